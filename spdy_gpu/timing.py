"""Timing tables: measured time of every prunable layer under every option, and where it
was measured. The JSON form ('spdy-gpu/timing-table', version 1) is documented in the README."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SpdyError
from .jsonio import is_number, load_json, located, require, save_json, side_file
from .options import SparsityOption, parse_options

TABLE_FORMAT, TABLE_VERSION = "spdy-gpu/timing-table", 1


CHECKPOINT_SUFFIX = ".partial"


def checkpoint_path(table_path: str | os.PathLike) -> Path | None:
    """Where the measurement of the table `table_path` keeps its progress until the table is
    saved: TABLE.partial, next to it (None for a device such as /dev/null: no progress kept,
    as there is no file to lock it by)."""
    return side_file(table_path, CHECKPOINT_SUFFIX)


@dataclass(frozen=True)
class Fingerprint:
    """Where and how a table was measured. Tables only combine with matching fingerprints."""

    backend: str                  # "deepsparse", "triton", ...
    backend_version: str
    device: str                   # CPU model or GPU name
    isa: str                      # e.g. "avx512_vnni", "sm_90"
    threads: int
    batch_size: int
    input_shape: str              # e.g. "seq=128" or "3x224x224"
    dtype: str
    software: dict[str, str] = field(default_factory=dict)   # torch, triton, ... versions

    def mismatches(self, other: Fingerprint) -> list[str]:
        """Human-readable differences, empty when the two describe the same setting."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine
                if mine[key] != theirs[key]]

    @classmethod
    def from_dict(cls, data: dict[str, Any],
                  path: str | os.PathLike = "<fingerprint>") -> Fingerprint:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(names)
        if unknown:
            raise SpdyError(f"{path}: unknown fingerprint fields {sorted(unknown)}; "
                            "the file is malformed, regenerate it")
        try:
            return cls(**data)
        except TypeError as e:
            raise SpdyError(f"{path}: incomplete fingerprint ({e}); regenerate the file") from None


@dataclass(frozen=True)
class LayerTiming:
    """One layer's row: per option, the median time in ms and its spread (max - min over
    repeats); None marks an option the backend cannot run for this layer."""

    name: str
    kind: str
    gemm: tuple[int, int, int]            # N, K, M
    median_ms: tuple[float | None, ...]
    spread_ms: tuple[float | None, ...]
    note: str = ""


