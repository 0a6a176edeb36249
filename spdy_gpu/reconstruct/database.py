"""The reconstruction database: every layer's reconstructed weights at every option it can
take (masks.unfit_reason: not a block larger than the layer, an N:M group dividing it), on disk.

Layout of a database directory:

    manifest.json                       'spdy-gpu/reconstruction-db', version 2
    entries/<layer>/<option>.safetensors  one tensor "weight" in the model's dtype, metadata
                                          {"layer": <layer>, "option": <option name>}

Masks are stored implicitly: pruned weights are exact zeros (block and N:M structure
survive). The manifest records the model fingerprint, the option grid, the calibration, the
method and its settings, and per entry its file, byte size, blake2b content hash and
relative layer error ||X (W - W_dense)^T||^2 / ||Y_dense||^2. An entry is used only when its
bytes hash as recorded, its metadata names its layer and option and its values are finite.
Entries are written atomically and the manifest after each of them, under an exclusive lock
on the directory, so a killed build loses at most the entry in flight and resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import batches_digest
from ..errors import SpdyError, as_path, problem_of
from ..jsonio import TEMPORARY, atomic_write_bytes, load_json, require, save_json
from ..layers import on_gpu_else_cpu, other_weights_hint, require_real
from ..locks import LOCK_NAME, exclusive_directory, holder
from ..masks import build_mask, unfit_reason
from ..options import SparsityOption
from .adaprune import AdaPruneConfig, adaprune
from .capture import LayerStats, capture_inputs, capture_statistics
from .fast import FastConfig, damped_gram, reconstruct_fast, solver_device

log = logging.getLogger(__name__)

DB_FORMAT, DB_VERSION = "spdy-gpu/reconstruction-db", 2    # 2: entries carry a content hash
MANIFEST = "manifest.json"
METHODS = ("fast", "adaprune")


def layer_hashes(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """sha256 of each layer's name, shape, dtype and dense values."""
    modules = dict(model.named_modules())
    hashes = {}
    for name in layers:
        weight = modules[name].weight.detach().cpu().contiguous()
        digest = hashlib.sha256(f"{name}:{tuple(weight.shape)}:{weight.dtype};".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
        hashes[name] = digest.hexdigest()
    return hashes


def model_fingerprint(model: nn.Module, layers: Sequence[str]) -> str:
    """One sha256 over the layer hashes: equal iff the same layers with the same weights."""
    return _combine(layer_hashes(model, layers))


def _combine(hashes: Mapping[str, str]) -> str:
    """One sha256 of layer hashes, in name order: the layers' order does not count."""
    return hashlib.sha256("".join(hashes[name] for name in sorted(hashes)).encode()).hexdigest()


def _size_mismatch(size: int, recorded: Any) -> str:
    """What an entry file of `size` bytes (-1: none) is, where the manifest records another."""
    if size < 0:
        return "missing"
    if isinstance(recorded, int) and size < recorded:
        return f"truncated ({size} of {recorded} bytes)"
    return f"not the file recorded ({size} bytes, {recorded} recorded)"


def option_chains(options: Sequence[SparsityOption]) -> list[list[SparsityOption]]:
    """Options grouped into families whose masks nest (same pattern and block or M), each
    in increasing sparsity. Dense is in no chain: it is the start of every chain."""
    chains: dict[tuple, list[SparsityOption]] = {}
    for option in options:
        if option.pattern != "dense":
            key = (option.pattern, option.block, option.m)
            chains.setdefault(key, []).append(option)
    return [sorted(chain, key=lambda o: o.sparsity) for chain in chains.values()]


def _entry_file(layer: str, option: SparsityOption) -> str:
    return f"entries/{layer}/{option.name.replace(':', '-')}.safetensors"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _load_manifest(directory: Path) -> dict[str, Any]:
    """The manifest document; a database of an older format is refused with the fix."""
    manifest = directory / MANIFEST
    try:
        return load_json(manifest, DB_FORMAT, DB_VERSION)
    except SpdyError:
        old = _older_version(manifest)
        if old is not None:
            raise SpdyError(f"{directory}: a database of format version {old}, whose entries "
                            "carry no content hash; delete it and rerun spdy-gpu database to "
                            "rebuild it") from None
        raise


def _older_version(manifest: Path) -> int | None:
    """The format version of a database manifest older than this one reads, else None."""
    try:
        document = json.loads(manifest.read_text())
        kind, version = document.get("format"), document.get("version")
    except (OSError, ValueError, AttributeError):
        return None
    old = kind == DB_FORMAT and isinstance(version, int) and version < DB_VERSION
    return version if old else None


def _read_entry(directory: Path, layer: str, option: SparsityOption,
                entry: Mapping[str, Any]) -> torch.Tensor:
    """The weight stored for `layer` at `option`, read once and checked: the very bytes the
    manifest hashed, a file written for this layer and option, every value finite."""
    from safetensors.torch import load

    file = directory / str(entry.get("file", ""))
    where = f"{directory}: layer {layer}, option {option.name}: entry {file}"
    fix = (f"rerun spdy-gpu database --out {directory} with the arguments it was built with: "
           "it rebuilds the entry")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise SpdyError(f"{where} cannot be read ({e.strerror or e}); {fix}") from None
    if len(data) != entry.get("bytes"):
        raise SpdyError(f"{where} is {_size_mismatch(len(data), entry.get('bytes'))}; {fix}")
    if _digest(data) != entry.get("blake2b"):
        raise SpdyError(f"{where} is corrupted (its content hash differs from the manifest's); "
                        f"{fix}")
    try:
        meta, weight = _metadata(data), load(data)["weight"]
    except Exception as e:  # safetensors raises its own error types for bad files
        raise SpdyError(f"{where} cannot be read ({e}); {fix}") from None
    if meta != {"layer": layer, "option": option.name}:
        raise SpdyError(f"{where} holds layer {meta.get('layer')!r} at option "
                        f"{meta.get('option')!r} (the manifest points at another entry's "
                        f"file); {fix}")
    if not weight.isfinite().all():
        raise SpdyError(f"{where} holds non-finite weights; {fix}")
    return weight


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's metadata: an 8-byte header length, then a JSON header."""
    length = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + length]).get("__metadata__") or {})


