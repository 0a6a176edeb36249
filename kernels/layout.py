"""Block-sparse layout facts the kernel relies on, in pure torch (importing this loads no
Triton): the supported blocks, dtypes and activations, the per-weight index arrays, whether the
interpreter is asked for, the error a call the kernel cannot run raises, the checks of an
input and of an index layout that the kernel and its pure-torch callers share, the
conversions between stored blocks and the dense matrix, and the exact dense fallback that a
CPU without the interpreter runs."""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

BLOCK_SIDES = (16, 32, 64, 128)     # supported block sides (any pair: square or rectangular)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")    # the epilogue's, by name

log = logging.getLogger(__name__)


def interpret_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read at every call, so a
    change after import counts)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class KernelInputError(ValueError):
    """A call the kernel cannot run; the message names the problem and the fix."""


class LayoutIndices(NamedTuple):
    """Per-weight index arrays the kernel reads besides the CSR ones (all int32)."""

    row_order: torch.Tensor     # [R] block-rows by decreasing block count (ties by index)
    block_rows: torch.Tensor    # [nnz] block-row of each stored block
    empty_rows: torch.Tensor    # [E] block-rows without stored blocks


def layout_indices(crow_indices: torch.Tensor) -> LayoutIndices:
    """The index arrays of a block-sparse layout (compute once per weight: this syncs)."""
    counts = torch.diff(crow_indices.long())
    rows = torch.arange(counts.numel(), device=crow_indices.device)
    return LayoutIndices(torch.argsort(-counts, stable=True).to(torch.int32),
                         torch.repeat_interleave(rows, counts).to(torch.int32),
                         rows[counts == 0].to(torch.int32))


def input_problem(x: torch.Tensor, k: int, values: torch.Tensor) -> str | None:
    """What keeps `x` from being multiplied by a weight stored as `values` with K = `k`
    (None: nothing): another dtype, another last dimension, another device."""
    if x.dtype != values.dtype:
        return f"input dtype {x.dtype} differs from the weight's {values.dtype}; cast one of them"
    if x.dim() < 1 or x.shape[-1] != k:
        return f"input of shape {tuple(x.shape)} does not end in K={k}; pass [..., {k}]"
    if x.device != values.device:
        return "input, weight and bias must be on one device; move them with .to(device)"
    return None


def layout_problem(crow: torch.Tensor, col: torch.Tensor, nnz: int, block_cols: int
                   ) -> str | None:
    """What is wrong with a BSR index layout, or None: crow starts at 0, never decreases and
    ends at nnz; every column index lies in [0, block_cols) and increases within its
    block-row (a block stored twice would be summed by the kernel, once by the fallback).
    Reading them costs a device sync on a GPU, which bsr_linear only pays when asked
    (check_indices=True)."""
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow.diff() < 0).any()):
        return (f"crow_indices must start at 0, never decrease and end at nnz={nnz}; repack "
                "the weight")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= block_cols):
        return (f"col_indices must lie in [0, {block_cols}) (a column index past K's block "
                "columns); repack the weight")
    if col.numel() > 1:
        increasing = col.diff() > 0
        row_starts = crow[1:-1].long()              # a row's first block may be any column
        row_starts = row_starts[(row_starts > 0) & (row_starts < col.numel())]
        increasing[row_starts - 1] = True
        if not bool(increasing.all()):
            return ("col_indices must increase within each block-row (a block column stored "
                    "twice or out of order); repack the weight")
    return None


def _grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def block_dense(values: torch.Tensor, block_rows: torch.Tensor, col: torch.Tensor, n: int,
                k: int) -> torch.Tensor:
    """W [n, k] from its stored blocks (zeros elsewhere; differentiable in `values`).
    block_rows: each block's block-row (layout_indices); col: its block-column."""
    bn, bk = values.shape[1:]
    rows, cols = _grid((n, k), (bn, bk))
    tiles = values.new_zeros(rows, cols, bn, bk)
    tiles = tiles.index_put((block_rows.long(), col.long()), values)
    return tiles.permute(0, 2, 1, 3).reshape(rows * bn, cols * bk)[:n, :k]


def stored_blocks(dense: torch.Tensor, shape: torch.Size, block_rows: torch.Tensor,
                  col: torch.Tensor) -> torch.Tensor:
    """The stored blocks' entries of a dense [n, k] matrix, as [nnz, bn, bk]."""
    _, bn, bk = shape
    rows, cols = _grid(tuple(dense.shape), (bn, bk))
    padded = F.pad(dense, (0, cols * bk - dense.shape[1], 0, rows * bn - dense.shape[0]))
    tiles = padded.reshape(rows, bn, cols, bk).permute(0, 2, 1, 3)
    return tiles[block_rows.long(), col.long()]


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The fused epilogue's activation by name (see ACTIVATIONS), in torch."""
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def dense_linear(x: torch.Tensor, values: torch.Tensor, block_rows: torch.Tensor,
                 col: torch.Tensor, n: int, k: int, bias: torch.Tensor | None,
                 activation: str | None) -> torch.Tensor:
    """What the kernel computes, exactly, in plain torch: act(x @ W^T + bias) with W [n, k]
    the dense matrix of the stored blocks. Differentiable as the kernel's op is: zeros stored
    inside blocks (an unstructured or 2:4 mask packed) get no gradient. The dense weight is
    rebuilt per call: a write through values.data leaves no trace a cache could key on."""
    weight = block_dense(values * (values != 0), block_rows, col, n, k)
    return activate(F.linear(x, weight, None if bias is None else bias.to(x.dtype)), activation)


@functools.cache
def note_cpu_fallback() -> None:
    """Say once that a CPU without TRITON_INTERPRET=1 runs dense_linear, not the kernel."""
    log.info("block-sparse layers on a CPU without TRITON_INTERPRET=1 run the exact dense "
             "fallback (masked weight, F.linear); set TRITON_INTERPRET=1 to run the kernel")
