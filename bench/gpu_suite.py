"""GPU suite: the block-sparse kernel against cuBLAS, PyTorch's Triton BSR kernel (default
and tuned), 2:4 semi-structured sparsity and the roofline, in one command.

    python bench/gpu_suite.py [--quick] [--out bench/results]
    python bench/gpu_suite.py --cpu-check [--out DIR]   # no GPU: check the script itself
    python bench/gpu_suite.py --reevaluate FILE.json    # this version's targets, same data

On a CUDA GPU, in this order (one process, so a 10-minute call holds all of it):
1. Correctness, before any timing: every block shape (16x16, 32x32, 64x64, 128x128, 64x32,
   64x16), both schedules (stream-K forced with stream_k=8 at small M, direct with stream_k=0),
   TMA on and off, strided / transposed / misaligned / 3-D X, an empty weight (0 blocks),
   bias + activation, BLOCK_T=256; each against float64 into a NaN-poisoned `out=`, relative
   Frobenius error limits fp16 2e-3, bf16 1e-2. These run with fixed tiles (`block_t`), one
   compile each; the autotuned path is checked on every timed case. A failure is printed,
   recorded, and makes the exit status 1 (the timing still runs).
2. Ceilings measured here: a 1 GiB device-to-device copy (bytes/s) and cuBLAS bf16 at the
   largest GEMM of the matrix (FLOP/s); datasheet ceilings from spdy_gpu.gpu_specs. Host
   time per call of each way of calling the kernel on a tiny problem (host_paths).
3. The cases (MATRIX / QUICK below; the full cross product of the axes would take hours),
   each timed with triton.testing.do_bench (L2 flushed between runs; p10/p50/p90), plain and
   as a CUDA-graph replay: ours (`bsr_linear`, autotuned on its first call; the tuned config
   and tuning seconds recorded), cuBLAS (`F.linear`, unmasked weight: never time zeros),
   `torch.sparse._triton_ops.bsr_dense_mm` with its default parameters (Y^T = W X^T; X^T
   made contiguous and M padded to 16 outside the timing) and, on the cases marked so,
   tuned by `torch.sparse._triton_ops_meta.tune_bsr_dense_addmm` (time-boxed: its do_bench
   capped at 10/25 ms and no new evaluation after --torch-tune-s seconds), and 2:4
   (`to_sparse_semi_structured` on a 2:4 magnitude mask, `F.linear`).
Cost: Triton compiles 3-12 launch configurations for every new tuning key (M bucket, N, K,
block, density bucket, dtype), a few seconds a case; the full matrix took 172 s on an H200
(2026-11-26, 37 cases). No case starts after --budget-s; the ones
left are listed as skipped.

Output under --out: gpu-suite-<gpu>-<date>[-quick].json (format spdy-gpu/kernel-suite v2)
and .md, both rewritten atomically after every case. JSON: device, date, command, mode,
software, settings, ceilings {spec, measured}, correctness {passed, checks: [...]}, cases:
[{case {n, k, m, dtype, block, sparsity, goal, tune_torch}, density, nnz_blocks, ours
{plain, graph: [p10, p50, p90] ms}, config, tune_s, tune_configs, rel_err, rel_err_ok,
cublas, torch_bsr, torch_bsr_tuned (+ meta, tune_s), semi_2_4 (each a timing or {error}),
derived {medians, speedups, vs_*, flops, bytes, floor_ms, roofline_fraction,
bandwidth_fraction}}], skipped, targets [{name, status: met | not met | no data, summary,
cells}], seconds, complete.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shlex
import statistics
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from spdy_kernels.layout import activate

from spdy_gpu import errors
from spdy_gpu.cli.common import positive_seconds, run_script
from spdy_gpu.jsonio import check_output_dir, slug
from spdy_gpu.masks import build_mask
from spdy_gpu.roofline import gemm_cost
from spdy_gpu.semi_structured import SEMI_STRUCTURED

SUITE_FORMAT, SUITE_VERSION = "spdy-gpu/kernel-suite", 2
QUANTILES = (0.1, 0.5, 0.9)
# What --reevaluate says changed since a results file was written.
REEVALUATION_RULE = ("kernel-against-kernel targets (compute-bound, tuned bsr_dense_mm) "
                     "compare CUDA-graph times where both sides have them")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2}        # relative Frobenius error vs float64
BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (64, 16))
MS = (1, 16, 32, 64, 256, 2048, 4096)
SPARSITIES = (0.3, 0.5, 0.7, 0.9, 0.95)
SMALL_M = 64                    # the kernel's stream-K bound

# GEMM shapes (N, K) of Y = X W^T
B_ATT, B_UP, B_DOWN = (768, 768), (3072, 768), (768, 3072)                  # BERT-base
ATT, UP, DOWN = (4096, 4096), (11008, 4096), (4096, 11008)                  # Llama-7B
UP8, DOWN8, KV8 = (14336, 4096), (4096, 14336), (1024, 4096)                # Llama-3-8B
SHAPES = {"bert-base": (B_ATT, B_UP, B_DOWN), "llama-7b": (ATT, UP, DOWN),
          "llama-8b": (UP8, DOWN8, KV8)}
LLAMA_SHAPES = SHAPES["llama-7b"] + SHAPES["llama-8b"]
log = logging.getLogger("gpu_suite")


# ---- the matrix ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One timed cell: Y[M, N] = X[M, K] @ W[N, K]^T, W block-sparse."""

    n: int
    k: int
    m: int
    dtype: str                  # "bf16" or "fp16"
    block: tuple[int, int]
    sparsity: float             # fraction of blocks dropped
    goal: str                   # the target it serves: memory, break-even, compute, cover
    tune_torch: bool = False    # also time torch's bsr_dense_mm tuned here

    @property
    def label(self) -> str:
        return (f"{self.n}x{self.k} M={self.m} {self.dtype} {self.block[0]}x{self.block[1]} "
                f"s{round(100 * self.sparsity)}%")


def _case(shape: tuple[int, int], m: int, dtype: str, block: int | tuple[int, int],
          sparsity: float, goal: str, tune_torch: bool = False) -> Case:
    pair = (block, block) if isinstance(block, int) else tuple(block)
    return Case(shape[0], shape[1], m, dtype, pair, sparsity, goal, tune_torch)


