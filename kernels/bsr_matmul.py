"""Triton block-sparse linear: Y[M, N] = act(X[M, K] @ W[N, K]^T + bias), W block-sparse.

Raw tensors in (this package imports nothing from spdy_gpu): W is given in block-sparse
row form, `values` [nnz, BN, BK] (blocks block-row by block-row), `crow_indices` [R + 1],
`col_indices` [nnz], plus three index arrays a packer computes once per weight
(layout.layout_indices): `row_order` (block-rows heaviest first), `block_rows` (the
block-row of each stored block) and `empty_rows` (block-rows without blocks).

The weight block sits on the MMA's M side and a tile of BLOCK_T tokens on its N side:
a program accumulates acc[BN, BLOCK_T] += W_block[BN, BK] @ X^T[BK, BLOCK_T], so on Hopper
a 64-row block is one wgmma of N = BLOCK_T (up to 256) instead of N = block width. Loads
go through TMA descriptors where the layout allows (Hopper, X with unit column stride and
16-byte aligned rows) and through pointers otherwise. Two schedules, chosen per call:

- direct (M > 64): one program per (token tile, block-row); bias and activation in the
  epilogue. Block-rows are visited heaviest first, GROUP_T token tiles per block-row in a
  row so its blocks come from L2 after the first read.
- stream-K (M <= 64, the decode case: too few block-rows to fill the GPU): P programs
  (a few per SM) split the stored blocks evenly, crossing block-row boundaries. A program
  that owns a whole block-row finishes it itself; partial rows are added into an fp32
  workspace, and the program that arrives last at a row (a per-row counter) reads the sum,
  applies the epilogue, writes Y and zeroes the workspace and counter again. One launch,
  no memset: the workspace is self-cleaning. fp32 atomics make the order of the partial
  sums, and so the last bits of stream-K results, nondeterministic.

On CUDA the launch configuration is autotuned per (M bucket, N, K, block, density bucket,
dtype) and kept for the process (a pre-hook sets the TMA boxes per configuration, which
keeps the choice off Triton's disk cache: each process tunes once per bucket). For M <= 64
the schedule is part of the configuration: stream-K competes with direct launches of one
token tile (a program per block-row, no atomics), which may win where few blocks are left
and stream-K's per-row bookkeeping dominates (not yet measured on a GPU). On a CPU
the same kernel runs under Triton's interpreter with one fixed configuration (correctness
only, slow). bf16 `tl.dot` is wrong in the
interpreter (triton 3.9): there bf16 operands are upcast to fp32. The kernel calls only
Triton builtins, no `@triton.jit` library helpers (tl.cdiv, tl.zeros...), so it also runs
under the interpreter when TRITON_INTERPRET was unset at import.
"""

from __future__ import annotations

import functools
import numbers
import re

import numpy as np
import torch
import triton
import triton.language as tl

from .layout import (
    ACTIVATIONS,
    BLOCK_SIDES,
    DTYPES,
    KernelInputError,
    LayoutIndices,
    input_problem,
    interpret_requested,
    layout_indices,
    layout_problem,
)

__all__ = ["ACTIVATIONS", "BLOCK_SIDES", "DTYPES", "KernelInputError", "LayoutIndices",
           "bsr_linear", "compile_for", "layout_indices"]

SMALL_M = 64                # stream-K up to this many rows of X (one token tile)
INTERPRET_SMS = 4           # nominal "SM count" under the interpreter (keeps grids small)
WORKSPACE_COLS = SMALL_M    # the stream-K workspace holds [N, 64] fp32 partial sums
# Globals a kernel reads must be tl.constexpr (Triton 3 refuses plain Python globals).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI_X2 = tl.constexpr(1.5957691216057308)    # 2 * sqrt(2 / pi)
_WS_COLS = tl.constexpr(WORKSPACE_COLS)


