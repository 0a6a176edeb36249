"""Profiles: the option chosen for every layer, what was asked and what is predicted.
JSON form: 'spdy-gpu/profile', version 1 (documented in the README).

`check_for_model` is the one rule every command applies before it uses a profile or a
database on a model: both must belong to that model (see there)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import SpdyError
from .jsonio import load_json, located, require, save_json
from .options import SparsityOption
from .timing import Fingerprint

if TYPE_CHECKING:
    from torch import nn

    from .reconstruct import Database

PROFILE_FORMAT, PROFILE_VERSION = "spdy-gpu/profile", 1


@dataclass(frozen=True)
class Profile:
    model: str
    choices: dict[str, SparsityOption]    # every layer of the table, in table order
    target_speedup: float
    budget_ms: float                       # dense_total_ms / target_speedup
    predicted_ms: float                    # fixed_ms + sum of the chosen layer times
    dense_total_ms: float
    fixed_ms: float                        # unattributed time + dense time of excluded layers
    fingerprint: Fingerprint               # of the timing table the profile came from
    excluded: tuple[str, ...] = ()
    estimated: bool = False                # planned on estimated (not measured) times
    provenance: dict[str, Any] = field(default_factory=dict)
    # sha256 of the dense weights of the chosen layers (model_fingerprint over `choices`),
    # recorded when the profile was made with the model at hand (run); "" when not (solve).
    model_fingerprint: str = ""

    @property
    def predicted_speedup(self) -> float:
        return self.dense_total_ms / self.predicted_ms

    @property
    def pruned_layers(self) -> tuple[str, ...]:
        """The layers whose choice is not dense."""
        return tuple(name for name, o in self.choices.items() if o.pattern != "dense")

    @property
    def over_budget(self) -> bool:
        """Predicted slower than the target allows (choices made by hand, not by the DP)."""
        return self.predicted_ms > self.budget_ms

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, PROFILE_FORMAT, PROFILE_VERSION, {
            "model": self.model,
            "target_speedup": self.target_speedup,
            "budget_ms": self.budget_ms,
            "predicted_ms": self.predicted_ms,
            "predicted_speedup": self.predicted_speedup,
            "dense_total_ms": self.dense_total_ms,
            "fixed_ms": self.fixed_ms,
            "estimated": self.estimated,
            "excluded": list(self.excluded),
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "provenance": self.provenance,
            "choices": {name: option.name for name, option in self.choices.items()},
            # the prediction and what it was made for: an edit of either shows on load
            "prediction_sha256": self._prediction_digest(),
            **({"model_fingerprint": self.model_fingerprint} if self.model_fingerprint else {}),
        })

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        doc = load_json(path, PROFILE_FORMAT, PROFILE_VERSION)
        number = (int, float)
        try:
            named = require(doc, "choices", dict, path)
            odd = next((name for name, option in named.items()
                        if not isinstance(option, str)), None)
            if odd is not None:
                raise SpdyError(f"the choice of layer {odd} is {named[odd]!r}, not an option "
                                "name such as 'unstructured@0.5'; regenerate the profile")
            choices = {str(name): SparsityOption.parse(option) for name, option in named.items()}
            profile = cls(
                model=str(doc.get("model", "")),
                choices=choices,
                target_speedup=float(require(doc, "target_speedup", number, path)),
                budget_ms=float(require(doc, "budget_ms", number, path)),
                predicted_ms=float(require(doc, "predicted_ms", number, path)),
                dense_total_ms=float(require(doc, "dense_total_ms", number, path)),
                fixed_ms=float(require(doc, "fixed_ms", number, path)),
                fingerprint=Fingerprint.from_dict(require(doc, "fingerprint", dict, path), path),
                excluded=tuple(str(n) for n in require(doc, "excluded", list, path))
                if "excluded" in doc else (),
                estimated=require(doc, "estimated", bool, path) if "estimated" in doc
                else False,
                provenance=dict(doc.get("provenance", {})),
                model_fingerprint=str(doc.get("model_fingerprint", "")))
        except (SpdyError, AttributeError, TypeError) as e:
            raise located(path, e) from None
        if not profile.predicted_ms > 0 or not profile.dense_total_ms > 0:
            raise SpdyError(f"{path}: predicted and dense times must be > 0; "
                            "regenerate the profile")
        if not (math.isfinite(profile.target_speedup) and profile.target_speedup > 0):
            raise SpdyError(f"{path}: target_speedup {profile.target_speedup:g} must be a "
                            "finite number > 0; regenerate the profile")
        pruned_excluded = next((n for n in profile.excluded
                                if profile.choices.get(n, SparsityOption.dense()).pattern
                                != "dense"), None)
        if pruned_excluded is not None:
            raise SpdyError(f"{path}: layer {pruned_excluded} is excluded yet pruned; "
                            "regenerate the profile")
        recorded = doc.get("prediction_sha256")
        if recorded is not None and recorded != profile._prediction_digest():
            raise SpdyError(f"{path}: its choices or predicted times were edited after it "
                            "was solved, so its prediction no longer holds; solve again "
                            "(spdy-gpu solve) for a profile of these choices")
        return profile

    def _prediction_digest(self) -> str:
        """A digest of the choices and the times predicted for them."""
        times = [self.predicted_ms, self.dense_total_ms, self.fixed_ms, self.budget_ms,
                 self.target_speedup]
        return hashlib.sha256(f"{choices_digest(self.choices)} {times!r}".encode()).hexdigest()

    def check_model(self, model_name: str | None, model: nn.Module) -> None:
        """Refuse using this profile on another model: a chosen layer that is not a Linear
        or Conv2d of `model`, other dense weights (when recorded: then the name may differ,
        e.g. a notebook's prune(name=...) used with --model module:function), or else
        another model name."""
        from .layers import other_weights_hint, require_prunable
        from .reconstruct.database import model_fingerprint

        require_prunable(model, self.choices)
        if self.model_fingerprint:
            if model_fingerprint(model, list(self.choices)) != self.model_fingerprint:
                hint = other_weights_hint(model, self.choices)
                raise SpdyError(f"the profile was made for other dense weights of "
                                f"{self.model!r} (its model fingerprint differs){hint}; pass "
                                "the dense model it was made for")
        elif model_name and self.model and self.model != model_name:
            raise SpdyError(f"the profile is for model {self.model!r}, not {model_name!r}; "
                            f"pass --model {self.model}")


def check_for_model(model: nn.Module, model_name: str | None, profile: Profile | None = None,
                    database: Database | None = None) -> None:
    """The one rule before using a profile or database on `model` (dense, as built): the
    profile's model, layers and (when recorded) fingerprint are the model's, the database
    was built from the model's dense weights (fingerprint) and holds the profile's options."""
    if profile is not None:
        profile.check_model(model_name, model)
    if database is not None:
        database.check_model(model)
        if profile is not None:
            database.check_options(list(profile.choices.values()))


def choices_digest(choices: Mapping[str, SparsityOption]) -> str:
    """A digest of a profile's choices: what a prediction or a measurement was made for."""
    named = json.dumps({name: option.name for name, option in choices.items()}, sort_keys=True)
    return hashlib.sha256(named.encode()).hexdigest()
