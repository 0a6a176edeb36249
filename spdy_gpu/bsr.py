"""Block-sparse (BSR) weights: the packed form the Triton kernel reads.

A weight W[N, K] (the GEMM view of a layer, Y = X @ W^T) is cut into blocks of
`block = (rows, cols)`; a block is stored when it holds a kept weight. Packing pads N and K
up to whole blocks with zeros, so any shape packs; the kernel never reads or writes past the
real [N, K]. Any mask packs at any block size, exactly: a kept block keeps its masked-out
entries as zeros. Pure torch: importing this module loads no Triton (the kernel's layout
facts come from spdy_kernels.layout, which is pure torch too).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field

import torch
from spdy_kernels.layout import (
    BLOCK_SIDES,
    DTYPES,
    LayoutIndices,
    block_dense,
    layout_indices,
    layout_problem,
)

from .errors import SpdyError
from .masks import build_mask, gemm_view
from .options import SparsityOption

KERNEL_BLOCK_SIDES = BLOCK_SIDES
"""Block sides the Triton kernel supports (any pair of them: square or rectangular)."""

FLOAT_DTYPES = DTYPES


@dataclass
class BSRWeight:
    """A weight W[N, K] in block-sparse row form.

    values:       [nnz, rows, cols]  the stored blocks, block-row by block-row, columns ascending
    crow_indices: [R + 1] int32      blocks of block-row r are values[crow[r]:crow[r + 1]]
    col_indices:  [nnz] int32        block-column of each stored block
    row_order:    [R] int32          block-rows by decreasing block count: the order the
                                     kernel visits them in (load balance; results do not change)
    shape:        (N, K)             the real (unpadded) shape
    R = ceil(N / rows), C = ceil(K / cols).
    """

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    row_order: torch.Tensor
    shape: tuple[int, int]
    indices: LayoutIndices = field(init=False, repr=False)   # what the kernel reads besides

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()
        derived = layout_indices(self.crow_indices)
        self.indices = LayoutIndices(self.row_order, derived.block_rows, derived.empty_rows)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Not a tensor, and no torch function takes one. Defining this makes PyTorch's fused
        # inference paths (TransformerEncoderLayer's fast path reads linear1.weight as a
        # dense tensor) see a weight they must not fuse, so the layer's own forward runs.
        return NotImplemented

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   block: int | tuple[int, int] = 32,
                   dtype: torch.dtype | None = None) -> BSRWeight:
        """Pack `weight` (any layer weight; its GEMM view [N, K] is packed).

        mask: bool, the weight's shape; True = kept. Blocks holding a True are stored (with
        the False entries zeroed); None stores every block holding a nonzero.
        dtype: value dtype (default: the weight's; must be fp32, fp16 or bf16).
        """
        rows, cols = _pair(block)
        if rows not in BLOCK_SIDES or cols not in BLOCK_SIDES:
            raise SpdyError(f"block {rows}x{cols} is not a kernel block (sides in "
                            f"{', '.join(map(str, BLOCK_SIDES))}); pack with one of them, e.g. "
                            f"block={kernel_block((rows, cols))}")
        if weight.dim() < 2:
            raise SpdyError(f"cannot pack a weight of shape {tuple(weight.shape)}: a layer "
                            "weight is [out, in, ...]")
        if weight.numel() == 0:
            raise SpdyError(f"cannot pack an empty weight of shape {tuple(weight.shape)}; "
                            "sparsify only layers with inputs and outputs")
        w = gemm_view(weight.detach())
        n, k = w.shape
        if mask is None:
            keep = w != 0
        else:
            if mask.shape != weight.shape:
                raise SpdyError(f"mask shape {tuple(mask.shape)} does not match weight shape "
                                f"{tuple(weight.shape)}; build the mask on this weight")
            keep = gemm_view(mask.to(device=w.device, dtype=torch.bool))
        dtype = dtype or w.dtype
        if dtype not in FLOAT_DTYPES:
            raise SpdyError(f"BSR values must be float32, float16 or bfloat16, not {dtype}; "
                            "cast the weight first")
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)).to(dtype)
        pad = (0, -k % cols, 0, -n % rows)
        blocks = _to_blocks(torch.nn.functional.pad(w, pad), rows, cols)        # [R, C, rows, cols]
        kept = _to_blocks(torch.nn.functional.pad(keep, pad), rows, cols).any(-1).any(-1)  # [R, C]
        counts = kept.sum(dim=1)
        crow = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=w.device)
        crow[1:] = counts.cumsum(0)
        return cls(values=blocks[kept].contiguous(),
                   crow_indices=crow.to(torch.int32),
                   col_indices=kept.nonzero()[:, 1].to(torch.int32),
                   row_order=layout_indices(crow).row_order,
                   shape=(n, k))

    @classmethod
    def from_option(cls, weight: torch.Tensor, option: SparsityOption,
                    block: int | tuple[int, int] | None = None,
                    dtype: torch.dtype | None = None) -> BSRWeight:
        """Prune `weight` to `option` (spdy_gpu.masks.build_mask) and pack it.

        block: the packing block; default `kernel_block(option.block)` for block options and
        32 x 32 otherwise (unstructured and N:M masks pack exactly but rarely skip a block).
        """
        if block is None:
            block = kernel_block(option.block) if option.block is not None else (32, 32)
        return cls.from_dense(weight, build_mask(weight, option), block, dtype)

    # ---- shape facts --------------------------------------------------------------------

    @property
    def block(self) -> tuple[int, int]:
        return int(self.values.shape[1]), int(self.values.shape[2])

    @property
    def n_block_rows(self) -> int:
        return int(self.crow_indices.numel()) - 1

    @property
    def n_block_cols(self) -> int:
        return -(-self.shape[1] // self.block[1])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of the R x C blocks stored."""
        return self.nnz_blocks / (self.n_block_rows * self.n_block_cols)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.n_block_rows * self.block[0], self.n_block_cols * self.block[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    # ---- conversion ---------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        """[N, K] in the value dtype: the masked weight, exactly."""
        return block_dense(self.values, self.indices.block_rows, self.col_indices, *self.shape)

    def to_torch_sparse(self) -> torch.Tensor:
        """The padded matrix as a torch sparse BSR tensor (same blocks, no copy of values)."""
        with warnings.catch_warnings():       # "BSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values,
                                           size=self.padded_shape, check_invariants=False)

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> BSRWeight:
        """A copy with values in `dtype` and all tensors on `device` (self if nothing changes)."""
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise SpdyError(f"BSR values must be float32, float16 or bfloat16, not {dtype}")
        return BSRWeight(self.values.to(device=device, dtype=dtype),
                         self.crow_indices.to(device), self.col_indices.to(device),
                         self.row_order.to(device), self.shape)

    def validate(self) -> None:
        """Check the invariants the kernel relies on; SpdyError naming the broken one."""
        v, crow, col, order = self.values, self.crow_indices, self.col_indices, self.row_order
        n, k = self.shape
        problem = None
        if v.dim() != 3 or v.dtype not in FLOAT_DTYPES:
            problem = (f"values must be [nnz, rows, cols] in float32, float16 or bfloat16, "
                       f"got {v.dtype} {tuple(v.shape)}")
        elif min(v.shape[1:]) < 1 or n < 1 or k < 1:
            problem = f"empty block {tuple(v.shape[1:])} or shape {self.shape}"
        elif any(int(side) not in BLOCK_SIDES for side in v.shape[1:]):
            problem = (f"block {tuple(v.shape[1:])} is not a kernel block (sides in "
                       f"{', '.join(map(str, BLOCK_SIDES))}; kernel_block(block) picks the one "
                       "a block mask packs into exactly)")
        elif any(t.dtype != torch.int32 or t.dim() != 1 for t in (crow, col, order)):
            problem = "crow_indices, col_indices and row_order must be 1-D int32"
        elif crow.numel() != -(-n // v.shape[1]) + 1 or order.numel() != crow.numel() - 1:
            problem = f"{crow.numel() - 1} block-rows (or {order.numel()} ordered) for N={n}"
        elif col.numel() != v.shape[0]:
            problem = f"{col.numel()} column indices for {v.shape[0]} stored blocks"
        elif (layout := layout_problem(crow, col, v.shape[0], -(-k // v.shape[2]))) is not None:
            problem = layout
        elif not torch.equal(torch.sort(order.long()).values,
                             torch.arange(order.numel(), device=order.device)):
            problem = "row_order is not a permutation of the block-rows"
        if problem is not None:
            fix = "" if "repack" in problem else "; repack it with BSRWeight.from_dense"
            raise SpdyError(f"malformed BSR weight: {problem}{fix}")

    def __repr__(self) -> str:
        return (f"BSRWeight(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz_blocks}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")


def kernel_block(block: int | tuple[int, int] | None) -> tuple[int, int]:
    """The kernel block to pack a mask of `block` granularity with. A side that is a
    multiple of 16 gets the largest kernel side dividing it (48 -> 16, 256 -> 128), so the
    packed matrix keeps exactly the mask's density; a smaller or odd side is rounded up to a
    kernel side (16..128), which stores some zero blocks."""
    rows, cols = _pair(block if block is not None else 32)
    return _kernel_side(rows), _kernel_side(cols)


def packs_exactly(block: tuple[int, int]) -> bool:
    """Whether kernel tiles pack a mask of `block` granularity with no zero tile stored."""
    return all(side % min(BLOCK_SIDES) == 0 for side in block)


def _kernel_side(side: int) -> int:
    dividing = [s for s in BLOCK_SIDES if side % s == 0]
    return max(dividing) if dividing else min(max(16, 1 << (side - 1).bit_length()), 128)


def _pair(block: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a block given as one side or two."""
    sides = (block, block) if isinstance(block, numbers.Integral) else block
    if not (isinstance(sides, (tuple, list)) and len(sides) == 2 and all(
            isinstance(side, numbers.Integral) and not isinstance(side, bool) and side >= 1
            for side in sides)):
        raise SpdyError(f"block {block!r} must be a positive int or two of them, e.g. 32 or "
                        "(64, 32)")
    return int(sides[0]), int(sides[1])


def _to_blocks(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[R * rows, C * cols] -> [R, C, rows, cols] (a view where possible)."""
    n, k = matrix.shape
    return matrix.reshape(n // rows, rows, k // cols, cols).permute(0, 2, 1, 3)