def _bsr_linear_kernel(
    # operands: x_desc / w_desc are TMA descriptors when USE_TMA, else unused tensors
    x_ptr, x_desc, w_ptr, w_desc, bias_ptr, y_ptr,
    # layout
    crow_ptr, col_ptr, order_ptr, block_row_ptr, empty_ptr,
    # stream-K workspace: [n_rows * BLOCK_N, _WS_COLS] fp32 and [n_rows] int32, both zero
    ws_ptr, count_ptr,
    # sizes
    M, N, K, n_rows, nnz, n_empty,
    M_BUCKET, DENSITY_BUCKET,       # autotuning key only
    stride_xm, stride_xk, stride_ym, stride_yn,
    # compile-time
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,       # the weight's block shape
    BLOCK_T: tl.constexpr, GROUP_T: tl.constexpr,       # tuned (stream-K: BLOCK_T >= M)
    WAVES: tl.constexpr,            # tuned, read by the launch grid only: stream-K programs per SM
    STREAM_K: tl.constexpr,         # tuned for M <= 64 (else direct), or forced by the caller
    USE_TMA: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    EVEN_K: tl.constexpr,           # K % BLOCK_K == 0: no column mask on X
    UPCAST: tl.constexpr,           # interpreter only: run the dot in fp32
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "ieee" (exact) or "tf32" (Tensor Cores)
):
    """Grid: direct (n_rows * cdiv(M, BLOCK_T),); stream-K (P,) with P <= max(nnz, 1)."""
    pid = tl.program_id(0)
    if STREAM_K:
        n_prog = tl.num_programs(0)
        t0 = 0
        lo = (pid.to(tl.int64) * nnz // n_prog).to(tl.int32)
        hi = ((pid.to(tl.int64) + 1) * nnz // n_prog).to(tl.int32)
        empty_next = pid                # this program's share of the empty rows: pid, pid + P...
    else:
        # Program -> (token tile, block-row): GROUP_T tiles sweep a block-row one after the
        # other, so its blocks come from L2 after the first read; rows start heaviest first.
        num_t = (M + BLOCK_T - 1) // BLOCK_T
        width = GROUP_T * n_rows
        first_t = (pid // width) * GROUP_T
        group_t = tl.minimum(num_t - first_t, GROUP_T)
        t0 = (first_t + (pid % width) % group_t) * BLOCK_T
        row = tl.load(order_ptr + (pid % width) // group_t)
        lo = tl.load(crow_ptr + row)
        hi = tl.load(crow_ptr + row + 1)
        empty_next = n_empty            # direct programs write their own (maybe empty) row

    offs_bn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_ok = offs_t[None, :] < M
    x_cols = x_ptr + offs_t.to(tl.int64)[None, :] * stride_xm                # [1, BT]

    # Each pass of this loop finishes one segment: the blocks [seg_lo, seg_hi) of one row.
    seg_lo = lo
    if STREAM_K:
        go = (lo < hi) | (empty_next < n_empty)
    else:
        go = lo <= hi                   # one pass, also for an empty row
    while go:
        if STREAM_K:
            if seg_lo < hi:
                row = tl.load(block_row_ptr + seg_lo)
            else:                       # an empty row: no blocks, the epilogue of zeros
                row = tl.load(empty_ptr + empty_next)
                empty_next += n_prog
        row_lo = tl.load(crow_ptr + row)
        row_hi = tl.load(crow_ptr + row + 1)
        seg_hi = tl.minimum(row_hi, hi)
        partial = False
        if STREAM_K:
            if seg_lo < hi:
                partial = (seg_lo > row_lo) | (seg_hi < row_hi)
            else:
                seg_hi = seg_lo         # an empty row: no blocks to visit

        acc = tl.full((BLOCK_N, BLOCK_T), 0.0, tl.float32)
        w_ptrs = (w_ptr + seg_lo.to(tl.int64) * (BLOCK_N * BLOCK_K)
                  + offs_bn[:, None] * BLOCK_K + offs_k[None, :])            # [BN, BK]
        col_ptrs = col_ptr + seg_lo
        for b in range(seg_lo, seg_hi):
            col = tl.load(col_ptrs)
            if USE_TMA:
                w = w_desc.load([b * BLOCK_N, 0])                            # [BN, BK]
                xt = tl.trans(x_desc.load([t0, col * BLOCK_K]))              # [BK, BT]
            else:
                w = tl.load(w_ptrs)
                k_idx = col.to(tl.int64) * BLOCK_K + offs_k
                x_ptrs = x_cols + k_idx[:, None] * stride_xk
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=t_ok, other=0.0)
                else:
                    xt = tl.load(x_ptrs, mask=t_ok & (k_idx[:, None] < K), other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(w, xt, acc, input_precision=INPUT_PRECISION)
            w_ptrs += BLOCK_N * BLOCK_K
            col_ptrs += 1

        offs_n = row * BLOCK_N + offs_bn
        finish = True
        if STREAM_K:
            if partial:
                # A partial row: add it in; the last of the row's programs finishes it.
                # Only the M live columns: at M = 1 a 16-token tile would add 16x the sums.
                ws_ptrs = (ws_ptr + offs_n.to(tl.int64)[:, None] * _WS_COLS
                           + tl.arange(0, BLOCK_T)[None, :])
                tl.atomic_add(ws_ptrs, acc, mask=t_ok, sem="relaxed")
                tl.debug_barrier()          # every thread's partial is in before the count
                arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
                first = ((row_lo.to(tl.int64) + 1) * n_prog - 1) // nnz    # owner of row_lo
                last = (row_hi.to(tl.int64) * n_prog - 1) // nnz           # owner of row_hi - 1
                finish = arrived == last - first
                if finish:
                    acc = tl.load(ws_ptrs, mask=t_ok, other=0.0,
                                  cache_modifier=".cg")                    # L2: atomics live there
                    tl.store(ws_ptrs, tl.full((BLOCK_N, BLOCK_T), 0.0, tl.float32), mask=t_ok)
                    tl.atomic_xchg(count_ptr + row, 0)
        if finish:
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
                acc += bias.to(tl.float32)[:, None]
            if ACTIVATION == "relu":
                acc = tl.maximum(acc, 0.0)
            elif ACTIVATION == "gelu":
                acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
            elif ACTIVATION == "gelu_tanh":
                # 0.5 (1 + tanh(u)) = sigmoid(2 u), from exp(-|2 u|) so nothing overflows
                z = _SQRT_2_OVER_PI_X2 * (acc + 0.044715 * acc * acc * acc)
                e = tl.exp(-tl.abs(z))
                acc = acc * tl.where(z >= 0, 1.0, e) / (1.0 + e)
            y_ptrs = (y_ptr + offs_t.to(tl.int64)[None, :] * stride_ym
                      + offs_n.to(tl.int64)[:, None] * stride_yn)
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok & (offs_n[:, None] < N))
        seg_lo = seg_hi
        if STREAM_K:
            go = (seg_lo < hi) | (empty_next < n_empty)
        else:
            go = seg_lo > hi


_KERNEL = triton.jit(_bsr_linear_kernel)


# ---- launch configurations ----------------------------------------------------------------

# direct: BLOCK_T -> (num_warps, num_stages) candidates; stream-K tiles are fixed by M.
# Stages 4-5 keep 3-4 tiles in flight (Triton allocates stages - 1 buffers); 3 where the
# tiles are large. BLOCK_T 0 stands for one tile of M's bucket (set by _prune): stream-K's
# always, and the direct schedule's for M <= 64 (_DIRECT_ONE_TILE).
_DIRECT = {64: [(4, 4), (4, 5)], 128: [(4, 3), (4, 4), (8, 4)], 256: [(8, 3), (8, 4)]}
_DIRECT_ONE_TILE = [(4, 4), (4, 5)]
_STREAM = [(4, 4), (4, 5), (8, 4)]
# Stream-K programs per SM. On an H200 (gpu-suite 2026-11-26) 4, the largest offered, won
# 13 of the 17 tuned stream-K cases, the large weights faster at each step from 1 to 2 to 4
# (4096x11008 at M = 1: 33, 27, 25 us; 14336x4096 with 32x32 blocks: 110, 68, 48 us): 8
# extends the trend for the tuner to try.
_WAVES = (1, 2, 4, 8)
_TUNE_KEY = ["M_BUCKET", "N", "K", "BLOCK_N", "BLOCK_K", "DENSITY_BUCKET"]  # + dtypes (Triton)
_ACC_PER_THREAD = 128       # fp32 accumulators per thread at most (a 128 x 256 tile on 8 warps)


def _configs(stream: bool, direct: bool) -> list[triton.Config]:
    """The launch configurations of the schedules asked for (STREAM_K is a config value)."""
    def config(stream_k: bool, block_t: int, group_t: int, waves: int, warps: int,
               stages: int) -> triton.Config:
        return triton.Config({"BLOCK_T": block_t, "GROUP_T": group_t, "WAVES": waves,
                              "STREAM_K": stream_k}, num_warps=warps, num_stages=stages,
                             pre_hook=_set_boxes)

    configs = []
    if stream:
        configs += [config(True, 0, 1, waves, w, s) for w, s in _STREAM for waves in _WAVES]
    if direct:
        configs += [config(False, bt, 8, 1, w, s) for bt, options in _DIRECT.items()
                    for w, s in options]
        configs += [config(False, 0, 8, 1, w, s) for w, s in _DIRECT_ONE_TILE]
    return configs


def _schedules(m: int, stream_k: int | None) -> tuple[bool, bool]:
    """(stream-K, direct): the schedules a CUDA call at M rows may be tuned over."""
    if stream_k is None:
        return m <= SMALL_M, True
    return stream_k > 0, stream_k == 0


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Stream-K: the token tile is M's bucket. Direct: one tile of M's bucket where M <= 64,
    and tiles no taller than the M bucket; of these, those whose accumulators fit in
    registers and whose pipeline fits in shared memory; where none fits, the smallest tile
    with as many stages as fit."""
    args = {**named_args, **kwargs}
    bucket, bn, bk = args["M_BUCKET"], args["BLOCK_N"], args["BLOCK_K"]
    item = args["x_ptr"].element_size()
    budget = _smem_bytes(args["x_ptr"].device)
    one_tile = {}                       # the bucket's tile in place of 0, duplicates dropped
    for c in configs:
        if c.kwargs["BLOCK_T"] or c.kwargs["STREAM_K"] or bucket <= SMALL_M:
            c = triton.Config({**c.kwargs, "BLOCK_T": c.kwargs["BLOCK_T"] or bucket},
                              num_warps=c.num_warps, num_stages=c.num_stages,
                              pre_hook=c.pre_hook)
            one_tile.setdefault((*sorted(c.kwargs.items()), c.num_warps, c.num_stages), c)
    configs = list(one_tile.values())
    suited = [c for c in configs
              if (c.kwargs["STREAM_K"] or c.kwargs["BLOCK_T"] <= max(bucket, 64))
              and bn * c.kwargs["BLOCK_T"] <= _ACC_PER_THREAD * 32 * c.num_warps] or configs

    def smem(c: triton.Config, stages: int) -> int:
        return _shared_bytes(bn, bk, c.kwargs["BLOCK_T"], item, stages)

    fitting = [c for c in suited if smem(c, c.num_stages) <= budget]
    if fitting:
        return fitting
    small = min(suited, key=lambda c: smem(c, 1))
    stages = max([s for s in range(1, small.num_stages + 1) if smem(small, s) <= budget],
                 default=1)
    return [triton.Config(dict(small.kwargs), num_warps=small.num_warps, num_stages=stages,
                          pre_hook=small.pre_hook)]


def _shared_bytes(bn: int, bk: int, block_t: int, item: int, num_stages: int) -> int:
    """Shared memory of a launch: the pipelined W and X tiles, or the fp32 tile the epilogue
    transposes through, whichever is larger (read off compiled sm_90 kernels, Triton 3.9)."""
    return max(_pipeline_buffers(num_stages) * (bn + block_t) * bk * item, bn * block_t * 4)


def _pipeline_buffers(num_stages: int) -> int:
    """Tile buffers Triton 3.9 allocates for this kernel: one per stage but the last, read
    off compiled sm_90 kernels (TMA and cp.async alike)."""
    return max(num_stages - 1, 1)


def _bench(fn, quantiles):
    # Short runs: tuning happens once per shape bucket, inside a model's first forward.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _tuned(stream: bool, direct: bool) -> triton.runtime.Autotuner:
    """The autotuner over the configurations of these schedules (_schedules)."""
    # The workspace needs no reset between tuning runs: every run leaves it zeroed.
    return triton.autotune(configs=_configs(stream, direct), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune},
                           do_bench=_bench, cache_results=True)(_KERNEL)


@functools.cache
def _interpreted() -> object:
    """The kernel run by Triton's CPU interpreter, whatever TRITON_INTERPRET said at import."""
    from triton.runtime.interpreter import InterpretedFunction

    problem = interpreter_problem(triton.__version__, np.__version__)
    if problem:
        raise KernelInputError(problem)
    return InterpretedFunction(_bsr_linear_kernel)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run this kernel with these versions (None: it can).
    Up to Triton 3.6 the interpreter turns a loop bound read from memory into a Python int
    with int() of a one-element array, which NumPy 2.4 refuses (seen with 3.6; 3.7, 3.8, 3.9
    and 3.6 with NumPy 2.3 work; releases before 3.6 are taken to share 3.6's code)."""
    def major_minor(version: str) -> tuple[int, int]:
        found = re.match(r"(\d+)\.(\d+)", version)
        return (int(found[1]), int(found[2])) if found else (0, 0)

    if major_minor(triton_version) <= (3, 6) and major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter cannot run the kernel with NumPy "
                f"{numpy_version} (loop bounds read from memory fail from NumPy 2.4 on); "
                "install triton>=3.7 or numpy<2.4")
    return None


@functools.cache
def _device_props(index: int) -> tuple[int, int, tuple[int, int]]:
    props = torch.cuda.get_device_properties(index)
    smem = int(getattr(props, "shared_memory_per_block_optin", 160 * 1024))
    return props.multi_processor_count, smem, (props.major, props.minor)


def _sms(device: torch.device) -> int:
    return _device_props(device.index or 0)[0] if device.type == "cuda" else INTERPRET_SMS


def _smem_bytes(device: torch.device) -> int:
    return _device_props(device.index or 0)[1] if device.type == "cuda" else 160 * 1024


def _m_bucket(m: int) -> int:
    # triton.next_power_of_2 costs ~2 us a call (a constexpr-function wrapper); twice per launch
    return max(16, min(1 << max(m - 1, 0).bit_length(), 4096))


def _density_bucket(nnz: int, n_rows: int, n_cols: int) -> int:
    """Density in steps of 1/8 (0 = empty .. 8 = dense): the autotune key's density."""
    return round(8 * nnz / max(n_rows * n_cols, 1))


def _use_stream_k(m: int, stream_k: int | None) -> bool:
    return m <= SMALL_M if stream_k is None else stream_k > 0


def _stream_programs(nnz: int, device: torch.device, stream_k: int | None, waves: int) -> int:
    """Stream-K programs: `waves` per SM (or `stream_k`), never more than the stored blocks."""
    wanted = stream_k if stream_k else waves * _sms(device)
    return max(1, min(int(wanted), nnz))


def _tma_layout_ok(x2: torch.Tensor, values: torch.Tensor) -> bool:
    """TMA descriptors need unit inner strides and 16-byte aligned bases and rows."""
    item = x2.element_size()
    return (x2.stride(1) == 1 and (x2.stride(0) * item) % 16 == 0 and x2.data_ptr() % 16 == 0
            and values.is_contiguous() and values.data_ptr() % 16 == 0)


def _tma_ok(x2: torch.Tensor, values: torch.Tensor) -> bool:
    """TMA where the hardware has it (Hopper or newer) and the layout allows."""
    return (x2.device.type == "cuda" and not interpret_requested()
            and _device_props(x2.device.index or 0)[2] >= (9, 0) and _tma_layout_ok(x2, values))


# ---- ahead-of-time compilation (no GPU needed) ---------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_for(config: triton.Config, dtype: torch.dtype, block: tuple[int, int],
                stream_k: bool, tma: bool, arch: int = 90):
    """The kernel compiled for CUDA compute capability `arch` (e.g. 90 = H100) without a GPU,
    specialised as a launch would be (16-byte aligned pointers, unit inner strides, N, K and
    row strides divisible by 16, bias and GELU): read its `.asm` and `.metadata.shared`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction  # compiled even under TRITON_INTERPRET=1

    bn, bk = block
    name = _TRITON_TYPES[dtype]
    types = {arg: "*" + name for arg in ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")}
    types |= {arg: "*i32" for arg in ("crow_ptr", "col_ptr", "order_ptr", "block_row_ptr",
                                      "empty_ptr", "count_ptr")}
    types |= {"ws_ptr": "*fp32",
              "x_desc": f"tensordesc<{name}[{config.kwargs['BLOCK_T']}, {bk}]>" if tma
              else "*" + name,
              "w_desc": f"tensordesc<{name}[{bn}, {bk}]>" if tma else "*" + name}
    constants = {**config.kwargs, **dict(
        BLOCK_N=bn, BLOCK_K=bk, STREAM_K=stream_k, USE_TMA=tma, HAS_BIAS=True,
        ACTIVATION="gelu", EVEN_K=True, UPCAST=False,
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", stride_xk=1,
        stride_yn=1)}
    kernel = JITFunction(_bsr_linear_kernel)
    names = kernel.arg_names
    signature, attrs = {}, {}
    for i, arg in enumerate(names):
        if arg in constants:
            signature[arg] = "constexpr"
            continue
        signature[arg] = types.get(arg, "i32")
        if signature[arg].startswith("*") or arg in ("N", "K", "stride_xm", "stride_ym"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature,
                       {(names.index(k),): v for k, v in constants.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps,
                                   "num_stages": config.num_stages})


# ---- the stream-K workspace ---------------------------------------------------------------

_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []   # outgrown workspaces: a captured CUDA graph may use them


def _workspace(device: torch.device, rows: int,
               block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 [rows, 64] partial sums and int32 [block_rows] counters, shared by every
    call on this device and stream (each stream-K launch leaves them zeroed). Grown on
    demand, at least doubling; an outgrown one is kept alive, since a CUDA graph captured
    earlier still points at it."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    ws, counts = _WORKSPACES.get((device, stream), (None, None))
    if ws is None or ws.shape[0] < rows:
        if ws is not None:
            _RETIRED.append(ws)
        grown = rows if ws is None else max(rows, 2 * ws.shape[0])
        ws = torch.zeros(grown, WORKSPACE_COLS, device=device, dtype=torch.float32)
    if counts is None or counts.numel() < block_rows:
        if counts is not None:
            _RETIRED.append(counts)
        grown = block_rows if counts is None else max(block_rows, 2 * counts.numel())
        counts = torch.zeros(grown, device=device, dtype=torch.int32)
    _WORKSPACES[(device, stream)] = ws, counts
    return ws, counts


# ---- the launcher -------------------------------------------------------------------------

def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
               col_indices: torch.Tensor, shape: tuple[int, int],
               bias: torch.Tensor | None = None, activation: str | None = None, *,
               indices: LayoutIndices | None = None, allow_tf32: bool | None = None,
               stream_k: int | None = None, block_t: int | None = None,
               tma: bool | None = None, out: torch.Tensor | None = None,
               check_indices: bool | None = None) -> torch.Tensor:
    """act(x @ W^T + bias) with W [N, K] = `shape` block-sparse.

    x: [..., K] in the values' dtype (fp32, fp16 or bf16), on their device; values
    [nnz, BN, BK] with block sides in BLOCK_SIDES; crow_indices [ceil(N / BN) + 1] and
    col_indices [nnz] int32; bias [N] (any float dtype) or None; activation: None, "relu",
    "gelu" (erf) or "gelu_tanh". Returns [..., N] in x's dtype; accumulation is fp32.
    indices: layout_indices(crow_indices), computed once per weight (None: computed now).
    allow_tf32: fp32 inputs only; None follows torch.backends.cuda.matmul.allow_tf32.
    stream_k: None chooses (stream-K for M <= 64), 0 forces the direct schedule, n > 0
    runs stream-K with n programs (M <= 64 only).
    block_t: the direct schedule's token tile (16..256, a power of two) instead of tuning.
    tma: None uses TMA descriptors where the layout allows (Hopper and newer); False forces
    pointer loads; True forces descriptors (the interpreter emulates them).
    out: optional contiguous [..., N] result tensor in x's dtype (written, and returned).
    check_indices: check the index layout's contents (layout_problem); None: on the CPU only,
    since on a GPU it costs a sync per call (BSRWeight checks its layout once when built).
    values, indices and bias must be contiguous; x may be strided. A CPU tensor runs under
    Triton's interpreter (slow; meant for tests).
    """
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(
            isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in shape)):
        raise KernelInputError(f"bsr_linear: shape must be the weight's (N, K) as two ints, "
                               f"got {shape!r}")
    for name, value in (("stream_k", stream_k), ("block_t", block_t)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise KernelInputError(f"bsr_linear: {name} must be an int or None, got "
                                   f"{type(value).__name__} {value!r}")
    if indices is not None and not isinstance(indices, LayoutIndices):
        raise KernelInputError(f"bsr_linear: indices must be layout_indices(crow_indices), a "
                               f"LayoutIndices, got {type(indices).__name__}")
    n, k = int(shape[0]), int(shape[1])
    checking = check_indices or (check_indices is None and isinstance(x, torch.Tensor)
                                 and x.device.type == "cpu")
    _check(x, values, crow_indices, col_indices, (n, k), bias, activation, stream_k, block_t,
           out, checking)
    if checking and indices is not None and not _indices_match(indices, crow_indices):
        raise KernelInputError("bsr_linear: indices belong to another layout; pass "
                               "layout_indices(crow_indices) of this weight")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out.view(m, n)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    indices = indices or layout_indices(crow_indices)
    interpret = x.device.type != "cuda" or interpret_requested()
    stream_ok, direct_ok = _schedules(m, stream_k)
    # untuned launches (the interpreter, a fixed block_t: always the direct schedule's tile)
    use_stream = _use_stream_k(m, stream_k) and block_t is None
    bn, bk = int(values.shape[1]), int(values.shape[2])
    n_rows, nnz = crow_indices.numel() - 1, int(values.shape[0])
    n_empty = int(indices.empty_rows.numel())
    cols, block_rows, empty = col_indices, indices.block_rows, indices.empty_rows
    if nnz == 0:                        # never read, but Triton needs real pointers
        values, cols, block_rows = values.new_zeros(1, bn, bk), crow_indices, crow_indices
    if n_empty == 0:
        empty = crow_indices
    ws, counts = _workspace(x.device, n_rows * bn, n_rows) if stream_ok else (y, crow_indices)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    # "ieee" keeps fp32 exact; 16-bit operands ignore the setting (Triton's default is "tf32").
    precision = "ieee" if x.dtype == torch.float32 and not allow_tf32 else "tf32"
    use_tma = _tma_ok(x2, values) if tma is None else tma
    if use_tma and not _tma_layout_ok(x2, values):
        raise KernelInputError("bsr_linear: tma=True needs x with unit column stride and "
                               "16-byte aligned rows; pass tma=None to fall back to pointers")
    x_desc, w_desc = x2, values
    if use_tma:     # boxes are set per launch configuration (_set_boxes)
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor.from_tensor(x2, [16, bk])
        w_desc = TensorDescriptor.from_tensor(values.view(-1, bk), [bn, bk])
    args = (x2, x_desc, values, w_desc, bias if bias is not None else y, y,
            crow_indices, cols, indices.row_order, block_rows, empty, ws, counts,
            m, n, k, n_rows, nnz, n_empty, _m_bucket(m),
            _density_bucket(nnz, n_rows, -(-k // bk)),
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1))
    meta = dict(BLOCK_N=bn, BLOCK_K=bk, USE_TMA=use_tma,
                HAS_BIAS=bias is not None, ACTIVATION=activation, EVEN_K=k % bk == 0,
                UPCAST=interpret and x.dtype == torch.bfloat16, INPUT_PRECISION=precision)

    def grid(cfg: dict) -> tuple[int]:
        if cfg["STREAM_K"]:
            return (_stream_programs(nnz, x.device, stream_k, cfg["WAVES"]),)
        return (n_rows * triton.cdiv(m, cfg["BLOCK_T"]),)

    tile = _m_bucket(m) if use_stream else block_t
    if interpret:
        fixed = dict(BLOCK_T=tile or min(64, _m_bucket(m)), GROUP_T=4, WAVES=2,
                     STREAM_K=use_stream)
        _set_boxes({**dict(zip(_KERNEL.arg_names, args)), **meta, **fixed})
        _interpreted()[grid](*args, **meta, **fixed)
    elif block_t is not None:
        fixed = dict(BLOCK_T=block_t, GROUP_T=8, WAVES=2, STREAM_K=use_stream)
        _set_boxes({**dict(zip(_KERNEL.arg_names, args)), **meta, **fixed})
        _KERNEL[grid](*args, **meta, **fixed, num_warps=8 if bn * block_t > 8192 else 4,
                      num_stages=3 if bn * block_t > 8192 else 4)
    else:
        _tuned(stream_ok, direct_ok)[grid](*args, **meta)
    return y.reshape(*x.shape[:-1], n)


def _set_boxes(nargs: dict) -> None:
    """TMA boxes follow the launch configuration's tiles (an autotuning pre-hook)."""
    if nargs["USE_TMA"]:
        nargs["x_desc"].block_shape = [nargs["BLOCK_T"], nargs["BLOCK_K"]]
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _check(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
           shape: tuple[int, int], bias: torch.Tensor | None, activation: str | None,
           stream_k: int | None, block_t: int | None, out: torch.Tensor | None,
           check_indices: bool) -> None:
    n, k = shape
    problem = None
    tensors = {"x": x, "values": values, "crow_indices": crow, "col_indices": col,
               **({} if bias is None else {"bias": bias})}
    given = {**tensors, **({} if out is None else {"out": out})}
    not_tensor = next((name for name, t in given.items() if not isinstance(t, torch.Tensor)),
                      None)
    if not_tensor is not None:
        raise KernelInputError(f"bsr_linear: {not_tensor} must be a torch.Tensor, got "
                               f"{type(given[not_tensor]).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, values, bias)
                                       if t is not None):
        raise KernelInputError("bsr_linear: an input requires grad, and the raw kernel has no "
                               "backward; call torch.ops.spdy_kernels.bsr_linear (registered "
                               "by import spdy_kernels.ops), which has one, or run under "
                               "torch.no_grad()")
    strided = next((name for name, t in tensors.items()
                    if name != "x" and not t.is_contiguous()), None)
    if n < 1 or k < 1:
        problem = f"the weight shape {(n, k)} must be positive"
    elif strided is not None:
        problem = (f"{strided} must be contiguous (the kernel reads it densely); pass "
                   f"{strided}.contiguous()")
    elif values.dim() != 3 or values.dtype not in DTYPES:
        problem = (f"values must be [nnz, rows, cols] in float32, float16 or bfloat16, got "
                   f"{values.dtype} {tuple(values.shape)}")
    elif any(int(side) not in BLOCK_SIDES for side in values.shape[1:]):
        problem = (f"block {tuple(values.shape[1:])} is not supported (sides must be in "
                   f"{BLOCK_SIDES}); repack the weight with one of them")
    elif (problem := input_problem(x, k, values)) is not None:
        pass
    elif (crow.dtype != torch.int32 or col.dtype != torch.int32
          or crow.numel() != -(-n // values.shape[1]) + 1 or col.numel() != values.shape[0]):
        problem = (f"crow_indices must be int32 of length ceil(N / {values.shape[1]}) + 1 and "
                   "col_indices int32, one per block; repack the weight")
    elif any(t.device != x.device for t in (crow, col)) or (
            bias is not None and bias.device != x.device):
        problem = "input, weight and bias must be on one device; move them with .to(device)"
    elif x.device.type not in ("cuda", "cpu"):
        problem = f"device {x.device} is not supported; use CUDA (or the CPU interpreter)"
    elif bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        problem = f"bias must be a float tensor of shape ({n},), got {tuple(bias.shape)}"
    elif activation not in ACTIVATIONS:
        problem = f"unknown activation {activation!r}; use one of {ACTIVATIONS}"
    elif stream_k is not None and (stream_k < 0 or stream_k > 0 and x.numel() > SMALL_M * k):
        problem = f"stream_k={stream_k} needs M <= {SMALL_M} rows and a count >= 0"
    elif block_t is not None and block_t not in (16, 32, 64, 128, 256):
        problem = f"block_t={block_t} must be a power of two in 16..256"
    elif block_t is not None and stream_k:
        problem = (f"block_t sets the direct schedule's token tile, and stream_k={stream_k} "
                   "asks for stream-K; pass one of them")
    elif out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype
                              or out.device != x.device or not out.is_contiguous()):
        problem = (f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], n)} "
                   f"on {x.device}; got {out.dtype} {tuple(out.shape)}")
    elif out is not None and _overlap(out, (x, values, *(() if bias is None else (bias,)))):
        problem = "out shares memory with an input, which the kernel still reads; pass a new tensor"
    if problem is None and check_indices:
        problem = layout_problem(crow, col, values.shape[0], -(-k // values.shape[2]))
    if problem is not None:
        raise KernelInputError(f"bsr_linear: {problem}")


def _overlap(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether `out`'s storage bytes overlap any of `inputs`'."""
    def span(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return start, start + (extent + 1) * t.element_size()

    if out.numel() == 0:
        return False
    lo, hi = span(out)
    return any(t.numel() and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
               and span(t)[0] < hi and lo < span(t)[1] for t in inputs)


def _indices_match(indices: LayoutIndices, crow: torch.Tensor) -> bool:
    """Whether `indices` fit the layout `crow`: its block-rows and empty rows, and an order
    of the rows (any permutation: the order only schedules the work)."""
    expected = layout_indices(crow)
    rows = torch.arange(crow.numel() - 1, device=crow.device)
    return (torch.equal(indices.block_rows, expected.block_rows)
            and torch.equal(indices.empty_rows, expected.empty_rows)
            and torch.equal(indices.row_order.sort().values.long(), rows))
