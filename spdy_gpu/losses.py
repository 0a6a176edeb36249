"""Model-level losses that score a pruned model against the dense one on held-out batches.

A loss is `loss(pruned_output, dense_output, batch) -> scalar tensor`, lower is better.
Built-in, by name: "nmse" (normalised squared error of the outputs, the default), "cosine"
(1 - mean cosine similarity per sample: embeddings), "kl" (KL divergence of the pruned
model's softmax from the dense one's: classifiers), "cross_entropy" (the pruned model's
cross-entropy against the dense model's soft predictions: classifiers; KL plus the dense
entropy, so the same minimiser). A model entry may name one of these or
bring its own callable (e.g. a task loss against labels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import SpdyError

Loss = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def nmse(pruned: torch.Tensor, dense: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """||pruned - dense||^2 / ||dense||^2 over the batch."""
    return (pruned - dense).square().sum() / dense.square().sum().clamp_min(1e-30)


def _require_samples(output: torch.Tensor, loss: str, what: str) -> None:
    if output.dim() < 2:
        raise SpdyError(f"--loss {loss} compares {what} per sample, and the model's output has "
                        f"shape {list(output.shape)}; return [batch, ...] outputs from forward "
                        "or use --loss nmse")


def cosine(pruned: torch.Tensor, dense: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """1 - mean over samples of the cosine between flattened outputs."""
    _require_samples(dense, "cosine", "feature vectors")
    similarity = F.cosine_similarity(pruned.flatten(1).double(), dense.flatten(1).double(),
                                     dim=1, eps=1e-12)
    return 1.0 - similarity.mean()


def kl(pruned: torch.Tensor, dense: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """KL(dense || pruned) of the softmax over the last dimension, mean over samples."""
    _require_samples(dense, "kl", "class scores")
    log_p = F.log_softmax(pruned.double(), dim=-1).flatten(0, -2)
    log_q = F.log_softmax(dense.double(), dim=-1).flatten(0, -2)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def cross_entropy(pruned: torch.Tensor, dense: torch.Tensor, batch: Any = None) -> torch.Tensor:
    """Mean over samples of -sum softmax(dense) * log_softmax(pruned) over the last
    dimension."""
    _require_samples(dense, "cross_entropy", "class scores")
    log_p = F.log_softmax(pruned.double(), dim=-1).flatten(0, -2)
    q = F.softmax(dense.double(), dim=-1).flatten(0, -2)
    return -(q * log_p).sum(-1).mean()


LOSSES: dict[str, Loss] = {"nmse": nmse, "cosine": cosine, "kl": kl,
                           "cross_entropy": cross_entropy}


def get_loss(loss: str | Loss | None) -> tuple[str, Loss]:
    """(name, function) of a loss given by name or as a callable (None: nmse)."""
    if loss is None:
        loss = "nmse"
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if loss not in LOSSES:
        raise SpdyError(f"unknown loss {loss!r}; use one of {sorted(LOSSES)} (or give the "
                        "model entry its own loss function)")
    return loss, LOSSES[loss]


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors a loss compares (each scored, the losses averaged): the output itself, a
    model output's `logits` or `last_hidden_state`, else every floating tensor of at least
    one dimension it holds (nested tuples, lists, dicts), so no head of a multi-output model
    goes unscored; integer outputs beside them (an argmax) are left out."""
    if isinstance(output, torch.Tensor):
        return [_floating(output)]
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return [_floating(value)]
    leaves = _tensor_leaves(output)
    scored = ([t for t in leaves if t.is_floating_point() and t.dim() > 0]
              or [t for t in leaves if t.is_floating_point()])
    if scored:
        return scored
    if leaves:
        return [_floating(leaves[0])]           # refused: integer outputs only
    raise SpdyError(f"the model returned {type(output).__name__}, which holds no tensor to "
                    "score; return a tensor (or a tuple/dict of them) from forward")


def _tensor_leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [leaf for value in output for leaf in _tensor_leaves(value)]
    return []


def _floating(output: torch.Tensor) -> torch.Tensor:
    """An integer or boolean output (an argmax, a prediction) hides how far a pruned model
    moved from dense: every candidate would score the same and the search learn nothing."""
    if not output.is_floating_point():
        raise SpdyError(f"the model's output is {str(output.dtype).removeprefix('torch.')} "
                        f"{list(output.shape)}, which no loss can tell apart across pruned "
                        "models; return the floating outputs (logits, hidden states) from "
                        "forward")
    return output
