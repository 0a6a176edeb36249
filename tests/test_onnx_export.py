"""ONNX export: every Linear (MatMul or Gemm) and Conv maps back to its torch module."""

import pytest
import torch
from torch import nn

from spdy_gpu.errors import SpdyError
from spdy_gpu.masks import build_mask
from spdy_gpu.options import SparsityOption

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from spdy_gpu.onnx_export import example_arrays, export_onnx, map_layers, prune_onnx  # noqa: E402


class ConvNet(nn.Module):
    """conv -> conv (grouped) -> pool -> Linear on 2-D input (exported as Gemm)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Encoder(nn.Module):
    """Token Linears on 3-D input (exported as MatMul + Add) with two identical weights."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(16, 16), "up": nn.Linear(16, 32),
                           "down": nn.Linear(32, 16, bias=False)}) for _ in range(2))
        with torch.no_grad():                      # tied values: must still map one-to-one
            self.layers[1]["query"].weight.copy_(self.layers[0]["query"].weight)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        for layer in self.layers:
            h = h + layer["query"](h)
            h = h + layer["down"](torch.relu(layer["up"](h)))
        return h


def _encoder_example():
    ids = torch.randint(0, 50, (2, 7))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 7)}


def test_conv_and_gemm_layers_map_to_their_modules(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    export = export_onnx(model, torch.randn(1, 3, 12, 12), tmp_path / "m.onnx")
    by_module = {layer.module: layer for layer in export.layers}
    assert set(by_module) == {"stem", "block.1", "head"}
    assert by_module["stem"].op_type == "Conv" and not by_module["stem"].transposed
    assert by_module["block.1"].op_type == "Conv"
    assert by_module["head"].op_type == "Gemm"
    graph = onnx.load(str(export.path)).graph
    outputs = {node.output[0]: node for node in graph.node}
    for layer in export.layers:                # each output is produced by the named node
        assert outputs[layer.output].name == layer.node
        assert outputs[layer.output].op_type == layer.op_type


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.again, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.again(torch.relu(self.again(self.first(x)))))


def test_a_module_called_twice_owns_both_of_its_nodes(tmp_path):
    torch.manual_seed(0)
    export = export_onnx(CalledTwice().eval(), torch.randn(2, 8), tmp_path / "t.onnx")
    assert [layer.module for layer in export.layers] == ["first", "again", "head"]
    to_module = export.module_of_output()
    assert sorted(to_module.values()) == ["again", "again", "first", "head"]
    gemms = [n for n in onnx.load(str(export.path)).graph.node if n.op_type == "Gemm"]
    assert [to_module[n.output[0]] for n in gemms] == ["first", "again", "again", "head"]


def test_matmul_layers_map_with_tied_values_and_dynamic_axes(tmp_path):
    torch.manual_seed(0)
    model = Encoder().eval()
    export = export_onnx(model, _encoder_example(), tmp_path / "e.onnx")
    assert export.input_names == ("input_ids", "attention_mask")
    assert len(export.module_of_output()) == 6
    # graph order is execution order; the tied pair is told apart by position
    assert [layer.module for layer in export.layers] == [
        f"layers.{i}.{n}" for i in range(2) for n in ("query", "up", "down")]
    assert all(layer.op_type == "MatMul" and layer.transposed for layer in export.layers)
    graph = onnx.load(str(export.path)).graph
    # the batch only: DeepSparse drops its optimised runtime for any other dynamic axis
    for given in graph.input:
        dims = [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim]
        assert dims == ["batch", _encoder_example()[given.name].shape[1]]


def test_unexported_module_is_a_clear_error(tmp_path):
    model = ConvNet().eval()
    export = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    extra = {"head": model.head, "unused": nn.Linear(3, 3)}
    with pytest.raises(SpdyError, match="cannot locate 1 of 2 prunable layer.*unused"):
        map_layers(onnx.load(str(export.path)), extra)


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.unused = nn.Linear(96, 96)         # defined, never called by forward

    def forward(self, x):
        return self.fc(x)


def test_a_layer_the_forward_never_calls_is_left_out_of_the_mapping(tmp_path):
    export = export_onnx(WithUnusedLayer().eval(), torch.randn(2, 6), tmp_path / "m.onnx")
    assert [layer.module for layer in export.layers] == ["fc"]


def test_prune_onnx_writes_magnitude_masked_weights(tmp_path):
    torch.manual_seed(0)
    model = Encoder().eval()
    export = export_onnx(model, _encoder_example(), tmp_path / "e.onnx")
    option = SparsityOption.unstructured(0.75)
    path = prune_onnx(export, {"layers.0.up": option, "layers.1.down": SparsityOption.dense()},
                      tmp_path / "p.onnx")
    stored = {i.name: numpy_helper.to_array(i)
              for i in onnx.load(str(path)).graph.initializer}
    layers = {layer.module: layer for layer in export.layers}
    up = torch.from_numpy(stored[layers["layers.0.up"].initializer].copy()).t()
    weight = model.layers[0]["up"].weight.detach()
    torch.testing.assert_close(up, weight * build_mask(weight, option))
    assert (up == 0).float().mean().item() == pytest.approx(0.75, abs=1 / weight.numel())
    down = torch.from_numpy(stored[layers["layers.1.down"].initializer].copy()).t()
    torch.testing.assert_close(down, model.layers[1]["down"].weight.detach())