@dataclass(frozen=True)
class TimingTable:
    fingerprint: Fingerprint
    options: tuple[SparsityOption, ...]
    layers: tuple[LayerTiming, ...]
    dense_total_ms: float          # whole model, dense, end to end
    fixed_ms: float                # time not attributed to any prunable layer
    model: str = ""
    estimated: bool = False        # True when times come from a model, not a measurement
    provenance: dict[str, Any] = field(default_factory=dict)   # command, date, duration

    def __post_init__(self) -> None:
        self.validate()

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def times(self) -> np.ndarray:
        """[layers, options] median times in ms, inf where unsupported."""
        return np.array([[math.inf if t is None else t for t in layer.median_ms]
                         for layer in self.layers], dtype=np.float64).reshape(
                             len(self.layers), len(self.options))

    def dense_times(self) -> np.ndarray:
        return self.times()[:, 0]

    def restricted_to(self, names: set[str]) -> TimingTable:
        """The table of the named layers only: the others' dense time moves into the fixed
        time, as a layer kept dense counts."""
        dropped = [layer for layer in self.layers if layer.name not in names]
        if not dropped:
            return self
        return dataclasses.replace(
            self, layers=tuple(layer for layer in self.layers if layer.name in names),
            fixed_ms=self.fixed_ms + math.fsum(layer.median_ms[0] for layer in dropped))

    def validate(self) -> None:
        if not self.options or self.options[0].pattern != "dense":
            raise SpdyError("the first option must be dense; regenerate the table")
        names = self.layer_names
        if len(set(names)) != len(names):
            raise SpdyError("duplicate layer names; regenerate the table")
        if not self.layers:
            raise SpdyError("the timing table has no layers; re-measure it on a model with "
                            "prunable layers")
        # Every speedup divides by the dense total: it must be a real, positive time.
        if not (math.isfinite(self.dense_total_ms) and self.dense_total_ms > 0):
            raise SpdyError(f"dense_total_ms = {self.dense_total_ms} must be finite and > 0; "
                            "re-measure the table")
        if not (math.isfinite(self.fixed_ms) and self.fixed_ms >= 0):
            raise SpdyError(f"fixed_ms = {self.fixed_ms} must be finite and >= 0; "
                            "re-measure the table")
        for layer in self.layers:
            if {len(layer.median_ms), len(layer.spread_ms)} != {len(self.options)}:
                raise SpdyError(f"layer {layer.name!r} has {len(layer.median_ms)} times and "
                                f"{len(layer.spread_ms)} spreads for {len(self.options)} "
                                "options; the file is malformed")
            if layer.median_ms[0] is None:
                raise SpdyError(f"layer {layer.name!r} has no dense time; "
                                "every layer must run dense")
            if layer.kind not in ("linear", "conv2d"):
                raise SpdyError(f"layer {layer.name!r} is of kind {layer.kind!r}; a table "
                                "times linear and conv2d layers; the file is malformed")
            if len(layer.gemm) != 3 or min(layer.gemm[:2]) < 1 or layer.gemm[2] < 0:
                raise SpdyError(f"layer {layer.name!r} has GEMM {list(layer.gemm)}; it must be "
                                "[N >= 1, K >= 1, M >= 0]; the file is malformed")
            for kind, values in (("time", layer.median_ms), ("spread", layer.spread_ms)):
                for t in values:
                    if t is not None and not (is_number(t) and math.isfinite(t) and t >= 0):
                        raise SpdyError(f"layer {layer.name!r} has {kind} {t!r}; times and "
                                        "spreads must be finite and >= 0 (null marks an "
                                        "unsupported option)")
        try:        # every budget adds layer times up: they must add up to a number
            slowest = math.fsum([self.fixed_ms, *(max(t for t in layer.median_ms if t is not None)
                                                  for layer in self.layers)])
        except OverflowError:
            slowest = math.inf
        if not math.isfinite(slowest):
            raise SpdyError("the table's times are too large to add up (a sum overflows); "
                            "re-measure the table")
        # The dense model's parts add up to about its whole (measured tables: 0.88-1.07);
        # three orders of magnitude off is a damaged table whose speedups mean nothing.
        parts = math.fsum([self.fixed_ms, *(layer.median_ms[0] for layer in self.layers)])
        if not parts / 1000 <= self.dense_total_ms <= parts * 1000:
            raise SpdyError(f"dense_total_ms {self.dense_total_ms:g} is not within 1000x of "
                            f"fixed_ms plus the layers' dense times ({parts:g} ms); the table "
                            "is inconsistent, re-measure it")

    def check_compatible(self, fingerprint: Fingerprint, force: bool = False) -> None:
        """Refuse to combine this table with a different setting unless forced."""
        differences = self.fingerprint.mismatches(fingerprint)
        if differences and not force:
            raise SpdyError("timing table was measured elsewhere (" + "; ".join(differences)
                            + "); re-measure here or pass --force")

    def save(self, path: str | os.PathLike) -> None:
        """Write the table; its measurement checkpoint (`checkpoint_path`) is removed only
        then, so no measurement is lost when the write fails."""
        save_json(path, TABLE_FORMAT, TABLE_VERSION, {
            "model": self.model,
            "estimated": self.estimated,
            "fingerprint": dataclasses.asdict(self.fingerprint),
            "provenance": self.provenance,
            "options": [o.name for o in self.options],
            "dense_total_ms": self.dense_total_ms,
            "fixed_ms": self.fixed_ms,
            "layers": [{"name": l.name, "kind": l.kind, "gemm": list(l.gemm),
                        "median_ms": list(l.median_ms), "spread_ms": list(l.spread_ms),
                        "note": l.note} for l in self.layers],
        })
        partial = checkpoint_path(path)
        if partial is not None:
            partial.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TimingTable:
        doc = load_json(path, TABLE_FORMAT, TABLE_VERSION)
        entries = require(doc, "layers", list, path)
        odd = next((i for i, entry in enumerate(entries) if not isinstance(entry, dict)), None)
        if odd is not None:
            raise SpdyError(f"{path}: layer entry {odd} is a {type(entries[odd]).__name__}, "
                            "not an object; the file is malformed, regenerate it")
        try:
            layers = tuple(
                LayerTiming(name=require(l, "name", str, path),
                            kind=str(l.get("kind", "linear")),
                            gemm=tuple(_whole(x) for x in l["gemm"]),
                            median_ms=tuple(l["median_ms"]), spread_ms=tuple(l["spread_ms"]),
                            note=str(l.get("note", "")))
                for l in entries)
        except SpdyError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SpdyError(f"{path}: malformed layer entry ({type(e).__name__}: {e}); "
                            "regenerate the table") from None
        try:
            return cls(
                fingerprint=Fingerprint.from_dict(require(doc, "fingerprint", dict, path), path),
                options=tuple(parse_options(require(doc, "options", list, path))),
                layers=layers,
                dense_total_ms=float(require(doc, "dense_total_ms", (int, float), path)),
                fixed_ms=float(require(doc, "fixed_ms", (int, float), path)),
                model=require(doc, "model", str, path) if "model" in doc else "",
                estimated=require(doc, "estimated", bool, path) if "estimated" in doc
                else False,
                provenance=require(doc, "provenance", dict, path) if "provenance" in doc
                else {})
        except SpdyError as e:
            raise located(path, e) from None


def _whole(value: Any) -> int:
    """A GEMM size read from a file: an integer (32.5 is refused, not truncated)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"GEMM size {value!r} is not a whole number")
    return value