class Database:
    """A reconstruction database opened lazily: weights are read (memory-mapped) on demand."""

    def __init__(self, path: Path, document: dict[str, Any]):
        self.path = path
        self.model: str = require(document, "model", str, path)
        self.fingerprint: str = require(document, "fingerprint", str, path)
        self.method: str = require(document, "method", str, path)
        self.config: dict[str, Any] = require(document, "config", dict, path)
        self.calibration: dict[str, Any] = require(document, "calibration", dict, path)
        self.options: tuple[SparsityOption, ...] = tuple(
            SparsityOption.parse(n) for n in require(document, "options", list, path))
        self.layer_shapes: dict[str, list[int]] = require(document, "layers", dict, path)
        self.layers: tuple[str, ...] = tuple(self.layer_shapes)
        self.layer_hashes: dict[str, str] = require(document, "layer_sha256", dict, path)
        self._entries: dict[str, dict[str, Any]] = require(document, "entries", dict, path)
        self.timing_s: dict[str, float] = document.get("timing_s", {})   # capture, reconstruct
        # (layer, option) -> (inode, mtime_ns, size) of the entry file when it was last checked:
        # the search reads each entry many times, its bytes are hashed once while unchanged.
        self._checked: dict[tuple[str, str], tuple[int, int, int]] = {}

    @classmethod
    def of(cls, database: Database | str | os.PathLike | None) -> Database | None:
        """A Database as given, or opened from its directory (None stays None)."""
        if database is None or isinstance(database, Database):
            return database
        return cls.open(database)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Database:
        """Open and validate a complete database (every layer at every option it can take
        on disk)."""
        path = as_path(path, "the database directory")
        if not (path / MANIFEST).is_file():
            raise SpdyError(f"{path}: not a reconstruction database (no {MANIFEST}); build one "
                            "with: spdy-gpu database --out DIR")
        db = cls(path, _load_manifest(path))
        for layer in db.layers:
            for option in db.options_of(layer):
                db._entry(layer, option)
        return db

    def options_of(self, layer: str) -> list[SparsityOption]:
        """The grid's options `layer` can take (see masks.unfit_reason); it has entries for
        these only."""
        return fitting_options(self.layer_shapes[layer], self.options)

    def _entry(self, layer: str, option: SparsityOption) -> dict[str, Any]:
        if layer not in self.layer_shapes:
            raise SpdyError(f"layer {layer} is not in the database {self.path}; it was built "
                            "for other layers, rebuild it for this model")
        self.check_options([option])
        unfit = unfit_reason(self.layer_shapes[layer], option)
        if unfit is not None:
            raise SpdyError(f"layer {layer} cannot take option {option.name} ({unfit}), so "
                            f"{self.path} has no entry for it; choose another option")
        entry = self._entries.get(layer, {}).get(option.name)
        if entry is None:
            building = holder(self.path)
            why = (f"it is being built ({building}); wait for that build to finish" if building
                   else f"the build was interrupted; rerun spdy-gpu database --out {self.path}"
                   " with the same arguments to resume it")
            raise SpdyError(f"layer {layer}: option {option.name} is missing from {self.path}, "
                            f"which is incomplete: {why}")
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("bytes"), int)):
            raise SpdyError(f"{self.path}: layer {layer}, option {option.name}: malformed "
                            "manifest entry; delete the database and rebuild it")
        file = self.path / entry["file"]
        size = file.stat().st_size if file.is_file() else -1
        if size != entry["bytes"]:
            raise SpdyError(f"layer {layer}: entry {option.name} is "
                            f"{_size_mismatch(size, entry['bytes'])} ({file}); rerun "
                            "spdy-gpu database on this directory to rebuild it")
        return entry

    def weight(self, layer: str, option: SparsityOption) -> torch.Tensor:
        """The stored weight of `layer` at `option` (the model's shape and dtype), refused
        when its file is not the one written for it (hash, layer and option, finite)."""
        entry = self._entry(layer, option)
        file = self.path / entry["file"]
        stat = file.stat()
        key, seen = (layer, option.name), (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._checked.get(key) == seen:
            from safetensors.torch import load
            return load(file.read_bytes())["weight"]
        weight = _read_entry(self.path, layer, option, entry)
        self._checked[key] = seen
        return weight

    def error(self, layer: str, option: SparsityOption) -> float:
        """Relative layer error of the stored weight, on the calibration data; inf for an
        option the layer cannot take (which no backend can time either)."""
        if layer in self.layer_shapes and unfit_reason(self.layer_shapes[layer], option):
            self.check_options([option])
            return math.inf
        error = self._entry(layer, option)["rel_error"]
        if not (isinstance(error, (int, float)) and math.isfinite(error) and error >= 0):
            raise SpdyError(f"{self.path}: layer {layer}, option {option.name}: relative error "
                            f"{error!r} is not a finite number >= 0; the manifest is corrupted, "
                            "delete the database and rebuild it")
        return float(error)

    def errors_matrix(self, layer_names: Sequence[str],
                      options: Sequence[SparsityOption]) -> np.ndarray:
        """[L, O] relative layer errors."""
        return np.array([[self.error(layer, option) for option in options]
                         for layer in layer_names], dtype=np.float64)

    def errors_by_layer(self, layer_names: Sequence[str],
                        options: Sequence[SparsityOption]) -> dict[str, np.ndarray]:
        """{layer: [relative error per option]}: the keyed form the DP takes."""
        return dict(zip(layer_names, self.errors_matrix(layer_names, options)))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose layers or dense weights are not the ones the database saw."""
        modules = dict(model.named_modules())
        absent = [name for name in self.layers if name not in modules]
        if absent:
            raise SpdyError(f"layer {absent[0]} of database {self.path} is not in this model; "
                            "use the database built for this model")
        hashes = layer_hashes(model, self.layers)
        if _combine(hashes) != self.fingerprint:
            stored = self.layer_hashes
            changed = next((n for n in self.layers if stored.get(n) != hashes[n]), self.layers[0])
            hint = other_weights_hint(model, self.layers)
            raise SpdyError(f"layer {changed}: its dense weights are not those {self.path} was "
                            f"built from (another model than {self.model}?){hint}; rebuild "
                            "the database for this model")

    def check_options(self, options: Sequence[SparsityOption]) -> None:
        """Refuse options outside the grid the database was built for."""
        missing = [o.name for o in dict.fromkeys(options) if o not in self.options]
        if missing:
            grid = " ".join(o.name for o in self.options)
            raise SpdyError(f"{self.path} has no entries for options {', '.join(missing)}: it "
                            f"was built for another option grid ({grid}); build a database "
                            "with them (spdy-gpu database --options ..., e.g. the timing "
                            "table's grid) into another --out")


@dataclasses.dataclass
class _Build:
    """A database under construction: its manifest document and checkpointing."""

    path: Path
    document: dict[str, Any]
    checked: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def done(self, layer: str, option: SparsityOption) -> bool:
        """Whether the entry is on disk intact; a damaged one is rebuilt (with a warning)."""
        entry = self.document["entries"].get(layer, {}).get(option.name)
        if entry is None or (layer, option.name) in self.checked:
            return entry is not None
        try:
            _read_entry(self.path, layer, option, entry)
        except SpdyError as e:
            log.warning("rebuilding a damaged entry: %s", e)
            del self.document["entries"][layer][option.name]
            return False
        self.checked.add((layer, option.name))
        return True

    def add(self, layer: str, option: SparsityOption, weight: torch.Tensor,
            rel_error: float) -> None:
        from safetensors.torch import save
        if not (weight.isfinite().all() and math.isfinite(rel_error)):
            raise SpdyError(f"layer {layer}: reconstruction at {option.name} gave non-finite "
                            "weights; check the calibration data, or raise --damp")
        relative = _entry_file(layer, option)
        data = save({"weight": weight.detach().contiguous()},
                    metadata={"layer": layer, "option": option.name})
        atomic_write_bytes(self.path / relative, data)
        self.document["entries"].setdefault(layer, {})[option.name] = {
            "file": relative, "bytes": len(data), "blake2b": _digest(data),
            "rel_error": rel_error}
        self.checked.add((layer, option.name))
        self.save()        # after every entry: a killed build loses only the one in flight

    def load(self, layer: str, option: SparsityOption) -> torch.Tensor:
        return _read_entry(self.path, layer, option,
                           self.document["entries"][layer][option.name])

    def save(self) -> None:
        body = {k: v for k, v in self.document.items() if k not in ("format", "version")}
        save_json(self.path / MANIFEST, DB_FORMAT, DB_VERSION, body)


def _start(out_dir: Path, header: dict[str, Any], replace_other: bool) -> _Build:
    """A fresh build, or the interrupted one in out_dir if it was for the same work; a
    database of other work is refused, or (replace_other) deleted with a warning."""
    manifest = out_dir / MANIFEST
    if manifest.exists():
        try:
            document = _load_manifest(out_dir)
            other = _other_work(document, header)
        except SpdyError as e:          # unreadable: replaced like a database of other work
            if not replace_other:
                raise SpdyError(f"{problem_of(e)}; delete {out_dir} to rebuild it (a run's "
                                "own database: spdy-gpu run --overwrite replaces it)") from None
            other = f"an unreadable manifest ({problem_of(e)})"
        if other is None:
            log.info("continuing the database in %s (entries already built are kept)",
                     out_dir)
            return _Build(out_dir, document)
        if not replace_other:
            raise other_work_error(out_dir, other)
        log.warning("replacing the database in %s: it was one of %s", out_dir, other)
        shutil.rmtree(out_dir / "entries", ignore_errors=True)
        manifest.unlink()
    leftover = {p.name for p in out_dir.iterdir()} - {LOCK_NAME}
    # a build killed in its first entry, before the manifest (a user's folder named entries
    # holding anything else is no such build)
    if leftover == {"entries"} and _only_entry_files(out_dir / "entries"):
        log.warning("%s holds the entries of a build killed before its first entry was "
                    "recorded; starting it afresh", out_dir)
        shutil.rmtree(out_dir / "entries")
    elif leftover:
        raise SpdyError(f"{out_dir} exists, is not empty and holds no database; choose an "
                        "empty or new directory, or delete it")
    # Nothing is written until the first entry: a failed capture leaves no directory.
    return _Build(out_dir, {"format": DB_FORMAT, "version": DB_VERSION, **header,
                            "entries": {}})


def _only_entry_files(entries: Path) -> bool:
    """Whether `entries` holds nothing but what a build writes there: a folder per layer of
    entry files (.safetensors) and their temporaries."""
    for path in entries.rglob("*"):
        depth = len(path.relative_to(entries).parts)
        entry = path.is_file() and path.name.endswith((".safetensors", TEMPORARY))
        if not (depth == 1 and path.is_dir() or depth == 2 and entry):
            return False
    return True


def other_work_error(path: Path, other: str) -> SpdyError:
    return SpdyError(f"{path} holds a database of {other}; delete it or choose another "
                     "directory (a run's own database: spdy-gpu run --overwrite replaces it)")


def other_model_in(path: str | os.PathLike, model_name: str, model: nn.Module,
                   layers: Sequence[str],
                   calibration: Mapping[str, Any] | None = None) -> str | None:
    """What the database in `path` was built for, where its model, layers or their shapes,
    or (given) its calibration record differ from these (None: no database there, or one
    that may fit): checked before a run measures anything. The dense weights (hashed,
    seconds for a large model) and options are checked once, when the database is built; a
    timing table measured before that refusal is of the same shapes, so a rerun reuses it."""
    if not (Path(path) / MANIFEST).exists():
        return None
    modules = dict(model.named_modules())
    header = {"model": model_name,
              "layers": {name: list(modules[name].weight.shape) for name in layers},
              "calibration": calibration}
    keys = ("model", "layers") if calibration is None else ("model", "layers", "calibration")
    try:
        document = _load_manifest(Path(path))
    except SpdyError as e:
        return f"an unreadable manifest ({problem_of(e)})"
    return _other_work(document, header, keys, weights=False)


def calibration_record(description: Mapping[str, Any], batches: Sequence[Any]) -> dict[str, Any]:
    """A database's record of its calibration: where it came from, and its contents' digest."""
    return {**dict(description), "data_sha256": batches_digest(batches)}


def stored_entries(path: str | os.PathLike) -> set[tuple[str, str, str]]:
    """(layer, option, content hash) of every entry the database in `path` records (empty
    where there is none or its manifest is unreadable): what a build added or replaced."""
    try:
        entries = _load_manifest(Path(path))["entries"]
        return {(layer, option, str(entry.get("blake2b")))
                for layer, options in entries.items() for option, entry in options.items()}
    except (SpdyError, KeyError, TypeError, AttributeError):
        return set()


# What a stored database and new work are compared on, most telling first; the combined
# weight fingerprint last (layer_sha256 names the layer whose weights differ).
_WORK_KEYS = ("model", "layers", "options", "method", "config", "calibration")


def _other_work(document: Mapping[str, Any], header: Mapping[str, Any],
                keys: Sequence[str] = _WORK_KEYS, weights: bool = True) -> str | None:
    """What the stored database was built for, where that differs from `header` (None: the
    same work); the dense weights are compared too unless `weights` is False."""
    for key in keys:
        before, now = document.get(key), header[key]
        if before != now:
            return _difference(key, before, now)
    if not weights:
        return None
    stored = document.get("layer_sha256", {})
    changed = next((n for n, h in header["layer_sha256"].items() if stored.get(n) != h), None)
    if changed is not None:
        return f"other dense weights (layer {changed} differs)"
    if "fingerprint" in header and document.get("fingerprint") != header["fingerprint"]:
        return "other dense weights"
    return None


_WORK_NAMES = {"model": "another model", "layers": "other layer shapes",
               "options": "other options", "method": "another method",
               "config": "another solver configuration", "calibration": "another calibration"}


def _difference(key: str, before: Any, now: Any) -> str:
    name = _WORK_NAMES.get(key, f"another {key}")
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        if key == "calibration" and "data_sha256" not in before and "data_sha256" in now:
            return ("calibration data of unknown contents (an older spdy-gpu recorded no "
                    "digest of them)")
        fields = [f"{k}: {before.get(k, 'absent')} stored, {now.get(k, 'absent')} now"
                  for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        more = f"; {len(fields) - 3} more" if len(fields) > 3 else ""
        return f"{name} ({'; '.join(fields[:3])}{more})"
    if isinstance(before, list) and isinstance(now, list):
        return f"{name} ({len(before)} stored, {len(now)} now)"
    return f"{name} ({before!r} stored, {now!r} now)"


def fitting_options(shape: Sequence[int],
                    options: Sequence[SparsityOption]) -> list[SparsityOption]:
    """The options a weight of `shape` can take, in grid order."""
    return [option for option in options if unfit_reason(shape, option) is None]


def options_no_layer_takes(modules: Mapping[str, nn.Module],
                           options: Sequence[SparsityOption]) -> list[SparsityOption]:
    """The options none of `modules` can take (a block larger than every layer, an N:M
    group dividing none)."""
    return [option for option in options
            if all(unfit_reason(m.weight.shape, option) for m in modules.values())]


def _check_fit(modules: Mapping[str, nn.Module], options: Sequence[SparsityOption]) -> None:
    """Refuse an option no layer can take; say which layers keep out of which families:
    they get the others."""
    useless = options_no_layer_takes(modules, options)
    if useless:
        name, module = next(iter(modules.items()))
        raise SpdyError(f"no layer can take option {useless[0].name} (layer {name}: "
                        f"{unfit_reason(module.weight.shape, useless[0])}); drop it from the "
                        "options")
    left_out: dict[str, list[str]] = {}
    for option in options:
        names = left_out.setdefault(_family_name(option), [])
        names += [name for name, m in modules.items()
                  if unfit_reason(m.weight.shape, option) and name not in names]
    for family, names in left_out.items():
        if names:
            log.warning("%d layer(s) cannot take %s and keep their other options: %s",
                        len(names), family,
                        ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))


def _family_name(option: SparsityOption) -> str:
    return option.name.split("@")[0]


def build_database(model: nn.Module, layers: Sequence[str], options: Sequence[SparsityOption],
                   calibration_batches: Iterable[Any], out_dir: str | os.PathLike,
                   method: str = "fast", *, model_name: str = "model",
                   calibration: Mapping[str, Any] | None = None,
                   fast: FastConfig | None = None,
                   adaprune_config: AdaPruneConfig | None = None,
                   max_input_bytes: int = 2 << 30, progress: bool = True,
                   replace_other: bool = False) -> Database:
    """Reconstruct every layer in `layers` at every option and store it in `out_dir`.

    Level k+1's mask is built on level k's reconstructed weights (nested masks) within each
    family of options. method "fast": the Gram-matrix solver (one calibration pass);
    "adaprune": faithful AdaPrune on stored inputs (one pass per group of layers whose
    inputs fit in `max_input_bytes`). Resumes an interrupted build of the same work; a
    database of other work in `out_dir` is refused, or replaced with `replace_other`; the
    work includes the calibration batches' contents (`calibration` describes where they came
    from), so new data in a file of the same name is other work.
    """
    fast = fast or FastConfig()
    adaprune_config = adaprune_config or AdaPruneConfig()
    if method not in METHODS:
        raise SpdyError(f"unknown reconstruction method {method!r}; use one of {METHODS}")
    options = [SparsityOption.parse(o) if isinstance(o, str) else o for o in options]
    layers = [layers] if isinstance(layers, str) else list(layers)   # one name, not letters
    modules = _checked_modules(model, layers, options)
    chains = option_chains(options)
    _check_fit(modules, options)
    config = (dataclasses.asdict(fast) | {"dtype": str(fast.dtype)} if method == "fast"
              else dataclasses.asdict(adaprune_config))
    hashes = layer_hashes(model, list(layers))
    batches = list(calibration_batches)
    header = {
        "model": model_name, "fingerprint": _combine(hashes), "layer_sha256": hashes,
        "options": [o.name for o in options], "method": method, "config": config,
        "calibration": calibration_record(calibration or {}, batches),
        "layers": {name: list(m.weight.shape) for name, m in modules.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with exclusive_directory(out_dir, "database directory") as out_dir:
        build = _start(out_dir, header, replace_other)
        todo = {name: m for name, m in modules.items()    # checks every entry
                if not all([build.done(name, o)
                            for o in fitting_options(m.weight.shape, options)])}
        if todo:
            _reconstruct(build, model, todo, options, chains, batches, method,
                         fast, adaprune_config, max_input_bytes, progress)
        return Database.open(out_dir)


def _reconstruct(build: _Build, model: nn.Module, todo: dict[str, nn.Module],
                 options: Sequence[SparsityOption], chains: list[list[SparsityOption]],
                 calibration_batches: Iterable[Any], method: str, fast: FastConfig,
                 adaprune_config: AdaPruneConfig, max_input_bytes: int,
                 progress: bool) -> None:
    """Capture the calibration statistics of the `todo` layers and build their entries."""
    batches = list(calibration_batches)
    began = time.perf_counter()
    stats = _calibration_pass(model, todo, batches, progress)
    timing = build.document.setdefault("timing_s", {"capture": 0.0, "reconstruct": 0.0})
    timing["capture"] += time.perf_counter() - began
    began = time.perf_counter()
    try:
        entries = sum(len(fitting_options(m.weight.shape, options)) for m in todo.values())
        with tqdm(total=entries, desc=f"database ({method})",
                  unit="entry", disable=not progress) as bar:
            for group in _input_groups(todo, stats, method, max_input_bytes):
                samples = (capture_inputs(model, group, batches) if method == "adaprune"
                           else {})
                for name, module in group.items():
                    _build_layer(build, name, module, stats[name], options, chains, method,
                                 fast, adaprune_config, samples.pop(name, None), bar)
    finally:
        timing["reconstruct"] += time.perf_counter() - began
        if build.document["entries"]:
            build.save()    # the timing too; every entry is already in the manifest


def _calibration_pass(model: nn.Module, todo: dict[str, nn.Module], batches: list[Any],
                      progress: bool) -> dict[str, LayerStats]:
    """The calibration statistics, captured where the solver runs (solver_device: a GPU
    when there is one), or on the CPU where the pass fails on the GPU."""
    def capture(device: torch.device) -> dict[str, LayerStats]:
        with tqdm(total=len(batches), desc=f"calibration ({device.type})", unit="batch",
                  disable=not progress) as bar:
            return capture_statistics(model, todo, batches, bar.update, device=device)

    return on_gpu_else_cpu(capture, "the calibration pass")


def _checked_modules(model: nn.Module, layers: Sequence[str],
                     options: Sequence[SparsityOption]) -> dict[str, nn.Module]:
    """The named layers' modules, refusing an empty or dense-less job or a name that is not
    a Linear or Conv2d of the model."""
    require_real(model, "reconstruction")
    if SparsityOption.dense() not in options:
        raise SpdyError("the option list must include dense (dense is always a choice)")
    if not layers:
        raise SpdyError("no layers to reconstruct; pass at least one Linear or Conv2d name")
    modules = dict(model.named_modules())
    unknown = [name for name in layers if not isinstance(modules.get(name),
                                                         (nn.Linear, nn.Conv2d))]
    if unknown:
        raise SpdyError(f"layer {unknown[0]} is not a Linear or Conv2d of this model; check the "
                        "layer names")
    return {name: modules[name] for name in layers}


def _input_groups(modules: dict[str, nn.Module], stats: dict[str, LayerStats], method: str,
                  budget: int) -> list[dict[str, nn.Module]]:
    """Layers grouped so that one group's stored inputs fit in `budget` bytes (AdaPrune);
    a single group for the fast solver, which needs no inputs."""
    if method == "fast":
        return [modules]
    groups: list[dict[str, nn.Module]] = [{}]
    used = 0
    for name, module in modules.items():
        size = 4 * stats[name].rows * stats[name].gram.shape[0] * stats[name].gram.shape[-1]
        if groups[-1] and used + size > budget:
            groups.append({})
            used = 0
        groups[-1][name] = module
        used += size
    return groups


def _build_layer(build: _Build, name: str, module: nn.Module, stats: LayerStats,
                 options: Sequence[SparsityOption], chains: list[list[SparsityOption]],
                 method: str, fast: FastConfig, config: AdaPruneConfig,
                 samples: list[torch.Tensor] | None, bar: tqdm) -> None:
    """Every option of one layer: dense, then each chain with nested masks."""
    dense = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    dense_option = SparsityOption.dense()
    if not build.done(name, dense_option):
        build.add(name, dense_option, dense, 0.0)
    bar.update(1)
    hessian = (damped_gram(stats, fast.damp, fast.dtype, solver_device()) if method == "fast"
               else None)
    for chain in chains:
        if unfit_reason(dense.shape, chain[0]) is not None:
            continue                  # a whole family: block too large, N:M not dividing
        previous = dense
        for i, option in enumerate(chain):
            if build.done(name, option):
                previous = build.load(name, option)
                bar.update(1)
                continue
            mask = build_mask(previous, option, allowed=None if i == 0 else previous != 0)
            start = previous * mask
            if method == "fast":
                weight = reconstruct_fast(stats, dense, mask, start, fast, hessian)
            else:
                weight = adaprune(samples, dense, bias, mask, start, config)
            build.add(name, option, weight, stats.relative_error(weight, dense, bias))
            previous = weight
            bar.update(1)
