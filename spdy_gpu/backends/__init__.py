"""Latency backends behind one small protocol, looked up by name.

The search depends on this module only. A backend module is imported when its name is
first asked for, so `import spdy_gpu` loads neither DeepSparse nor Triton. Adding a backend
is one module with a class decorated by `@register_backend` and one line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..errors import SpdyError
from ..layers import LayerInfo
from ..models import ModelSetting
from ..options import SparsityOption
from ..timing import Fingerprint, TimingTable

# name -> module that defines (and registers) the backend
_MODULES = {
    "deepsparse": "spdy_gpu.backends.deepsparse",
    "triton": "spdy_gpu.backends.triton",
}
_REGISTRY: dict[str, Callable[..., LatencyBackend]] = {}


@runtime_checkable
class LatencyBackend(Protocol):
    """What the search needs from a place where models run."""

    name: str

    def fingerprint(self, setting: ModelSetting) -> Fingerprint:
        """Where this backend measures (device, versions, threads, batch, shape, dtype)."""
        ...

    def supports(self, layer: LayerInfo, option: SparsityOption) -> bool:
        """Whether this backend can run `layer` pruned to `option` (dense: always)."""
        ...

    def measure_table(self, model: nn.Module, example: Any, layers: list[LayerInfo],
                      options: list[SparsityOption], *, model_name: str,
                      setting: ModelSetting, checkpoint: Path | None = None) -> TimingTable:
        """Per-layer times for every option, whole-model dense time and fixed time.
        With `checkpoint`, partial progress is saved there and an interrupted run resumes."""
        ...

    def latency_ms(self, model: nn.Module, example: Any,
                   setting: ModelSetting) -> tuple[float, float]:
        """End-to-end (median, spread) latency of `model` as it is (dense or pruned)."""
        ...


def register_backend(name: str) -> Callable:
    """Class decorator: make a backend available under `name`."""
    def decorate(cls: Callable[..., LatencyBackend]) -> Callable[..., LatencyBackend]:
        _REGISTRY[name] = cls
        return cls
    return decorate


def backend_names() -> list[str]:
    return sorted(_MODULES)


def get_backend(name: str, **config: Any) -> LatencyBackend:
    """Instantiate the backend called `name` with its keyword configuration."""
    if name not in _MODULES:
        raise SpdyError(f"unknown backend {name!r}; choose one of {backend_names()}")
    if name not in _REGISTRY:
        importlib.import_module(_MODULES[name])
    return _REGISTRY[name](**config)
