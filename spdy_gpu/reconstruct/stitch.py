"""Stitching: put a profile's chosen weights into a model in place, and take them out again.

The search scores thousands of profiles, so stitching swaps the `.data` of each changed
weight (O(1) per layer, the Parameter objects stay the same) and keeps only the original
tensors of the layers it changed. Magnitude masks (no database) are cached per dense weight.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from ..errors import SpdyError
from ..layers import require_prunable, tied_weights
from ..masks import build_mask
from ..options import SparsityOption

Backup = dict[str, torch.Tensor]      # layer name -> its original weight tensor


class WeightSource(Protocol):
    """What stitch_ reads weights from (a Database, or anything with the same method)."""

    def weight(self, layer: str, option: SparsityOption) -> torch.Tensor: ...


# id(Parameter) -> ((data_ptr, version) of the weight the masks were built on, {option: mask}).
# Tensors cannot key a WeakKeyDictionary (== is elementwise), so entries die with a finalizer.
_MASKS: dict[int, tuple[tuple[int, int], dict[SparsityOption, torch.Tensor]]] = {}


def magnitude_weight(param: nn.Parameter, option: SparsityOption) -> torch.Tensor:
    """param's current weight times option's magnitude mask (masks cached while unchanged)."""
    data = param.data
    key = (data.data_ptr(), param._version)
    cached = _MASKS.get(id(param))
    if cached is None:
        weakref.finalize(param, _MASKS.pop, id(param), None)
    if cached is None or cached[0] != key:
        cached = (key, {})
        _MASKS[id(param)] = cached
    masks = cached[1]
    if option not in masks:
        masks[option] = build_mask(data, option)
    return data * masks[option]


def stitch_(model: nn.Module, choices: Mapping[str, SparsityOption],
            database: WeightSource | None = None) -> Backup:
    """Give every layer in `choices` its chosen option's weights, in place.

    With a database, the stored reconstructed weights; without, magnitude masks on the
    current dense weights. Dense choices leave the layer as it is (the model must be the
    dense one). Returns the backup that restore_ needs; on any error nothing is changed.
    """
    require_prunable(model, choices)
    modules = dict(model.named_modules())
    pruned = {name: modules[name] for name, option in choices.items() if option.pattern != "dense"}
    tied = tied_weights(model, pruned)
    if tied:
        name, other = next(iter(tied.items()))
        raise SpdyError(f"layer {name} shares its weight with {other} (tied): pruning it would "
                        "prune both; keep it dense")
    backup: Backup = {}
    try:
        with torch.no_grad():
            for name, option in choices.items():
                if option.pattern == "dense":
                    continue                  # the model's own weight is the dense one
                param = modules[name].weight
                if database is None:
                    try:
                        new = magnitude_weight(param, option)
                    except SpdyError as e:
                        raise SpdyError(f"layer {name}: {e}") from None
                else:
                    new = database.weight(name, option)
                if new.shape != param.shape:
                    raise SpdyError(f"layer {name}: stored weight has shape {tuple(new.shape)}, "
                                    f"the model's is {tuple(param.shape)}; use the database "
                                    "built for this model")
                backup[name] = param.data
                param.data = new.to(device=param.device, dtype=param.dtype)
    except BaseException:
        restore_(model, backup)
        raise
    return backup


def restore_(model: nn.Module, backup: Backup) -> None:
    """Put back the weights that stitch_ replaced."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, original in backup.items():
            modules[name].weight.data = original
