"""`torch.ops.spdy_kernels.bsr_linear`: the block-sparse linear as a PyTorch custom op.

Registered with a fake (meta) implementation, so a model calling it traces under
torch.compile and torch.export (the op stays one node of the graph) and replays in CUDA
graphs, and with a backward (gradients of the input, the stored block values and the bias;
pruned weights, whole blocks or zeros inside stored blocks, get no gradient and stay zero),
so gradients flow through a pruned layer to the layers before it, also to second order.
Raw tensors in, like bsr_matmul.bsr_linear; the launch settings are the defaults (autotuned
on CUDA, the interpreter on a CPU). Importing this module registers the op.
"""

from __future__ import annotations

import torch

from .layout import (
    LayoutIndices,
    activate,
    block_dense,
    dense_linear,
    interpret_requested,
    note_cpu_fallback,
    stored_blocks,
)

__all__ = ["bsr_linear_op"]


@torch.library.custom_op("spdy_kernels::bsr_linear", mutates_args=())
def bsr_linear_op(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                  col_indices: torch.Tensor, row_order: torch.Tensor, block_rows: torch.Tensor,
                  empty_rows: torch.Tensor, out_features: int, in_features: int,
                  bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """act(x @ W^T + bias), W [out_features, in_features] block-sparse (see bsr_linear); on a
    CPU without TRITON_INTERPRET=1 the exact dense fallback (said once in the log)."""
    from .bsr_matmul import bsr_linear

    if x.device.type != "cuda" and not interpret_requested():
        note_cpu_fallback()
        return dense_linear(x, values, block_rows, col_indices, out_features, in_features, bias,
                            activation)
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


def _setup_context(ctx, inputs, output):
    (x, values, crow_indices, col_indices, row_order, block_rows, empty_rows, out_features,
     in_features, bias, activation) = inputs
    ctx.save_for_backward(x, values, crow_indices, col_indices, row_order, block_rows,
                          empty_rows, bias)
    ctx.shape, ctx.activation = (out_features, in_features), activation


def _backward(ctx, grad):
    """y = act(x W^T + b): grad_x = g W, grad_W = g^T x on the stored nonzeros, grad_b =
    sum g, with g = grad * act'(z) and z recomputed by the kernel (the forward keeps no
    copy). Under backward(create_graph=True) all of it stays differentiable."""
    x, values, crow, col, row_order, block_rows, empty_rows, bias = ctx.saved_tensors
    n, k = ctx.shape
    if ctx.activation is not None:
        grad = _through_activation(ctx.activation, grad, (x, values, crow, col, row_order,
                                                          block_rows, empty_rows, n, k, bias))
    g = grad.reshape(-1, n).float()                                        # [M, N]
    x2 = x.reshape(-1, k).float()                                          # [M, K]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = (g @ block_dense(values.float(), block_rows, col, n, k)).reshape(x.shape)
        grad_x = grad_x.to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = stored_blocks(g.t() @ x2, values.shape, block_rows, col) * (values != 0)
        grad_values = grad_values.to(values.dtype)
    if bias is not None and ctx.needs_input_grad[9]:
        grad_bias = g.sum(0).to(bias.dtype)
    return grad_x, grad_values, None, None, None, None, None, None, None, grad_bias, None


def _through_activation(activation: str, grad: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """grad * act'(z), z = x W^T + b recomputed; differentiable in x, W and b when the
    backward builds a graph (create_graph=True)."""
    higher = torch.is_grad_enabled()
    with torch.enable_grad():
        z = bsr_linear_op(*inputs, None).float()
        if not (higher and z.requires_grad):
            z = z.detach().requires_grad_()
        (grad,) = torch.autograd.grad(activate(z, activation), z, grad.float(),
                                      create_graph=higher)
    return grad


bsr_linear_op.register_autograd(_backward, setup_context=_setup_context)
