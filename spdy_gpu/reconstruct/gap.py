"""Global AdaPrune (gAP): fine-tune a stitched model against the dense model's layer outputs.

Loss: sum over the pruned layers of ||out_l - out_l^dense||^2 / ||out_l^dense||^2 (padding
tokens left out where batches carry an attention mask), Adam at lr 1e-5 by default over all
parameters or only the pruned weights, masks re-applied after every step, early stopping on
the calibration loss; the best parameters seen are kept. It changes the model in place, so
it is a final step on a chosen profile (restore_ does not undo it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SpdyError
from ..layers import call_model, hooks_attached
from .capture import token_mask

log = logging.getLogger(__name__)

Targets = Sequence[Mapping[str, torch.Tensor]]     # per batch: layer name -> dense output


@dataclass(frozen=True)
class GapReport:
    loss_before: float      # mean calibration loss before gAP
    loss_after: float       # ... after (best epoch)
    epochs: int
    steps: int
    stopped_early: bool


def _outputs(model: nn.Module, modules: Mapping[str, nn.Module], batch: Any,
             grad: bool) -> dict[str, torch.Tensor]:
    """Outputs of `modules` for one forward of `model` on `batch`."""
    found: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(
        lambda mod, args, out, name=name: found.__setitem__(name, out))
        for name, m in modules.items()]
    with hooks_attached(handles), torch.set_grad_enabled(grad):
        call_model(model, batch)
    return found


def _loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
          mask: torch.Tensor | None) -> torch.Tensor:
    total = torch.zeros(())
    for name, target in targets.items():
        out = outputs[name]
        if mask is not None and out.dim() >= 3 and tuple(out.shape[:2]) == tuple(mask.shape):
            out, target = out[mask], target[mask]
        total = total + (out - target).square().sum() / target.square().sum().clamp_min(1e-30)
    return total


def _target_source(dense: nn.Module | Targets, modules: Mapping[str, nn.Module]
                   ) -> Callable[[int, Any], Mapping[str, torch.Tensor]]:
    if isinstance(dense, nn.Module):
        dense_modules = dict(dense.named_modules())
        absent = [n for n in modules if n not in dense_modules]
        if absent:
            raise SpdyError(f"layer {absent[0]} is not in the dense model; pass the dense "
                            "version of the same model")
        chosen = {n: dense_modules[n] for n in modules}
        return lambda i, batch: {n: t.detach() for n, t in
                                 _outputs(dense, chosen, batch, grad=False).items()}
    return lambda i, batch: {n: dense[i][n] for n in modules}


def global_adaprune_(model: nn.Module, dense_model_or_targets: nn.Module | Targets,
                     masks: Mapping[str, torch.Tensor], batches: Iterable[Any], *,
                     lr: float = 1e-5, epochs: int = 10, only_pruned: bool = False,
                     patience: int = 2, min_delta: float = 1e-4,
                     progress: bool = False) -> GapReport:
    """Fine-tune `model` in place; `masks`: layer name -> bool mask (True = kept) of every
    pruned layer (the layers whose outputs enter the loss). Returns the losses."""
    batches = list(batches)
    modules = dict(model.named_modules())
    absent = [n for n in masks if n not in modules]
    if absent:
        raise SpdyError(f"layer {absent[0]} is not in the model; pass masks of this model")
    if not batches or not masks:
        raise SpdyError("gAP needs calibration batches and at least one pruned layer")
    pruned = {n: modules[n] for n in masks}
    targets = _target_source(dense_model_or_targets, pruned)
    params = ([m.weight for m in pruned.values()] if only_pruned
              else [p for p in model.parameters() if p.is_floating_point()])
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def apply_masks() -> None:
        with torch.no_grad():
            for name, mask in masks.items():
                modules[name].weight.mul_(mask)

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(_loss(_outputs(model, pruned, b, grad=False), targets(i, b),
                                   token_mask(b))) for i, b in enumerate(batches)) / len(batches)

    try:
        apply_masks()
        before = best = evaluate()
        best_state = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=lr)
        steps, bad, epoch, stopped = 0, 0, 0, False
        for epoch in tqdm(range(1, epochs + 1), desc="gAP", unit="epoch", disable=not progress):
            for i, batch in enumerate(batches):
                loss = _loss(_outputs(model, pruned, batch, grad=True), targets(i, batch),
                             token_mask(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks()
                steps += 1
            current = evaluate()
            log.info("gAP epoch %d: loss %.6g (before %.6g)", epoch, current, before)
            if current < best * (1 - min_delta):
                best, bad = current, 0
                best_state = [p.detach().clone() for p in params]
            else:
                bad += 1
                if bad >= patience:
                    stopped = True
                    break
        with torch.no_grad():
            for p, saved in zip(params, best_state):
                p.copy_(saved)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return GapReport(before, best, epoch, steps, stopped_early=stopped)
