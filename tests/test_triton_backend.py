"""The Triton latency backend on a CPU: the analytic estimate end to end, the no-GPU error,
the timing cache, supports(), block detection, and the measuring loop driven through the
kernel under Triton's interpreter with a stand-in clock (real GPU timing is bench/)."""

import json
import logging
import math
import os

import pytest
import torch
from torch import nn

import spdy_gpu.backends.triton as triton_backend
from spdy_gpu.backends import LatencyBackend, get_backend
from spdy_gpu.backends.triton import (
    CONV_NOTE,
    TimingCache,
    TritonBackend,
    cache_key,
)
from spdy_gpu.backends.triton_estimate import (
    OpCost,
    TritonEstimateBackend,
    estimate_layer_ms,
    fixed_ms,
    non_gemm_costs,
)
from spdy_gpu.errors import SpdyError
from spdy_gpu.gpu_specs import GPU_SPECS, GpuSpec, gpu_spec
from spdy_gpu.layers import LayerInfo, discover_layers
from spdy_gpu.masks import block_mask
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.options import SparsityOption, option_grid
from spdy_gpu.sparse_linear import BlockSparseLinear, sparsify_
from spdy_gpu.timing import Fingerprint, TimingTable

H100 = GPU_SPECS["h100-sxm"]
DENSE = SparsityOption.dense()


def block(sparsity: float, rows: int = 32, cols: int | None = None) -> SparsityOption:
    return SparsityOption.blocked(sparsity, rows, cols)


# ---- analytic estimate ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setting = ModelSetting(batch_size=1, seq_len=128)
    model, example = load_model("minilm").build(setting)
    return model, example, discover_layers(model, example), setting


def test_estimated_table_for_minilm_is_marked_everywhere(minilm, tmp_path):
    model, example, layers, setting = minilm
    options = option_grid("block", count=5, block=32)
    with pytest.raises(SpdyError, match="--estimate times nothing, so --repeats would be "
                                        "ignored; drop it"):
        get_backend("triton", estimate="h100-sxm", repeats=5)
    backend = get_backend("triton", estimate="h100-sxm")
    assert isinstance(backend, TritonEstimateBackend) and backend.dtype == "bf16"
    assert isinstance(backend, LatencyBackend)
    table = backend.measure_table(model, example, layers, options, model_name="minilm")
    assert table.estimated and "ESTIMATED" in table.fingerprint.device
    assert table.fingerprint.input_shape == "attention_mask=1x128,input_ids=1x128"
    assert len(table.layers) == 36 and all(l.note.startswith("ESTIMATED") for l in table.layers)
    assert [l.gemm for l in table.layers[:2]] == [(384, 384, 128)] * 2
    dense = table.dense_times()
    assert table.fixed_ms > 0
    assert table.dense_total_ms == pytest.approx(table.fixed_ms + dense.sum())
    assert math.isfinite(table.times().max())                  # every block fits 384 / 1536

    path = tmp_path / "minilm-h100-estimate.json"
    table.save(path)
    saved = json.loads(path.read_text())
    assert saved["estimated"] is True and "ESTIMATED" in saved["provenance"]["method"]
    loaded = TimingTable.load(path)
    assert loaded.estimated and loaded.layers == table.layers
    assert not (tmp_path / "triton-timings.json").exists()    # estimates are never cached


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Unswappable(nn.Module):
    """A Linear subclass and a reflect-padded 1x1 conv: deployment swaps neither."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(64, 64, 1, padding=1, padding_mode="reflect")
        self.plain_pw = nn.Conv2d(64, 64, 1)
        self.scaled = ScaledLinear(64, 64)
        self.plain = nn.Linear(64, 64)

    def forward(self, x):                                       # x: [B, 64, 4, 4]
        x = self.plain_pw(self.pw(x)).mean((2, 3))
        return self.plain(self.scaled(x))


def test_layers_deployment_cannot_swap_get_no_sparse_options():
    model, example = Unswappable().eval(), torch.randn(2, 64, 4, 4)
    layers = {layer.name: layer for layer in discover_layers(model, example)}
    assert {n for n, layer in layers.items() if layer.gpu_swappable} == {"plain_pw", "plain"}
    options = [DENSE, block(0.5, 32), SparsityOption.parse("nm2:4")]
    table = get_backend("triton", estimate="h100-sxm", dtype="fp16").measure_table(
        model, example, list(layers.values()), options, model_name="unswappable")
    rows = {row.name: row for row in table.layers}
    for name in ("pw", "scaled"):
        assert rows[name].median_ms[1:] == (None, None)
        assert "deployment cannot swap it" in rows[name].note
    assert rows["plain_pw"].median_ms[1] is not None
    assert None not in rows["plain"].median_ms


def toy_mlp(batch_size: int = 1):
    """User-model entry point for the command-line test."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval(), \
        torch.randn(batch_size, 8, 64)


