"""Triton block-sparse linear: Y[M, N] = act(X[M, K] @ W[N, K]^T + bias), W block-sparse.

One program computes a [BLOCK_M, rows] tile of Y: one block-row of W against one tile of
X rows, looping over that block-row's stored blocks with fp32 accumulation. Block-rows are
visited heaviest first (BSRWeight.row_order), so the long rows do not finish last.

Two paths, chosen per call:
- direct (large M, or enough block-rows to fill the GPU): bias and activation fused into
  the epilogue, one launch.
- split-K (M <= 64 with too few block-rows to keep every SM busy, the decode case): each
  block-row's blocks are split into `n_split` chunks (enough for SPLIT_WAVES programs per
  SM, a tuned parameter), programs atomically add fp32 partials into a zeroed buffer, and
  a small second kernel adds bias, applies the activation and casts. fp32 atomics make
  this path's rounding order nondeterministic.

On CUDA the launch configuration (BLOCK_M, warps, stages) is autotuned per shape bucket
(M rounded up to a power of two, N, K, block shape, dtype); Triton caches the choice in
memory and on disk, so a model pays the tuning once. On a CPU the same kernels run under
Triton's interpreter with one fixed configuration (correctness only; slow). bf16 `tl.dot`
is wrong in the interpreter (triton 3.9), so there the bf16 operands are upcast to fp32.
The kernels call only Triton builtins, no `@triton.jit` library helpers (tl.cdiv, tl.zeros,
tl.sigmoid): that lets them run under the interpreter even when TRITON_INTERPRET was unset
when Triton was imported.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from spdy_gpu.bsr import KERNEL_BLOCK_SIDES, BSRWeight
from spdy_gpu.errors import SpdyError

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")
SMALL_M = 64                # the split-K path is considered up to this many rows of X
INTERPRET_SMS = 4           # nominal "SM count" under the interpreter (keeps grids small)
# Globals a kernel reads must be tl.constexpr (Triton 3 refuses plain Python globals).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI_X2 = tl.constexpr(1.5957691216057308)    # 2 * sqrt(2 / pi)


def _bsr_linear_kernel(
    # pointers
    x_ptr, values_ptr, crow_ptr, col_ptr, order_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, n_rows,
    M_BUCKET,               # autotuning key only: M rounded up to a power of two
    # strides, in elements
    stride_xm, stride_xk, stride_ym, stride_yn,
    # compile-time
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,       # the weight's block shape
    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,       # tuned
    SPLIT_WAVES: tl.constexpr,      # tuned, read by the launch grid only: split-K programs per SM
    SPLIT: tl.constexpr,            # True: atomically add fp32 partials into y (no epilogue)
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    EVEN_K: tl.constexpr,           # K % BLOCK_K == 0: no column mask on X
    UPCAST: tl.constexpr,           # interpreter only: run the dot in fp32
    INPUT_PRECISION: tl.constexpr,  # fp32 operands: "ieee" (exact) or "tf32" (Tensor Cores)
):
    """x: [M, K]; values: [nnz, BLOCK_N, BLOCK_K]; crow: [n_rows + 1]; col: [nnz];
    order: [n_rows]; bias: [N]; y: [M, N] (fp32 when SPLIT). Grid: (n_rows * cdiv(M,
    BLOCK_M), n_split); program (p, s) takes chunk s of its block-row's blocks."""
    # Program -> (m tile, block-row). GROUP_M m-tiles sweep a block-row one after the other,
    # so its blocks come from L2 after the first read; rows start heaviest first.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    width = GROUP_M * n_rows
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_m
    row = tl.load(order_ptr + (pid % width) // group_m)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    if SPLIT:
        n_split = tl.num_programs(1)
        chunk = (end - start + n_split - 1) // n_split
        start = tl.minimum(start + tl.program_id(1) * chunk, end)
        end = tl.minimum(end, start + chunk)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = row * BLOCK_N + offs_bn
    m_ok = offs_m[:, None] < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm                   # [BM, 1]
    # A stored block is [BLOCK_N, BLOCK_K] row-major; read it as W^T: [BLOCK_K, BLOCK_N].
    w_ptrs = (values_ptr + start.to(tl.int64) * (BLOCK_N * BLOCK_K)
              + offs_k[:, None] + offs_bn[None, :] * BLOCK_K)
    col_ptrs = col_ptr + start

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for _ in range(0, end - start):
        k_idx = tl.load(col_ptrs) * BLOCK_K + offs_k
        if EVEN_K:
            x = tl.load(x_rows + k_idx[None, :] * stride_xk, mask=m_ok, other=0.0)
        else:
            x = tl.load(x_rows + k_idx[None, :] * stride_xk,
                        mask=m_ok & (k_idx[None, :] < K), other=0.0)
        w = tl.load(w_ptrs)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK_N * BLOCK_K
        col_ptrs += 1

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_ok & (offs_n[None, :] < N)
    if SPLIT:
        if start < end:
            tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")   # only atomicity needed
    else:
        # Epilogue (kept in step with _bias_act_kernel).
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == "relu":
            acc = tl.maximum(acc, 0.0)
        elif ACTIVATION == "gelu":
            acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
        elif ACTIVATION == "gelu_tanh":
            # 0.5 (1 + tanh(u)) = sigmoid(2 u), from exp(-|2 u|) so nothing overflows
            z = _SQRT_2_OVER_PI_X2 * (acc + 0.044715 * acc * acc * acc)
            e = tl.exp(-tl.abs(z))
            acc = acc * tl.where(z >= 0, 1.0, e) / (1.0 + e)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _bias_act_kernel(
    acc_ptr, bias_ptr, y_ptr,
    M, N,
    stride_am, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-K epilogue: y = act(acc + bias) cast to y's dtype. acc: [M, N] fp32 (unit
    column stride); y: [M, N]. Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.load(acc_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :],
                  mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
    elif ACTIVATION == "gelu_tanh":
        z = _SQRT_2_OVER_PI_X2 * (acc + 0.044715 * acc * acc * acc)
        e = tl.exp(-tl.abs(z))
        acc = acc * tl.where(z >= 0, 1.0, e) / (1.0 + e)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


_MAIN = triton.jit(_bsr_linear_kernel)
_FINISH = triton.jit(_bias_act_kernel)


# ---- launch configurations ----------------------------------------------------------------

# BLOCK_M -> (num_warps, num_stages) candidates. Small tiles serve M <= 64, large ones the
# rest. Stage counts are high on purpose: X's address depends on a loaded column index, and
# Triton 3.9's pipeliner spends stages on that indirection (num_stages 3-4 single- or
# double-buffers the tiles, 5-6 adds a buffer, 7 another; see _pipeline_buffers).
_CANDIDATES = {16: [(4, 5), (4, 7), (2, 5)], 32: [(4, 5), (4, 7)], 64: [(4, 5), (4, 7), (8, 5)],
               128: [(4, 5), (8, 5), (8, 3)], 256: [(8, 5), (8, 3)]}
# Split-K: fewer tiles, times how many programs per SM to aim for (memory parallelism).
_SPLIT_CANDIDATES = {16: [(4, 5), (4, 7)], 32: [(4, 5)], 64: [(4, 5)]}
_SPLIT_WAVES = (2, 4, 8)
_TUNE_KEY = ["M_BUCKET", "N", "K", "BLOCK_N", "BLOCK_K"]   # Triton adds the tensors' dtypes


def _configs(split: bool = False) -> list[triton.Config]:
    if split:
        return [triton.Config({"BLOCK_M": bm, "GROUP_M": 8, "SPLIT_WAVES": waves},
                              num_warps=w, num_stages=s)
                for bm, options in _SPLIT_CANDIDATES.items() for w, s in options
                for waves in _SPLIT_WAVES]
    return [triton.Config({"BLOCK_M": bm, "GROUP_M": 8, "SPLIT_WAVES": 1}, num_warps=w,
                          num_stages=s)
            for bm, options in _CANDIDATES.items() for w, s in options]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the tiles that suit the M bucket, keep their accumulators in registers and fit
    their pipeline in shared memory; where none fits (fp32 with 128-wide blocks), the
    smallest tile with as many stages as fit."""
    args = {**named_args, **kwargs}
    bucket, bn, bk = args["M_BUCKET"], args["BLOCK_N"], args["BLOCK_K"]
    item = args["x_ptr"].element_size()
    budget = _smem_bytes(args["x_ptr"].device)
    tiles = {16, 32, 64} if bucket <= SMALL_M else {64, 128, 256}
    # <= 64 fp32 accumulators per thread: more spilled registers in sm_90 builds.
    suited = [c for c in configs if c.kwargs["BLOCK_M"] in tiles and c.kwargs["BLOCK_M"] <= bucket
              and c.kwargs["BLOCK_M"] * bn <= 64 * 32 * c.num_warps] or configs

    def stage_bytes(c: triton.Config) -> int:
        return (c.kwargs["BLOCK_M"] * bk + bk * bn) * item

    def smem(c: triton.Config) -> int:
        return _pipeline_buffers(c.num_stages) * stage_bytes(c)

    fitting = [c for c in suited if smem(c) <= budget]
    if fitting:
        return fitting
    small = min(suited, key=lambda c: (stage_bytes(c), smem(c)))
    stages = max([s for s in range(1, small.num_stages + 1)
                  if _pipeline_buffers(s) * stage_bytes(small) <= budget], default=1)
    return [triton.Config(dict(small.kwargs), num_warps=small.num_warps, num_stages=stages)]


def _pipeline_buffers(num_stages: int) -> int:
    """Tile buffers Triton 3.9 allocates for this kernel (one level of load indirection),
    an upper bound read off compiled sm_90 kernels: 3-4 stages -> 2, 5-6 -> 3, 7 -> 4."""
    return (num_stages - 1) // 2 + 1


def _bench(fn, quantiles):
    # Short runs: tuning happens once per shape bucket, inside a model's first forward.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _tuned(split: bool) -> triton.runtime.Autotuner:
    return triton.autotune(configs=_configs(split), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune},
                           reset_to_zero=["y_ptr"] if split else None,
                           do_bench=_bench, cache_results=True)(_MAIN)


@functools.cache
def _interpreted(kernel) -> object:
    """The kernel run by Triton's CPU interpreter, whatever TRITON_INTERPRET said at import."""
    from triton.runtime.interpreter import InterpretedFunction
    return InterpretedFunction(kernel)


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 160 * 1024))


