"""DeepSparse backend: layer attribution, checkpoints, and a real (tiny) measurement."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spdy_gpu.errors import MissingDependencyError, SpdyError
from spdy_gpu.layers import LayerInfo, discover_layers
from spdy_gpu.options import SparsityOption

OPTIONS = [SparsityOption.dense(), SparsityOption.unstructured(0.5),
           SparsityOption.unstructured(0.9)]


def test_missing_deepsparse_is_a_one_line_install_hint(monkeypatch):
    from spdy_gpu.backends.deepsparse import DeepSparseBackend
    monkeypatch.setitem(sys.modules, "deepsparse", None)       # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'spdy-gpu\[deepsparse\]'"):
        DeepSparseBackend()


def test_attribute_layers_sums_per_module_and_refuses_fusion_or_nothing_attributed():
    from spdy_gpu.backends.deepsparse import TOTAL, attribute_layers
    to_module = {"/a/MatMul_output_0": "a", "/b/Conv_output_0": "b"}
    info = [{"canonical_name": "/a/MatMul_output_0", "average_run_time_in_ms": 1.5},
            {"canonical_name": "/a/Add_output_0", "average_run_time_in_ms": 0.25},
            {"canonical_name": "/x/Relu_output_0,/b/Conv_output_0", "average_run_time_in_ms": 2.0},
            {"canonical_name": "<none>", "average_run_time_in_ms": 0.5}]
    assert attribute_layers(info, to_module) == {"a": 1.5, "b": 2.0, TOTAL: 4.25}
    fused = [{"canonical_name": "/a/MatMul_output_0,/b/Conv_output_0",
              "average_run_time_in_ms": 1.0}]
    with pytest.raises(SpdyError, match="optimization level 0"):
        attribute_layers(fused, to_module)
    # b computed in no engine layer of its own: 0 here, its time stays in the fixed time
    assert attribute_layers(info[:2], to_module) == {"a": 1.5, "b": 0.0, TOTAL: 1.75}
    with pytest.raises(SpdyError, match="no engine layer for any prunable layer"):
        attribute_layers(info[1:2], to_module)


def test_checkpoint_resumes_only_the_same_key(tmp_path, caplog):
    from spdy_gpu.backends.deepsparse import _Checkpoint
    path = tmp_path / "t.json.partial"
    key = {"model": "toy", "layers": [["a", [8, 8], 1, 4]], "protocol": {"repeats": 3}}
    store = _Checkpoint(path, key)
    store.add(0, OPTIONS[1], {"a": 1.0})
    store.add(1, OPTIONS[1], {"a": 3.0})
    again = _Checkpoint(path, key)
    assert again.done == 2 and again.has(1, OPTIONS[1]) and not again.has(0, OPTIONS[0])
    assert sorted(again.values(OPTIONS[1], "a")) == [1.0, 3.0]
    with caplog.at_level("WARNING"):
        assert _Checkpoint(path, {**key, "protocol": {"repeats": 5}}).done == 0
    assert "other protocol" in caplog.text
    path.write_text('{"key": ')                               # truncated file
    assert _Checkpoint(path, key).done == 0


def test_supports_unstructured_but_not_grouped_convs():
    pytest.importorskip("deepsparse")
    from spdy_gpu.backends import get_backend
    backend = get_backend("deepsparse", threads=1, repeats=1)
    linear = LayerInfo("fc", "linear", (8, 8))
    depthwise = LayerInfo("dw", "conv2d", (8, 1, 3, 3), groups=8)
    assert backend.supports(linear, OPTIONS[1]) and backend.supports(depthwise, OPTIONS[0])
    assert not backend.supports(depthwise, OPTIONS[1])
    assert not backend.supports(linear, SparsityOption.blocked(0.5, 4))
    with pytest.raises(SpdyError, match="--threads 999"):
        get_backend("deepsparse", threads=999)


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 512)
        self.down = nn.Linear(512, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("deepsparse")
    from spdy_gpu.backends.deepsparse import DeepSparseBackend
    return DeepSparseBackend(threads=1, repeats=2, iterations=3, warmup=1)


def test_measure_table_resumes_after_interruption(backend, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    layers = discover_layers(model, example)
    checkpoint = tmp_path / "t.json.partial"
    calls = []
    real = type(backend).analyse

    def flaky(self, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[3])
        return real(self, *args)

    monkeypatch.setattr(type(backend), "analyse", flaky)
    kwargs = dict(model_name="toy", checkpoint=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        backend.measure_table(model, example, layers, OPTIONS, **kwargs)
    assert checkpoint.exists() and len(calls) == 3
    monkeypatch.setattr(type(backend), "analyse", real)
    table = backend.measure_table(model, example, layers, OPTIONS, **kwargs)
    assert checkpoint.exists(), "kept until the table is saved"
    table.save(tmp_path / "t.json")
    assert not checkpoint.exists()
    assert table.layer_names == ["up", "down"]
    assert table.layers[0].gemm == (512, 128, 64)
    times = table.times()
    assert (times > 0).all() and table.dense_total_ms > 0 and table.fixed_ms >= 0
    assert table.fingerprint.threads == 1 and table.fingerprint.backend == "deepsparse"
    assert (table.fingerprint.batch_size, table.fingerprint.input_shape) == (1, "0=1x64x128")
    assert table.provenance["repeats"] == 2
    calibration = table.provenance["fixed_calibration"]     # dense, then levels 0.5 and 0.9
    assert [c["option"] for c in calibration] == ["dense", "unstructured@0.5",
                                                  "unstructured@0.9"]
    residuals = sorted(c["measured_ms"] - c["layers_ms"] for c in calibration)
    assert table.fixed_ms == pytest.approx(max(residuals[1], 0.0))


def test_settled_latency_leaves_out_engines_that_settled_slow():
    from spdy_gpu.backends.deepsparse import settled_latency
    rounds = [[10.0, 10.4, 10.2], [13.0, 13.4, 13.2], [10.6, 10.5, 11.0]]   # engine 1: +30%
    result = settled_latency(rounds, tolerance=0.15)
    assert result.slow_engines == 1
    assert result.engine_ms == (10.2, 13.2, 10.6)
    assert result.median_ms == pytest.approx(10.45)          # rounds of engines 0 and 2
    assert result.spread_ms == pytest.approx(1.0)
    assert settled_latency(rounds, tolerance=0.5).slow_engines == 0


class FakeEngine:
    def __init__(self, label, log):
        self.label, self.log = label, log

    def run(self, inputs):
        self.log.append(self.label)


def test_rounds_go_round_robin_over_every_engine_of_every_model(backend, monkeypatch):
    log, compiled = [], []

    def compile_fake(path, inputs, batch):
        compiled.append(path.name)
        return FakeEngine(f"{path.name}{len(compiled)}", log)

    monkeypatch.setattr(backend, "_compile", compile_fake)
    monkeypatch.setattr(backend, "engines", 2)
    result = backend._interleaved({"dense": Path("d"), "pruned": Path("p")}, [], 1)
    assert compiled == ["d", "d", "p", "p"]                  # fresh engines, each file once
    warm = 4 * 3                                             # 3 untimed runs per engine
    timed = log[warm:warm + 4 * backend.rounds * backend.iterations]
    blocks = timed[::backend.iterations]                     # one round = `iterations` runs
    assert blocks == ["d1", "d2", "p3", "p4"] * backend.rounds
    assert set(result) == {"dense", "pruned"} and len(result["pruned"].engine_ms) == 2


def test_latency_of_two_models_in_one_interleaved_run(backend):
    dense, pruned = TokenMLP().eval(), TokenMLP().eval()
    with torch.no_grad():
        pruned.up.weight[torch.rand_like(pruned.up.weight) < 0.9] = 0
    result = backend.latency({"dense": dense, "pruned": pruned}, torch.randn(2, 16, 128))
    for latency in result.values():
        assert latency.median_ms > 0 and latency.spread_ms >= 0
        assert len(latency.engine_ms) == backend.engines
        assert 0 <= latency.slow_engines < backend.engines
    with pytest.raises(SpdyError, match="no models to time"):
        backend.latency({}, torch.randn(2, 16, 128))


def test_speedup_curves_mark_sparse_slower_than_dense(toy_table, tmp_path):
    from spdy_gpu.plots import layer_role, plot_speedup_curves, speedup_curves
    sparsities, speedup = speedup_curves(toy_table)
    assert sparsities.shape == (3,) and speedup.shape == (3, 3)
    assert speedup[0, 0] == pytest.approx(4 / 3) and speedup[2, 0] == pytest.approx(3 / 3.5)
    assert np.isnan(speedup[2, 2])                         # unsupported option
    assert layer_role("bert.encoder.layer.11.output.dense") == "bert.encoder.layer.*.output.dense"
    path = plot_speedup_curves(toy_table, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the adaptive protocol --------------------------------------------------------------------

def smooth(densities, layers=4):
    """Layer times falling smoothly with density, like a real sparsity curve."""
    return [np.full(layers, 0.05 + d ** 0.7) for d in densities]


DENSITIES = list(np.geomspace(0.6, 0.01, 15))          # 15 levels from 40% to 99% sparsity


def test_a_smooth_curve_is_on_trend():
    from spdy_gpu.backends.deepsparse import off_trend
    assert off_trend(DENSITIES, smooth(DENSITIES), 0.15) == []


@pytest.mark.parametrize("index", [0, 1, 7, 13, 14])
def test_a_disturbed_level_is_off_trend_wherever_it_lies(index):
    from spdy_gpu.backends.deepsparse import off_trend
    times = smooth(DENSITIES)
    times[index] = times[index] * 1.3
    assert off_trend(DENSITIES, times, 0.15) == [index]     # its neighbours are not blamed


def test_three_levels_are_enough_for_a_trend():
    from spdy_gpu.backends.deepsparse import off_trend
    times = smooth(DENSITIES[:3])
    times[2] = times[2] * 2.5
    assert 2 in off_trend(DENSITIES[:3], times, 0.15)


def test_faster_than_trend_is_not_flagged_but_a_few_slow_layers_are():
    from spdy_gpu.backends.deepsparse import off_trend
    times = smooth(DENSITIES, layers=8)
    times[3] = times[3] * 0.7                               # no disturbance makes a call faster
    assert off_trend(DENSITIES, times, 0.15) == []
    times = smooth(DENSITIES, layers=8)
    times[5][:3] *= 1.5                                     # 3 of 8 layers 50% slow: total +15%
    times[5][3:] *= 0.95
    assert off_trend(DENSITIES, times, 0.2) == [5]          # total within 20%, layers not


@pytest.fixture(scope="module")
def adaptive():
    pytest.importorskip("deepsparse")
    from spdy_gpu.backends.deepsparse import DeepSparseBackend
    return DeepSparseBackend(threads=1, repeats=0, iterations=3, warmup=1)


def test_adaptive_protocol_catches_a_slow_stretch_and_remeasures_only_it(adaptive,
                                                                         monkeypatch):
    from spdy_gpu.backends.deepsparse import TOTAL
    torch.manual_seed(0)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    layers = discover_layers(model, example)
    options = [SparsityOption.dense()] + [SparsityOption.unstructured(s)
                                          for s in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)]
    calls = []
    stretch = {"unstructured@0.7", "unstructured@0.8", "unstructured@0.9"}

    def fake_analyse(self, path, inputs, batch, option, to_module):
        calls.append(option.name)
        # a stretch of consecutive calls in the first pass runs 50% slow, consistently
        slow = 1.5 if option.name in stretch and calls.count(option.name) == 1 else 1.0
        # (ms scaled to stay below the real end-to-end time, as layer times add up to it)
        times = {name: slow * 0.02 * (0.05 + option.density ** 0.7) for name in ("up", "down")}
        return {**times, TOTAL: sum(times.values())}

    monkeypatch.setattr(type(adaptive), "analyse", fake_analyse)
    table = adaptive.measure_table(model, example, layers, options, model_name="toy")
    per_option = table.provenance["calls_per_option"]
    assert per_option["dense"] == 3 and per_option["unstructured@0.7"] == 2
    assert sum(per_option.values()) == 3 + 6 * 2
    assert len(calls) == 15 + 3                      # the three slow calls run again
    for name in stretch:
        density = 1 - float(name.split("@")[1])
        assert table.provenance["layer_sums_per_call_ms"][name] == \
            [pytest.approx(2 * 0.02 * (0.05 + density ** 0.7))] * 2
    assert table.provenance["repeats"] is None and "adaptive" in table.provenance["protocol"]
    assert table.provenance["calibration_engines"] == {
        "dense": 3, "unstructured@0.5": 1, "unstructured@0.8": 1, "unstructured@0.95": 1}


def test_repeats_forces_that_many_calls_per_option(backend, monkeypatch):
    from spdy_gpu.backends.deepsparse import TOTAL

    def steady(self, path, inputs, batch, option, to_module):
        return {"up": 0.01, "down": 0.01, TOTAL: 0.02}

    monkeypatch.setattr(type(backend), "analyse", steady)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    table = backend.measure_table(model, example, discover_layers(model, example), OPTIONS,
                                  model_name="toy")
    assert table.provenance["calls_per_option"] == dict.fromkeys(
        [o.name for o in OPTIONS], backend.repeats)
    assert set(table.provenance["calibration_engines"].values()) == {backend.engines}


def test_a_compile_that_ends_the_process_is_a_one_line_error(backend, tmp_path, monkeypatch):
    """DeepSparse ends the process on some internal assertions (status 1, no exception):
    the forked first compile turns that into a SpdyError naming the assertion."""
    import os
    from types import SimpleNamespace

    def dies(*args, **kwargs):
        os.write(2, b"banner\nAssertion at src/lib/jit/function/fused_ops.cpp:250\nmail us\n")
        os._exit(1)

    path = tmp_path / "m.onnx"
    path.write_bytes(b"")
    monkeypatch.setattr(backend, "ds", SimpleNamespace(compile_model=dies))
    with pytest.raises(SpdyError, match=r"crashed compiling this model \(exit status 1: "
                                        r"Assertion at src/lib/jit/function/fused_ops"):
        backend._check_compiles(path, [], 1)
    monkeypatch.setattr(backend, "ds", SimpleNamespace(compile_model=lambda *a, **k: None))
    backend._check_compiles(path, [], 1)                   # a compile that returns is fine


def test_layer_times_far_above_the_whole_are_refused_and_not_resumed(backend, monkeypatch,
                                                                     tmp_path):
    """A busy machine's outliers (layers adding up to 800x the model) planned 6.8x for a
    model pruning cannot speed up, and a rerun resumed the same calls from the checkpoint."""
    from spdy_gpu.backends.deepsparse import TOTAL

    def stalled(self, path, inputs, batch, option, to_module):
        return {"up": 20.0, "down": 20.0, TOTAL: 40.0}

    monkeypatch.setattr(type(backend), "analyse", stalled)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    checkpoint = tmp_path / "t.json.partial"
    with pytest.raises(SpdyError, match="add up to \\d+x the measured model .* measure again"):
        backend.measure_table(model, example, discover_layers(model, example), OPTIONS,
                              model_name="toy", checkpoint=checkpoint)
    assert not checkpoint.exists()


def test_layer_times_adding_up_to_twice_the_whole_are_warned_about(backend, monkeypatch,
                                                                   caplog):
    """Layers at 2x the model with a positive fixed time passed without a word (only a
    negative median residual was warned about), and plans from such a table are off."""
    from spdy_gpu.backends import Latency
    from spdy_gpu.backends.deepsparse import TOTAL

    def analysed(self, path, inputs, batch, option, to_module):
        return {"up": 2.0 * option.density, "down": 2.0 * option.density, TOTAL: 1.0}

    def whole(self, paths, inputs, batch, engines=None):   # residuals of the levels > 0
        return {name: Latency(2.0 if name == "dense" else 3.0, 0.0) for name in paths}

    monkeypatch.setattr(type(backend), "analyse", analysed)
    monkeypatch.setattr(type(backend), "_interleaved", whole)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    table = backend.measure_table(model, example, discover_layers(model, example), OPTIONS,
                                  model_name="toy")
    assert table.fixed_ms > 0
    assert "the prunable layers alone take 2.00x the measured model" in caplog.text


def test_the_adaptive_protocol_on_a_grid_too_short_for_a_trend(adaptive, monkeypatch):
    """Fewer than 3 unstructured levels: no chain to draw a trend on (was a ValueError
    from stacking no arrays, an internal error of spdy-gpu timings --levels 2 --repeats 0)."""
    from spdy_gpu.backends.deepsparse import TOTAL

    def steady(self, path, inputs, batch, option, to_module):
        times = {name: 0.01 * (0.05 + option.density) for name in ("up", "down")}
        return {**times, TOTAL: sum(times.values())}

    monkeypatch.setattr(type(adaptive), "analyse", steady)
    model, example = TokenMLP().eval(), torch.randn(1, 64, 128)
    options = [SparsityOption.dense(), SparsityOption.unstructured(0.5),
               SparsityOption.unstructured(0.9)]
    table = adaptive.measure_table(model, example, discover_layers(model, example), options,
                                   model_name="toy")
    assert [o.name for o in table.options] == [o.name for o in options]