def test_timings_command_with_estimate_writes_an_estimated_table(tmp_path, capsys):
    from spdy_gpu.cli import main
    out = tmp_path / "est.json"
    assert main(["timings", "--model", "tests.test_triton_backend:toy_mlp", "--backend",
                 "triton", "--estimate", "l4", "--dtype", "fp16", "--levels", "3",
                 "--out", str(out)]) == 0
    table = TimingTable.load(out)
    assert table.estimated and table.fingerprint.device == "NVIDIA L4 (ESTIMATED)"
    assert table.fingerprint.dtype == "float16"
    # the default grid mixes block levels and 2:4 (64 x 64 fp16 suits semi-structured)
    assert [o.pattern for o in table.options] == ["dense", "block", "block", "block", "nm"]
    assert all(0 < row.median_ms[-1] <= row.median_ms[0] for row in table.layers)
    assert "[ESTIMATED]" in capsys.readouterr().out


def odd_mlp(batch_size: int = 1):
    """Layers no 2:4 storage fits (K = 70 and N = 40 are not multiples of 64 and 32)."""
    return nn.Sequential(nn.Linear(70, 40), nn.ReLU(), nn.Linear(40, 40)).eval(), \
        torch.randn(batch_size, 70)


def test_a_grid_family_no_layer_runs_is_left_out_but_an_explicit_option_is_refused(tmp_path):
    from spdy_gpu.cli import main
    out = tmp_path / "est.json"
    args = ["timings", "--model", "tests.test_triton_backend:odd_mlp", "--backend", "triton",
            "--estimate", "h100-sxm", "--levels", "2", "--block", "16", "32", "--out", str(out)]
    assert main(args) == 0
    names = [o.name for o in TimingTable.load(out).options]
    assert names == ["dense", "block16x16@0.4", "block16x16@0.99", "block32x32@0.4",
                     "block32x32@0.99"]                         # nm2:4 dropped: no layer fits
    assert main([*args[:-2], "--options", "dense", "nm2:4", "--out", str(out)]) == 2


def test_semi_structured_support_and_estimate():
    backend = get_backend("triton", estimate="h100-sxm")
    two_four = SparsityOption.parse("nm2:4")
    assert backend.supports(LayerInfo("fc", "linear", (4096, 4096), m=16), two_four)
    assert not backend.supports(LayerInfo("fc", "linear", (4096, 4100), m=16), two_four)
    assert not backend.supports(LayerInfo("fc", "linear", (96, 64), m=16),
                                SparsityOption.parse("nm1:4"))
    assert not backend.supports(LayerInfo("c", "conv2d", (64, 576), m=16), two_four)
    # memory-bound: charged the dense layer's bytes (2:4 measured no faster than dense at
    # small M), so it never beats dense there; compute-bound: half the dense FLOPs
    layer = LayerInfo("fc", "linear", (4096, 4096), m=16)
    assert estimate_layer_ms(layer, two_four, H100, "bf16") == pytest.approx(
        estimate_layer_ms(layer, DENSE, H100, "bf16"))
    big = LayerInfo("fc", "linear", (4096, 4096), m=8192)
    assert estimate_layer_ms(big, two_four, H100, "bf16") == pytest.approx(
        4096 * 4096 * 8192 / H100.peak("bf16") * 1e3)
    assert estimate_layer_ms(big, DENSE, H100, "bf16") == pytest.approx(
        2 * estimate_layer_ms(big, two_four, H100, "bf16"))


def test_roofline_estimate_matches_hand_computed_h100_figure():
    # 4096 x 4096 at M = 16 in bf16 is memory-bound: 2 (N K + K M + N M) bytes at 3.35 TB/s.
    layer = LayerInfo("fc", "linear", (4096, 4096), m=16)
    expected_ms = 2 * (4096 * 4096 + 2 * 4096 * 16) / 3.35e12 * 1e3
    assert estimate_layer_ms(layer, DENSE, H100, "bf16") == pytest.approx(expected_ms)
    # compute-bound: 2 N K M FLOPs at 989.4 TFLOP/s
    big = LayerInfo("fc", "linear", (4096, 4096), m=65536)
    assert estimate_layer_ms(big, DENSE, H100, "bf16") == pytest.approx(
        2 * 4096 * 4096 * 65536 / 989.4e12 * 1e3)


@pytest.mark.parametrize("m", [1, 16, 256, 8192])
@pytest.mark.parametrize("side", [16, 32, 64])
def test_roofline_estimate_is_monotone_in_sparsity(m, side):
    layer = LayerInfo("fc", "linear", (4096, 11008), m=m)
    times = [estimate_layer_ms(layer, o, H100, "bf16")
             for o in option_grid("block", count=41, block=side)]
    assert all(a >= b for a, b in zip(times, times[1:]))
    assert min(times) >= H100.kernel_floor_ms
    assert times[-1] < times[0]                               # 99% sparse beats dense here


def test_tiny_layers_sit_on_the_kernel_floor():
    layer = LayerInfo("fc", "linear", (64, 64), m=8)
    for option in (DENSE, block(0.9, 16)):
        assert estimate_layer_ms(layer, option, H100, "bf16") == H100.kernel_floor_ms


