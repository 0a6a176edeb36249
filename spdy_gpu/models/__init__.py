"""Models by name: built-in entries and users' own `package.module:function`."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SpdyError, first_line, user_code
from ..layers import example_shape, named_inputs

log = logging.getLogger(__name__)


GENERIC_DEFAULTS = {"seq_len": 128, "image_size": 224}   # transformers' tokens, CNNs' side


@dataclass(frozen=True)
class ModelSetting:
    """Input geometry a model is built, measured and calibrated with.

    None means the model's own (ModelEntry.resolve fills it in): batch_size 1 for built-ins,
    the example's batch for a user function (which then need not take a batch_size keyword);
    seq_len and image_size the built-ins' GENERIC_DEFAULTS, a user function's own parameter
    defaults (or GENERIC_DEFAULTS where the parameter has none)."""

    batch_size: int | None = None
    seq_len: int | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
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
    defaults: dict[str, int] = dataclasses.field(default_factory=dict)   # seq_len, image_size

    def resolve(self, setting: ModelSetting) -> ModelSetting:
        """`setting` with the fields left None set to the model's own defaults."""
        return dataclasses.replace(setting, **{
            name: value for name, value in self.defaults.items()
            if getattr(setting, name) is None})

    def quality_of(self, pruned: nn.Module, dense: nn.Module) -> dict[str, float]:
        """The entry's quality measures of `pruned` against `dense` ({} when it has none)."""
        if self.quality is None:
            return {}
        with user_code(f"the quality function of model {self.name}",
                       "fix it so that it returns {measure: number}"):
            return {str(k): float(v) for k, v in self.quality(pruned, dense).items()}


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
        return _batch_checked(_resolved(_builtin_defaults(BUILTIN[spec]())))
    module_name, colon, function_name = spec.partition(":")
    if not (colon and module_name and function_name):
        raise SpdyError(f"unknown model {spec!r}; use one of {sorted(BUILTIN)} "
                        "or 'package.module:function' returning (model, example_input)")
    return _batch_checked(_resolved(_user_entry(spec)))


def _builtin_defaults(entry: ModelEntry) -> ModelEntry:
    """Built-ins build batch 1 unless asked otherwise, at the generic sequence length and
    image size: their functions always get numbers."""
    def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
        if setting.batch_size is None:
            setting = dataclasses.replace(setting, batch_size=1)
        return entry.build(setting)
    return dataclasses.replace(entry, build=build, defaults=dict(GENERIC_DEFAULTS))


def _resolved(entry: ModelEntry) -> ModelEntry:
    """The entry's functions see the setting with its defaults filled in, however called."""
    build, calibration = entry.build, entry.calibration
    return dataclasses.replace(
        entry, build=lambda setting: build(entry.resolve(setting)),
        calibration=None if calibration is None else (
            lambda setting, samples: calibration(entry.resolve(setting), samples)))


def _batch_checked(entry: ModelEntry) -> ModelEntry:
    """The example must have the batch asked for: tables and calibration record it."""
    def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
        model, example = entry.build(setting)
        batch, _ = example_shape(example)
        if setting.batch_size is not None and batch != setting.batch_size:
            raise SpdyError(f"{entry.name} built an example input of batch {batch}, not "
                            f"--batch-size {setting.batch_size}; drop --batch-size to use "
                            f"batch {batch}, or make the function honour batch_size")
        return model, example
    return dataclasses.replace(entry, build=build)


