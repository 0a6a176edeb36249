"""Scoring a profile on held-out data: stitch its weights from the database into the model,
run the held-out batches, compare with the dense model's outputs by a model-level loss,
and put the dense weights back. The search calls this for every distinct candidate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import user_code
from .layers import call_model
from .losses import LOSSES, Loss, get_loss, output_tensor
from .options import SparsityOption
from .reconstruct.stitch import WeightSource, restore_, stitch_


class HeldOutScorer:
    """score(choices) -> mean loss of the stitched model against the dense outputs.

    model: the dense model (changed only while a score is computed); database: where the
    chosen weights come from (None: magnitude masks on the dense weights)."""

    def __init__(self, model: nn.Module, batches: Sequence[Any],
                 database: WeightSource | None = None, loss: str | Loss | None = None):
        self.model = model
        self.batches = list(batches)
        self.database = database
        self.loss_name, self.loss = get_loss(loss)
        self.dense_outputs = [self._forward(batch) for batch in self.batches]
        self._loss(self.dense_outputs[0], self.dense_outputs[0], self.batches[0])  # usable?

    def __call__(self, choices: Mapping[str, SparsityOption]) -> float:
        backup = stitch_(self.model, choices, self.database)
        try:
            return self.loss_of(self.model)
        finally:
            restore_(self.model, backup)

    def loss_of(self, model: nn.Module) -> float:
        """Mean loss of `model` (e.g. a pruned copy after gAP) against the dense outputs."""
        losses = [self._loss(self._forward(batch, model), dense, batch)
                  for batch, dense in zip(self.batches, self.dense_outputs)]
        return sum(losses) / len(losses)

    def _loss(self, pruned: torch.Tensor, dense: torch.Tensor, batch: Any) -> float:
        own = self.loss_name in LOSSES and self.loss is LOSSES[self.loss_name]
        with torch.inference_mode(), user_code(
                f"the loss {self.loss_name}",
                "pick another --loss" if own else "fix the model's loss function"):
            return float(self.loss(pruned, dense, batch))

    def _forward(self, batch: Any, model: nn.Module | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return output_tensor(call_model(model or self.model, batch)).float()