def test_models_deepsparse_cannot_run_are_one_line_errors_before_the_export(tmp_path):
    half = nn.Sequential(nn.Linear(8, 8)).half().eval()
    with pytest.raises(SpdyError, match="DeepSparse runs float32 models.*float16"):
        export_onnx(half, torch.randn(2, 8).half(), tmp_path / "half.onnx")

    class ReturnsNothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            self.fc(x)

    with pytest.raises(SpdyError, match="forward returned NoneType, no tensor to export"):
        export_onnx(ReturnsNothing().eval(), torch.randn(2, 8), tmp_path / "none.onnx")


def test_an_op_onnx_lacks_is_one_line_without_the_exporters_graph_dump(tmp_path, capfd):
    class Bessel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.special.i0(self.fc(x))

    with pytest.raises(SpdyError, match="raised UnsupportedOperatorError: .*'aten::i0'") as info:
        export_onnx(Bessel().eval(), torch.randn(2, 8), tmp_path / "i0.onnx")
    assert "\n" not in str(info.value)
    assert capfd.readouterr().out == ""         # the exporter's IR dump goes to fd 1


def test_transformer_layers_export_with_their_fused_fast_path_off(tmp_path):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                          nn.Linear(16, 4)).eval()
    export = export_onnx(model, torch.randn(2, 5, 16), tmp_path / "encoder.onnx")
    assert {layer.module for layer in export.layers} == {"0.layers.0.linear1",
                                                          "0.layers.0.linear2", "1"}
    assert torch.backends.mha.get_fastpath_enabled()          # restored


def test_an_example_that_requires_grad_still_gives_arrays():
    example = torch.randn(2, 8, requires_grad=True)
    (array,) = example_arrays(example, ["input_0"])
    assert array.shape == (2, 8)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return {"logits": y, "hidden": (y + 1, [y * 2]), "unused": None}


@pytest.mark.parametrize("model, names", [
    (nn.Linear(8, 8), ["output"]),
    (DictOutput(), ["logits", "hidden.0", "hidden.1.0"]),
])
def test_onnx_outputs_are_named_after_the_forwards_keys_and_positions(model, names, tmp_path):
    export_onnx(model.eval(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(str(tmp_path / "m.onnx")).graph.output] == names


def test_deepsparse_runs_the_export_optimised_given_only_a_batch_size(tmp_path):
    """With a dynamic sequence axis DeepSparse compiled Engine(path, batch_size=B) without its
    optimised runtime (0 of the ops supported), 2x slower than the dense table's time."""
    deepsparse = pytest.importorskip("deepsparse")
    torch.manual_seed(0)
    export = export_onnx(Encoder().eval(), _encoder_example(), tmp_path / "e.onnx")
    engine = deepsparse.Engine(str(export.path), batch_size=2, num_cores=1)
    assert engine.fraction_of_supported_ops > 0.5


class Flagged(nn.Module):
    """A forward taking flags beside its tensor, as many user models do."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x, use_relu=True, scale=1.0):
        h = self.up(x)
        return self.down(torch.relu(h) if use_relu else h) * scale


@pytest.mark.parametrize("example", [
    (torch.randn(3, 16), False, 2.0),
    {"x": torch.randn(3, 16), "use_relu": False, "scale": 2.0},
])
def test_flags_in_the_example_are_graph_constants_and_tensors_its_inputs(example, tmp_path):
    """An example holding a bool and a float ended in AttributeError ('bool' object has no
    attribute 'dim'): the graph's inputs are now its tensors alone, the flags constants."""
    deepsparse = pytest.importorskip("deepsparse")
    torch.manual_seed(0)
    model = Flagged().eval()
    export = export_onnx(model, example, tmp_path / "f.onnx")
    graph = onnx.load(str(export.path)).graph
    assert [i.name for i in graph.input] == list(export.input_names) == [
        "x" if isinstance(example, dict) else "input_0"]
    assert {layer.module for layer in export.layers} == {"up", "down"}
    assert "forward" not in model.__dict__                       # the model is as it was
    engine = deepsparse.Engine(str(export.path), batch_size=3, num_cores=1)
    out = engine.run(export.inputs_numpy(example))[0]
    expected = model(**example) if isinstance(example, dict) else model(*example)
    torch.testing.assert_close(torch.from_numpy(out), expected.detach(), rtol=1e-4, atol=1e-4)


class OneDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(4, 8)

    def forward(self, batch):
        return self.a(batch["x"]) + self.b(batch["y"])


def test_a_forward_taking_one_dict_exports_from_its_example_wrapped_in_a_tuple(tmp_path):
    """(inputs,) as the README advises ended in 'the example input holds no tensor'."""
    deepsparse = pytest.importorskip("deepsparse")
    torch.manual_seed(0)
    model, example = OneDict().eval(), ({"x": torch.randn(2, 16), "y": torch.randn(2, 4)},)
    export = export_onnx(model, example, tmp_path / "d.onnx")
    assert export.input_names == ("input_0.x", "input_0.y")
    assert {layer.module for layer in export.layers} == {"a", "b"}
    engine = deepsparse.Engine(str(export.path), batch_size=2, num_cores=1)
    out = engine.run(export.inputs_numpy(example))[0]
    torch.testing.assert_close(torch.from_numpy(out), model(*example).detach(), rtol=1e-4,
                               atol=1e-4)


def test_a_number_in_the_forwards_output_is_named_in_one_line(tmp_path):
    """It ended in the exporter's multi-line error cut to 'output 1 (3'."""
    class WithCount(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return {"logits": self.proj(x), "aux": (x, None, 3)}

    with pytest.raises(SpdyError, match="returns int 3 as aux.2 beside its tensors"):
        export_onnx(WithCount().eval(), torch.randn(2, 8), tmp_path / "m.onnx")