def _user_entry(spec: str) -> ModelEntry:
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(_import_user_module(spec, module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise SpdyError(f"cannot load model function {spec!r} ({e}); check that the module is "
                        "importable (on PYTHONPATH) and defines the function") from None
    except SpdyError:
        raise
    except Exception as e:  # noqa: BLE001 - the module's own code failed while importing
        raise SpdyError(f"importing {module_name} for --model {spec} raised "
                        f"{type(e).__name__}: {first_line(e)}; fix the module") from e
    if not callable(function):
        raise SpdyError(f"{spec} is a {type(function).__name__}, not a function; name a "
                        "function returning (model, example_input)")
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise SpdyError(f"{spec} has no Python signature to read (a builtin?); wrap it in a "
                        "Python function returning (model, example_input)") from None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = {"batch_size", *GENERIC_DEFAULTS}                 # **kwargs takes them all
    else:
        accepted = set(parameters)

    def build(setting: ModelSetting) -> tuple[nn.Module, Any]:
        kwargs = _setting_kwargs(spec, setting, accepted)
        with user_code(f"model function {spec}", "fix it so that it returns "
                                                  "(model, example_input)"), \
                _exit_refused(spec, f"model function {function_name}"):
            result = function(**kwargs)
        pair = isinstance(result, tuple) and len(result) == 2
        if not (pair and isinstance(result[0], nn.Module)):
            got = type(result).__name__
            if isinstance(result, tuple):
                got += f" ({', '.join(type(item).__name__ for item in result)})"
            raise SpdyError(f"{spec} must return (torch.nn.Module, example_input), got {got}")
        _refuse_unbatched(spec, result[1])
        return result[0].eval(), result[1]

    # A user function names its own search loss with an attribute: `fn.spdy_loss = "kl"`.
    return ModelEntry(name=spec, description=f"user model {spec}", build=build,
                      loss=getattr(function, "spdy_loss", None),
                      defaults=_own_defaults(parameters, accepted))


def _refuse_unbatched(spec: str, example: Any) -> None:
    """An example of float tensors with fewer than 2 dimensions has no batch dimension (a
    [64] vector would pass as 64 samples of a scalar); integer ones may be a batch of ids."""
    tensors = [t for _, t in named_inputs(example) if isinstance(t, torch.Tensor)]
    if tensors and all(t.is_floating_point() and t.dim() < 2 for t in tensors):
        shape = list(tensors[0].shape)
        raise SpdyError(f"{spec} returned an example input of shape {shape}, with no batch "
                        f"dimension; return it batched, e.g. x.unsqueeze(0) ({[1, *shape]})")


def _own_defaults(parameters: Mapping[str, inspect.Parameter],
                  accepted: set[str]) -> dict[str, int]:
    """The user function's own seq_len / image_size defaults; a parameter without a default
    gets the generic one, one defaulting to None (its own choice) or only taken through
    **kwargs stays unset."""
    defaults = {}
    for name, generic in GENERIC_DEFAULTS.items():
        if name not in accepted or name not in parameters:
            continue
        own = parameters[name].default
        if own is inspect.Parameter.empty:
            defaults[name] = generic
        elif isinstance(own, int) and not isinstance(own, bool):
            defaults[name] = own
    return defaults


@contextlib.contextmanager
def _exit_refused(spec: str, where: str) -> Iterator[None]:
    """Run the user's code with what it prints to stderr held back and passed on, unless it
    exits (sys.exit, or argparse on spdy-gpu's own arguments), which would end spdy-gpu:
    then one line naming `where` with the last line it printed instead of a usage block."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except SystemExit as e:
        lines = printed.getvalue().strip().splitlines()
        printed = io.StringIO()
        said = f", after printing {lines[-1].strip()!r}" if lines else ""
        raise SpdyError(f"{where} for --model {spec} exited (status {e.code!r}{said}); move "
                        "its script code (sys.exit, argument parsing) under "
                        "`if __name__ == '__main__':`") from None
    finally:
        sys.stderr.write(printed.getvalue())


def _import_user_module(spec: str, name: str) -> Any:
    """Import the user's module as `python -m` would: the working directory is searched
    too (a console script's sys.path does not hold it)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    with _exit_refused(spec, f"importing {name}"):
        return importlib.import_module(name)


def _setting_kwargs(spec: str, setting: ModelSetting, accepted: set[str]) -> dict[str, int]:
    """The setting's fields the user's function takes as keywords; a field it does not take
    must be left unset, or the option would be silently ignored. A batch size the function
    cannot take is checked against its example's batch instead (_batch_checked)."""
    kwargs = {}
    for name in ("batch_size", "seq_len", "image_size"):
        value = getattr(setting, name)
        if name in accepted:
            if value is not None:
                kwargs[name] = value
        elif name != "batch_size" and value is not None:
            raise SpdyError(f"{spec} takes no {name} keyword, so --{name.replace('_', '-')} "
                            f"cannot apply; add `{name}` to its parameters or drop the option")
    return kwargs


def _import_builtins() -> None:
    from . import llama_decode, minilm, resnet_fmnist  # noqa: F401  (they register themselves)
