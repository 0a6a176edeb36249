"""BSR packing (pure torch) and the roofline formula."""

import subprocess
import sys

import pytest
import torch
from spdy_kernels.layout import layout_indices

from spdy_gpu import SparsityOption, SpdyError
from spdy_gpu.bsr import BSRWeight, kernel_block, packs_exactly
from spdy_gpu.masks import build_mask
from spdy_gpu.roofline import roofline_ms, roofline_speedup

BLOCKS = [16, 32, 64, 128, (16, 32), (64, 16)]
SHAPES = [(64, 64), (100, 70), (33, 150), (130, 257), (1, 1)]
H100 = dict(peak_flops=990e12, bandwidth=3.35e12)


def _weight(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _block_mask(shape, block, density, seed=1):
    """A mask that keeps whole blocks (ragged at the edges), about `density` of them."""
    rows, cols = (block, block) if isinstance(block, int) else block
    r, c = -(-shape[0] // rows), -(-shape[1] // cols)
    keep = torch.rand(r, c, generator=torch.Generator().manual_seed(seed)) < density
    full = keep.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return full[: shape[0], : shape[1]]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(block, shape, dtype):
    w = _weight(shape, dtype=dtype)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.3
    packed = BSRWeight.from_dense(w, mask, block)
    assert packed.dtype == dtype and packed.values.is_contiguous()
    assert torch.equal(packed.to_dense(), torch.where(mask, w, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("block", BLOCKS)
def test_block_masks_store_only_kept_blocks(block):
    shape = (200, 170)
    mask = _block_mask(shape, block, 0.4)
    packed = BSRWeight.from_dense(_weight(shape), mask, block)
    rows, cols = packed.block
    kept = torch.nn.functional.pad(mask, (0, -shape[1] % cols, 0, -shape[0] % rows))
    kept = kept.reshape(packed.n_block_rows, rows, -1, cols).any(3).any(1)
    assert packed.nnz_blocks == int(kept.sum())
    assert packed.density == pytest.approx(kept.float().mean().item())
    assert packed.padded_shape == (packed.n_block_rows * rows, packed.n_block_cols * cols)
    # stored blocks hold only kept weights: the padding and pruned entries are zero
    assert torch.equal(packed.to_dense() != 0, mask & (_weight(shape) != 0))


def test_empty_rows_and_empty_matrix():
    w = _weight((96, 64))
    mask = torch.zeros(96, 64, dtype=torch.bool)
    mask[32:64, :32] = True                      # only block-row 1 (of 3) is non-empty
    packed = BSRWeight.from_dense(w, mask, 32)
    assert torch.diff(packed.crow_indices).tolist() == [0, 1, 0]
    assert packed.row_order.tolist()[0] == 1
    assert torch.equal(packed.to_dense(), w * mask)
    empty = BSRWeight.from_dense(w, torch.zeros_like(mask), 32)
    assert empty.nnz_blocks == 0 and empty.values.shape == (0, 32, 32)
    assert torch.equal(empty.to_dense(), torch.zeros_like(w))
    assert empty.density == 0.0 and empty.indices.empty_rows.tolist() == [0, 1, 2]


def test_row_order_balances_without_changing_the_matrix():
    crow = torch.tensor([0, 1, 4, 4, 7, 9], dtype=torch.int32)      # rows of 1, 3, 0, 3, 2
    order, block_rows, empty_rows = layout_indices(crow)
    assert order.tolist() == [1, 3, 4, 0, 2]                        # ties keep index order
    assert block_rows.tolist() == [0, 1, 1, 1, 3, 3, 3, 4, 4] and empty_rows.tolist() == [2]
    w = _weight((160, 96))
    packed = BSRWeight.from_dense(w, _block_mask(w.shape, 32, 0.5, seed=5), 32)
    per_row = torch.diff(packed.crow_indices)[packed.row_order.long()]
    assert (torch.diff(per_row) <= 0).all()
    assert sorted(packed.row_order.tolist()) == list(range(packed.n_block_rows))


def test_without_a_mask_nonzero_blocks_are_kept():
    w = _weight((64, 64)) * _block_mask((64, 64), 16, 0.5, seed=3)
    packed = BSRWeight.from_dense(w, None, 16)
    assert packed.nnz_blocks == int((w.reshape(4, 16, 4, 16).abs().sum((1, 3)) > 0).sum())
    assert torch.equal(packed.to_dense(), w)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_from_option_matches_build_mask(sparsity):
    w = _weight((128, 256))
    option = SparsityOption.blocked(sparsity, 32)
    packed = BSRWeight.from_option(w, option)
    assert packed.block == (32, 32)
    assert packed.nnz_blocks == 32 - round(sparsity * 32)      # 4 x 8 blocks of 32 x 32
    assert torch.equal(packed.to_dense(), w * build_mask(w, option))
    # a mask of 8x8 blocks packs exactly into 16x16 kernel blocks
    fine = BSRWeight.from_option(w, SparsityOption.blocked(sparsity, 8))
    assert fine.block == (16, 16)
    assert torch.equal(fine.to_dense(), w * build_mask(w, SparsityOption.blocked(sparsity, 8)))


def test_torch_sparse_and_dtype_conversion():
    w = _weight((100, 70))
    packed = BSRWeight.from_dense(w, _block_mask(w.shape, 32, 0.5), 32)
    dense = packed.to_torch_sparse().to_dense()
    assert dense.shape == packed.padded_shape
    assert torch.equal(dense[:100, :70], packed.to_dense()) and not dense[100:].any()
    half = packed.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.shape == packed.shape
    assert torch.equal(half.to_dense(), packed.to_dense().half())


def test_kernel_block_divides_multiples_of_16_and_rounds_up_the_rest():
    assert kernel_block(None) == (32, 32)
    assert kernel_block(8) == (16, 16)
    assert kernel_block((1, 4)) == (16, 16)
    assert kernel_block((48, 64)) == (16, 64)
    assert kernel_block((96, 80)) == (32, 16)
    assert kernel_block(256) == (128, 128)
    assert packs_exactly((48, 256)) and not packs_exactly((8, 64))


def test_a_48_block_mask_packs_with_its_own_density():
    """48x48 blocks are nine 16x16 tiles each: the packed matrix stores no zero tile."""
    weight = _weight((192, 192))
    option = SparsityOption.blocked(0.5, 48)
    packed = BSRWeight.from_option(weight, option)
    assert packed.block == (16, 16)
    assert packed.nnz_blocks == 9 * round((1 - option.sparsity) * 16)   # 16 blocks of 48
    assert torch.equal(packed.to_dense(), weight * build_mask(weight, option))


def test_bad_input_raises_one_line_spdy_errors():
    w = _weight((64, 64))
    with pytest.raises(SpdyError, match="does not match weight shape"):
        BSRWeight.from_dense(w, torch.ones(32, 64, dtype=torch.bool))
    with pytest.raises(SpdyError, match="float32, float16 or bfloat16"):
        BSRWeight.from_dense(w, dtype=torch.int8)
    with pytest.raises(SpdyError, match="positive"):
        BSRWeight.from_dense(w, block=0)
    for block in [(16,), "16", (16.0, 16), True]:
        with pytest.raises(SpdyError, match="must be a positive int or two of them"):
            BSRWeight.from_dense(w, block=block)
    with pytest.raises(SpdyError, match="cannot pack an empty weight of shape \\(0, 32\\)"):
        BSRWeight.from_dense(torch.randn(0, 32))
    with pytest.raises(SpdyError, match="a layer weight is \\[out, in, ...\\]"):
        BSRWeight.from_dense(torch.randn(64))
    good = BSRWeight.from_dense(w, block=32)
    with pytest.raises(SpdyError, match="malformed BSR weight: crow"):
        BSRWeight(good.values, good.crow_indices.flip(0), good.col_indices, good.row_order,
                  good.shape)
    with pytest.raises(SpdyError, match="column index"):
        BSRWeight(good.values, good.crow_indices, good.col_indices + 2, good.row_order,
                  good.shape)
    with pytest.raises(SpdyError, match="permutation"):
        BSRWeight(good.values, good.crow_indices, good.col_indices,
                  torch.zeros_like(good.row_order), good.shape)


def test_roofline_reproduces_the_published_examples():
    # 4096 x 4096, bf16, 64x64 blocks (gpu-kernel-anchors.md): memory-bound at M=16,
    # compute-bound at M=8192.
    ideal = [roofline_speedup(4096, 4096, 16, d, 64, **H100) for d in (0.5, 0.25, 0.1)]
    assert ideal == pytest.approx([1.98, 3.90, 9.3], rel=0.01)
    ideal = [roofline_speedup(4096, 4096, 8192, d, 64, **H100) for d in (0.5, 0.25, 0.1)]
    assert ideal == pytest.approx([2.0, 4.0, 6.8], rel=0.01)
    dense = roofline_ms(4096, 4096, 8192, **H100)
    assert dense == pytest.approx(1e3 * 2 * 4096**2 * 8192 / 990e12)
    assert roofline_ms(4096, 4096, 16, 1.0, 64, **H100) > roofline_ms(4096, 4096, 16, **H100)


def test_packing_modules_do_not_import_triton():
    code = ("import sys, spdy_gpu, spdy_gpu.bsr, spdy_gpu.sparse_linear, spdy_gpu.roofline; "
            "sys.exit('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("block", [8, 200, (8, 16), (16, 24)])
def test_a_block_the_kernel_cannot_run_is_refused_when_packing(block):
    """Refused on the CPU where it is built, not on the GPU where it is deployed."""
    with pytest.raises(SpdyError, match="is not a kernel block .sides in 16, 32, 64, 128"):
        BSRWeight.from_dense(_weight((256, 256)), block=block)
