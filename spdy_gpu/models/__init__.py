"""Models by name: built-in entries and users' own `package.module:function`."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import SpdyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSetting:
    """Input geometry a model is built, measured and calibrated with."""

    batch_size: int = 1
    seq_len: int = 128          # transformers
    image_size: int = 224       # CNNs

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "image_size"):
            if getattr(self, name) < 1:
                raise SpdyError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass(frozen=True)
class ModelEntry:
    """How to build a model and feed it.

    build(setting) -> (model in eval mode, example input: tensor, tuple or dict).
    calibration(setting, samples) -> iterator of input batches (same form as the example);
    None means no real data ships with the model.
    loss: the search's model-level loss against the dense model, a name from
    spdy_gpu.losses ("nmse", "cosine", "kl") or a callable (pruned_out, dense_out, batch);
    None: nmse. quality(pruned, dense) -> {metric: value}: the model's own quality measures
    for reports (None: only the held-out loss is reported).
    """

    name: str
    description: str
    build: Callable[[ModelSetting], tuple[nn.Module, Any]]
    calibration: Callable[[ModelSetting, int], Iterator[Any]] | None = None
    exclude: tuple[str, ...] = ()
    loss: str | Callable[..., Any] | None = None
    quality: Callable[[nn.Module, nn.Module], dict[str, float]] | None = None


BUILTIN: dict[str, Callable[[], ModelEntry]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register a function returning the ModelEntry of a built-in model."""
    def decorate(factory: Callable[[], ModelEntry]) -> Callable[[], ModelEntry]:
        BUILTIN[name] = factory
        return factory
    return decorate


def load_model(spec: str) -> ModelEntry:
    """A built-in name (see BUILTIN) or 'package.module:function' returning (model, example)."""
    _import_builtins()
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        raise SpdyError(f"unknown model {spec!r}; use one of {sorted(BUILTIN)} "
                        "or 'package.module:function' returning (model, example_input)")
    return _user_entry(spec)


def _user_entry(spec: str) -> ModelEntry:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise SpdyError(f"cannot load model function {spec!r} ({e}); check that the module is "
                        "importable (on PYTHONPATH) and defines the function") from None
    accepted = set(inspect.signature(function).parameters)

    def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
        kwargs = _setting_kwargs(spec, setting, accepted)
        try:
            result = function(**kwargs)
        except SpdyError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code failed, not ours
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise SpdyError(f"model function {spec} raised {type(e).__name__}: {first}; fix "
                            "it so that it returns (model, example_input)") from None
        pair = isinstance(result, tuple) and len(result) == 2
        if not (pair and isinstance(result[0], nn.Module)):
            raise SpdyError(f"{spec} must return (torch.nn.Module, example_input), "
                            f"got {type(result).__name__}")
        return result[0].eval(), result[1]

    # A user function names its own search loss with an attribute: `fn.spdy_loss = "kl"`.
    return ModelEntry(name=spec, description=f"user model {spec}", build=build,
                      loss=getattr(function, "spdy_loss", None))


def _setting_kwargs(spec: str, setting: ModelSetting, accepted: set[str]) -> dict[str, int]:
    """The setting's fields the user's function takes as keywords; a field it does not take
    must keep its default, or the option would be silently ignored."""
    kwargs, default = {}, ModelSetting()
    for name in ("batch_size", "seq_len", "image_size"):
        if name in accepted:
            kwargs[name] = getattr(setting, name)
        elif getattr(setting, name) != getattr(default, name):
            raise SpdyError(f"{spec} takes no {name} keyword, so --{name.replace('_', '-')} "
                            f"cannot apply; add `{name}` to its parameters or drop the option")
    return kwargs


def _import_builtins() -> None:
    from . import minilm  # noqa: F401  (registers itself)
