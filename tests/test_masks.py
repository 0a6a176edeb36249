import pytest
import torch

from spdy_gpu import SparsityOption, SpdyError, build_mask
from spdy_gpu.masks import block_mask, gemm_view

SHAPES = [(64, 32), (70, 50), (33, 17), (16, 8, 3, 3), (24, 4, 1, 1)]


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.1, 0.4, 0.5, 0.77, 0.99])
def test_unstructured_removes_exactly_the_smallest(shape, sparsity):
    w = _weight(shape)
    mask = build_mask(w, SparsityOption.unstructured(sparsity))
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert (~mask).sum().item() == round(sparsity * w.numel())
    if (~mask).any() and mask.any():
        assert w[~mask].abs().max() <= w[mask].abs().min()


def _blocks_of(mask, rows, cols):
    view = gemm_view(mask).float()
    n, k = view.shape
    padded = torch.nn.functional.pad(view, (0, -k % cols, 0, -n % rows), value=-1)
    return padded.reshape(padded.shape[0] // rows, rows, -1, cols).permute(0, 2, 1, 3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [(4, 4), (8, 4), (16, 16)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_block_mask_keeps_whole_blocks_in_exact_number(shape, block, sparsity):
    w = _weight(shape, 1)
    n, k = gemm_view(w).shape
    if block[0] > n or block[1] > k:
        with pytest.raises(SpdyError, match="larger than"):
            build_mask(w, SparsityOption.blocked(sparsity, *block))
        return
    mask = build_mask(w, SparsityOption.blocked(sparsity, *block))
    blocks = _blocks_of(mask, *block)            # [nb, kb, rows, cols]; padding is -1
    real = blocks >= 0
    kept = (blocks == 1).any(dim=(2, 3))
    pruned = ((blocks == 0) | ~real).all(dim=(2, 3))
    assert (kept ^ pruned).all(), "every block is entirely kept or entirely pruned"
    assert pruned.sum().item() == round(sparsity * kept.numel())


def test_block_mask_prefers_high_norm_blocks():
    w = torch.zeros(32, 32)
    w[16:, :16] = 5.0
    w[:16, 16:] = 1.0
    mask = block_mask(w, (16, 16), 0.5)
    assert mask[16:, :16].all() and mask[:16, 16:].all()
    assert not mask[:16, :16].any() and not mask[16:, 16:].any()


@pytest.mark.parametrize("shape", [(8, 16), (12, 4, 2, 2)])
def test_two_four_keeps_two_of_every_four(shape):
    w = _weight(shape, 2)
    mask = build_mask(w, SparsityOption.n_of_m(2, 4))
    groups = gemm_view(mask).reshape(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    values = gemm_view(w).abs().reshape(shape[0], -1, 4)
    assert (values.masked_fill(~groups, 0).amax(-1) >= values.masked_fill(groups, 0).amax(-1)).all()


def test_two_four_needs_a_multiple_of_four():
    with pytest.raises(SpdyError, match="multiple of 4"):
        build_mask(_weight((8, 6)), SparsityOption.n_of_m(2, 4))


@pytest.mark.parametrize("make", [
    lambda s: SparsityOption.unstructured(s), lambda s: SparsityOption.blocked(s, 8)])
def test_allowed_masks_nest_levels(make):
    w = _weight((64, 48), 3)
    previous = build_mask(w, make(0.3))
    w = w * previous + 0.001 * torch.randn_like(w)      # reconstruction moves kept weights
    nested = build_mask(w, make(0.6), allowed=previous)
    assert not (nested & ~previous).any()
    with pytest.raises(SpdyError, match="increase in sparsity"):
        build_mask(w, make(0.1), allowed=previous)


def test_dense_keeps_everything():
    assert build_mask(_weight((5, 7)), SparsityOption.dense()).all()
