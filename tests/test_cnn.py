"""Conv + BatchNorm networks: every Conv2d (plain, strided, 1x1, depthwise) and Linear is
found in the ONNX graph although the exporter folds each BatchNorm into its Conv, and the
mask a layer gets does not depend on whether its weight was folded."""

import numpy as np
import pytest
import torch
from torch import nn

from spdy_gpu.errors import SpdyError
from spdy_gpu.layers import prunable_modules
from spdy_gpu.masks import build_mask
from spdy_gpu.options import SparsityOption
from tests import cnn_models

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from spdy_gpu.onnx_export import export_onnx, folded_scale, map_layers, prune_onnx  # noqa: E402

ARCHITECTURES = {
    "resnet18": lambda: cnn_models.resnet18(width=16),
    "resnet50": lambda: cnn_models.resnet50(width=8),
    "mobilenet_v2": lambda: cnn_models.mobilenet_v2(width=0.5),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_layer_of_a_conv_bn_network_is_mapped(name, tmp_path):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / f"{name}.onnx")
    graph = onnx.load(str(export.path)).graph
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)   # folded
    modules = prunable_modules(model)
    assert {layer.module for layer in export.layers} == set(modules)
    assert len(set(layer.output for layer in export.layers)) == len(modules)
    convs = [layer for layer in export.layers if layer.op_type == "Conv"]
    assert convs and all(layer.channel_scale is not None for layer in convs)
    if name == "mobilenet_v2":
        assert any(modules[layer.module].groups > 1 for layer in convs)   # depthwise mapped


def test_folded_scales_are_the_batchnorm_factors(tmp_path):
    model = cnn_models.resnet18(width=8)
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r.onnx")
    stem = next(layer for layer in export.layers if layer.module == "stem.0.0")
    bn = model.stem[0][1]
    expected = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    np.testing.assert_allclose(stem.channel_scale, expected.detach().numpy(), rtol=1e-5)


def test_folded_and_unfolded_weights_get_the_same_mask(tmp_path):
    torch.manual_seed(0)
    model = cnn_models.mobilenet_v2(width=0.5)
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    modules = prunable_modules(model)
    option = SparsityOption.unstructured(0.6)
    path = prune_onnx(export, dict.fromkeys(modules, option), tmp_path / "p.onnx")
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for layer in export.layers:
        weight = modules[layer.module].weight.detach()
        pruned = torch.from_numpy(stored[layer.initializer].copy())
        pruned = pruned.t() if layer.transposed else pruned
        torch.testing.assert_close(pruned != 0, build_mask(weight, option).bool() & (weight != 0))


def test_a_pruned_model_still_maps_after_folding(tmp_path):
    model = cnn_models.resnet18(width=8)
    with torch.no_grad():
        for module in prunable_modules(model).values():
            module.weight.mul_(build_mask(module.weight, SparsityOption.unstructured(0.9)))
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r.onnx")
    assert len(export.layers) == len(prunable_modules(model))


def test_folded_scale_rejects_what_is_not_a_channel_scaling():
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    scale = np.array([2.0, -0.5, 1.0, 3.0], dtype=np.float32)
    assert folded_scale(weight * scale[:, None, None, None], weight) == pytest.approx(scale)
    assert folded_scale(weight + 0.01, weight) is None
    assert folded_scale(np.zeros_like(weight), weight) is None
    assert folded_scale(weight[:2], weight) is None


def test_unmapped_layers_are_named_with_shape_and_reason(tmp_path):
    model = cnn_models.resnet18(width=8)
    export = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "r.onnx")
    stranger = nn.Conv2d(8, 8, 3, bias=False)
    modules = {**prunable_modules(model), "extra.conv": stranger, "extra.fc": nn.Linear(7, 3)}
    with pytest.raises(SpdyError) as error:
        map_layers(onnx.load(str(export.path)), modules)
    message = str(error.value)
    assert "\n" not in message and "cannot locate 2 of" in message
    assert "extra.conv (Conv2d 8x8x3x3:" in message and "none equal to it" in message
    assert "extra.fc (Linear 3x7: no MatMul/Gemm/Conv has a weight of that shape" in message


def _timing_table(model: str, tmp_path, *extra: str):
    from spdy_gpu.cli import main
    from spdy_gpu.timing import TimingTable
    out = tmp_path / "t.json"
    assert main(["timings", "--model", model, "--backend", "deepsparse", "--threads", "1",
                 "--repeats", "1", "--options", "dense", "unstructured@0.9", *extra,
                 "--out", str(out)]) == 0
    return TimingTable.load(out)


def test_deepsparse_times_every_layer_of_a_conv_bn_network(tmp_path):
    pytest.importorskip("deepsparse")
    from spdy_gpu.backends.deepsparse import UNATTRIBUTED_NOTE
    table = _timing_table("tests.cnn_models:small_mobilenet_v2", tmp_path)
    model, _ = cnn_models.small_mobilenet_v2()
    modules = prunable_modules(model)
    assert [layer.name for layer in table.layers] == list(modules)
    assert table.fingerprint.batch_size == 2                      # the example's own batch
    for layer in table.layers:
        assert layer.median_ms[0] is not None and layer.median_ms[0] >= 0
        if getattr(modules[layer.name], "groups", 1) > 1:           # depthwise: no sparse kernel
            assert layer.median_ms[1] is None and "depthwise" in layer.note
        elif layer.note == UNATTRIBUTED_NOTE:  # fused: no time of its own at any option
            assert layer.median_ms == (0.0, None)
        else:
            assert layer.median_ms[1] is not None


def test_the_table_notes_where_sparse_is_slower_than_dense():
    from spdy_gpu.backends.deepsparse import _speed_note
    from spdy_gpu.layers import LayerInfo
    options = [SparsityOption.dense(), SparsityOption.unstructured(0.5),
               SparsityOption.unstructured(0.9)]
    layer = LayerInfo("conv", "conv2d", (8, 8, 3, 3))
    assert _speed_note(layer, options, [1.0, 0.8, 0.5]) == ""
    assert "at every level" in _speed_note(layer, options, [1.0, 1.2, 1.1])
    assert "1 of 2 levels (up to 50% sparsity)" in _speed_note(layer, options, [1.0, 1.2, 0.5])
    depthwise = LayerInfo("dw", "conv2d", (8, 1, 3, 3), groups=8)
    assert "depthwise" in _speed_note(depthwise, options, [1.0, None, None])