# --quick: every block, M, dtype, sparsity and baseline once (2:4 where sparsity is 50%).
QUICK = [_case(*spec) for spec in (
    (DOWN, 1, "bf16", 64, 0.5, "memory"),
    (UP, 64, "bf16", 64, 0.3, "break-even", True),
    (ATT, 2048, "bf16", 128, 0.5, "compute"),
    (ATT, 2048, "fp16", 64, 0.7, "compute"),
    (B_DOWN, 4096, "fp16", 32, 0.9, "cover"),
    (B_UP, 32, "bf16", 16, 0.95, "cover"),
    (UP8, 16, "fp16", (64, 32), 0.5, "memory"),
    (KV8, 256, "bf16", (64, 16), 0.7, "cover"),
)]
# The full run: QUICK first, then the targets' cells, then coverage (skipped first at budget).
MATRIX = QUICK + [_case(*spec) for spec in (
    # break-even with cuBLAS: 64x64 blocks, 30% sparsity, M = 64, every Llama shape
    (ATT, 64, "bf16", 64, 0.3, "break-even"),
    (DOWN, 64, "bf16", 64, 0.3, "break-even"),
    (UP8, 64, "bf16", 64, 0.3, "break-even"),
    (DOWN8, 64, "bf16", 64, 0.3, "break-even"),
    (KV8, 64, "bf16", 64, 0.3, "break-even"),
    # compute-bound: M >= 2048 at 128x128 and 64x64
    (ATT, 2048, "bf16", 64, 0.5, "compute", True),
    (UP, 4096, "bf16", 128, 0.7, "compute"),
    (UP, 4096, "bf16", 64, 0.7, "compute"),
    (DOWN, 4096, "fp16", 128, 0.9, "compute"),
    (DOWN, 4096, "fp16", 64, 0.9, "compute"),
    (UP8, 2048, "bf16", 128, 0.3, "compute"),
    (DOWN8, 2048, "fp16", 64, 0.95, "compute"),
    # memory-bound decode: weights large enough for a roofline time >= 15 us
    (DOWN, 16, "bf16", 64, 0.5, "memory"),
    (UP8, 32, "bf16", 64, 0.5, "memory"),
    (DOWN8, 64, "fp16", 128, 0.3, "memory"),
    (UP8, 1, "bf16", 32, 0.3, "memory"),
    (UP8, 1, "fp16", 128, 0.5, "memory"),
    (DOWN8, 16, "bf16", (64, 32), 0.5, "memory"),
    (ATT, 16, "bf16", 64, 0.9, "cover"),
    # M = 256
    (ATT, 256, "bf16", 64, 0.7, "cover"),
    (UP, 256, "fp16", 128, 0.5, "cover"),
    # BERT-base (batch 32 x 128 tokens = 4096 rows, and smaller)
    (B_ATT, 4096, "fp16", 32, 0.5, "cover"),
    (B_UP, 4096, "bf16", 16, 0.7, "cover"),
    (B_DOWN, 4096, "fp16", (64, 32), 0.9, "cover", True),
    (B_UP, 256, "bf16", (64, 16), 0.5, "cover"),
    (B_ATT, 64, "bf16", 32, 0.3, "cover"),
    (B_UP, 2048, "fp16", 64, 0.5, "cover"),
    # small blocks on Llama shapes
    (ATT, 2048, "bf16", 32, 0.7, "cover"),
    (ATT, 64, "fp16", 16, 0.9, "cover"),
)]
# --cpu-check: tiny shapes under Triton's interpreter, fake times.
CPU_CASES = [_case((256, 192), 5, "bf16", 64, 0.5, "memory"),
             _case((192, 256), 80, "fp16", 32, 0.3, "compute", True)]


@dataclass(frozen=True)
class Check:
    """One correctness run of the kernel against float64."""

    name: str
    block: tuple[int, int]
    dtype: str
    m: int
    n: int
    k: int
    stream_k: int | None = None
    tma: bool | None = None
    block_t: int | None = None
    layout: str = "contiguous"      # contiguous, strided, transposed, misaligned, 3d
    sparsity: float = 0.5
    bias: bool = False
    activation: str | None = None


def correctness_checks(tma_on: bool | None, quick: bool, big_m: int) -> list[Check]:
    """Every block x both schedules x TMA on/off, plus the X layouts and an empty weight.
    tma_on: what "TMA on" passes (True where the device has TMA, else None = automatic)."""
    checks = []
    for i, (bn, bk) in enumerate(BLOCKS):
        one, other = ("bf16", "fp16") if i % 2 == 0 else ("fp16", "bf16")
        # a partial last block-row and block-column; K * 2 bytes stays 16-byte aligned
        shape = dict(block=(bn, bk), n=3 * bn + bn // 2, k=4 * bk + 8)
        checks += [
            Check("stream-K, TMA", dtype=one, m=37, stream_k=8, tma=tma_on, **shape),
            Check("direct (stream_k=0), TMA", dtype=one, m=37, stream_k=0, tma=tma_on,
                  block_t=64, **shape),
            Check("direct, pointers, bias+relu", dtype=other, m=big_m, tma=False, block_t=128,
                  bias=True, activation="relu", **shape)]
        if not quick:
            checks.append(Check("stream-K, pointers, bias+gelu_tanh", dtype=other, m=5,
                                stream_k=8, tma=False, bias=True, activation="gelu_tanh",
                                **shape))
    shape = dict(block=(64, 64), n=224, k=264)
    checks += [
        Check("strided X (column stride 2)", dtype="fp16", m=37, stream_k=8, layout="strided",
              **shape),
        Check("transposed X", dtype="bf16", m=big_m, block_t=128, layout="transposed", **shape),
        Check("empty weight (0 blocks), bias+gelu", dtype="bf16", m=16, stream_k=8,
              sparsity=1.0, bias=True, activation="gelu", **shape),
        Check("empty weight (0 blocks), direct", dtype="fp16", m=big_m, stream_k=0,
              block_t=128, sparsity=1.0, bias=True, **shape)]
    if not quick:
        checks += [
            Check("transposed X, stream-K", dtype="fp16", m=16, stream_k=8, layout="transposed",
                  **shape),
            Check("misaligned X (2-byte offset)", dtype="fp16", m=100, block_t=64,
                  layout="misaligned", **shape),
            Check("3-D X [2, 24, K]", dtype="bf16", m=48, block_t=64, layout="3d", **shape),
            Check("BLOCK_T=256", dtype="fp16", m=2 * big_m, block_t=256, tma=tma_on, **shape)]
    return checks


# ---- timers -------------------------------------------------------------------------------

class CudaTimer:
    """do_bench quantiles (L2 flushed between runs), plain and as a CUDA-graph replay."""

    def __init__(self, warmup_ms: int, rep_ms: int):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def measure(self, fn: Callable[[], Any]) -> dict[str, Any]:
        from spdy_gpu.deploy import cuda_graph_of

        result: dict[str, Any] = {"plain": self._bench(fn), "graph": None}
        try:
            graph = cuda_graph_of(fn)
        except Exception as e:  # noqa: BLE001 - a capture failure is recorded, not fatal
            torch.cuda.synchronize()
            result["graph_error"] = first_line(e)
            return result
        result["graph"] = self._bench(graph.replay)
        del graph
        return result

    def _bench(self, fn: Callable[[], Any]) -> list[float]:
        from triton.testing import do_bench

        times = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=list(QUANTILES))
        return [float(t) for t in times]


class FakeTimer:
    """--cpu-check: runs the function once and makes up times (the output says FAKE)."""

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, fn: Callable[[], Any]) -> dict[str, Any]:
        fn()
        self.calls += 1
        t = 0.01 * (1 + self.calls % 7)
        return {"plain": [0.9 * t, t, 1.2 * t], "graph": [0.8 * t, 0.9 * t, 1.1 * t],
                "fake": True}


