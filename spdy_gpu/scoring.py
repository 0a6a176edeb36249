"""Scoring a profile on held-out data: stitch its weights from the database into the model,
run the held-out batches, compare with the dense model's outputs by a model-level loss,
and put the dense weights back. The search calls this for every distinct candidate, so
where there is a GPU the forwards run there (held_out_scorer)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .data import batches_digest
from .errors import SpdyError, user_code
from .layers import call_model, inputs_to, model_device, on_gpu_else_cpu
from .losses import LOSSES, Loss, get_loss, output_tensors
from .options import SparsityOption
from .reconstruct.stitch import WeightSource, restore_, stitch_


def held_out_scorer(model: nn.Module, batches: Sequence[Any],
                    database: WeightSource | None = None,
                    loss: str | Loss | None = None) -> HeldOutScorer:
    """A HeldOutScorer on the GPU where there is one, else where the model is; a model whose
    forward fails on the GPU (an op without a CUDA kernel, memory) is scored where it is,
    with a warning."""
    if model_device(model).type == "cuda":
        return HeldOutScorer(model, batches, database, loss)
    return on_gpu_else_cpu(
        lambda device: HeldOutScorer(model, batches, database, loss, device=device),
        "scoring the search's candidates")


class HeldOutScorer:
    """score(choices) -> mean loss of the stitched model against the dense outputs.

    model: the dense model (changed only while a score is computed); database: where the
    chosen weights come from (None: magnitude masks on the dense weights); device: where the
    forwards run (default: where the model is; elsewhere the scorer runs its own copy of
    the model there, and the caller's model is never changed)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any],
                 database: WeightSource | None = None, loss: str | Loss | None = None,
                 device: torch.device | str | None = None):
        if not batches:
            raise SpdyError("no held-out batches to score on; pass at least one batch of "
                            "inputs the model takes")
        check_model = getattr(database, "check_model", None)    # a Database checks its own
        if check_model is not None:
            check_model(model)
        home = model_device(model)
        self.device = home if device is None else torch.device(device)
        self.model = model if self.device == home else copy.deepcopy(model).to(self.device)
        self.batches = [inputs_to(batch, self.device) for batch in batches]
        self.database = database
        self.loss_name, self.loss = get_loss(loss)
        self.dense_outputs = [self._forward(batch) for batch in self.batches]
        for output in self.dense_outputs[0]:                 # can the loss compare them?
            self._loss(output, output, self.batches[0])

    def identity(self) -> dict[str, Any]:
        """What the scores depend on besides the choices (a search resumes only under the
        same): the loss, the weight source and a digest of the held-out batches."""
        return {"loss": self.loss_name, "data": batches_digest(self.batches),
                "database": ("magnitude" if self.database is None
                             else getattr(self.database, "fingerprint", repr(self.database)))}

    def __call__(self, choices: Mapping[str, SparsityOption]) -> float:
        backup = stitch_(self.model, choices, self.database)
        try:
            return self.loss_of(self.model)
        finally:
            restore_(self.model, backup)

    def loss_of(self, model: nn.Module) -> float:
        """Mean loss of `model` (e.g. a pruned copy after gAP, on any device) against the
        dense outputs."""
        device = model_device(model)
        losses = []
        for batch, dense in zip(self.batches, self.dense_outputs):
            batch = inputs_to(batch, device)
            pruned = self._forward(batch, model)
            losses += [self._loss(p, d.to(device), batch) for p, d in zip(pruned, dense)]
        return sum(losses) / len(losses)

    def _loss(self, pruned: torch.Tensor, dense: torch.Tensor, batch: Any) -> float:
        own = self.loss_name in LOSSES and self.loss is LOSSES[self.loss_name]
        with torch.inference_mode(), user_code(
                f"the loss {self.loss_name}",
                "pick another --loss" if own else
                "fix the model's loss function, called as loss(pruned_output, dense_output, "
                "batch) and returning a scalar, lower better"):
            return float(self.loss(pruned, dense, batch))

    def _forward(self, batch: Any, model: nn.Module | None = None) -> list[torch.Tensor]:
        """The outputs the loss compares (several for a multi-output model: output_tensors)."""
        with torch.inference_mode():
            outputs = output_tensors(call_model(model or self.model, batch))
            return [output.float() for output in outputs]
