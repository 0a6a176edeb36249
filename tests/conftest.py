"""Shared test fixtures: small timing tables built from arrays; the two CPU paths of the
block-sparse layers."""

import math

import pytest

from spdy_gpu.options import option_grid
from spdy_gpu.timing import Fingerprint, LayerTiming, TimingTable


def fingerprint(**changes) -> Fingerprint:
    base = dict(backend="deepsparse", backend_version="1.8.0", device="Test CPU", isa="avx512",
                threads=2, batch_size=1, input_shape="batch=1,seq=128", dtype="float32",
                software={"torch": "2.13.0"})
    return Fingerprint(**{**base, **changes})


def make_table(times, dense_total, fixed, options=None, **fields) -> TimingTable:
    """times: [layers][options] in ms, inf for unsupported."""
    options = options or option_grid(count=len(times[0]) - 1)
    layers = tuple(
        LayerTiming(name=f"layer{i}", kind="linear", gemm=(8, 8, 4),
                    median_ms=tuple(None if math.isinf(t) else float(t) for t in row),
                    spread_ms=tuple(None if math.isinf(t) else 0.01 for t in row))
        for i, row in enumerate(times))
    return TimingTable(fingerprint=fields.pop("fingerprint", fingerprint()),
                       options=tuple(options), layers=layers, dense_total_ms=dense_total,
                       fixed_ms=fixed, model=fields.pop("model", "toy"), **fields)


@pytest.fixture
def toy_table() -> TimingTable:
    # 3 layers x (dense + 3 levels); layer 2 is slower sparse at the first level.
    return make_table([[4.0, 3.0, 2.0, 1.0],
                       [2.0, 1.5, 1.0, 0.5],
                       [3.0, 3.5, 2.0, math.inf]], dense_total=10.0, fixed=1.0)


@pytest.fixture(params=["fallback", "interpreter"])
def kernel_path(request, monkeypatch):
    """Block-sparse layers on a CPU run the exact torch fallback, or the Triton kernel under
    the interpreter (TRITON_INTERPRET=1): a test taking this runs on both."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    if request.param == "interpreter":
        pytest.importorskip("triton")
    return request.param
