"""pytest-benchmark timing of the block-sparse kernel and its dense baseline (CUDA only).

    pytest bench/ --benchmark-only

Each round launches the layer CALLS times back to back and synchronizes once, so the
figures are GPU time plus launch overhead, not host round trips; divide by CALLS (stored
in extra_info) for one call. For the full comparison grid with the roofline and PyTorch's
BSR kernel, run bench/gpu_suite.py.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="kernel timing needs a CUDA device and none was found; run on a GPU machine")

CALLS = 20
SHAPES = [(768, 3072), (4096, 4096), (11008, 4096)]      # N x K
MS = [16, 2048]


def _layer(n, k, m, block, density):
    from spdy_gpu.bsr import BSRWeight
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    keep = torch.rand(-(-n // block), -(-k // block), device="cuda", generator=gen) < density
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return x, weight, BSRWeight.from_dense(weight, mask, block)


def _time(benchmark, fn, **info):
    fn()                                   # compile and autotune outside the timing
    torch.cuda.synchronize()

    def rounds():
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(calls_per_round=CALLS, **info)
    benchmark.pedantic(rounds, rounds=10, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bsr_linear(benchmark, shape, m, block, density):
    from spdy_kernels.bsr_matmul import bsr_linear
    x, _, packed = _layer(*shape, m, block, density)
    benchmark.group = f"{shape[0]}x{shape[1]} M={m}"
    _time(benchmark, lambda: bsr_linear(x, packed.values, packed.crow_indices,
                                        packed.col_indices, packed.shape,
                                        indices=packed.indices),
          kernel="bsr_linear", block=block, density=packed.density)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_linear(benchmark, shape, m):
    x, weight, _ = _layer(*shape, m, 64, 1.0)
    benchmark.group = f"{shape[0]}x{shape[1]} M={m}"
    _time(benchmark, lambda: torch.nn.functional.linear(x, weight), kernel="cublas")