def test_a_layer_called_twice_is_estimated_as_two_gemms():
    once = LayerInfo("fc", "linear", (64, 64), m=16)
    twice = LayerInfo("fc", "linear", (64, 64), m=16, calls=(8, 8))
    assert estimate_layer_ms(once, DENSE, H100, "bf16") == H100.kernel_floor_ms
    assert estimate_layer_ms(twice, DENSE, H100, "bf16") == 2 * H100.kernel_floor_ms
    with pytest.raises(ValueError, match="do not sum"):
        LayerInfo("fc", "linear", (64, 64), m=16, calls=(8, 4))


def test_non_gemm_costs_skip_prunable_layers_and_views():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):                                  # x: [4, 8]
            scores = torch.bmm(x.view(2, 2, 8), x.view(2, 2, 8).transpose(1, 2))   # [2, 2, 2]
            return self.fc2(torch.relu(self.fc1(x))) + x + scores.sum()

    costs = non_gemm_costs(Block(), torch.randn(4, 8), ["fc1", "fc2"], dtype_bytes=2)
    by_op = {c.op: c for c in costs}
    assert "addmm" not in by_op and "view" not in by_op and "transpose" not in by_op
    assert by_op["relu"].bytes == 2 * (4 * 16) * 2           # read + write [4, 16] at 2 bytes
    assert by_op["relu"].flops == 0
    assert by_op["bmm"].flops == 2 * 2 * 2 * 2 * 8            # 2 * batch * M * N * K


# ---- the no-GPU path ------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_without_cuda_one_line_error_names_the_three_choices():
    with pytest.raises(SpdyError) as error:
        get_backend("triton")
    message = str(error.value)
    assert "\n" not in message and "no CUDA device" in message
    assert "--timings" in message and "--estimate" in message and "h100-sxm" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_without_cuda_a_latency_caller_is_told_it_needs_a_gpu():
    import argparse

    from spdy_gpu.cli.common import add_backend_args, backend_from_args
    parser = argparse.ArgumentParser()
    add_backend_args(parser)
    args = parser.parse_args(["--backend", "triton"])
    with pytest.raises(SpdyError, match="no CUDA device for the triton backend"):
        backend_from_args(args)
    with pytest.raises(SpdyError) as error:
        backend_from_args(args, for_latency=True)
    message = str(error.value)
    assert "\n" not in message and "end-to-end latency" in message and "needs a GPU" in message
    assert "where the profile's timings were measured" in message and "--estimate" not in message


def test_latency_without_a_device_says_it_needs_a_gpu(tmp_path, monkeypatch):
    backend = InterpretedBackend(cache_dir=tmp_path)
    monkeypatch.setattr(backend, "_has_device", lambda: False)
    with pytest.raises(SpdyError, match="end-to-end latency on the triton backend needs a GPU"):
        backend.latency({"m": TwoLayer()}, torch.randn(8, 4, 4, 4))


def test_bad_configuration_is_refused():
    with pytest.raises(SpdyError, match="unknown GPU"):
        get_backend("triton", estimate="h900")
    with pytest.raises(SpdyError, match="unknown dtype"):
        get_backend("triton", dtype="int8", estimate="l4")
    with pytest.raises(SpdyError, match="repeats"):
        InterpretedBackend(repeats=0)
    backend = TritonEstimateBackend(H100, dtype="fp16")
    assert backend.spec is H100 and backend.estimated
    with pytest.raises(SpdyError, match="cannot measure end-to-end latency, which needs a GPU"):
        backend.latency({"m": nn.Linear(4, 4)}, torch.randn(1, 4))


# ---- GPU specs ------------------------------------------------------------------------------

def test_datasheet_specs_are_sane():
    for key, spec in GPU_SPECS.items():
        assert gpu_spec(key.upper()) is spec and spec.source and spec.sm_count > 0
        assert spec.peak("bf16") == spec.peak("fp16") >= spec.peak("tf32") >= spec.peak("fp32")
        # dense Tensor Core peaks lie between 50 and 1000 TFLOP/s, HBM/GDDR 0.2..5 TB/s
        assert 50e12 < spec.peak("bf16") < 1000e12 and 0.2e12 < spec.bandwidth < 5e12


def test_measured_spec_round_trips_and_bad_files_are_refused(tmp_path):
    spec = GpuSpec("Test GPU", "sm_90", 132, 3.0e12, {"bf16": 700e12}, "measured", 0.002)
    spec.save(tmp_path / "gpu.json")
    assert gpu_spec(str(tmp_path / "gpu.json")) == spec
    (tmp_path / "bad.json").write_text('{"format": "spdy-gpu/gpu-spec", "version": 1, '
                                       '"name": "x", "arch": "sm_90", "sm_count": 1, '
                                       '"bandwidth": -1, "peak_flops": {"bf16": 1}}')
    with pytest.raises(SpdyError, match="bandwidth -1 is not a GPU's"):
        gpu_spec(str(tmp_path / "bad.json"))
    with pytest.raises(SpdyError, match="no fp16 peak"):
        spec.peak("fp16")


