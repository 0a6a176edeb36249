"""Latency backends behind one small protocol, looked up by name.

The search depends on this module only. A backend module is imported when its name is
first asked for, so `import spdy_gpu` loads neither DeepSparse nor Triton. Adding a backend
is one module with a class decorated by `@register_backend` and one line in `_MODULES`; the
class declares its command-line options (`cli_options`) and its natural option family
(`default_pattern`), so the command line names no backend itself.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import SpdyError
from ..layers import LayerInfo, example_shape  # noqa: F401  (part of this seam)
from ..options import SparsityOption, blocks_left_out
from ..timing import Fingerprint, TimingTable

log = logging.getLogger(__name__)

# name -> module that defines (and registers) the backend
_MODULES = {
    "deepsparse": "spdy_gpu.backends.deepsparse",
    "triton": "spdy_gpu.backends.triton",
}
_REGISTRY: dict[str, type] = {}


@dataclass(frozen=True)
class CliOption:
    """One command-line option of a backend: `flag` sets the constructor keyword `key` (the
    flag without dashes). Left off the command line, the backend's own default applies. A
    flag several backends declare (e.g. --repeats) must have the same type and choices.
    type None: a switch taking no value (given: True)."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class Latency:
    """Measured end-to-end latency of one model, in ms.

    median_ms: median of the timing rounds counted; spread_ms: their max - min;
    engine_ms: median per compiled engine or instance (DeepSparse: per engine; Triton: per
    execution mode, eager and CUDA graph); slow_engines: engines left out because they
    settled slower than the model's fastest engine by more than the backend's tolerance.
    """

    median_ms: float
    spread_ms: float
    engine_ms: tuple[float, ...] = ()
    slow_engines: int = 0


class NoDeviceError(SpdyError):
    """The backend's device is missing on this machine. The message says how to plan without
    it; `latency` is the message for a caller that wanted end-to-end latency instead, which
    cannot do without the device."""

    def __init__(self, message: str, latency: str):
        super().__init__(message)
        self.latency = latency


@runtime_checkable
class LatencyBackend(Protocol):
    """What the search needs from a place where models run."""

    name: str
    summary: str                          # one line for --help: where it runs, what it prunes
    default_pattern: str                  # option family of the default grid
    cli_options: tuple[CliOption, ...]    # the command-line options it takes
    estimated: bool                       # times modelled, not measured: no latency()

    def fingerprint(self, example: Any) -> Fingerprint:
        """Where this backend measures (device, versions, threads, dtype) and what: the batch
        and input shape of `example` (see example_shape)."""
        ...

    def supports(self, layer: LayerInfo, option: SparsityOption) -> bool:
        """Whether this backend can run `layer` pruned to `option` (dense: always)."""
        ...

    def measure_table(self, model: nn.Module, example: Any, layers: list[LayerInfo],
                      options: list[SparsityOption], *, model_name: str,
                      checkpoint: Path | None = None, progress: bool = True) -> TimingTable:
        """Per-layer times for every option, whole-model dense time and fixed time.
        With `checkpoint`, partial progress is saved there and an interrupted run resumes;
        `progress` shows a progress bar."""
        ...

    def latency(self, models: Mapping[str, nn.Module], example: Any) -> dict[str, Latency]:
        """End-to-end latency of each model as it is (dense or pruned), all timed in one
        interleaved run so that slow drift of the machine hits them alike."""
        ...

    def export(self, model: nn.Module, example: Any, profile: Any, out_dir: Path) -> Path:
        """Write the pruned `model` as this backend deploys it into `out_dir`; its path."""
        ...


