"""Global AdaPrune (gAP): fine-tune a stitched model against the dense model's layer outputs.

Loss: sum over the pruned layers of ||out_l - out_l^dense||^2 / ||out_l^dense||^2 (padding
tokens left out where batches carry an attention mask), Adam at lr 1e-5 by default over all
parameters or only the pruned weights, masks re-applied after every step, early stopping on
the calibration loss; the best parameters seen are kept. It changes the model in place, so
it is a final step on a chosen profile (restore_ does not undo it). With a checkpoint path
the state after every epoch is written there atomically, and a killed run of the same work
(starting weights, masks, data, settings) resumes after its last finished epoch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SpdyError, first_line
from ..jsonio import atomic_write_bytes
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
                     patience: int = 2, min_delta: float = 1e-4, progress: bool = False,
                     checkpoint: str | os.PathLike | None = None) -> GapReport:
    """Fine-tune `model` in place; `masks`: layer name -> bool mask (True = kept) of every
    pruned layer (the layers whose outputs enter the loss). Returns the losses. With
    `checkpoint`, a killed run resumes (module docstring); the file is removed at the end."""
    batches = list(batches)
    modules = dict(model.named_modules())
    absent = [n for n in masks if n not in modules]
    if absent:
        raise SpdyError(f"layer {absent[0]} is not in the model; pass masks of this model")
    if not batches:
        raise SpdyError("gAP needs calibration batches; pass some")
    if not masks:
        raise SpdyError("the profile prunes no layer: gAP has nothing to fine-tune (the "
                        "model is the dense one)")
    pruned = {n: modules[n] for n in masks}
    targets = _target_source(dense_model_or_targets, pruned)
    # What the caller froze (requires_grad=False) stays as it is.
    params = [p for p in ([m.weight for m in pruned.values()] if only_pruned
                          else model.parameters()) if p.is_floating_point() and p.requires_grad]
    if not params:
        raise SpdyError("gAP has no parameter to train: every one it would train is frozen "
                        "(requires_grad=False); unfreeze the pruned layers' weights")
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
        optimizer = torch.optim.Adam(params, lr=lr)
        saved = _Checkpoint(checkpoint, _work_key(params, masks, batches, dict(
            lr=lr, epochs=epochs, only_pruned=only_pruned, patience=patience,
            min_delta=min_delta)))
        state = saved.load()
        if state is None:
            before = evaluate()
            state = {"epoch": 0, "steps": 0, "bad": 0, "stopped": False, "before": before,
                     "best": before, "best_state": [p.detach().clone() for p in params]}
        else:
            with torch.no_grad():
                for p, value in zip(params, state["params"]):
                    p.copy_(value)
            optimizer.load_state_dict(state["optimizer"])
            log.info("gAP resumes after epoch %d of %d (%s)", state["epoch"], epochs,
                     saved.path)
        last = state["epoch"] if state["stopped"] else epochs
        for epoch in tqdm(range(state["epoch"] + 1, last + 1), desc="gAP", unit="epoch",
                          initial=state["epoch"], total=epochs, disable=not progress):
            for i, batch in enumerate(batches):
                loss = _loss(_outputs(model, pruned, batch, grad=True), targets(i, batch),
                             token_mask(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks()
                state["steps"] += 1
            current = evaluate()
            log.info("gAP epoch %d: loss %.6g (before %.6g)", epoch, current, state["before"])
            state["epoch"] = epoch
            if current < state["best"] * (1 - min_delta):
                state["best"], state["bad"] = current, 0
                state["best_state"] = [p.detach().clone() for p in params]
            else:
                state["bad"] += 1
                state["stopped"] = state["bad"] >= patience
            saved.save(state, params, optimizer)
            if state["stopped"]:
                break
        with torch.no_grad():
            for p, best in zip(params, state["best_state"]):
                p.copy_(best)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    saved.remove()
    return GapReport(state["before"], state["best"], state["epoch"], state["steps"],
                     stopped_early=state["stopped"])


def _work_key(params: Sequence[torch.Tensor], masks: Mapping[str, torch.Tensor],
              batches: Sequence[Any], settings: Mapping[str, Any]) -> str:
    """A digest of everything a gAP run's result depends on: the starting (masked)
    parameters, the masks, the calibration batches and the settings."""
    digest = hashlib.blake2b(repr(sorted(settings.items())).encode(), digest_size=16)

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, Mapping):
            for key in sorted(value):
                digest.update(str(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add(list(params))
    add(dict(masks))
    add(list(batches))
    return digest.hexdigest()


class _Checkpoint:
    """gAP's state after an epoch, in one file written atomically (None: no checkpoint)."""

    def __init__(self, path: str | os.PathLike | None, key: str):
        self.path = None if path is None else Path(path)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        """The saved state of this work, or None (no file, or one of other work: ignored)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is a fresh start
            log.warning("ignoring an unreadable gAP checkpoint %s (%s)", self.path,
                        first_line(e) or type(e).__name__)
            return None
        if not isinstance(state, dict) or state.get("key") != self.key:
            log.warning("ignoring the gAP checkpoint %s: it is of other work (another profile, "
                        "data or settings); starting afresh", self.path)
            return None
        return state

    def save(self, state: dict[str, Any], params: Sequence[torch.Tensor],
             optimizer: torch.optim.Optimizer) -> None:
        if self.path is None:
            return
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key, "params": [p.detach().cpu() for p in params],
                    "best_state": [p.cpu() for p in state["best_state"]],
                    "optimizer": optimizer.state_dict()}, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
