"""`torch.ops.spdy_kernels.bsr_linear`: the block-sparse linear as a PyTorch custom op.

Registered with a fake (meta) implementation, so a model calling it traces under
torch.compile and torch.export (the op stays one node of the graph) and replays in CUDA
graphs. Raw tensors in, like bsr_matmul.bsr_linear; the launch settings are the defaults
(autotuned on CUDA, the interpreter on a CPU). Importing this module registers the op.
"""

from __future__ import annotations

import torch

from .layout import LayoutIndices

__all__ = ["bsr_linear_op"]


@torch.library.custom_op("spdy_kernels::bsr_linear", mutates_args=())
def bsr_linear_op(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                  col_indices: torch.Tensor, row_order: torch.Tensor, block_rows: torch.Tensor,
                  empty_rows: torch.Tensor, out_features: int, in_features: int,
                  bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """act(x @ W^T + bias), W [out_features, in_features] block-sparse (see bsr_linear)."""
    from .bsr_matmul import bsr_linear

    return bsr_linear(x, values, crow_indices, col_indices, (out_features, in_features), bias,
                      activation, indices=LayoutIndices(row_order, block_rows, empty_rows))


@bsr_linear_op.register_fake
def _(x, values, crow_indices, col_indices, row_order, block_rows, empty_rows, out_features,
      in_features, bias, activation):
    # the kernel's own words (bsr_matmul._check), for tracers that never run it
    torch._check(x.shape[-1] == in_features, lambda: (
        f"bsr_linear: input of shape {tuple(x.shape)} does not end in K={in_features}; pass "
        f"[..., {in_features}]"))
    torch._check(x.dtype == values.dtype, lambda: (
        f"bsr_linear: input dtype {x.dtype} differs from the weight's {values.dtype}; cast one "
        "of them"))
    return x.new_empty((*x.shape[:-1], out_features))