@pytest.mark.parametrize("field, value, match", [
    ("bandwidth", "NaN", "bandwidth nan is not a GPU's"),
    ("bandwidth", "1e-300", r"bandwidth 1e-300 is not a GPU's \(expected 1e\+09 .. 1e\+15\)"),
    ("peak_flops", '{"bf16": Infinity}', "peak_flops.bf16 inf is not a GPU's"),
    ("peak_flops", '{"bf16": "1e15"}', "peak_flops.bf16 is '1e15', not a number"),
    ("peak_flops", "{}", "no peak FLOP/s given"),
    ("kernel_floor_ms", "NaN", "kernel_floor_ms nan is not a GPU's"),
    ("kernel_floor_ms", "1e308", "kernel_floor_ms 1e\\+308 is not a GPU's"),
    ("sm_count", "0", "positive SM count"),
    ("arch", '"banana"', "an arch like sm_90"),
])
def test_a_spec_file_with_nonsense_ceilings_is_refused(field, value, match, tmp_path):
    doc = {"name": '"x"', "arch": '"sm_90"', "sm_count": "1", "bandwidth": "1e12",
           "peak_flops": '{"bf16": 1e14}', field: value}
    body = ", ".join(f'"{k}": {v}' for k, v in doc.items())
    (tmp_path / "bad.json").write_text(f'{{"format": "spdy-gpu/gpu-spec", "version": 1, {body}}}')
    with pytest.raises(SpdyError, match=f"^{tmp_path / 'bad.json'}: .*{match}"):
        gpu_spec(str(tmp_path / "bad.json"))


# ---- cache ----------------------------------------------------------------------------------

def test_cache_key_names_everything_a_time_depends_on():
    base = dict(device="NVIDIA H100", software={"torch": "2.13", "triton": "3.9"},
                dtype="bf16", gemm=(384, 384, 128), option=block(0.5), repeats=3)
    variants = [base, {**base, "device": "NVIDIA A100"},
                {**base, "software": {"torch": "2.13", "triton": "3.8"}},
                {**base, "dtype": "fp16"}, {**base, "gemm": (384, 384, 4096)},
                {**base, "gemm": (1536, 384, 128)}, {**base, "option": block(0.6)},
                {**base, "option": block(0.5, 64)}, {**base, "option": DENSE},
                {**base, "repeats": 5}]
    keys = {cache_key(**v) for v in variants}
    assert len(keys) == len(variants)
    assert cache_key(**base) == cache_key(**{**base, "software": {"triton": "3.9",
                                                                   "torch": "2.13"}})


def test_cache_persists_merges_and_writes_atomically(tmp_path, monkeypatch, caplog):
    path = tmp_path / "cache.json"
    first, second = TimingCache(path), TimingCache(path)
    first.put("a", 1.0, 0.1)
    second.put("b", 2.0, 0.2)                                   # another process, same file
    assert TimingCache(path).entries == {"a": (1.0, 0.1), "b": (2.0, 0.2)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]   # no temp files left

    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SpdyError, match=r"cannot write .* \(disk full\)"):
        TimingCache(path).put("c", 3.0, 0.0)
    assert path.read_bytes() == before                          # old file intact, no half file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_corrupted_cache_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "cache.json"
    path.write_text('{"format": "spdy-gpu/triton-timing-cache", "version": 1, "entr')
    with caplog.at_level(logging.WARNING):
        cache = TimingCache(path)
    assert cache.entries == {} and "unreadable timing cache" in caplog.text
    cache.put("a", 1.0, 0.0)
    assert TimingCache(path).entries == {"a": (1.0, 0.0)}


# ---- supports -------------------------------------------------------------------------------

def test_supports_block_options_on_linears_that_fit_them():
    backend = TritonEstimateBackend("h100-sxm")
    linear = LayerInfo("fc", "linear", (384, 1536), m=128)
    conv = LayerInfo("conv", "conv2d", (64, 64, 3, 3), m=3136)
    narrow = LayerInfo("head", "linear", (48, 384), m=128)
    for layer in (linear, conv, narrow):
        assert backend.supports(layer, DENSE)
    assert backend.supports(linear, block(0.5)) and backend.supports(linear, block(0.9, 16, 128))
    assert not backend.supports(conv, block(0.5))
    assert not backend.supports(linear, block(0.5, 512))      # more rows than the layer's 384
    assert not backend.supports(narrow, block(0.5, 64))       # 64 > N = 48
    assert backend.supports(narrow, block(0.5, 32))
    assert not backend.supports(linear, SparsityOption.unstructured(0.5))
    assert backend.supports(linear, SparsityOption.n_of_m(2, 4))     # 384 x 1536 suits 2:4
    assert not backend.supports(narrow, SparsityOption.n_of_m(2, 4))  # 48 rows: not 32-aligned
    # sides must be multiples of 16: kernel tiles then pack the mask with its own density
    assert backend.supports(linear, block(0.5, 48)) and backend.supports(linear, block(0.5, 256))
    assert not backend.supports(linear, block(0.5, 8))
    assert not backend.supports(linear, block(0.5, 64, 40))


