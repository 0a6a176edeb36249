import pytest
import torch
from torch import nn

from spdy_gpu import SpdyError, discover_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 16, 1, groups=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def forward(self, x):
        return self.head(self.grouped(self.depthwise(self.conv1(x))))


def test_discovers_every_linear_and_conv_with_gemm_view():
    layers = {l.name: l for l in discover_layers(Net(), torch.randn(2, 3, 8, 8))}
    assert list(layers) == ["conv1", "depthwise", "grouped", "head.1"]
    conv1, depthwise, grouped, linear = layers.values()
    assert (conv1.n, conv1.k, conv1.m) == (8, 27, 2 * 8 * 8)
    assert (depthwise.n, depthwise.k, depthwise.m, depthwise.groups) == (8, 9, 2 * 4 * 4, 8)
    assert depthwise.depthwise_or_grouped and not conv1.depthwise_or_grouped
    assert (grouped.n, grouped.k, grouped.groups) == (16, 4, 2)
    assert (linear.kind, linear.n, linear.k, linear.m) == ("linear", 10, 256, 2)
    assert linear.flops == 2 * 2 * 10 * 256


def test_gemm_rows_count_tokens_and_repeated_calls():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(self.proj(x))

    (layer,) = discover_layers(Shared(), torch.randn(3, 5, 4))
    assert layer.m == 2 * 15 and layer.calls == layer.rows_per_call == (15, 15)
    (once,) = discover_layers(nn.Linear(4, 4), torch.randn(3, 4))
    assert once.calls == () and once.rows_per_call == (3,)


def test_exclusions_are_patterns():
    names = [l.name for l in discover_layers(Net(), exclude=["conv1", "head.*"])]
    assert names == ["depthwise", "grouped"]


def test_no_layers_left_is_an_error():
    with pytest.raises(SpdyError, match="no Linear or Conv2d"):
        discover_layers(Net(), exclude=["*"])


class TiedHead(nn.Module):
    """An embedding and an LM head sharing one weight, one Linear registered under two
    names (not tied: it is one module), and a Linear forward never calls."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.alias = self.proj
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.alias(self.proj(self.embed(ids))))


def test_tied_and_never_called_layers_are_left_out_with_a_log_line(caplog):
    with caplog.at_level("INFO"):
        layers = discover_layers(TiedHead(), torch.tensor([[1, 2, 3]]))
    assert [(layer.name, layer.m) for layer in layers] == [("proj", 6)]
    assert "head shares its weight with embed.weight (tied)" in caplog.text
    assert "never called on the example input, so not pruned: unused" in caplog.text


def test_a_forward_that_calls_no_layer_is_an_error():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x * 2

    with pytest.raises(SpdyError, match="calls none of its Linear or Conv2d"):
        discover_layers(Bypass(), torch.randn(2, 4))


def test_one_exclude_string_is_one_pattern_not_its_characters():
    from spdy_gpu.layers import exclude_patterns, prunable_modules
    from spdy_gpu.pipeline import RunSettings
    assert exclude_patterns("fc2") == ("fc2",)
    assert exclude_patterns(["a", "*.b"]) == ("a", "*.b")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(prunable_modules(model, "2")) == ["0"]
    assert exclude_patterns(None) == ()
    for wrong, kind in ((["a", 2], "int"), (3, "int"), (b"fc2", "bytes"), (["a", None], "None")):
        with pytest.raises(SpdyError, match=f"exclude patterns must be strings .* got a {kind}"):
            exclude_patterns(wrong)
    with pytest.raises(SpdyError, match=r"search must be a SearchConfig, not dict; pass "
                                        r"search=SearchConfig\(...\)"):
        RunSettings(speedup=2.0, search={"max_evaluations": 3})
    assert RunSettings(speedup=2.0, exclude="fc2").exclude == ("fc2",)


def test_forwards_run_in_eval_mode_and_leave_a_training_model_as_it_was(tmp_path):
    import copy

    from spdy_gpu.deploy import export_onnx_pruned
    from spdy_gpu.layers import call_model
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5),
                          nn.Conv2d(8, 4, 1)).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 9, 9)
    discover_layers(model, x)
    assert torch.equal(call_model(model, x), call_model(model, x))      # dropout off
    assert torch.equal(call_model(model, x), copy.deepcopy(model).eval()(x))
    pytest.importorskip("onnx")
    export_onnx_pruned(model, x, tmp_path / "m.onnx")
    assert all(m.training for m in model.modules())                     # as it was given
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_nan_weight_is_named_and_other_conv_kinds_are_logged(caplog):
    """A NaN weight was blamed on the next layer's calibration inputs, and Conv1d or
    ConvTranspose2d layers were left out without a word."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(SpdyError, match="layer 0: its weight holds NaN or inf"):
        discover_layers(model, torch.randn(2, 8))
    mixed = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(24, 2)).eval()
    with caplog.at_level("INFO", logger="spdy_gpu.layers"):
        assert [layer.name for layer in discover_layers(mixed, torch.randn(1, 3, 8))] == ["2"]
    assert "only Linear and Conv2d layers are pruned, not: 0 (Conv1d)" in caplog.text