def _smem_bytes(device: torch.device) -> int:
    return _smem_limit(device.index or 0) if device.type == "cuda" else 160 * 1024


def _m_bucket(m: int) -> int:
    return max(16, min(triton.next_power_of_2(m), 4096))


def _use_split(weight: BSRWeight, m: int, device: torch.device, split_k: int | None) -> bool:
    """Split-K where M <= 64 and the block-rows give fewer than two programs per SM."""
    if split_k is not None:
        return split_k > 1
    return m <= SMALL_M and weight.n_block_rows < 2 * _sms(device)


def _split_count(weight: BSRWeight, programs: int, device: torch.device,
                 split_k: int | None, waves: int) -> int:
    """Chunks per block-row: enough for `waves` programs per SM, at most one block each."""
    most = max(weight.max_row_blocks, 1)
    wanted = split_k if split_k is not None else triton.cdiv(waves * _sms(device), programs)
    return max(1, min(int(wanted), most))


def _sms(device: torch.device) -> int:
    return _sm_count(device.index or 0) if device.type == "cuda" else INTERPRET_SMS


# ---- the launcher -------------------------------------------------------------------------

def bsr_linear(x: torch.Tensor, weight: BSRWeight, bias: torch.Tensor | None = None,
               activation: str | None = None, *, allow_tf32: bool | None = None,
               split_k: int | None = None, block_m: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ W^T + bias) with W block-sparse.

    x: [..., K] in the weight's dtype (fp32, fp16 or bf16), on the weight's device;
    bias: [N] (any float dtype) or None; activation: None, "relu", "gelu" (erf) or
    "gelu_tanh". Returns [..., N] in x's dtype; accumulation is fp32.
    allow_tf32: fp32 inputs only; None follows torch.backends.cuda.matmul.allow_tf32.
    split_k: force the split count (1 = direct path); None chooses (split-K for M <= 64
    when block-rows are too few to fill the GPU).
    block_m: force the M tile (16..256, a power of two) instead of autotuning.
    out: optional contiguous [..., N] result tensor in x's dtype (written, and returned).
    A CPU tensor runs the kernels under Triton's interpreter (slow; meant for tests).
    """
    _check(x, weight, bias, activation, block_m, out)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out.view(m, n)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    interpret = x.device.type != "cuda" or _interpret_env()
    split = _use_split(weight, m, x.device, split_k)
    # The split path accumulates in fp32: straight into y when y is fp32 with no epilogue.
    in_place = x.dtype == torch.float32 and bias is None and activation is None
    acc_buf = y if not split or in_place else torch.empty_like(y, dtype=torch.float32)
    if split:
        acc_buf.zero_()

    bn, bk = weight.block
    values, cols = weight.values, weight.col_indices
    if weight.nnz_blocks == 0:          # never read, but Triton needs real pointers
        values, cols = values.new_zeros(1, bn, bk), cols.new_zeros(1)
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    # "ieee" keeps fp32 exact; 16-bit operands ignore the setting (Triton's default is "tf32").
    precision = "ieee" if x.dtype == torch.float32 and not allow_tf32 else "tf32"
    args = (x2, values, weight.crow_indices, cols, weight.row_order,
            bias if bias is not None else y, acc_buf,
            m, n, k, weight.n_block_rows, _m_bucket(m),
            x2.stride(0), x2.stride(1), acc_buf.stride(0), acc_buf.stride(1))
    meta = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, HAS_BIAS=bias is not None,
                ACTIVATION=activation, EVEN_K=k % bk == 0,
                UPCAST=interpret and x.dtype == torch.bfloat16, INPUT_PRECISION=precision)

    def grid(cfg: dict) -> tuple[int, int]:
        programs = weight.n_block_rows * triton.cdiv(m, cfg["BLOCK_M"])
        if not split:
            return programs, 1
        return programs, _split_count(weight, programs, x.device, split_k, cfg["SPLIT_WAVES"])

    if interpret:
        fixed = dict(BLOCK_M=block_m or min(64, _m_bucket(m)), GROUP_M=4, SPLIT_WAVES=2)
        _interpreted(_bsr_linear_kernel)[grid](*args, **meta, **fixed)
    elif block_m is not None:
        _MAIN[grid](*args, **meta, BLOCK_M=block_m, GROUP_M=8, SPLIT_WAVES=4, num_warps=4,
                    num_stages=5)
    else:
        _tuned(split)[grid](*args, **meta)

    if acc_buf is not y:
        finish = _interpreted(_bias_act_kernel) if interpret else _FINISH
        bm_f, bn_f = 32, 128
        finish[(triton.cdiv(m, bm_f), triton.cdiv(n, bn_f))](
            acc_buf, bias if bias is not None else acc_buf, y, m, n,
            acc_buf.stride(0), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, ACTIVATION=activation, BLOCK_M=bm_f, BLOCK_N=bn_f)
    return y.reshape(*x.shape[:-1], n)


def _check(x: torch.Tensor, weight: BSRWeight, bias: torch.Tensor | None,
           activation: str | None, block_m: int | None, out: torch.Tensor | None) -> None:
    n, k = weight.shape
    problem = None
    if x.dtype != weight.dtype:
        problem = (f"input dtype {x.dtype} differs from the weight's {weight.dtype}; "
                   "cast one of them (x.to(dtype) or weight.to(dtype=...))")
    elif x.dim() < 1 or x.shape[-1] != k:
        problem = f"input of shape {tuple(x.shape)} does not end in K={k}; pass [..., {k}]"
    elif x.device != weight.device or (bias is not None and bias.device != x.device):
        problem = "input, weight and bias must be on one device; move them with .to(device)"
    elif x.device.type not in ("cuda", "cpu"):
        problem = f"device {x.device} is not supported; use CUDA (or the CPU interpreter)"
    elif any(side not in KERNEL_BLOCK_SIDES for side in weight.block):
        problem = (f"block {weight.block} is not supported by the kernel (sides must be in "
                   f"{KERNEL_BLOCK_SIDES}); repack with block=spdy_gpu.bsr.kernel_block(...)")
    elif bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        problem = f"bias must be a float tensor of shape ({n},), got {tuple(bias.shape)}"
    elif activation not in ACTIVATIONS:
        problem = f"unknown activation {activation!r}; use one of {ACTIVATIONS}"
    elif block_m is not None and block_m not in (16, 32, 64, 128, 256):
        problem = f"block_m={block_m} must be a power of two in 16..256"
    elif out is not None and (out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype
                              or out.device != x.device or not out.is_contiguous()):
        problem = (f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], n)} "
                   f"on {x.device}; got {out.dtype} {tuple(out.shape)}")
    if problem is not None:
        raise SpdyError(f"bsr_linear: {problem}")