def test_block_sides_the_kernel_cannot_pack_are_refused_in_a_list_and_in_a_grid(caplog):
    from spdy_gpu.backends import check_options_supported
    backend = TritonEstimateBackend("h100-sxm")
    layers = [LayerInfo("fc", "linear", (384, 1536), m=128)]
    with pytest.raises(SpdyError, match="multiples of 16"):
        check_options_supported(backend, layers, [DENSE, block(0.5, 8)])
    # --block 8 in a grid: 2:4 alone would remain, which is not what was asked for
    for side in (8, 24, 1024):      # unpackable, unpackable, larger than every layer
        grid = option_grid("block+nm", 3, block=side)
        with pytest.raises(SpdyError, match=f"no block option of {side}x{side}.*--block"):
            check_options_supported(backend, layers, grid, grid=True)
    grid = option_grid("block", 3, block=[32, 24])          # one shape runs, one never does
    with pytest.raises(SpdyError, match="no block option of 24x24 "):
        check_options_supported(backend, layers, grid, grid=True)


def test_a_grid_leaves_out_loudly_what_no_layer_of_this_model_fits(caplog):
    from spdy_gpu.backends import check_options_supported
    backend = TritonEstimateBackend("h100-sxm")
    narrow = [LayerInfo("head", "linear", (48, 384), m=128)]     # 48 rows: no 2:4 storage
    grid = option_grid("block+nm", 3, block=16)
    with caplog.at_level("WARNING"):
        kept = check_options_supported(backend, narrow, grid, grid=True)
    assert [o.pattern for o in kept] == ["dense", "block", "block", "block"]
    assert "nm2:4 on no layer of this model: left out of the grid" in caplog.text


def test_a_model_with_nothing_the_kernel_runs_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    example = torch.randn(1, 3, 16, 16)
    with pytest.raises(SpdyError, match="no layer of convnet can run"):
        TritonEstimateBackend("l4").measure_table(
            model, example, discover_layers(model, example), [DENSE, block(0.5)],
            model_name="convnet")


# ---- the measuring loop, on the CPU ---------------------------------------------------------

class InterpretedBackend(TritonBackend):
    """The real measuring loop on a CPU: kernels run under Triton's interpreter and are
    checked against the masked dense layer; a stand-in clock returns distinct times."""

    def __init__(self, *args, clock=None, repeats=1, dtype="fp32", **kwargs):
        self.calls = 0
        self.clock = clock or (lambda call: (0.01 * call, 0.001))
        super().__init__(*args, dtype=dtype, repeats=repeats, **kwargs)
        self.device = torch.device("cpu")

    def _has_device(self):
        return True

    def _device_name(self):
        return "Interpreted CPU"

    def _software(self):
        return {"torch": torch.__version__, "spdy-gpu": "test"}

    def fingerprint(self, example):
        return Fingerprint("triton", "test", self._device_name(), "cpu", 1, len(example),
                           "0=?", "float32", self._software())

    def _bench_once(self, fn):
        out = fn()
        assert torch.isfinite(out).all()
        self.calls += 1
        return self.clock(self.calls)[0]


class TwoLayer(nn.Module):
    def __init__(self, width: int = 64, conv: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1) if conv else None
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):                                       # x: [B, 4, 4, width / 4]
        if self.conv is not None:
            x = self.conv(x)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def measure(backend, model, options, **kwargs):
    example = torch.randn(8, 4, 4, 4)
    layers = discover_layers(model, example)
    return backend.measure_table(model, example, layers, options, model_name="toy", **kwargs)


def test_measuring_loop_shares_times_by_shape_and_across_models(tmp_path):
    options = [DENSE, block(0.5, 16), block(0.75, 32)]
    backend = InterpretedBackend(cache_dir=tmp_path)
    table = measure(backend, TwoLayer(), options)
    assert backend.calls == 3 + 1            # 3 options for the shared 64x64x8 shape + model
    assert table.layers[0].median_ms == table.layers[1].median_ms
    assert table.provenance["cache_hits"] == 3 and table.provenance["measured"] == 3

    again = InterpretedBackend(cache_dir=tmp_path)
    other = measure(again, TwoLayer(), options)            # another model, same shapes
    assert again.calls == 1                                # only the end-to-end time
    assert other.layers == table.layers


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):                                       # x: [B, 4, 4, 4]
        x = x.flatten(1)
        return self.head(self.fc(x) + self.fc(x[:2]).sum(0))