@dataclass
class Env:
    """What measuring needs: the device, a timer, and baselines measured once."""

    device: str
    timer: Any
    torch_tune_s: float
    cache: dict[tuple, dict[str, Any]] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def cached(self, key: tuple, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A baseline measured once per (kind, shape, M, dtype)."""
        if key not in self.cache:
            self.cache[key] = guarded(measure)
        return self.cache[key]


def guarded(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement, or {"error": first line} where it raised: a baseline that fails is
    reported, not fatal."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        return {"error": first_line(e)}


def first_line(error: BaseException) -> str:
    """"Type: first line of the message", for records."""
    return f"{type(error).__name__}: {errors.first_line(error)}"[:300]


# ---- weights, inputs, references ----------------------------------------------------------

def _seed(thing: Any) -> int:
    return zlib.crc32(repr(thing).encode()) % 2**31


def random_weight(n: int, k: int, block: tuple[int, int], sparsity: float, dtype: torch.dtype,
                  gen: torch.Generator, device: str, empty_rows: tuple[int, ...] = ()):
    """(packed BSRWeight keeping exactly round((1 - sparsity) * blocks) random blocks, the
    unmasked dense weight in `dtype`)."""
    from spdy_gpu.bsr import BSRWeight

    rows, cols = -(-n // block[0]), -(-k // block[1])
    weight = torch.randn(n, k, generator=gen, device=device)
    order = torch.randperm(rows * cols, generator=gen, device=device)
    keep = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    keep[order[: round((1 - sparsity) * rows * cols)]] = True
    keep = keep.view(rows, cols)
    keep[list(empty_rows)] = False
    mask = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return BSRWeight.from_dense(weight, mask, block, dtype), weight.to(dtype)


def reference(x: torch.Tensor, packed: Any, bias: torch.Tensor | None = None,
              activation: str | None = None) -> torch.Tensor:
    """act(x W^T + b) in float64, W the packed (masked) weight."""
    y = F.linear(x.double(), packed.to_dense().double(), None if bias is None else bias.double())
    return activate(y, activation)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error (absolute where the reference is zero); inf if y has a
    non-finite entry (a tile left NaN-poisoned)."""
    y = y.double()
    if not bool(torch.isfinite(y).all()):
        return math.inf
    scale = ref.norm().item()
    return (y - ref).norm().item() / (scale if scale > 0 else 1.0)


def check_input(check: Check, dtype: torch.dtype, gen: torch.Generator,
                device: str) -> torch.Tensor:
    """X [M, K] (3-D: [2, M / 2, K]) in the check's memory layout."""
    m, k = check.m, check.k

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if check.layout == "strided":
        return randn(m, 2 * k)[:, ::2]
    if check.layout == "transposed":
        return randn(k, m).t()
    if check.layout == "misaligned":
        return randn(m * k + 1)[1:].view(m, k)
    if check.layout == "3d":
        return randn(2, m // 2, k)
    return randn(m, k)


# ---- correctness --------------------------------------------------------------------------

def run_check(check: Check, device: str) -> dict[str, Any]:
    """The kernel into a NaN-poisoned `out=` against float64; the record says ok or why not."""
    from spdy_kernels.bsr_matmul import bsr_linear

    dtype, limit = DTYPES[check.dtype], TOLERANCE[check.dtype]
    gen = torch.Generator().manual_seed(_seed(check))
    record: dict[str, Any] = {**asdict(check), "limit": limit}
    try:
        packed, _ = random_weight(check.n, check.k, check.block, check.sparsity, dtype, gen,
                                  "cpu", empty_rows=(1,))
        packed = packed.to(device)
        x = check_input(check, dtype, gen, device)
        bias = torch.randn(check.n, generator=gen).to(device) if check.bias else None
        out = torch.full((*x.shape[:-1], check.n), math.nan, dtype=dtype, device=device)
        y = bsr_linear(x, packed.values, packed.crow_indices, packed.col_indices, packed.shape,
                       bias, check.activation, indices=packed.indices,
                       stream_k=check.stream_k, tma=check.tma, block_t=check.block_t, out=out)
        err = rel_err(y, reference(x, packed, bias, check.activation))
        record.update(rel_err=_finite(err), nnz_blocks=packed.nnz_blocks,
                      ok=err <= limit and y.data_ptr() == out.data_ptr())
    except Exception as e:  # noqa: BLE001 - a failing check is recorded and reported
        record.update(rel_err=None, ok=False, error=first_line(e))
    return record


def run_checks(checks: list[Check], device: str) -> dict[str, Any]:
    results = []
    for i, check in enumerate(checks, 1):
        started = time.perf_counter()
        record = run_check(check, device)
        record["seconds"] = round(time.perf_counter() - started, 2)
        results.append(record)
        what = f"[check {i}/{len(checks)}] {check.name} {_block_name(check.block)} " \
               f"{check.dtype} M={check.m}"
        if record["ok"]:
            log.info("%s: ok (%.1e) %.1f s", what, record["rel_err"], record["seconds"])
        else:
            log.error("CORRECTNESS FAILED %s: %s", what,
                      record.get("error") or f"rel err {record['rel_err']}")
    passed = sum(r["ok"] for r in results)
    worst = max((r["rel_err"] / r["limit"] for r in results if r["rel_err"] is not None),
                default=None)
    log.info("correctness: %d/%d checks passed%s", passed, len(results),
             "" if worst is None else f" (worst error {worst:.2f} of its limit)")
    return {"passed": passed == len(results), "checks": results}


# ---- measuring one case -------------------------------------------------------------------

def measure_case(case: Case, env: Env) -> dict[str, Any]:
    """Ours, cuBLAS, torch bsr_dense_mm (default, tuned where marked) and 2:4 on one cell."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=env.device).manual_seed(_seed(case))
    packed, weight = random_weight(case.n, case.k, case.block, case.sparsity, dtype, gen,
                                   env.device)
    x = torch.randn(case.m, case.k, generator=gen, device=env.device).to(dtype)
    key = (case.n, case.k, case.m, case.dtype)
    ref = reference(x, packed)
    row: dict[str, Any] = {"case": asdict(case), "density": packed.density,
                           "nnz_blocks": packed.nnz_blocks}
    row.update(measure_ours(x, packed, ref, env))
    row["cublas"] = env.cached(("cublas", *key), lambda: env.timer.measure(
        lambda: F.linear(x, weight)))
    row["torch_bsr"] = guarded(lambda: measure_torch_bsr(x, packed, ref, env, tuned=False))
    row["torch_bsr_tuned"] = (guarded(lambda: measure_torch_bsr(x, packed, ref, env, True))
                              if case.tune_torch else None)
    row["semi_2_4"] = env.cached(("2:4", *key), lambda: measure_semi(x, weight, env))
    return row


def measure_ours(x: torch.Tensor, packed: Any, ref: torch.Tensor, env: Env) -> dict[str, Any]:
    from spdy_kernels import bsr_matmul
    from spdy_kernels.bsr_matmul import bsr_linear

    indices = packed.indices

    def call(out: torch.Tensor | None = None) -> torch.Tensor:
        return bsr_linear(x, packed.values, packed.crow_indices, packed.col_indices,
                          packed.shape, indices=indices, out=out)

    tuner = autotuner(x.shape[0]) if env.device == "cuda" else None
    if tuner is not None:       # reset what a tuning run sets, to tell whether one ran now
        tuned_keys = len(tuner.cache)
        tuner.bench_time, tuner.configs_timings = None, {}
    started = time.perf_counter()
    out = torch.full((x.shape[0], packed.shape[0]), math.nan, dtype=x.dtype, device=x.device)
    y = call(out)                       # tunes this shape bucket on CUDA
    env.sync()
    first_s = time.perf_counter() - started
    err = rel_err(y, ref)
    del y, out
    result = {"ours": env.timer.measure(call), "rel_err": _finite(err),
              "rel_err_ok": err <= TOLERANCE[_dtype_name(x.dtype)], "first_call_s": first_s}
    if tuner is None:
        result["config"] = "interpreter (fixed tiles)"
        result["stream_k"] = bool(bsr_matmul._use_stream_k(x.shape[0], None))
    else:
        result.update(tuned_config(x, packed, tuner, len(tuner.cache) > tuned_keys))
        # the schedule is the tuner's choice where M <= 64
        result["stream_k"] = bool((result["config"] or {}).get("STREAM_K"))
    return result


def autotuner(m: int) -> Any:
    """The Triton autotuner the kernel's call at M rows goes through (private API)."""
    from spdy_kernels import bsr_matmul

    return bsr_matmul._tuned(*bsr_matmul._schedules(m, None))


def tuned_config(x: torch.Tensor, packed: Any, tuner: Any, tuned_now: bool) -> dict[str, Any]:
    """The configuration the autotuner chose (its best_config), whether TMA ran, and, where
    this call tuned, the seconds it took (compiling + timing every configuration; None if
    pruning left one) and every configuration's median ms."""
    from spdy_kernels import bsr_matmul

    info: dict[str, Any] = {"config": None, "tma": None, "tuned_now": tuned_now,
                            "tune_s": None, "tune_configs": []}
    with contextlib.suppress(Exception):    # a private helper: absent means unrecorded
        info["tma"] = bool(bsr_matmul._tma_ok(x, packed.values))
    best = getattr(tuner, "best_config", None)
    info["config"] = None if best is None else _config_dict(best)
    if tuned_now:
        info["tune_s"] = getattr(tuner, "bench_time", None)
        timings = getattr(tuner, "configs_timings", None) or {}
        info["tune_configs"] = [{**_config_dict(c), "ms": _median_of(t)}
                                for c, t in timings.items()]
    return info


def _config_dict(config: Any) -> dict[str, Any]:
    return {**{k: v for k, v in config.kwargs.items()}, "num_warps": config.num_warps,
            "num_stages": config.num_stages}


def _median_of(timing: Any) -> float | None:
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    return _finite(float(value))


def measure_torch_bsr(x: torch.Tensor, packed: Any, ref: torch.Tensor, env: Env,
                      tuned: bool) -> dict[str, Any]:
    """PyTorch's Triton BSR kernel on the same blocks: Y^T = W @ X^T (M padded to 16)."""
    from torch.sparse._triton_ops import bsr_dense_addmm, bsr_dense_mm

    m, k_pad = x.shape[0], packed.padded_shape[1]
    m_pad = max(16, -(-m // 16) * 16)
    bsr = packed.to_torch_sparse()
    xt = x.new_zeros(k_pad, m_pad)
    xt[: x.shape[1], :m] = x.t()
    out = x.new_empty(packed.padded_shape[0], m_pad)
    result: dict[str, Any] = {"m_padded": m_pad}
    with warnings.catch_warnings():         # "non-optimal triton kernel parameters"
        warnings.simplefilter("ignore")
        if tuned:
            meta, result["tune_s"] = tune_torch_bsr(bsr, xt, out, env.torch_tune_s)
            result["meta"] = meta

            def call() -> Any:
                return bsr_dense_addmm(out, bsr, xt, beta=0, alpha=1, out=out, meta=meta)
        else:
            def call() -> Any:
                return bsr_dense_mm(bsr, xt, out=out)
        call()
        env.sync()
        result["rel_err"] = _finite(rel_err(out[: packed.shape[0], :m].t(), ref))
        result.update(env.timer.measure(call))
    return result


def tune_torch_bsr(bsr: torch.Tensor, xt: torch.Tensor, out: torch.Tensor,
                   seconds: float) -> tuple[dict[str, Any], float]:
    """tune_bsr_dense_addmm as torch ships it (a local search over SPLIT_N, GROUP_SIZE_ROW,
    num_stages, num_warps from its reference parameters), time-boxed; not stored."""
    from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

    started = time.perf_counter()
    with time_boxed_do_bench(seconds):
        meta = tune_bsr_dense_addmm(out, bsr, xt, beta=0, alpha=1, out=out, store=False)
    if not meta:
        raise RuntimeError("tune_bsr_dense_addmm found no working parameters")
    return dict(meta), time.perf_counter() - started


@contextlib.contextmanager
def time_boxed_do_bench(seconds: float, warmup_ms: int = 10, rep_ms: int = 25) -> Iterator[None]:
    """torch's tuner times each candidate with triton.testing.do_bench(warmup=500, rep=100):
    here capped, and refusing (TimeoutError, which the tuner skips as a failed candidate)
    after `seconds`, so the search ends with the best parameters found by then."""
    import triton.testing

    original = triton.testing.do_bench
    deadline = time.perf_counter() + seconds

    def bench(fn: Callable[[], Any], warmup: int = 25, rep: int = 100, **kwargs: Any) -> Any:
        if time.perf_counter() > deadline:
            raise TimeoutError("tuning time box spent")
        return original(fn, warmup=min(warmup, warmup_ms), rep=min(rep, rep_ms), **kwargs)

    triton.testing.do_bench = bench
    try:
        yield
    finally:
        triton.testing.do_bench = original


def measure_semi(x: torch.Tensor, weight: torch.Tensor, env: Env) -> dict[str, Any]:
    """2:4 semi-structured (cuSPARSELt or CUTLASS through torch) on a 2:4 magnitude mask."""
    from torch.sparse import to_sparse_semi_structured

    pruned = weight * build_mask(weight, SEMI_STRUCTURED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = to_sparse_semi_structured(pruned)

        def call() -> torch.Tensor:
            return F.linear(x, sparse)

        err = rel_err(call(), F.linear(x.double(), pruned.double()))
        result = env.timer.measure(call)
    return {**result, "rel_err": _finite(err)}


# ---- ceilings -----------------------------------------------------------------------------

# ---- host overhead --------------------------------------------------------------------------

def host_paths(device: str) -> dict[str, Callable[[], Any]]:
    """One small call (M = 1, 256 x 256, 64x64 blocks at 50%: microseconds of GPU work) per
    way of calling the kernel, from the whole module down to a launch without the autotuner,
    so the host time of each layer shows by difference."""
    import spdy_kernels.ops  # noqa: F401  (registers the op)
    from spdy_kernels.bsr_matmul import bsr_linear

    from spdy_gpu.sparse_linear import BlockSparseLinear

    gen = torch.Generator().manual_seed(0)
    packed, dense = random_weight(256, 256, (64, 64), 0.5, torch.float16, gen, "cpu")
    packed = packed.to(device)
    dense = dense.to(device)
    layer = BlockSparseLinear(packed).to(device)
    x = torch.randn(1, 256, generator=gen).to(device=device, dtype=torch.float16)
    raw = (x, packed.values, packed.crow_indices, packed.col_indices, packed.shape)
    op_args = (x, layer.values, layer.crow_indices, layer.col_indices, layer.row_order,
               layer.block_rows, layer.empty_rows, 256, 256, None, None)
    return {
        "cuBLAS F.linear": lambda: F.linear(x, dense),
        "BlockSparseLinear (direct call)": lambda: layer(x),
        "torch op spdy_kernels::bsr_linear": lambda: torch.ops.spdy_kernels.bsr_linear(*op_args),
        "bsr_linear, autotuned, TMA where possible": lambda: bsr_linear(
            *raw, indices=packed.indices),
        "bsr_linear, autotuned, pointer loads": lambda: bsr_linear(
            *raw, indices=packed.indices, tma=False),
        "bsr_linear, fixed tile (no autotuner), pointer loads": lambda: bsr_linear(
            *raw, indices=packed.indices, tma=False, block_t=16)}


def measure_host_overhead(device: str, calls: int = 2000,
                          sync: Callable[[], None] = torch.cuda.synchronize) -> dict[str, Any]:
    """Microseconds per call of each host path, the calls back to back (their GPU work is
    far shorter, so the host sets the pace), after a warm-up that autotunes; median of three
    rounds. What the plain times of small cases consist of."""
    paths = host_paths(device)
    result: dict[str, Any] = {"calls": calls, "us_per_call": {}}
    with torch.inference_mode():
        for name, call in paths.items():
            try:
                for _ in range(3):
                    call()
                sync()
                rounds = []
                for _ in range(3):
                    began = time.perf_counter()
                    for _ in range(calls):
                        call()
                    sync()
                    rounds.append(1e6 * (time.perf_counter() - began) / calls)
                result["us_per_call"][name] = statistics.median(rounds)
            except Exception as e:  # noqa: BLE001 - a path failing is a result too
                result["us_per_call"][name] = None
                result.setdefault("errors", {})[name] = first_line(e)
    return result


def guess_spec(device: str) -> Any:
    """The datasheet spec (spdy_gpu.gpu_specs) this device name matches, or None."""
    from spdy_gpu.gpu_specs import GPU_SPECS, datasheet_for

    key = datasheet_for(device)
    return None if key is None else GPU_SPECS[key]


def spec_ceilings(spec: Any) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"name": spec.name, "peak_flops": spec.peak_flops["bf16"],
            "bandwidth": spec.bandwidth, "source": spec.source}


def measure_ceilings_here(cases: list[Case], copy_bytes: int = 1 << 30) -> dict[str, Any]:
    """A device-to-device copy (read + write bytes / s) and cuBLAS bf16 at the largest GEMM of
    `cases` (FLOP/s), do_bench medians."""
    from spdy_gpu.roofline import measure_ceilings

    gemm = max(((c.n, c.k, c.m) for c in cases), key=lambda s: s[0] * s[1] * s[2])
    ceilings = measure_ceilings("bfloat16", gemm, copy_bytes)
    return {"peak_flops": ceilings.peak_flops, "bandwidth": ceilings.bandwidth,
            "flops_gemm": list(gemm), "copy_bytes": copy_bytes,
            "source": "measured in this run (cuBLAS bf16 F.linear; device copy)"}


# ---- derived figures (pure) ---------------------------------------------------------------

def median(timing: dict[str, Any] | None, kind: str = "plain") -> float | None:
    """The p50 of a timing record's plain or graph quantiles (None if absent)."""
    if not timing or not timing.get(kind):
        return None
    return timing[kind][1]


def derive(row: dict[str, Any], ceilings: dict[str, Any]) -> dict[str, Any]:
    """Medians, speedups and roofline fractions of one measured case."""
    c = row["case"]
    ours, ours_graph = median(row.get("ours")), median(row.get("ours"), "graph")
    cublas, cublas_graph = median(row.get("cublas")), median(row.get("cublas"), "graph")
    flops, moved = gemm_cost(c["n"], c["k"], c["m"], row["density"], tuple(c["block"]))
    best = min((t for t in (ours, ours_graph) if t), default=None)
    graphed = bool(ours_graph and cublas_graph)     # kernel against kernel, host time out
    d: dict[str, Any] = {
        "compared": "graph" if graphed else "plain",
        "ours_compared_ms": ours_graph if graphed else ours,
        "cublas_compared_ms": cublas_graph if graphed else cublas,
        "ours_ms": ours, "ours_graph_ms": ours_graph, "cublas_ms": cublas,
        "cublas_graph_ms": cublas_graph,
        "speedup_vs_cublas": _ratio(cublas, ours),
        "speedup_vs_cublas_graph": _ratio(cublas_graph, ours_graph),
        "flops": flops, "bytes": moved, "floor_ms": {}, "roofline_fraction": {},
        "bandwidth_fraction": {}, "flops_fraction": {}}
    for name in ("torch_bsr", "torch_bsr_tuned", "semi_2_4"):
        d[f"{name}_ms"] = median(row.get(name))
        d[f"{name}_graph_ms"] = median(row.get(name), "graph")
        both = d[f"{name}_graph_ms"] and ours_graph             # graph times where both have
        d[f"vs_{name}"] = (_ratio(d[f"{name}_graph_ms"], ours_graph) if both
                           else _ratio(d[f"{name}_ms"], ours))
    for source, ceiling in ceilings.items():
        if not ceiling or "peak_flops" not in ceiling:     # absent, or its measuring failed
            continue
        floor = 1e3 * max(flops / ceiling["peak_flops"], moved / ceiling["bandwidth"])
        d["floor_ms"][source] = floor
        d["roofline_fraction"][source] = _ratio(floor, best)
        d["bandwidth_fraction"][source] = _ratio(1e3 * moved / ceiling["bandwidth"], ours_graph)
        d["flops_fraction"][source] = _ratio(1e3 * flops / ceiling["peak_flops"], ours)
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ---- targets (pure) -----------------------------------------------------------------------

def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each met / not met / no data, with the cells behind it."""
    ok = [r for r in rows if "derived" in r and r["derived"]["ours_ms"]]
    return [compute_target(ok, (128, 128), 0.9), compute_target(ok, (64, 64), 0.8),
            memory_target(ok), torch_target(ok), break_even_target(ok)]


def _target(name: str, cells: list[dict[str, Any]], summary: str,
            met: bool | None = None) -> dict[str, Any]:
    if met is None:
        met = all(cell["met"] for cell in cells)
    status = "no data" if not cells else "met" if met else "not met"
    return {"name": name, "status": status, "summary": summary if cells else
            "no measured cell qualifies", "cells": cells}


def _label(row: dict[str, Any]) -> str:
    c = row["case"]
    return Case(**{**c, "block": tuple(c["block"])}).label


def compute_target(rows: list[dict[str, Any]], block: tuple[int, int],
                   factor: float) -> dict[str, Any]:
    """M >= 2048: time <= density x cuBLAS / factor."""
    cells = []
    for r in rows:
        c, d = r["case"], r["derived"]
        ours, cublas = d.get("ours_compared_ms"), d.get("cublas_compared_ms")
        if c["m"] >= 2048 and tuple(c["block"]) == block and ours and cublas:
            bound = r["density"] * cublas / factor
            cells.append({"case": _label(r), "value": ours, "bound": bound,
                          "met": ours <= bound})
    worst = max(cells, key=lambda cell: cell["value"] / cell["bound"], default=None)
    summary = "" if worst is None else (
        f"{sum(cell['met'] for cell in cells)}/{len(cells)} cells; worst {worst['case']}: "
        f"{worst['value']:.4f} ms vs bound {worst['bound']:.4f} ms "
        f"({worst['value'] / worst['bound']:.2f}x the bound)")
    name = (f"compute-bound {block[0]}x{block[1]} (M >= 2048, CUDA-graph times): time <= "
            f"density x cuBLAS / {factor}")
    return _target(name, cells, summary)


def memory_target(rows: list[dict[str, Any]], fraction: float = 0.8,
                  min_floor_ms: float = 0.015) -> dict[str, Any]:
    """M <= 64, roofline time >= 15 us: CUDA-graph bandwidth >= 0.8 of the measured copy."""
    cells = []
    for r in rows:
        d = r["derived"]
        floor = d["floor_ms"].get("measured")
        value = d["bandwidth_fraction"].get("measured")
        if r["case"]["m"] <= SMALL_M and floor and floor >= min_floor_ms and value:
            cells.append({"case": _label(r), "value": value, "bound": fraction,
                          "met": value >= fraction})
    worst = min(cells, key=lambda cell: cell["value"], default=None)
    summary = "" if worst is None else (
        f"{sum(cell['met'] for cell in cells)}/{len(cells)} cells; lowest {worst['value']:.2f} "
        f"of the measured copy bandwidth ({worst['case']})")
    return _target(f"memory-bound (M <= 64, roofline >= {1e3 * min_floor_ms:.0f} us, CUDA "
                   f"graph): >= {fraction} of the measured copy bandwidth", cells, summary)


def torch_target(rows: list[dict[str, Any]], goal: float = 1.5) -> dict[str, Any]:
    """Median speed ratio over tuned bsr_dense_mm >= 1.5."""
    cells = [{"case": _label(r), "value": r["derived"]["vs_torch_bsr_tuned"], "bound": goal,
              "met": r["derived"]["vs_torch_bsr_tuned"] >= goal}
             for r in rows if r["derived"].get("vs_torch_bsr_tuned")]
    middle = statistics.median(cell["value"] for cell in cells) if cells else None
    summary = "" if middle is None else (
        f"median {middle:.2f}x over {len(cells)} tuned cells ("
        + ", ".join(f"{cell['case']}: {cell['value']:.2f}x" for cell in cells) + ")")
    return _target(f">= {goal}x median over tuned torch bsr_dense_mm (CUDA-graph times)",
                   cells, summary,
                   met=middle is not None and middle >= goal)


def break_even_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """64x64 blocks, M = 64, sparsity <= 30%, Llama shapes: at least as fast as cuBLAS
    (CUDA-graph times where both have them)."""
    cells = []
    for r in rows:
        c, d = r["case"], r["derived"]
        if (tuple(c["block"]) == (64, 64) and c["m"] == 64 and c["sparsity"] <= 0.3 + 1e-9
                and (c["n"], c["k"]) in LLAMA_SHAPES):
            speedup = d["speedup_vs_cublas_graph"] or d["speedup_vs_cublas"]
            if speedup:
                cells.append({"case": _label(r), "value": speedup, "bound": 1.0,
                              "met": speedup >= 1.0})
    worst = min(cells, key=lambda cell: cell["value"], default=None)
    summary = "" if worst is None else (
        f"{sum(cell['met'] for cell in cells)}/{len(cells)} Llama shapes; slowest "
        f"{worst['value']:.2f}x cuBLAS ({worst['case']})")
    return _target("break-even with cuBLAS at <= 30% sparsity, 64x64, M = 64, Llama shapes",
                   cells, summary)


# ---- the report (pure) --------------------------------------------------------------------

def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Block-sparse kernel suite: {doc['device']}, {doc['date']}", "",
             *_header(doc), "", "## Targets", ""]
    lines += [f"- **{t['status'].upper()}** {t['name']}: {t['summary']}"
              for t in doc.get("targets", [])] or ["- (not evaluated yet)"]
    lines += ["", "## Host time per call (M = 1, 256 x 256: the host sets the pace)", "",
              *_host_lines(doc), "", "## Correctness (before timing)", "",
              *_correctness_lines(doc), "",
              "## Cases", "", *_case_lines(doc.get("cases", []))]
    if doc.get("skipped"):
        lines += ["", "## Not run (time budget)", ""]
        lines += [f"- {s}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def _header(doc: dict[str, Any]) -> list[str]:
    sw = doc["software"]
    state = "complete" if doc.get("complete") else "INCOMPLETE (still running, or stopped)"
    lines = [f"`{doc['command']}`; mode {doc['mode']}; torch {sw.get('torch')}, triton "
             f"{sw.get('triton')}, CUDA {sw.get('cuda')}; {_num(doc.get('seconds'), 0)} s; "
             f"{state}."]
    if doc["mode"] == "cpu-check":
        lines.append("TIMES ARE FAKE: a check of the script under Triton's interpreter.")
    if doc.get("reevaluated"):
        again = doc["reevaluated"]
        lines.append(f"Derived figures and targets re-evaluated from these measurements on "
                     f"{again['date']} (git {again.get('git', '?')}: {again['rule']}).")
    for name, c in doc.get("ceilings", {}).items():
        if c and "error" in c:
            lines.append(f"Ceilings, {name}: FAILED ({c['error']}).")
        elif c:
            what = f"{c['name']}, {c['source']}" if "name" in c else c["source"]
            lines.append(f"Ceilings, {name} ({what}): {c['peak_flops'] / 1e12:.0f} TFLOP/s "
                         f"bf16, {c['bandwidth'] / 1e12:.2f} TB/s.")
    return lines


def _host_lines(doc: dict[str, Any]) -> list[str]:
    host = doc.get("host_overhead")
    if not host:
        return ["(not measured)"]
    errors_by_path = host.get("errors", {})
    return ["| path | us per call |", "|---|---|"] + [
        f"| {name} | {_num(us, 1) if us is not None else 'FAILED: ' + errors_by_path[name]} |"
        for name, us in host["us_per_call"].items()]


def _correctness_lines(doc: dict[str, Any]) -> list[str]:
    correctness = doc.get("correctness")
    if not correctness:
        return ["(not run yet)"]
    checks = correctness["checks"]
    passed = sum(c["ok"] for c in checks)
    lines = [f"{'PASSED' if correctness['passed'] else 'FAILED'}: {passed}/{len(checks)} "
             "checks against float64 (NaN-poisoned out=).", "",
             "| check | block | dtype | M | N x K | stream_k | tma | block_t | rel err | limit "
             "| ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in checks:
        err = c.get("error") or _num(c["rel_err"], 1, "e")
        lines.append(f"| {c['name']} | {_block_name(c['block'])} | {c['dtype']} | {c['m']} | "
                     f"{c['n']}x{c['k']} | {c['stream_k']} | {c['tma']} | {c['block_t']} | "
                     f"{err} | {c['limit']:.0e} | {'yes' if c['ok'] else 'NO'} |")
    return lines


CASE_COLUMNS = ("N x K", "M", "dtype", "block", "sparsity", "ours", "ours graph", "cuBLAS",
                "cuBLAS graph", "torch bsr", "torch tuned", "2:4", "speedup", "speedup graph",
                "vs torch tuned", "roofline (spec)", "roofline (measured)",
                "BW (measured)", "rel err", "config")


def _case_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Times in ms, medians of do_bench with the L2 flushed (p10 and p90 in the JSON); "
             "graph = CUDA-graph replay; speedup = cuBLAS / ours; roofline = floor / ours "
             "(the faster of plain and graph); BW = bytes moved / graph time / ceiling; n/a "
             "= not run or failed (the JSON says why).", "",
             "| " + " | ".join(CASE_COLUMNS) + " |", "|" + "---|" * len(CASE_COLUMNS)]
    return lines + [_case_line(r) for r in rows]


def _case_line(r: dict[str, Any]) -> str:
    c = r["case"]
    d = r.get("derived")
    if d is None:
        return (f"| {c['n']}x{c['k']} | {c['m']} | {c['dtype']} | {_block_name(c['block'])} | "
                f"{c['sparsity']:.0%} | FAILED: {r.get('error', '?')} |")
    cells = [f"{c['n']}x{c['k']}", str(c["m"]), c["dtype"], _block_name(c["block"]),
             f"{c['sparsity']:.0%}"]
    cells += [_num(d[key], 4, "g") for key in (
        "ours_ms", "ours_graph_ms", "cublas_ms", "cublas_graph_ms", "torch_bsr_ms",
        "torch_bsr_tuned_ms", "semi_2_4_ms")]
    cells += [_num(d[key], 2) for key in ("speedup_vs_cublas", "speedup_vs_cublas_graph",
                                          "vs_torch_bsr_tuned")]
    cells += [_num(d["roofline_fraction"].get("spec"), 2),
              _num(d["roofline_fraction"].get("measured"), 2),
              _num(d["bandwidth_fraction"].get("measured"), 2),
              _num(r.get("rel_err"), 1, "e") + ("" if r.get("rel_err_ok") else " FAIL"),
              _config_text(r)]
    return "| " + " | ".join(cells) + " |"


def _config_text(r: dict[str, Any]) -> str:
    config = r.get("config")
    schedule = "stream-K" if r.get("stream_k") else "direct"
    if isinstance(config, dict):
        keys = ("BLOCK_T", "GROUP_T", "WAVES", "num_warps", "num_stages")
        text = " ".join(f"{k}={config[k]}" for k in keys if k in config)
        tma = {True: " TMA", False: " ptr"}.get(r.get("tma"), "")
        return f"{schedule}{tma} {text}{_schedule_bests(r)}"
    return f"{schedule} {config or ''}".strip()


def _schedule_bests(r: dict[str, Any]) -> str:
    """Where tuning timed both schedules (M <= 64): each one's best time, same run."""
    best: dict[bool, float] = {}
    for c in r.get("tune_configs") or []:
        if c.get("ms") is not None and "STREAM_K" in c:
            best[c["STREAM_K"]] = min(best.get(c["STREAM_K"], math.inf), c["ms"])
    if len(best) < 2:
        return ""
    return f" (tuning: stream-K {best[True]:.4g} ms, direct {best[False]:.4g} ms)"


def _block_name(block: Any) -> str:
    return f"{block[0]}x{block[1]}"


def _num(value: float | None, digits: int, kind: str = "f") -> str:
    return "n/a" if value is None else f"{value:.{digits}{kind}}"


# ---- the document -------------------------------------------------------------------------

def new_document(device: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"device": device, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "command": shlex.join(["python", "bench/gpu_suite.py", *(args.argv or [])]),
            "mode": mode, "software": software(),
            "settings": {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                         "quantiles": list(QUANTILES), "budget_s": args.budget_s,
                         "torch_tune_s": args.torch_tune_s, "tolerance": TOLERANCE},
            "ceilings": {}, "correctness": None, "cases": [], "skipped": [], "targets": [],
            "seconds": 0.0, "complete": False}


def software() -> dict[str, str]:
    import triton

    found = {"torch": torch.__version__, "triton": triton.__version__,
             "cuda": str(torch.version.cuda), "python": sys.version.split()[0]}
    with contextlib.suppress(Exception):
        found["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True, timeout=10,
                                      cwd=Path(__file__).parent).stdout.strip()
    return found


def output_stem(out: str, device: str, date: str, mode: str) -> Path:
    name = slug(device) or "gpu"
    suffix = "" if mode == "full" else f"-{mode}"
    return Path(out) / f"gpu-suite-{name}-{date}{suffix}"


def save(doc: dict[str, Any], stem: Path, started: float) -> None:
    """Atomic JSON + markdown rewrite: a killed run keeps what it measured."""
    doc["seconds"] = round(time.perf_counter() - started, 1)
    write(doc, stem)


def write(doc: dict[str, Any], stem: Path) -> None:
    """STEM.json and STEM.md (appended, not with_suffix: a stem may hold dots)."""
    from spdy_gpu.jsonio import atomic_write_bytes, save_json

    text = markdown(doc)            # first: a document it cannot render writes nothing
    save_json(Path(f"{stem}.json"), SUITE_FORMAT, SUITE_VERSION, doc)
    atomic_write_bytes(Path(f"{stem}.md"), text.encode())


# ---- running ------------------------------------------------------------------------------

def run_cases(cases: list[Case], env: Env, doc: dict[str, Any], stem: Path, started: float,
              deadline: float) -> None:
    """Measure case after case, saving after each; none starts after `deadline`."""
    began = time.perf_counter()
    for i, case in enumerate(cases):
        if time.perf_counter() > deadline:
            doc["skipped"] = [c.label for c in cases[i:]]
            log.warning("time budget spent: %d cases not run", len(cases) - i)
            break
        t0 = time.perf_counter()
        row = measure_one(case, env, doc["ceilings"])
        row["seconds"] = round(time.perf_counter() - t0, 2)
        doc["cases"].append(row)
        doc["targets"] = evaluate_targets(doc["cases"])
        save(doc, stem, started)
        left = (time.perf_counter() - began) / (i + 1) * (len(cases) - i - 1)
        log.info("[%d/%d] %s  %.1f s; %.0f s elapsed, ~%.0f s left", i + 1, len(cases),
                 _progress_text(case, row), row["seconds"], time.perf_counter() - started, left)


def measure_one(case: Case, env: Env, ceilings: dict[str, Any]) -> dict[str, Any]:
    try:
        row = measure_case(case, env)
    except Exception as e:  # noqa: BLE001 - our kernel failing here is a result too
        log.error("CASE FAILED %s: %s", case.label, first_line(e))
        return {"case": asdict(case), "error": first_line(e)}
    row["derived"] = derive(row, ceilings)
    if not row["rel_err_ok"]:
        log.error("WRONG RESULT %s: relative error %s", case.label, row["rel_err"])
    return row


def _progress_text(case: Case, row: dict[str, Any]) -> str:
    d = row.get("derived")
    if d is None:
        return f"{case.label}: FAILED"
    return (f"{case.label}: ours {_num(d['ours_ms'], 4, 'g')} ms (graph "
            f"{_num(d['ours_graph_ms'], 4, 'g')}), cuBLAS {_num(d['cublas_ms'], 4, 'g')}, "
            f"speedup {_num(d['speedup_vs_cublas'], 2)}x, roofline "
            f"{_num(d['roofline_fraction'].get('measured'), 2)}")


def print_targets(doc: dict[str, Any]) -> None:
    for t in doc["targets"]:
        print(f"{t['status'].upper():>8}  {t['name']}: {t['summary']}")


def finish(doc: dict[str, Any], stem: Path, started: float) -> int:
    doc["targets"] = evaluate_targets(doc["cases"])
    doc["complete"] = not doc["skipped"]
    save(doc, stem, started)
    print_targets(doc)
    print(f"wrote {stem}.json and {stem}.md in {doc['seconds']:.0f} s")
    bad_case = any("error" in r or not r.get("rel_err_ok") for r in doc["cases"])
    return 0 if doc["correctness"]["passed"] and not bad_case else 1


def run_gpu(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    device = torch.cuda.get_device_name()
    mode = "quick" if args.quick else "full"
    cases = QUICK if args.quick else MATRIX
    doc = new_document(device, mode, args)
    stem = output_stem(args.out, device, doc["date"], mode)
    doc["ceilings"]["spec"] = spec_ceilings(guess_spec(device))
    tma_on = True if torch.cuda.get_device_capability() >= (9, 0) else None
    checks = correctness_checks(tma_on, args.quick, big_m=300)
    log.info("%s: %d correctness checks, then %d cases (planned ~%d s; no case starts after "
             "%d s)", device, len(checks), len(cases), 40 + 7 * len(cases), args.budget_s)
    doc["correctness"] = run_checks(checks, "cuda")
    save(doc, stem, started)
    doc["ceilings"]["measured"] = guarded(lambda: measure_ceilings_here(cases))
    doc["host_overhead"] = measure_host_overhead("cuda")
    env = Env("cuda", CudaTimer(args.warmup_ms, args.rep_ms), args.torch_tune_s)
    run_cases(cases, env, doc, stem, started, started + args.budget_s)
    return finish(doc, stem, started)


def reevaluate(path: Path, rule: str) -> int:
    """Recompute every case's derived figures and the targets of a results file with this
    version's rules (the measurements stay as they are) and rewrite its .json and .md."""
    from spdy_gpu.jsonio import load_json

    if path.suffix != ".json":
        raise errors.SpdyError(f"{path} is not a .json results file")
    doc = load_json(path, SUITE_FORMAT, SUITE_VERSION)
    for row in doc["cases"]:
        if "derived" in row:
            row["derived"] = derive(row, doc["ceilings"])
    doc["targets"] = evaluate_targets(doc["cases"])
    doc["reevaluated"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                          "git": software().get("git", "?"), "rule": rule}
    stem = path.with_suffix("")
    write(doc, stem)
    print_targets(doc)
    print(f"rewrote {stem}.json and {stem}.md")
    return 0


def run_cpu_check(args: argparse.Namespace) -> int:
    """Correctness on tiny shapes under Triton's interpreter, then the measuring and report
    path on CPU_CASES with fake times and fake "measured" ceilings (0.9 x the H100 spec)."""
    from spdy_gpu.gpu_specs import GPU_SPECS

    started = time.perf_counter()
    device = "cpu-check (Triton interpreter, FAKE times)"
    doc = new_document(device, "cpu-check", args)
    stem = output_stem(args.out, "cpu-check", doc["date"], "full")
    spec = spec_ceilings(GPU_SPECS["h100-sxm"])
    doc["ceilings"] = {"spec": spec, "measured": {
        "peak_flops": 0.9 * spec["peak_flops"], "bandwidth": 0.9 * spec["bandwidth"],
        "source": "FAKE (cpu-check): 0.9 x the spec"}}
    doc["correctness"] = run_checks(correctness_checks(True, args.quick, big_m=80), "cpu")
    doc["host_overhead"] = measure_host_overhead("cpu", calls=1, sync=lambda: None)
    run_cases(CPU_CASES, Env("cpu", FakeTimer(), args.torch_tune_s), doc, stem, started,
              math.inf)
    return finish(doc, stem, started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the ~2-minute subset")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="output folder (default bench/results)")
    parser.add_argument("--reevaluate", metavar="FILE.json",
                        help="recompute the derived figures and targets of a results file "
                             "with this version's rules (nothing is measured)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="without a GPU: correctness under Triton's interpreter on tiny "
                             "shapes and the report on fake times")
    parser.add_argument("--budget-s", type=positive_seconds, default=None,
                        help="no case starts after this many seconds (default 420; quick 150)")
    parser.add_argument("--torch-tune-s", type=positive_seconds, default=15.0,
                        help="time box of each bsr_dense_mm tuning (default 15)")
    parser.add_argument("--warmup-ms", type=int, default=10, help="do_bench warm-up (10 ms)")
    parser.add_argument("--rep-ms", type=int, default=40, help="do_bench repetitions (40 ms)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.warmup_ms < 0 or args.rep_ms < 1:
        parser.error(f"--warmup-ms {args.warmup_ms} must be >= 0 and --rep-ms {args.rep_ms} "
                     ">= 1")
    if not args.reevaluate:
        check_output_dir(args.out)                      # before minutes of checks
    if args.budget_s is None:
        args.budget_s = 150.0 if args.quick else 420.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.reevaluate:
        try:
            return reevaluate(Path(args.reevaluate), REEVALUATION_RULE)
        except errors.SpdyError as e:
            print(f"gpu_suite: {errors.first_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - any malformed content: one line, not a trace
            print(f"gpu_suite: {args.reevaluate} is not a complete results file "
                  f"({first_line(e)}); pass one this script wrote", file=sys.stderr)
            return 2
    if args.cpu_check:
        return run_cpu_check(args)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device, nothing measured (--cpu-check checks the script on "
              "the CPU)")
        return 0
    return run_gpu(args)


if __name__ == "__main__":
    run_script(main)
