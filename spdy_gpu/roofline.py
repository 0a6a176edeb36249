"""The roofline floor of Y[M, N] = X[M, K] @ W[N, K]^T, dense or block-sparse.

time >= max(FLOPs / peak_flops, bytes / bandwidth), with
  dense:  FLOPs = 2 N K M,    bytes = b (N K + K M + N M)
  sparse: FLOPs = 2 d N K M,  bytes = b (d N K + K M + N M) + 4 d N K / (rows * cols)
where b = bytes per value and d = fraction of blocks kept; the last term is the int32
column index of each stored block. Ceilings are FLOP/s and bytes/s, best measured on the
machine itself (`measure_ceilings`) rather than taken from a datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass


def gemm_cost(n: int, k: int, m: int, density: float = 1.0,
              block: int | tuple[int, int] | None = None,
              dtype_bytes: int = 2) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one layer's GEMM; block=None means a dense weight."""
    if block is None:
        weight_bytes = dtype_bytes * n * k
        density = 1.0
    else:
        rows, cols = (block, block) if isinstance(block, int) else block
        weight_bytes = density * n * k * (dtype_bytes + 4 / (rows * cols))
    return 2.0 * density * n * k * m, weight_bytes + dtype_bytes * (k * m + n * m)


def roofline_ms(n: int, k: int, m: int, density: float = 1.0,
                block: int | tuple[int, int] | None = None, dtype_bytes: int = 2, *,
                peak_flops: float, bandwidth: float) -> float:
    """Lower bound in milliseconds of one layer's GEMM; block=None means a dense weight."""
    flops, moved = gemm_cost(n, k, m, density, block, dtype_bytes)
    return 1e3 * max(flops / peak_flops, moved / bandwidth)


def semi_structured_ms(n: int, k: int, m: int, dtype_bytes: int = 2, *, peak_flops: float,
                       bandwidth: float) -> float:
    """Floor of a 2:4 layer as PyTorch runs it (cuSPARSELt / CUTLASS): half the FLOPs at the
    dense peak (sparse tensor cores double the throughput of the multiplies they keep), but
    the dense layer's memory traffic. The compressed weight is only 9/16 of the bytes, yet
    measured on an H200 2:4 ran 1.2-3.2x slower than dense at M <= 64 and paid only where
    compute-bound (1.65x at M = 4096; README, measured results), so the smaller weight is
    not counted as a saving."""
    moved = dtype_bytes * (n * k + k * m + n * m)
    return 1e3 * max(n * k * m / peak_flops, moved / bandwidth)


def roofline_speedup(n: int, k: int, m: int, density: float, block: int | tuple[int, int],
                     dtype_bytes: int = 2, *, peak_flops: float, bandwidth: float) -> float:
    """Ideal speedup of the block-sparse layer over the dense one (ratio of the two floors)."""
    ceilings = dict(peak_flops=peak_flops, bandwidth=bandwidth)
    dense = roofline_ms(n, k, m, dtype_bytes=dtype_bytes, **ceilings)
    return dense / roofline_ms(n, k, m, density, block, dtype_bytes, **ceilings)


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings of one device: matmul FLOP/s and device-memory bytes/s."""

    peak_flops: float
    bandwidth: float
    device: str


def measure_ceilings(dtype_name: str = "bfloat16", gemm: tuple[int, int, int] = (8192, 8192, 8192),
                     copy_bytes: int = 1 << 30) -> Ceilings:
    """Measure the two ceilings on the current CUDA device with triton.testing.do_bench:
    cuBLAS on Y[M, N] = X[M, K] @ W[N, K]^T at `gemm` = (N, K, M) in `dtype_name`, and a
    `copy_bytes` device-to-device copy (read + write)."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    n, k, m = gemm
    dtype = getattr(torch, dtype_name)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    matmul_ms = do_bench(lambda: F.linear(x, w), warmup=100, rep=500, return_mode="median")
    src = torch.empty(copy_bytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return Ceilings(peak_flops=2.0 * n * k * m / (matmul_ms * 1e-3),
                    bandwidth=2.0 * src.numel() * 4 / (copy_ms * 1e-3),
                    device=torch.cuda.get_device_name())