def test_a_layer_called_twice_is_timed_as_one_gemm_per_call(tmp_path, monkeypatch):
    backend = InterpretedBackend(cache_dir=tmp_path)
    # a stand-in time per call that is not linear in the rows: one GEMM of 8 + 2 rows
    # would be charged 100 units, the two calls 64 + 4
    unit = 1e-4
    monkeypatch.setattr(backend, "_per_call_ms", lambda calls, graphed: (
        unit * calls[0].args[0].shape[0] ** 2, unit))
    table = measure(backend, CalledTwice(), [DENSE, block(0.5, 16)])
    fc, head = table.layers
    assert fc.gemm == (64, 64, 10)
    assert fc.median_ms == pytest.approx((68 * unit, 68 * unit))
    assert fc.spread_ms == pytest.approx((2 * unit, 2 * unit))
    assert head.median_ms == pytest.approx((64 * unit, 64 * unit))


def test_measuring_loop_times_two_four_beside_blocks_under_torch_compile(tmp_path, caplog):
    """A grid mixing blocks and 2:4, the whole model compiled: every option gets a time (2:4
    through SemiStructuredLinear, here its CPU path) and the model runs compiled."""
    options = [DENSE, block(0.5, 16), SparsityOption.n_of_m(2, 4)]
    backend = InterpretedBackend(cache_dir=tmp_path, compile=True, dtype="fp16")   # 2:4: 16-bit
    with caplog.at_level(logging.INFO, logger="spdy_gpu.backends.triton"):
        table = measure(backend, TwoLayer(), options)
    assert all(None not in row.median_ms for row in table.layers)
    assert backend.calls == 3 + 1
    assert "model end to end: compiled" in caplog.text


def test_a_compiled_model_compiles_with_room_beyond_the_recompile_limit(tmp_path,
                                                                         monkeypatch):
    """Past torch.compile's recompile limit (8 per forward) a model would silently run
    eagerly under a "compiled" label; the limit is lifted while each model compiles."""
    import torch._dynamo

    limits = []

    def fake_compile(model, **kwargs):
        def compiled(*args, **kw):
            limits.append(torch._dynamo.config.recompile_limit)
            return model(*args, **kw)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    backend = InterpretedBackend(cache_dir=tmp_path, compile=True)
    backend.latency({"a": TwoLayer(), "b": TwoLayer()}, torch.randn(8, 4, 4, 4))
    assert limits and limits[0] > 8 and torch._dynamo.config.recompile_limit == 8


def test_fixed_time_is_the_unattributed_rest_and_clamps_at_zero(tmp_path, caplog):
    options = [DENSE, block(0.5, 16)]
    # The whole model is timed first (call 1), then the two layer kernels.
    fast_model = InterpretedBackend(cache_dir=tmp_path / "a",
                                    clock=lambda call: (1.0 if call == 1 else 0.05, 0.0))
    table = measure(fast_model, TwoLayer(), options)
    assert table.dense_total_ms == 1.0 and table.fixed_ms == pytest.approx(1.0 - 2 * 0.05)

    slow_layers = InterpretedBackend(cache_dir=tmp_path / "b",
                                     clock=lambda call: (1.0 if call == 1 else 0.6, 0.0))
    with caplog.at_level(logging.WARNING):
        table = measure(slow_layers, TwoLayer(), options)
    assert table.fixed_ms == 0.0 and "fixed time set to 0" in caplog.text


def test_interrupted_measurement_resumes_from_checkpoint(tmp_path):
    options = [DENSE, block(0.5, 16), block(0.75, 16), block(0.9, 16)]

    def dies_at_fourth(call):      # the whole model, two kernels, then the interrupt
        if call == 4:
            raise KeyboardInterrupt
        return 0.01 * call, 0.0

    checkpoint = tmp_path / "run.partial"
    with pytest.raises(KeyboardInterrupt):
        measure(InterpretedBackend(cache_dir=tmp_path / "c1", clock=dies_at_fourth),
                TwoLayer(), options, checkpoint=checkpoint)
    assert len(TimingCache(checkpoint).entries) == 2
    resumed = InterpretedBackend(cache_dir=tmp_path / "c2")   # empty cache: only the checkpoint
    table = measure(resumed, TwoLayer(), options, checkpoint=checkpoint)
    assert resumed.calls == 2 + 1                             # 2 options left + the whole model
    table.save(tmp_path / "run")
    assert not checkpoint.exists()                            # removed once the table is saved


class GraphedBackend(InterpretedBackend):
    """The dense model replays fastest from a CUDA graph: the layers are timed that way too.
    `capture_cuda_graph` is stood in for by the monkeypatch in the test."""

    def _modes(self, model, inputs):
        modes = super()._modes(model, inputs)
        return {**modes, "eager+cuda-graph": modes["eager"]}

    def _copies(self, weight):
        return 3