def register_backend(name: str) -> Callable[[type], type]:
    """Class decorator: make a backend available under `name`."""
    def decorate(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls
    return decorate


def backend_names() -> list[str]:
    return sorted(_MODULES)


def backend_class(name: str) -> type:
    """The class registered as `name` (its module is imported on first use)."""
    if name not in _MODULES:
        raise SpdyError(f"unknown backend {name!r}; choose one of {backend_names()}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name]


def get_backend(name: str, **config: Any) -> LatencyBackend:
    """Instantiate the backend called `name` with its keyword configuration. A class with
    variants (triton: measured or estimated) picks one in its classmethod `create`."""
    cls = backend_class(name)
    factory = getattr(cls, "create", cls)
    takes = _settings_of(factory, cls)
    unknown = sorted(set(config) - set(takes))
    if unknown:
        raise SpdyError(f"backend {name!r} has no setting {', '.join(map(repr, unknown))}; "
                        f"its settings: {', '.join(takes)}")
    return factory(**config)


def _settings_of(factory: Callable[..., Any], cls: type) -> list[str]:
    """The keywords `factory` takes; a factory passing **kwargs on takes the class's too."""
    parameters = inspect.signature(factory).parameters
    named = [p.name for p in parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if factory is not cls and any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        named += [n for n in _settings_of(cls, cls) if n not in named]
    return named


def measuring_inputs(model: nn.Module, layers: Sequence[LayerInfo],
                     options: Sequence[SparsityOption | str]
                     ) -> tuple[list[LayerInfo], list[SparsityOption]]:
    """measure_table's layers and options, checked (every backend's rules): layers of this
    model (discover_layers(model, example)) with their weight shapes; options (or their
    names) starting with dense."""
    options = [SparsityOption.parse(o) if isinstance(o, str) else o for o in options]
    if not options or options[0] != SparsityOption.dense():
        raise SpdyError("the option list must start with dense; add 'dense' first")
    odd = next((o for o in options if not isinstance(o, SparsityOption)), None)
    if odd is not None:
        raise SpdyError(f"options must be SparsityOptions or their names, not "
                        f"{type(odd).__name__} {odd!r}")
    if not layers:
        raise SpdyError("no prunable layers to time; check the model and --exclude")
    modules = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, LayerInfo):
            raise SpdyError(f"layers must be LayerInfos (from discover_layers(model, example)),"
                            f" not {type(layer).__name__} {layer!r}")
        weight = getattr(modules.get(layer.name), "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != layer.weight_shape:
            raise SpdyError(f"layer {layer.name} of weight shape {list(layer.weight_shape)} is "
                            "not in this model; discover the layers on this model "
                            "(discover_layers(model, example))")
    return list(layers), options


def check_options_supported(backend: LatencyBackend, layers: Sequence[LayerInfo],
                            options: Sequence[SparsityOption],
                            grid: bool = False) -> list[SparsityOption]:
    """The options to measure. Sparse options `backend` runs on no layer of the model would
    make an all-null column, a measurement that silently measured nothing: a list the user
    gave is refused for them; a grid (grid=True, e.g. block+nm on a model without 2:4-sized
    layers) drops them, with a log line, unless nothing sparse would remain or a block shape
    of the grid would lose all its levels (then that shape is what the user must change)."""
    sparse = [o for o in options if o.pattern != "dense"]
    unsupported = [o.name for o in sparse if not any(backend.supports(x, o) for x in layers)]
    if not unsupported:
        return list(options)
    supported = [o.name for o in sparse if o.name not in unsupported]
    kinds = ", ".join(sorted({x.kind for x in layers}))
    shapes = blocks_left_out(sparse, [o for o in sparse if o.name in unsupported])
    if grid and supported and shapes:
        raise SpdyError(f"backend {backend.name} runs no block option of {shapes} on this "
                        f"model's layers ({kinds}; the backend: {backend.summary}); choose "
                        "another --block")
    if grid and supported:
        log.warning("%s runs %s on no layer of this model: left out of the grid",
                    backend.name, _listed(unsupported))
        return [o for o in options if o.name not in unsupported]
    if not supported:
        raise SpdyError(f"backend {backend.name} supports none of the options "
                        f"{_listed(unsupported)} on this model's layers ({kinds}; the backend: "
                        f"{backend.summary}); pick another --pattern, --block, --options or "
                        "backend")
    raise SpdyError(f"backend {backend.name} runs {_listed(unsupported)} on no layer of this "
                    f"model ({kinds}); it runs {_listed(supported)}: drop the others from "
                    "--options")


def _listed(names: Sequence[str], shown: int = 3) -> str:
    more = f"... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
