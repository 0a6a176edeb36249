"""The reconstruction hot paths at all-MiniLM-L6-v2's shapes (synthetic weights and inputs):
one level of the fast solver on the largest layer next to the reference's AdaPrune (Adam on
the layer's output error, 10 passes) on the same layer, mask and rows, and the search's
stitch + restore of a 36-layer profile from a database. Each is its own benchmark group.

Run: flock /tmp/spdy-cpu.lock .venv/bin/pytest bench/test_bench_reconstruct.py --benchmark-only
"""

import pytest
import torch
from torch import nn

from spdy_gpu import SparsityOption, build_mask
from spdy_gpu.reconstruct import (
    FastConfig,
    LayerStats,
    build_database,
    reconstruct_fast,
    restore_,
    stitch_,
)
from spdy_gpu.reconstruct.adaprune import adaprune
from spdy_gpu.reconstruct.fast import damped_gram

# all-MiniLM-L6-v2's encoder: per block 4 x [384, 384], [1536, 384], [384, 1536].
SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]


def _inputs(rows, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[:, None]
    return torch.randn(rows, k, generator=g) @ basis


ONE_LAYER = "reconstruct one 384x1536 layer at 60%"


def _layer_problem():
    x = _inputs(8192, 1536)
    stats = LayerStats("output.dense", (x.double().T @ x.double())[None],
                       x.double().sum(0)[None], x.shape[0])
    dense = torch.randn(384, 1536, generator=torch.Generator().manual_seed(2)) * 0.05
    return x, stats, dense, build_mask(dense, SparsityOption.unstructured(0.6))


@pytest.mark.benchmark(group=ONE_LAYER)
def test_fast_solver_one_level_384x1536(benchmark):
    _, stats, dense, mask = _layer_problem()
    hessian = damped_gram(stats, 0.01, torch.float32)
    out = benchmark(reconstruct_fast, stats, dense, mask, dense * mask, FastConfig(), hessian)
    assert stats.relative_error(out, dense, None) < stats.relative_error(dense * mask, dense, None)


@pytest.mark.benchmark(group=ONE_LAYER)
def test_reference_adaprune_baseline_384x1536(benchmark):
    """The baseline: the reference's AdaPrune on the same rows (64 samples of 128), once."""
    x, stats, dense, mask = _layer_problem()
    samples = list(x.reshape(64, 1, 128, 1536))
    out = benchmark.pedantic(adaprune, (samples, dense, None, mask), rounds=1, iterations=1)
    assert stats.relative_error(out, dense, None) < stats.relative_error(dense * mask, dense, None)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(k, n) for _ in range(6) for n, k in SHAPES)

    def forward(self, x):
        return sum(layer(x[..., : layer.in_features]).sum() for layer in self.layers)


@pytest.fixture(scope="module")
def encoder_db(tmp_path_factory):
    torch.manual_seed(0)
    model = Encoder().eval()
    options = [SparsityOption.dense(), SparsityOption.unstructured(0.5),
               SparsityOption.unstructured(0.9)]
    names = [f"layers.{i}" for i in range(len(model.layers))]
    db = build_database(model, names, options, [_inputs(512, 1536, 1)],
                        tmp_path_factory.mktemp("db") / "encoder", progress=False,
                        fast=FastConfig(max_iters=5))
    return model, db, names, options


@pytest.mark.benchmark(group="stitch + restore a 36-layer profile")
def test_stitch_restore_36_layers(benchmark, encoder_db):
    model, db, names, options = encoder_db
    choices = {name: options[1 + i % 2] for i, name in enumerate(names)}

    def round_trip():
        restore_(model, stitch_(model, choices, db))

    benchmark(round_trip)
    assert (model.layers[0].weight != 0).all()