def test_layers_are_timed_in_the_mode_the_dense_model_runs_fastest(tmp_path, monkeypatch):
    captured = []

    def capture(run):
        captured.append(run)
        return run

    monkeypatch.setattr(triton_backend, "capture_cuda_graph", capture)
    def clock(call):    # two rounds of (eager, graph), then two do_bench runs per kernel
        if call <= 4:
            return (2.0 if call % 2 else 1.0), 0.0
        return (0.3 if call % 2 else 0.36), 0.0

    backend = GraphedBackend(cache_dir=tmp_path, clock=clock, repeats=2)
    table = measure(backend, TwoLayer(), [DENSE, block(0.5, 16)])
    assert table.dense_total_ms == 1.0 and table.provenance["mode"].startswith("cuda-graph")
    assert len(captured) == 2                           # one capture per (shape, option)
    # A timed run is the layer on its 3 weight copies in turn: the time is per call.
    assert table.layers[0].median_ms == pytest.approx((0.11, 0.11))
    assert table.layers[0].spread_ms == pytest.approx((0.02, 0.02))
    entries = TimingCache(tmp_path / "triton-timings.json").entries
    assert entries and all("|cuda-graph," in key for key in entries)

    eager = InterpretedBackend(cache_dir=tmp_path, repeats=2)   # eager times are not graph times
    measure(eager, TwoLayer(), [DENSE, block(0.5, 16)])
    assert eager.calls == 2 + 2 * 2


