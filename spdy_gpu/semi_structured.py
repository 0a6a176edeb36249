"""2:4 semi-structured sparsity on NVIDIA sparse tensor cores, beside the BSR kernel.

A Linear pruned 2:4 (two kept of every four consecutive inputs) runs as PyTorch's
semi-structured sparse tensor (cuSPARSELt, or CUTLASS where cuSPARSELt is missing): half
the weight bytes plus 2-bit position metadata, and the sparse tensor cores' doubled
throughput. SemiStructuredLinear keeps the 2:4-masked dense weight (the state dict of an
nn.Linear) and converts it on its first CUDA forward; on a CPU it runs the masked dense
weight, exactly.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpdyError
from .masks import build_mask
from .options import SparsityOption

log = logging.getLogger(__name__)

SEMI_STRUCTURED = SparsityOption.n_of_m(2, 4)
# Weight [N, K] multiples PyTorch's CUTLASS path needs (cuSPARSELt, its default, needs less).
# 16-bit only: cuSPARSELt has no fp32, and the CUTLASS fp32 path is not the default.
_MULTIPLES = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}


def fits(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a weight [N, K] of `dtype` can be stored semi-structured."""
    if dtype not in _MULTIPLES:
        return False
    rows, cols = _MULTIPLES[dtype]
    return n >= rows and k >= cols and n % rows == 0 and k % cols == 0


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of four consecutive inputs of `weight` [N, K] keeps at most two."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    kept = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((kept <= 2).all()) and bool((kept < 4).any())


class SemiStructuredLinear(nn.Linear):
    """An nn.Linear whose weight is 2:4 sparse and runs on sparse tensor cores on CUDA.

    Same parameters and state dict as nn.Linear (the masked dense weight), so a pruned
    checkpoint loads into it unchanged. The semi-structured copy is built on the first eager
    CUDA forward and rebuilt when the weight changes device, dtype or values (in-place
    writes counted by its version counter: `copy_` under no_grad, load_state_dict; a write
    through `.data` bypasses that counter, so call `refresh()` after one); run the model once
    eagerly before torch.compile so that the compiled graph uses it. A weight that cannot be
    stored 2:4 (fp32, odd shapes) runs dense, with a warning once."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> SemiStructuredLinear:
        """`linear` pruned 2:4 by `mask` (bool, the weight's shape) or, without one, by
        magnitude (the two largest of every four)."""
        if not isinstance(linear, nn.Linear):
            raise SpdyError(f"SemiStructuredLinear replaces nn.Linear, not "
                            f"{type(linear).__name__}; exclude this layer")
        weight = linear.weight.detach()
        mask = build_mask(weight, SEMI_STRUCTURED) if mask is None else mask.bool()
        if mask.shape != weight.shape:
            raise SpdyError(f"mask shape {tuple(mask.shape)} does not match weight shape "
                            f"{tuple(weight.shape)}; build the mask on this weight")
        if not is_2_4(mask.float()):
            raise SpdyError("the mask is not 2:4 (at most two kept of every four inputs); "
                            "build it with spdy_gpu.masks.build_mask(weight, 'nm2:4')")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=dtype or weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight * mask)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.requires_grad_(False)
        return layer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sparse: tuple[tuple, torch.Tensor] | None = None

    def refresh(self) -> None:
        """Drop the semi-structured copy; the next CUDA forward rebuilds it from the weight."""
        self._sparse = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():
            # fine-tuning: the masked dense weight, so that the pruned weights get no
            # gradient and the layer stays 2:4 (the semi-structured copy is for inference)
            return F.linear(x, self.weight * (self.weight != 0), self.bias)
        if not x.is_cuda:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self._semi_structured(), self.bias)

    def _semi_structured(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced (torch.compile): the copy an eager call built, which the tracer takes as
            # a constant; a model compiled before any eager call runs its dense weight.
            return self.weight if self._sparse is None else self._sparse[1]
        w = self.weight
        if not fits(*w.shape, w.dtype):
            _note_dense(tuple(w.shape), w.dtype)
            return w                            # exact, at dense speed
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._sparse is None or self._sparse[0] != key:
            from torch.sparse import to_sparse_semi_structured

            self._sparse = (key, to_sparse_semi_structured(w.detach()))
        return self._sparse[1]


@functools.cache
def _note_dense(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    log.warning("SemiStructuredLinear: a %s %s weight cannot be stored 2:4 (16-bit, multiples "
                "of (32, 64)); it runs as the masked dense weight", shape, dtype)
