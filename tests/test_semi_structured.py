"""2:4 semi-structured layers: the module, sparsify_ routing and the Triton artifact.

On a CPU SemiStructuredLinear runs its masked dense weight (exact); the sparse tensor core
path needs CUDA and is checked there only."""

import copy

import pytest
import torch
from torch import nn

from spdy_gpu import SpdyError
from spdy_gpu.deploy import load_block_sparse, save_block_sparse
from spdy_gpu.masks import build_mask
from spdy_gpu.semi_structured import SEMI_STRUCTURED, SemiStructuredLinear, fits, is_2_4
from spdy_gpu.sparse_linear import BlockSparseLinear, sparsify_


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96), nn.ReLU(),
                         nn.Linear(96, 40)).eval()


def test_shapes_that_suit_semi_structured_storage():
    assert fits(64, 128, torch.float16) and fits(32, 64, torch.bfloat16)
    assert not fits(48, 128, torch.float16) and not fits(64, 96, torch.float16)
    assert not fits(64, 128, torch.float32) and not fits(32, 64, torch.float64)


def test_layer_keeps_two_of_four_and_matches_the_masked_dense_layer():
    linear = _mlp()[0]
    layer = SemiStructuredLinear.from_linear(linear)
    assert is_2_4(layer.weight) and not is_2_4(linear.weight)
    mask = build_mask(linear.weight, SEMI_STRUCTURED)
    assert torch.equal(layer.weight, linear.weight * mask)
    assert set(layer.state_dict()) == {"weight", "bias"}          # an nn.Linear checkpoint
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, linear.weight * mask,
                                                                  linear.bias))


def test_fine_tuning_keeps_the_layer_two_of_four():
    layer = SemiStructuredLinear.from_linear(_mlp()[0]).requires_grad_()
    zeros = layer.weight == 0
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 128)).square().sum().backward()
    assert not layer.weight.grad[zeros].any()             # pruned weights get no gradient
    optimizer.step()
    assert torch.equal(layer.weight == 0, zeros) and not torch.equal(layer.weight, before)


def test_a_mask_that_is_not_two_of_four_is_refused():
    linear = _mlp()[0]
    with pytest.raises(SpdyError, match="not 2:4"):
        SemiStructuredLinear.from_linear(linear, torch.ones_like(linear.weight, dtype=torch.bool))
    with pytest.raises(SpdyError, match="replaces nn.Linear"):
        SemiStructuredLinear.from_linear(nn.Conv2d(4, 4, 3))
    with pytest.raises(SpdyError, match="mask shape \\(4, 128\\) does not match"):
        SemiStructuredLinear.from_linear(linear, torch.ones(4, 128, dtype=torch.bool))
    advised = build_mask(linear.weight, "nm2:4")          # what the message advises works
    assert SemiStructuredLinear.from_linear(linear, advised).weight.count_nonzero() == \
        linear.weight.numel() // 2


def test_sparsify_routes_two_four_and_blocks_to_their_kernels():
    model = _mlp()
    chosen = copy.deepcopy(model)
    assert sparsify_(chosen, {"0": "nm2:4", "2": "block16x16@0.5"}) == ["0", "2"]
    assert isinstance(chosen[0], SemiStructuredLinear) and isinstance(chosen[2], BlockSparseLinear)
    # without choices: weights already pruned 2:4 (and fitting) or in blocks are detected
    stitched = copy.deepcopy(model)
    with torch.no_grad():
        stitched[0].weight.mul_(build_mask(stitched[0].weight, SEMI_STRUCTURED))
        stitched[4].weight.mul_(build_mask(stitched[4].weight, SEMI_STRUCTURED))  # 40 rows: no
    assert sparsify_(stitched) == ["0"]
    assert isinstance(stitched[0], SemiStructuredLinear)
    assert type(stitched[4]) is nn.Linear


def test_triton_artifact_round_trip_with_two_four_and_block_layers(tmp_path):
    model = _mlp()
    choices = {"0": SEMI_STRUCTURED, "2": "block16x16@0.5"}
    layout = save_block_sparse(model, choices, tmp_path / "m.safetensors")
    assert layout["0"] == {"option": "nm2:4", "shape": [64, 128]}
    assert layout["2"]["block"] == [16, 16]
    loaded = load_block_sparse(_mlp, tmp_path / "m.safetensors")
    assert isinstance(loaded[0], SemiStructuredLinear) and isinstance(loaded[2], BlockSparseLinear)
    expected = copy.deepcopy(model)
    sparsify_(expected, choices)
    x = torch.randn(3, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x))
    assert is_2_4(loaded[0].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_on_sparse_tensor_cores_and_matches():
    linear = nn.Linear(256, 128).cuda().half()
    layer = SemiStructuredLinear.from_linear(linear)
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    expected = nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert layer._sparse is not None                      # the eager call built the copy
    compiled = torch.compile(layer)                       # ... which the traced graph uses
    torch.testing.assert_close(compiled(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_follows_in_place_weight_writes_and_refresh_after_a_data_write():
    layer = SemiStructuredLinear.from_linear(nn.Linear(256, 128).cuda().half())
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)

    def expected():
        return nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())

    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)                            # counted: rebuilt on the next call
    torch.testing.assert_close(layer(x).float(), expected(), rtol=2e-2, atol=5e-2)
    layer.weight.data.mul_(0.5)                           # not counted: refresh() after it
    layer.refresh()
    torch.testing.assert_close(layer(x).float(), expected(), rtol=2e-2, atol=5e-2)


def test_cuda_graphed_needs_a_cuda_model():
    from spdy_gpu import cuda_graphed
    with pytest.raises(SpdyError, match="CUDA device"):
        cuda_graphed(_mlp(), torch.randn(2, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_a_sparse_model_and_runs_other_shapes_eagerly():
    from spdy_gpu import cuda_graphed
    model = _mlp().cuda().half()
    sparsify_(model, {"0": "nm2:4", "2": "block16x16@0.5"})
    x = torch.randn(4, 128, device="cuda", dtype=torch.half)
    run = cuda_graphed(model, x.clone())
    for _ in range(2):
        fresh = torch.randn_like(x)
        torch.testing.assert_close(run(fresh).clone(), model(fresh), rtol=1e-2, atol=1e-2)
    odd = torch.randn(3, 128, device="cuda", dtype=torch.half)
    torch.testing.assert_close(run(odd), model(odd))