def test_an_option_that_cannot_be_captured_is_timed_eagerly_with_a_warning(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(triton_backend, "capture_cuda_graph", lambda run: None)
    backend = GraphedBackend(cache_dir=tmp_path,        # the replay is the faster mode
                             clock=lambda call: (1.0 if call == 1 else 0.5, 0.0))
    with caplog.at_level(logging.WARNING, logger="spdy_gpu.backends.triton"):
        table = measure(backend, TwoLayer(), [DENSE, block(0.5, 16)])
    assert all(None not in row.median_ms for row in table.layers)
    assert "could not be captured in a CUDA graph" in caplog.text


def test_cache_keys_tell_apart_a_bias_and_the_timing_protocol(tmp_path, monkeypatch):
    measure(InterpretedBackend(cache_dir=tmp_path), TwoLayer(), [DENSE])
    no_bias = TwoLayer()
    no_bias.fc1, no_bias.fc2 = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
    again = InterpretedBackend(cache_dir=tmp_path)
    measure(again, no_bias, [DENSE])
    assert again.calls == 1 + 1                         # the bias-free GEMM is timed anew
    monkeypatch.setattr(triton_backend, "MAX_COPIES", 4)
    third = InterpretedBackend(cache_dir=tmp_path)
    measure(third, TwoLayer(), [DENSE])
    assert third.calls == 1 + 1                         # another protocol: timed anew


def test_timed_runs_rotate_over_weight_copies_up_to_a_byte_budget():
    backend = InterpretedBackend()
    backend.device = torch.device("cuda")               # only the count, nothing runs
    small = torch.empty(64, 64, dtype=torch.bfloat16, device="meta")
    huge = torch.empty(1 << 14, 1 << 14, dtype=torch.bfloat16, device="meta")    # 512 MiB
    quarter = torch.empty(1 << 13, 1 << 13, dtype=torch.bfloat16, device="meta")  # 128 MiB
    assert backend._copies(small) == triton_backend.MAX_COPIES
    assert backend._copies(huge) == 1 and backend._copies(quarter) == 2
    assert InterpretedBackend()._copies(small) == 1     # off the GPU: one copy


def test_conv_layers_stay_dense_with_a_note(tmp_path):
    table = measure(InterpretedBackend(cache_dir=tmp_path), TwoLayer(conv=True),
                    [DENSE, block(0.5, 16)])
    conv = table.layers[0]
    assert conv.kind == "conv2d" and conv.note == CONV_NOTE
    assert conv.median_ms[0] is not None and conv.median_ms[1] is None
    assert all(t is not None for t in table.layers[1].median_ms)


def test_latency_swaps_block_pruned_and_two_four_linears(tmp_path, monkeypatch):
    from spdy_gpu.masks import build_mask
    from spdy_gpu.semi_structured import SemiStructuredLinear

    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight.mul_(block_mask(model.fc1.weight, (16, 16), 0.5))
        model.fc2.weight.mul_(build_mask(model.fc2.weight, SparsityOption.n_of_m(2, 4)))
    backend = InterpretedBackend(cache_dir=tmp_path)
    timed = []
    interleaved = backend._interleaved
    monkeypatch.setattr(backend, "_interleaved",
                        lambda models, inputs: timed.append(models) or interleaved(models, inputs))
    result = backend.latency({"model": model}, torch.randn(8, 4, 4, 4))["model"]
    assert isinstance(timed[0]["model"].fc1, BlockSparseLinear)
    assert isinstance(timed[0]["model"].fc2, SemiStructuredLinear)
    assert type(model.fc1) is nn.Linear                        # the caller's model is untouched
    assert result.median_ms > 0 and result.spread_ms >= 0


def test_latency_alternates_between_the_models(tmp_path):
    backend = InterpretedBackend(cache_dir=tmp_path, repeats=3)
    models = {"dense": TwoLayer(), "pruned": TwoLayer()}
    with torch.no_grad():
        models["pruned"].fc1.weight.mul_(block_mask(models["pruned"].fc1.weight, (16, 16), 0.5))
    order = []
    for name, model in models.items():
        model.register_forward_hook(lambda *_, name=name: order.append(name))
    result = backend.latency(models, torch.randn(8, 4, 4, 4))
    assert order[6:] == ["dense", "pruned"] * 3              # after 3 warm-up runs each
    assert result["dense"].median_ms == pytest.approx(0.03)   # clock calls 1, 3, 5
    assert result["pruned"].median_ms == pytest.approx(0.04)  # clock calls 2, 4, 6
    assert result["dense"].spread_ms == pytest.approx(0.04)
    assert result["dense"].engine_ms == (pytest.approx(0.03),)  # eager only on a CPU
    assert result["dense"].slow_engines == 0
    with pytest.raises(SpdyError, match="no models to time"):
        backend.latency({}, torch.randn(8, 4, 4, 4))


# ---- on a GPU -------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the measuring path times real kernels)")


@needs_cuda
def test_gpu_table_is_measured_once_per_shape(tmp_path, monkeypatch):
    import triton.testing

    options = [DENSE, block(0.5, 32), block(0.9, 32)]
    model = TwoLayer(width=256)
    example = torch.randn(64, 4, 4, 16)
    layers = discover_layers(model, example)
    table = TritonBackend(repeats=1, cache_dir=tmp_path).measure_table(
        model, example, layers, options, model_name="toy")
    assert table.fingerprint.device == torch.cuda.get_device_name()
    assert (table.fingerprint.batch_size, table.fingerprint.input_shape) == (64, "0=64x4x4x16")
    assert all(t > 0 for layer in table.layers for t in layer.median_ms)
    assert table.fixed_ms >= 0 and table.provenance["measured"] == 3

    calls = []
    real = triton.testing.do_bench
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = TritonBackend(repeats=1, cache_dir=tmp_path).measure_table(
        model, example, layers, options, model_name="toy")
    assert again.layers == table.layers and len(calls) <= 2      # only the whole model again


@needs_cuda
def test_gpu_swap_matches_the_masked_dense_model():
    model = TwoLayer(width=256).cuda().to(torch.bfloat16)
    with torch.no_grad():
        model.fc1.weight.mul_(block_mask(model.fc1.weight, (32, 32), 0.75))
    x = torch.randn(64, 4, 4, 16, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x).float()
        assert sparsify_(model) == ["fc1"]
        got = model(x).float()
    assert ((got - expected).norm() / expected.norm()) < 1e-2


def test_compile_is_a_switch_of_the_triton_backend():
    from spdy_gpu.cli import build_parser
    from spdy_gpu.cli.common import backend_config

    base = ["timings", "--model", "minilm", "--backend", "triton", "--out", "t.json"]
    assert backend_config(build_parser().parse_args([*base, "--compile"])) == {"compile": True}
    assert backend_config(build_parser().parse_args(base)) == {}
    estimate = get_backend("triton", estimate="h100-sxm", compile=True)
    assert estimate.estimated and estimate.compile
    if not torch.cuda.is_available():
        with pytest.raises(SpdyError, match="no CUDA device"):
            get_backend("triton", compile=True)


def test_compiled_estimate_fuses_the_ops_between_two_gemms():
    """Eager: every non-GEMM op costs at least a kernel floor; compiled: the ops between two
    GEMMs are one kernel, so the fixed time shrinks and the dense GEMM times stay."""
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64))
    example = torch.randn(4, 64)
    layers = discover_layers(model.eval(), example)
    options = option_grid("block", 2, block=16)
    eager = get_backend("triton", estimate="h100-sxm").measure_table(
        model, example, layers, options, model_name="toy")
    fused = get_backend("triton", estimate="h100-sxm", compile=True).measure_table(
        model, example, layers, options, model_name="toy")
    assert [r.median_ms for r in fused.layers] == [r.median_ms for r in eager.layers]
    assert fused.fixed_ms < eager.fixed_ms
    assert fused.fingerprint.software["execution"] == "torch.compile"
    costs = [OpCost("a", 0.0, 8.0, 0), OpCost("b", 0.0, 8.0, 0), OpCost("c", 0.0, 8.0, 1)]
    floor = H100.kernel_floor_ms
    assert fixed_ms(costs, H100, "bf16", fused=False) == pytest.approx(3 * floor)
    assert fixed_ms(costs, H100, "bf16", fused=True) == pytest.approx(2 * floor)


def test_device_names_pick_their_datasheet():
    from spdy_gpu.gpu_specs import datasheet_for
    names = {"NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie",
             "NVIDIA A100-SXM4-80GB": "a100-sxm", "NVIDIA A10": "a10", "NVIDIA L40S": "l40s",
             "NVIDIA H200": "h200-sxm", "Tesla T4": None}
    assert {name: datasheet_for(name) for name in names} == names
