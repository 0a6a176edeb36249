"""Mask builders: which weights an option keeps.

Every builder works on the GEMM view of a weight, [N, K] = [out, in * kernel area / groups],
returns a bool mask of the weight's own shape (True = kept), and removes exactly
round(sparsity * count) weights (or blocks). `allowed` restricts the kept set to a previous
mask, which is how the database nests the masks of successive levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import SpdyError
from .options import SparsityOption


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] for a Linear, [out, in/groups * kh * kw] for a Conv2d (a view, no copy)."""
    return weight.reshape(weight.shape[0], -1)


def unfit_reason(shape: Sequence[int], option: SparsityOption) -> str | None:
    """Why a weight of `shape` cannot take `option` (None: it can): a block larger than its
    GEMM view, or an N:M group that does not divide its input size. Such a layer keeps
    its other options (dense at least)."""
    n, k = shape[0], math.prod(shape[1:])
    if option.pattern == "block":
        return _block_unfit(n, k, *option.block)
    if option.pattern == "nm":
        return _nm_unfit(k, option.n, option.m)
    return None


def _block_unfit(n: int, k: int, rows: int, cols: int) -> str | None:
    if rows > n or cols > k:
        return f"block {rows}x{cols} is larger than the weight's GEMM view {n}x{k}"
    return None


def _nm_unfit(k: int, n: int, m: int) -> str | None:
    if k % m:
        return f"{n}:{m} sparsity needs the input size ({k}) to be a multiple of {m}"
    return None


def _require(reason: str | None) -> None:
    if reason is not None:
        raise SpdyError(f"{reason}; use another option for this layer")


def build_mask(weight: torch.Tensor, option: SparsityOption | str,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of `option` (or its name, e.g. "nm2:4") on `weight`, chosen by magnitude (or
    block norm) within `allowed`."""
    if isinstance(option, str):
        option = SparsityOption.parse(option)
    if option.pattern == "dense":
        return torch.ones_like(weight, dtype=torch.bool)
    if option.pattern == "unstructured":
        return magnitude_mask(weight, option.sparsity, allowed)
    if option.pattern == "block":
        return block_mask(weight, option.block, option.sparsity, allowed)
    return nm_mask(weight, option.n, option.m, allowed)


def magnitude_mask(weight: torch.Tensor, sparsity: float,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the largest-magnitude weights; prune exactly round(sparsity * numel)."""
    scores = _scores(weight.detach().abs(), allowed)
    return _prune_lowest(scores.flatten(), sparsity).reshape(weight.shape)


def block_mask(weight: torch.Tensor, block: tuple[int, int], sparsity: float,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the blocks of the GEMM view with the largest L2 norm; prune exactly
    round(sparsity * number of blocks). Edge blocks of shapes that are not multiples of
    the block count as whole blocks (zero padding adds nothing to their norm)."""
    rows, cols = block
    view = gemm_view(weight.detach()).float()
    n, k = view.shape
    _require(_block_unfit(n, k, rows, cols))
    padded = _pad_to_blocks(view.square(), rows, cols)
    norms = padded.reshape(padded.shape[0] // rows, rows, -1, cols).sum(dim=(1, 3))
    if allowed is not None:
        allowed_blocks = _pad_to_blocks(gemm_view(allowed).float(), rows, cols)
        allowed = allowed_blocks.reshape(norms.shape[0], rows, -1, cols).amax(dim=(1, 3)) > 0
    keep_blocks = _prune_lowest(_scores(norms, allowed).flatten(), sparsity).reshape(norms.shape)
    keep = keep_blocks.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
    return keep.reshape(weight.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int,
            allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the n largest-magnitude weights of every m consecutive ones along K."""
    view = gemm_view(weight.detach()).abs().float()
    rows, k = view.shape
    _require(_nm_unfit(k, n, m))
    allowed_view = None if allowed is None else gemm_view(allowed)
    groups = _scores(view, allowed_view).reshape(rows, k // m, m)
    kept = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    if allowed is not None and (keep & ~allowed_view.reshape(keep.shape)).any():
        raise SpdyError(f"the allowed mask keeps fewer than {n} of some group of {m}; "
                        "N:M levels cannot nest inside it")
    return keep.reshape(weight.shape)


def _scores(values: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Importance scores; weights outside `allowed` score -1, below every real magnitude."""
    if allowed is None:
        return values.float()
    if allowed.shape != values.shape:
        raise SpdyError(f"allowed mask shape {tuple(allowed.shape)} does not match "
                        f"{tuple(values.shape)}")
    return torch.where(allowed.bool(), values.float(), torch.full_like(values.float(), -1.0))


def _prune_lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask that drops exactly round(sparsity * len) of the lowest scores (ties by position)."""
    count = round(sparsity * scores.numel())
    if (scores < 0).sum() > count:
        raise SpdyError(f"sparsity {sparsity} keeps more weights than the allowed mask; "
                        "nested levels must increase in sparsity")
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:count]] = False
    return keep


def _pad_to_blocks(matrix: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n, k = matrix.shape
    return torch.nn.functional.pad(matrix, (0, -k % cols, 0, -n % rows))
