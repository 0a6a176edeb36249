"""1x1 convolutions on the block-sparse kernel: BlockSparseConv1x1, sparsify_, the Triton
artifact and the triton backend's options (CPU: the exact fallback and the interpreter)."""

import copy

import pytest
import torch
from torch import nn

from spdy_gpu import SparsityOption, SpdyError
from spdy_gpu.backends import get_backend
from spdy_gpu.deploy import load_block_sparse, save_block_sparse
from spdy_gpu.layers import discover_layers
from spdy_gpu.masks import build_mask
from spdy_gpu.sparse_linear import BlockSparseConv1x1, is_pointwise, sparsify_

BLOCK = SparsityOption.blocked(0.5, 16)


class Bottleneck(nn.Module):
    """1x1 reduce (stride 2, zero padding 1), 3x3, 1x1 expand, as in ResNet-50 blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.reduce = nn.Conv2d(64, 32, 1, stride=2, padding=1)
        self.spatial = nn.Conv2d(32, 32, 3, padding=1)
        self.expand = nn.Conv2d(32, 64, 1, bias=False)

    def forward(self, x):
        return self.expand(torch.relu(self.spatial(torch.relu(self.reduce(x)))))


def _masked(model, choices):
    masked = copy.deepcopy(model)
    for name, option in choices.items():
        layer = masked.get_submodule(name)
        with torch.no_grad():
            layer.weight.mul_(build_mask(layer.weight, option))
    return masked


def test_pointwise_convs_match_the_masked_dense_convs(kernel_path):
    model = Bottleneck().eval()
    choices = {"reduce": BLOCK, "expand": SparsityOption.blocked(0.75, 16, 32)}
    sparse = copy.deepcopy(model)
    assert sparsify_(sparse, choices) == ["reduce", "expand"]
    assert isinstance(sparse.reduce, BlockSparseConv1x1) and type(sparse.spatial) is nn.Conv2d
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), _masked(model, choices)(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sparse(x[0]), _masked(model, choices)(x[0]), rtol=1e-4,
                                   atol=1e-4)                     # an unbatched input too


def test_only_pointwise_convs_without_groups_run_block_sparse():
    assert is_pointwise(nn.Conv2d(8, 8, 1)) and not is_pointwise(nn.Conv2d(8, 8, 3))
    assert not is_pointwise(nn.Conv2d(8, 8, 1, groups=2)) and not is_pointwise(nn.Linear(4, 4))
    assert not is_pointwise(nn.Conv2d(8, 8, 1, padding=1, padding_mode="reflect"))
    assert is_pointwise(nn.Conv2d(8, 8, 1, padding_mode="reflect"))     # no padding to reflect
    with pytest.raises(SpdyError, match="only 1x1 Conv2d"):
        BlockSparseConv1x1.from_conv(nn.Conv2d(32, 32, 3), option=BLOCK)
    model = Bottleneck().eval()
    with torch.no_grad():                          # pruned in blocks: found without choices
        model.expand.weight.mul_(build_mask(model.expand.weight, BLOCK))
        model.spatial.weight.mul_(build_mask(model.spatial.weight, BLOCK))
    assert sparsify_(model) == ["expand"]          # the 3x3 conv stays dense


def test_triton_artifact_round_trip_with_a_pointwise_conv(tmp_path):
    model = Bottleneck().eval()
    layout = save_block_sparse(model, {"expand": BLOCK}, tmp_path / "m.safetensors")
    assert layout["expand"] == {"option": BLOCK.name, "shape": [64, 32, 1, 1],
                                "block": [16, 16]}
    loaded = load_block_sparse(lambda: Bottleneck().eval(), tmp_path / "m.safetensors")
    assert isinstance(loaded.expand, BlockSparseConv1x1)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _masked(model, {"expand": BLOCK})(x),
                                   rtol=1e-4, atol=1e-4)


def test_triton_backend_offers_blocks_on_pointwise_convs_only():
    model = Bottleneck().eval()
    example = torch.randn(1, 64, 16, 16)
    layers = {layer.name: layer for layer in discover_layers(model, example)}
    estimate = get_backend("triton", estimate="h100-sxm")
    assert estimate.supports(layers["reduce"], BLOCK)
    assert estimate.supports(layers["expand"], BLOCK)
    assert not estimate.supports(layers["spatial"], BLOCK)
    assert not estimate.supports(layers["expand"], SparsityOption.n_of_m(2, 4))
    table = estimate.measure_table(model, example, list(layers.values()),
                                   [SparsityOption.dense(), BLOCK], model_name="bottleneck")
    rows = {row.name: row for row in table.layers}
    assert rows["expand"].median_ms[1] is not None and rows["spatial"].median_ms[1] is None
    assert "kept dense" in rows["spatial"].note and "kept dense" not in rows["expand"].note


def test_measuring_loop_times_pointwise_convs_through_their_kernel(tmp_path):
    from tests.test_triton_backend import InterpretedBackend

    model = Bottleneck().eval()
    example = torch.randn(1, 64, 8, 8)
    layers = discover_layers(model, example)
    backend = InterpretedBackend(cache_dir=tmp_path)
    table = backend.measure_table(model, example, layers, [SparsityOption.dense(), BLOCK],
                                  model_name="bottleneck")
    times = {row.name: row.median_ms for row in table.layers}
    assert times["reduce"][1] is not None and times["expand"][1] is not None
    assert times["spatial"][1] is None
