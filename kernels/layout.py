"""Block-sparse layout facts the kernel relies on, in pure torch (importing this loads no
Triton): the supported blocks, dtypes and activations, the per-weight index arrays, whether the
interpreter is asked for, and the error a call the kernel cannot run raises."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

BLOCK_SIDES = (16, 32, 64, 128)     # supported block sides (any pair: square or rectangular)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")    # the epilogue's, by name


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
