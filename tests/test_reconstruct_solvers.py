"""Layer solvers: the fast Gram-matrix solver is the exact masked least squares, faithful
AdaPrune improves on magnitude pruning, and the fast solver is at least as good."""

import pytest
import torch

from spdy_gpu import SparsityOption, build_mask
from spdy_gpu.reconstruct import (
    AdaPruneConfig,
    FastConfig,
    LayerStats,
    adaprune,
    reconstruct_fast,
    solve_masked,
)
from spdy_gpu.reconstruct.fast import damped_gram, solve_masked_exact


def _correlated_inputs(rows, k, seed=0):
    """Inputs with a decaying spectrum and a mean, like real activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[:, None]
    return torch.randn(rows, k, generator=g) @ basis + 0.3


def _stats(x):
    x64 = x.double()
    return LayerStats("layer", (x64.T @ x64)[None], x64.sum(0)[None], x.shape[0])


def _exact(hessian, dense, mask):
    """Per-row Cholesky solves of w_S = H_SS^-1 (H w_dense)_S."""
    out = torch.zeros_like(dense)
    rhs = dense @ hessian
    for i in range(dense.shape[0]):
        keep = mask[i]
        h = hessian[keep][:, keep]
        out[i, keep] = torch.cholesky_solve(rhs[i, keep][:, None], torch.linalg.cholesky(h))[:, 0]
    return out


@pytest.mark.parametrize("option", [SparsityOption.unstructured(0.5),
                                    SparsityOption.unstructured(0.9),
                                    SparsityOption.n_of_m(2, 4),
                                    SparsityOption.blocked(0.5, 4, 4)])
def test_cg_reaches_the_exact_masked_least_squares(option):
    x = _correlated_inputs(400, 24)
    dense = torch.randn(20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = build_mask(dense, option)
    hessian = damped_gram(_stats(x), 0.01, torch.float64)
    solved = solve_masked(hessian, dense[None], mask[None], max_iters=500, tol=1e-14)[0]
    exact = _exact(hessian[0], dense, mask)
    torch.testing.assert_close(solved, exact, rtol=1e-6, atol=1e-8)
    assert (solved[~mask] == 0).all()
    batched = solve_masked_exact(hessian, dense[None], mask[None], budget_bytes=5000)[0]
    torch.testing.assert_close(batched, exact, rtol=1e-9, atol=1e-10)


def test_fast_float32_matches_float64():
    x = _correlated_inputs(300, 32, seed=1)
    dense = torch.randn(16, 32)
    mask = build_mask(dense, SparsityOption.unstructured(0.6))
    stats = _stats(x)
    w64 = reconstruct_fast(stats, dense, mask, config=FastConfig(dtype=torch.float64))
    e64 = stats.relative_error(w64, dense, None)
    e32 = stats.relative_error(reconstruct_fast(stats, dense, mask), dense, None)
    assert e32 == pytest.approx(e64, rel=1e-3)


def test_fast_beats_adaprune_which_beats_magnitude():
    torch.manual_seed(0)
    x = _correlated_inputs(64 * 16, 32, seed=2)
    dense = torch.randn(24, 32)
    bias = torch.randn(24)
    stats = _stats(x)
    samples = list(x[None].split(16, dim=1))                       # 64 samples of 16 rows
    for sparsity in (0.5, 0.8):
        mask = build_mask(dense, SparsityOption.unstructured(sparsity))
        magnitude = stats.relative_error(dense * mask, dense, bias)
        ada = adaprune(samples, dense, bias, mask, config=AdaPruneConfig(lr=1e-2, passes=5))
        fast = reconstruct_fast(stats, dense, mask)
        assert (ada[~mask] == 0).all() and (fast[~mask] == 0).all()
        e_ada, e_fast = (stats.relative_error(w, dense, bias) for w in (ada, fast))
        assert e_fast <= e_ada < magnitude


def test_grouped_conv_weights_keep_their_shape():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(2, 200, 9, generator=g, dtype=torch.float64)       # [G, M, Kg]
    stats = LayerStats("conv", rows.transpose(1, 2) @ rows, rows.sum(1), 200)
    dense = torch.randn(6, 1, 3, 3, generator=g)                           # 2 groups of 3
    mask = build_mask(dense, SparsityOption.unstructured(0.5))
    out = reconstruct_fast(stats, dense, mask)
    assert out.shape == dense.shape and out.dtype == dense.dtype
    assert stats.relative_error(out, dense, None) < stats.relative_error(dense * mask, dense, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_solver_on_cuda_matches_the_cpu():
    """Where there is a GPU the solver runs there (solver_device); the answer is the same."""
    from spdy_gpu.reconstruct.fast import solve_masked, solver_device

    torch.manual_seed(0)
    x = torch.randn(256, 96, dtype=torch.float64)
    hessian = (x.T @ x)[None]
    dense, mask = torch.randn(1, 48, 96), torch.rand(1, 48, 96) < 0.5
    assert solver_device().type == "cuda"
    cpu = solve_masked(hessian.float(), dense, mask)
    gpu = solve_masked(hessian.float().cuda(), dense.cuda(), mask.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
