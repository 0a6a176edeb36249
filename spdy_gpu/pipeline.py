"""The method's stages as library calls on a model entry: what a CLI command or a notebook
runs. Each function takes the library's own types and returns a result; none prints.

`run` is the whole method for one model, backend and target: timings -> database ->
search -> measured guarantee (guarantee.py) -> (gAP) -> export, every stage reusing what its output
directory (or a given timing table) already holds when it matches by fingerprint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import LatencyBackend, check_options_supported
from .data import Calibration, CalibrationSpec, batch_samples, sample_batches, tensors_digest
from .errors import SpdyError, as_path, check_types, problem_of
from .guarantee import (
    Measurement,
    dense_off_table,
    guaranteed_profile,
    measure_speedup,
    measured_near_table,
)
from .jsonio import changed_fields, is_number, load_json, save_json, side_file
from .layers import (
    LayerInfo,
    discover_layers,
    exclude_patterns,
    prunable_modules,
    require_real,
    warn_unmatched_excludes,
)
from .locks import LOCK_NAME, exclusive_directory, exclusive_file
from .models import ModelEntry, ModelSetting
from .options import SparsityOption, option_grid
from .profile import Profile, check_for_model
from .reconstruct import (
    Database,
    FastConfig,
    GapReport,
    global_adaprune_,
    model_fingerprint,
    stitch_,
)
from .scoring import HeldOutScorer, held_out_scorer
from .search import SearchConfig, SearchResult, search
from .solve import Planner, check_target
from .timing import TimingTable

log = logging.getLogger(__name__)

RUN_FORMAT, RUN_VERSION = "spdy-gpu/run", 1
REPORT_FORMAT, REPORT_VERSION = "spdy-gpu/run-report", 1
QUALITY_FORMAT, QUALITY_VERSION = "spdy-gpu/quality", 1
# What `run` writes into its directory; --overwrite removes only these.
MEASURED = ("timings.json", "database", "search-state.json")   # reused whenever they match
PROGRESS = ("search-state.json", "profile.json", "pruned.safetensors", "report.json")
RESULTS = ("profile.json", "pruned.safetensors", "model.onnx", "model.triton.safetensors",
           "report.json", "report.md", "report.png")     # written by the export, report last
OUTPUTS = ("run.json", "guarantee.json", "quality.json", *RESULTS, "timings.json.partial")


# ---- gAP and verify -----------------------------------------------------------------------

@dataclass(frozen=True)
class GapSettings:
    """Global AdaPrune after stitching (reference: Adam, lr 1e-5, masks kept)."""

    lr: float = 1e-5
    epochs: int = 10
    patience: int = 2
    only_pruned: bool = False

    def __post_init__(self) -> None:
        # run and compare take these as --gap-lr / --gap-epochs, spdy-gpu gap as --lr ...
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise SpdyError(f"gAP learning rate {self.lr} (--gap-lr; --lr of spdy-gpu gap) "
                            "must be in (0, 1], e.g. 1e-5 (Adam's steps are about lr)")
        if self.epochs < 1:
            raise SpdyError(f"gAP epochs {self.epochs} (--gap-epochs; --epochs of spdy-gpu "
                            "gap) must be >= 1")
        if self.patience < 1:
            raise SpdyError(f"gAP --patience {self.patience} must be >= 1")


def masks_of(model: nn.Module, choices: Mapping[str, SparsityOption]) -> dict[str, Any]:
    """Bool keep-masks of the pruned layers of a stitched model (what gAP must keep)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach() != 0 for name, option in choices.items()
            if option.pattern != "dense"}


GAP_CHECKPOINT_SUFFIX = ".gap-checkpoint.pt"      # beside the gap command's --out


def global_adaprune_profile(entry: ModelEntry, setting: ModelSetting, database: Database,
                            profile: Profile, calibration: CalibrationSpec,
                            out: str | os.PathLike, *, gap: GapSettings = GapSettings(),
                            metadata: dict[str, str] | None = None,
                            progress: bool = True) -> GapReport:
    """Stitch `profile` from `database`, fine-tune it against the dense model (gAP) and save
    the weights (safetensors state dict) to `out`, atomically; a killed run resumes from
    `out`.gap-checkpoint.pt, which is removed once gAP has finished."""
    from .deploy import save_pruned

    if not profile.pruned_layers:
        raise SpdyError("the profile prunes no layer: gAP has nothing to fine-tune (the model "
                        "is the dense one); give a profile of a target above 1x")
    model, example = entry.build(setting)
    dense, _ = entry.build(setting)
    check_for_model(model, entry.name, profile, database)
    stitch_(model, profile.choices, database)
    batches = calibration.load(entry, setting, example).batches
    with exclusive_file(out, "gAP weights file"):
        report = global_adaprune_(model, dense, masks_of(model, profile.choices), batches,
                                  lr=gap.lr, epochs=gap.epochs, only_pruned=gap.only_pruned,
                                  patience=gap.patience, progress=progress,
                                  checkpoint=side_file(out, GAP_CHECKPOINT_SUFFIX))
        _check_finite_weights(model)
        save_pruned(model, out, profile=profile, metadata=metadata)
    return report


def _check_finite_weights(model: nn.Module) -> None:
    bad = next((n for n, p in model.named_parameters() if not p.isfinite().all()), None)
    if bad is not None:
        raise SpdyError(f"gAP produced non-finite weights in {bad}; lower --gap-lr or check "
                        "the calibration data")




def verify_profile(entry: ModelEntry, setting: ModelSetting, backend: LatencyBackend,
                   profile: Profile | str | os.PathLike,
                   database: Database | str | os.PathLike | None = None, *,
                   force: bool = False) -> dict[str, Any]:
    """Prune the model to `profile` (database weights, or magnitude masks without one),
    measure it against the dense model on `backend` and compare with the prediction.

    A profile of another model, or planned on timings from another setting (unless
    `force`), is refused. Returns the 'spdy-gpu/verify' record (time_error_pct =
    (predicted - measured) / measured pruned time). Profile and database may be given as
    their paths."""
    if isinstance(profile, (str, os.PathLike)):
        profile = Profile.load(profile)
    database = Database.of(database)
    if not profile.pruned_layers:
        raise SpdyError("the profile prunes no layer, so there is nothing to verify; pass a "
                        "profile made by spdy-gpu solve or run")
    if profile.estimated:
        log.warning("the profile was planned on ESTIMATED times")
    dense, example = entry.build(setting)
    check_for_model(dense, entry.name, profile, database)
    differences = profile.fingerprint.mismatches(backend.fingerprint(example))
    if differences and not force:
        raise SpdyError("the profile was planned on timings from another setting ("
                        + "; ".join(differences) + "); re-measure and re-plan here, "
                        "or pass --force")
    for difference in differences:
        log.warning("forced: profile and this machine differ in %s", difference)
    pruned = copy.deepcopy(dense)
    stitch_(pruned, profile.choices, database)
    # as the guarantee measures: again on fresh engines where dense is far off the table
    m, taken = measured_near_table(lambda: measure_speedup(backend, dense, pruned, example),
                                   lambda m: m.dense_ms, profile.dense_total_ms)
    if dense_off_table(m.dense_ms, profile.dense_total_ms):
        log.warning("dense ran %.4g ms against the table's %.4g ms in %d sessions: the backend "
                    "is in a slow state or the machine is busy, so the measured speedup is "
                    "suspect; verify again with nothing else running", m.dense_ms,
                    profile.dense_total_ms, len(taken))
    if m.noisy:
        log.warning("the timings spread wider than their median (%s): the machine was busy, "
                    "so the measured speedup is suspect; verify again with nothing else "
                    "running", m.describe())
    return {"model": entry.name, "target_speedup": profile.target_speedup,
            "predicted_ms": profile.predicted_ms,
            "predicted_speedup": profile.predicted_speedup,
            "measured_dense_ms": m.dense_ms, "measured_dense_spread_ms": m.dense_spread_ms,
            "measured_pruned_ms": m.pruned_ms, "measured_pruned_spread_ms": m.pruned_spread_ms,
            "measured_speedup": m.speedup, "slow_engines": m.slow_engines,
            "sessions": len(taken), "table_dense_ms": profile.dense_total_ms,
            "time_error_pct": 100.0 * (profile.predicted_ms - m.pruned_ms) / m.pruned_ms,
            "estimated": profile.estimated, "forced_differences": differences,
            "weights": "magnitude" if database is None else str(database.path)}


# ---- the whole method ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """Everything `run` takes besides the model, the backend and the output directory."""

    speedup: float
    options: tuple[SparsityOption, ...] | None = None    # a table must have exactly these
    measure_grid: tuple[SparsityOption, ...] | None = None   # if measured (None: default)
    exclude: tuple[str, ...] = ()
    timings: tuple[Path, ...] = ()        # tables to reuse when one matches this setting
    database: Path | None = None          # shared database directory (None: DIR/database)
    calibration: CalibrationSpec = CalibrationSpec()
    search_samples: int = 32              # held out from the database, scored by the search
    search: SearchConfig = SearchConfig()
    errors: str = "auto"                  # per-option errors the coefficients scale
    loss: str | None = None               # None: the model entry's own (else nmse)
    fast: FastConfig = FastConfig()
    gap: GapSettings | None = None
    tolerance: float = 0.03               # measured may fall short of the target by this
    max_rounds: int = 5                   # measure / tighten / re-solve, at most
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "speedup", check_target(self.speedup))   # a float from here
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))
        for name in ("options", "measure_grid"):        # option names, as a notebook has them
            given = getattr(self, name)
            if isinstance(given, (str, SparsityOption)):
                given = (given,)
            if given is not None and (not isinstance(given, (tuple, list)) or not all(
                    isinstance(o, (str, SparsityOption)) for o in given)):
                raise SpdyError(f"{name} must be a list of options (names such as "
                                f"'unstructured@0.5' or SparsityOptions), not {given!r}")
            if given is not None and not given:
                raise SpdyError(f"{name} is empty; name the options (e.g. ['dense', "
                                "'unstructured@0.5']) or leave it out for the default grid")
            if given is not None:
                object.__setattr__(self, name, tuple(
                    SparsityOption.parse(o) if isinstance(o, str) else o for o in given))
        if isinstance(self.timings, (str, os.PathLike)):
            object.__setattr__(self, "timings", (self.timings,))
        if not isinstance(self.timings, (tuple, list)):
            raise SpdyError(f"timings must be a timing table's path or a list of them, not "
                            f"{type(self.timings).__name__} {self.timings!r}")
        check_types({**{f"timings[{i}]": (t, (str, os.PathLike))
                        for i, t in enumerate(self.timings)},
                     "database": (self.database, (str, os.PathLike, type(None))),
                     "overwrite": (self.overwrite, bool)})
        object.__setattr__(self, "timings", tuple(Path(t) for t in self.timings))
        if self.database is not None:
            object.__setattr__(self, "database", Path(self.database))
        kinds = {"search": SearchConfig, "fast": FastConfig, "calibration": CalibrationSpec,
                 "gap": (GapSettings, type(None))}
        wrong = next((name for name, kind in kinds.items()
                      if not isinstance(getattr(self, name), kind)), None)
        if wrong is not None:
            expected = "GapSettings" if wrong == "gap" else kinds[wrong].__name__
            raise SpdyError(f"{wrong} must be a {expected}"
                            f"{' or None' if wrong == 'gap' else ''}, not "
                            f"{type(getattr(self, wrong)).__name__}; pass "
                            f"{wrong}={expected}(...)")
        check_types({"--search-samples": (self.search_samples, int),
                     "--max-rounds": (self.max_rounds, int),
                     "--tolerance": (self.tolerance, float)})
        if self.errors not in ("auto", "prior", "database"):
            raise SpdyError(f"--errors {self.errors!r}: use auto, prior or database")
        if self.search_samples < 1:
            raise SpdyError(f"--search-samples {self.search_samples} must be >= 1")
        if self.max_rounds < 1:
            raise SpdyError(f"--max-rounds {self.max_rounds} must be >= 1")
        if not 0 <= self.tolerance < 1:
            raise SpdyError(f"--tolerance {self.tolerance} must be in [0, 1), e.g. 0.03")
        for name in ("search_samples", "max_rounds"):      # NumPy scalars as Python numbers
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "tolerance", float(self.tolerance))

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (the reusable measurements aside)."""
        return _jsonable({
            "speedup": self.speedup, "exclude": self.exclude,
            "options": None if self.options is None else [o.name for o in self.options],
            "grid": None if self.measure_grid is None else [o.name for o in self.measure_grid],
            "calibration": dataclasses.asdict(self.calibration),
            "search_samples": self.search_samples, "search": dataclasses.asdict(self.search),
            "errors": self.errors, "loss": self.loss, "fast": dataclasses.asdict(self.fast),
            "gap": None if self.gap is None else dataclasses.asdict(self.gap),
            "tolerance": self.tolerance, "max_rounds": self.max_rounds})


@dataclass
class RunReport:
    """What a run did and measured; saved as report.json and report.md."""

    model: str
    backend: str
    target_speedup: float
    predicted_speedup: float = math.nan
    measured: Measurement | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)
    held_out_loss: dict[str, float | None] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: Profile | None = None

    @property
    def measured_speedup(self) -> float | None:
        return None if self.measured is None else self.measured.speedup

    def to_json(self) -> dict[str, Any]:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "profile"}
        body["measured_speedup"] = self.measured_speedup
        if self.profile is not None:
            body["layers_pruned"] = len(self.profile.pruned_layers)
            body["predicted_ms"] = self.profile.predicted_ms
            body["dense_total_ms"] = self.profile.dense_total_ms
        return _jsonable(body)


def run(entry: ModelEntry, setting: ModelSetting, backend: LatencyBackend,
        settings: RunSettings, out_dir: str | os.PathLike, *,
        progress: bool = True) -> RunReport:
    """SPDY end to end: the pruned model in `out_dir` with its measured speedup and quality.

    Writes timings.json, database/, search-state.json (resume), profile.json,
    pruned.safetensors, the backend's deployable model, report.{json,md,png}, holding an
    exclusive lock on `out_dir` meanwhile (a second run into it is refused).
    """
    with exclusive_directory(out_dir, "run directory") as out:
        return _run(entry, setting, backend, settings, out, progress)


def _run(entry: ModelEntry, setting: ModelSetting, backend: LatencyBackend,
         settings: RunSettings, out: Path, progress: bool) -> RunReport:
    model, example = entry.build(setting)
    fingerprint = backend.fingerprint(example)
    report = RunReport(entry.name, backend.name, settings.speedup)
    with _stage(report, "calibration") as note:
        fit, held_out = calibration_split(entry, setting, example, settings)
        note["samples"] = {"database": fit.samples, "search": held_out.samples}
        # scores the dense outputs now: an output no loss can compare fails before any work
        scorer = held_out_scorer(model, held_out.batches, None, settings.loss or entry.loss)
    layers = discover_layers(model, example, (*entry.exclude, *settings.exclude))
    # before the directory is claimed (an --overwrite clears it): nothing is lost to a refusal
    _refuse_a_database_of_other_work(entry, model, layers, fit, settings, out)
    _claim(out, entry.name, fingerprint, settings)
    with _stage(report, "timings") as note:
        table = _timing_table(entry, model, example, layers, backend, fingerprint, settings,
                              out, note, progress)
    planner = Planner(table, (*entry.exclude, *settings.exclude))
    planner.grid(settings.speedup)                     # an unreachable target fails here
    with _stage(report, "database") as note:
        database = _database(entry, model, planner, fit, settings, out, progress, note)
    scorer.database = database              # the search stitches its weights from now on
    base = _base_errors(planner, database, settings)
    with _stage(report, "search") as note:
        result = _search(planner, database, base, scorer, settings, out, progress)
        report.search = _search_summary(result, scorer.loss_name)
        note.update(evaluations=result.evaluations, stopped=result.stopped)
        if result.resumed:
            note["resumed"] = True
    # the searched costs: each layer's base errors times its coefficient
    costs = {name: result.coefficients[name] * base[name] for name in planner.layers}
    with _stage(report, "guarantee") as note:
        profile, pruned = guaranteed_profile(backend, planner, database, costs, model, example,
                                             settings, report, out / "guarantee.json", note)
        note["rounds"] = len(report.rounds)
    # made with the model at hand: consumers can check the profile belongs to it
    # excluded: also the layers the run never timed (their time is in the fixed time)
    untimed = set(prunable_modules(model)) - set(prunable_modules(model, planner.exclude))
    profile = dataclasses.replace(
        profile, excluded=tuple(sorted({*profile.excluded, *untimed})),
        model_fingerprint=model_fingerprint(model, list(profile.choices)),
        provenance={"made_by": "spdy_gpu.run (coefficient search, DP, measured guarantee)",
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "run": str(out), "timings": str(out / "timings.json"),
                    "database": str(database.path), "loss": scorer.loss_name,
                    "round": next((r["round"] for r in report.rounds if r.get("kept")), None)})
    report.profile, report.predicted_speedup = profile, profile.predicted_speedup
    report.held_out_loss = _baselines(planner, database, scorer, settings, profile)
    masks = masks_of(pruned, profile.choices) if settings.gap is not None else {}
    if settings.gap is not None and not masks:
        report.notes.append("gAP skipped: the profile prunes no layer")
    elif settings.gap is not None:
        with _stage(report, "gap") as note:
            gap = global_adaprune_(pruned, model, masks,
                                   fit.batches, lr=settings.gap.lr, epochs=settings.gap.epochs,
                                   patience=settings.gap.patience,
                                   only_pruned=settings.gap.only_pruned, progress=progress,
                                   checkpoint=out / "gap-checkpoint.pt")
            _check_finite_weights(pruned)
            note.update(loss_before=gap.loss_before, loss_after=gap.loss_after)
            report.held_out_loss["spdy+gap"] = scorer.loss_of(pruned)
    with _stage(report, "quality") as note:
        report.quality = _quality(entry, pruned, model, out / "quality.json", note)
    with _stage(report, "export"):
        report.outputs = _export(backend, pruned, example, profile, out)
    _write_report(report, table, planner, costs, out)
    return report


def prune(model: nn.Module, example: Any, *, speedup: float,
          backend: LatencyBackend | str = "deepsparse",
          calibration: Sequence[Any] | str | os.PathLike | None = None,
          calibration_samples: int | None = None, calibration_batch_size: int | None = None,
          out_dir: str | os.PathLike = "spdy-run", name: str = "model",
          loss: str | Any = None, **settings: Any) -> tuple[nn.Module, RunReport]:
    """The whole method from a notebook: (pruned copy of `model`, report).

    calibration: a list of input batches (the form `model` takes), one tensor (or dict of
    tensors) whose first dimension is samples, a file or directory of saved tensors, or None
    (the example input, with a warning). A tensor or file is cut into batches of
    `calibration_batch_size` (default 32), `calibration_samples` of them in all (default:
    every sample of a tensor, 1024 of a file); a list is used as it is. `settings` are
    RunSettings fields (search=SearchConfig(...), gap=GapSettings(), exclude=...,
    options=...). The pruned copy is returned in eval mode, as it was measured.
    """
    from .backends import get_backend
    from .deploy import load_pruned

    require_real(model, "prune")
    check_types({"name": (name, str)})
    fields = [f.name for f in dataclasses.fields(RunSettings)
              if f.name not in ("speedup", "calibration")]    # prune's own arguments
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise SpdyError(f"prune() has no setting {', '.join(map(repr, unknown))}; it takes "
                        f"speedup, backend, calibration, calibration_samples, "
                        f"calibration_batch_size, out_dir, name, loss and the "
                        f"RunSettings fields {', '.join(fields)}")
    if not isinstance(backend, str) and not callable(getattr(backend, "measure_table", None)):
        raise SpdyError(f"backend must be a backend name (e.g. 'deepsparse') or a "
                        f"LatencyBackend, not {type(backend).__name__}")
    out_dir = as_path(out_dir, "out_dir")
    batches, spec = _notebook_calibration(calibration, example, calibration_samples,
                                          calibration_batch_size)
    entry = ModelEntry(name=name, description=f"notebook model {name}",
                       build=lambda _: (copy.deepcopy(model).eval(), example),
                       calibration=(lambda *_: iter(batches)) if batches is not None else None,
                       loss=loss)
    backend = get_backend(backend) if isinstance(backend, str) else backend
    run_settings = RunSettings(speedup=speedup, calibration=spec, **settings)
    require_files(run_settings.timings, "timings=")
    report = run(entry, ModelSetting(), backend, run_settings, out_dir)
    pruned = load_pruned(copy.deepcopy(model), Path(out_dir) / "pruned.safetensors")
    return pruned.eval(), report


def _notebook_calibration(data: Any, example: Any, samples: int | None,
                          batch_size: int | None) -> tuple[list[Any] | None, CalibrationSpec]:
    """prune()'s calibration: (the batches it was given in memory, else None; the spec)."""
    check_types({"calibration_samples": (samples, (int, type(None))),
                 "calibration_batch_size": (batch_size, (int, type(None)))})
    for argument, value in (("calibration_samples", samples),
                            ("calibration_batch_size", batch_size)):
        if value is not None and value < 1:
            raise SpdyError(f"{argument}={value} must be >= 1")
    is_list = isinstance(data, Sequence) and not isinstance(data, (str, bytes))
    if data is None and (samples, batch_size) != (None, None):
        raise SpdyError("calibration_samples and calibration_batch_size apply to calibration "
                        "data (a tensor of samples or a file), and none was given; pass "
                        "calibration=...")
    if is_list and (samples, batch_size) != (None, None):
        raise SpdyError("calibration is a list of batches, used as it is: "
                        "calibration_samples and calibration_batch_size apply to a tensor or "
                        "a file; pass the batches you want (e.g. batches[:8])")
    batch_size = batch_size or CalibrationSpec.batch_size
    if isinstance(data, (torch.Tensor, Mapping)):
        data, is_list = list(sample_batches(data, example, batch_size, samples)), True
    if is_list:
        found = sum(batch_samples(batch) for batch in data)
        return list(data), CalibrationSpec(samples=max(found, 1), batch_size=batch_size)
    if data is not None and not isinstance(data, (str, os.PathLike)):
        raise SpdyError(f"calibration must be a list of batches, a tensor (or dict of tensors) "
                        f"of samples or a path of saved tensors, not {type(data).__name__}")
    return None, CalibrationSpec(calib=data, samples=samples or CalibrationSpec.samples,
                                 batch_size=batch_size)


def require_files(tables: Sequence[Path], flag: str) -> None:
    """Timing tables passed in must be timing-table files: the run would otherwise measure
    the table again, silently, when a path has a typo (or skip a damaged one unread). (Not a
    RunSettings rule: compare passes its shared DIR/timings.json before it exists.)"""
    for path in tables:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise SpdyError(f"{flag} {path} {what}; pass a timing table file (written by "
                            "spdy-gpu timings --out), or leave it out to measure one")
        TimingTable.load(path)          # every one readable, not only the first that matches


# ---- stages --------------------------------------------------------------------------------

def _quality(entry: ModelEntry, pruned: nn.Module, dense: nn.Module, path: Path,
             note: dict[str, Any]) -> dict[str, float]:
    """The entry's quality measures of `pruned`, kept in `path` for a rerun that ends with
    the same weights (they may take minutes)."""
    if entry.quality is None:
        return {}
    key = f"{entry.name} {tensors_digest(pruned.state_dict().items())}"
    if path.exists():
        try:
            doc = load_json(path, QUALITY_FORMAT, QUALITY_VERSION)
            kept = doc.get("quality")
            if doc.get("key") == key and isinstance(kept, dict) and all(
                    isinstance(k, str) and is_number(v) for k, v in kept.items()):
                note["reused"] = str(path)
                return {k: float(v) for k, v in kept.items()}
        except SpdyError as e:
            log.warning("not reusing %s: it is damaged (%s)", path, e)
    quality = entry.quality_of(pruned, dense)
    save_json(path, QUALITY_FORMAT, QUALITY_VERSION, {"key": key, "quality": quality})
    return quality


@contextmanager
def _stage(report: RunReport, name: str) -> Iterator[dict[str, Any]]:
    """Times a stage into report.stages[name]; the stage may add notes to the dict."""
    began = time.perf_counter()
    note: dict[str, Any] = {}
    log.info("stage %s", name)
    yield note
    report.stages[name] = {"seconds": round(time.perf_counter() - began, 1), **note}


def _claim(out: Path, model: str, fingerprint: Any, settings: RunSettings) -> None:
    """Refuse a directory that holds another run's files, unless overwriting; then record
    this run. Measurements stay when they belong to the same model and backend setting."""
    manifest = out / "run.json"
    identity = _jsonable({"model": model, "fingerprint": dataclasses.asdict(fingerprint),
                          "settings": settings.identity()})
    if manifest.exists():
        try:
            previous = load_json(manifest, RUN_FORMAT, RUN_VERSION).get("identity", {})
        except SpdyError as e:
            if not settings.overwrite:
                raise SpdyError(f"{problem_of(e)}; pass --overwrite to replace the run (its "
                                "measurements are kept where they still match) or delete "
                                "the directory") from None
            log.warning("replacing the run in %s: its run.json is damaged", out)
            # its measurements may be of this setting: each is checked before it is reused
            previous = {k: identity[k] for k in ("model", "fingerprint")}
        same_setting = all(previous.get(k) == identity[k] for k in ("model", "fingerprint"))
        # a run that stopped before its search (e.g. on bad input) left nothing to lose
        unfinished = not any((out / name).exists() for name in PROGRESS)
        if previous != identity:
            if not (settings.overwrite or unfinished and same_setting):
                raise SpdyError(f"{out} holds another run (of {previous.get('model')!r}; "
                                f"differs in {_differences(previous, identity)}); pass "
                                "--overwrite to replace it or choose another --out")
            _remove(out, OUTPUTS if same_setting else OUTPUTS + MEASURED)
    elif any(p.name != LOCK_NAME for p in out.iterdir()):
        if not settings.overwrite:
            raise SpdyError(f"{out} exists and is not a spdy-gpu run directory; choose an "
                            "empty or new --out (or pass --overwrite to write into it)")
        _remove(out, OUTPUTS + MEASURED)
    save_json(manifest, RUN_FORMAT, RUN_VERSION, {
        "identity": identity,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _differences(previous: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """The settings two run identities differ in, named as run's options are."""
    names = changed_fields({k: previous.get(k) for k in ("model", "fingerprint")},
                           {k: identity[k] for k in ("model", "fingerprint")})
    names += changed_fields(previous.get("settings", {}), identity["settings"])
    return ", ".join(names) or "its format"


def _remove(out: Path, names: Sequence[str]) -> None:
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def calibration_split(entry: ModelEntry, setting: ModelSetting, example: Any,
                      settings: RunSettings) -> tuple[Calibration, Calibration]:
    """(data for the database, held-out data for the search). With nothing but the
    example input there is nothing to hold out: both use it, and the report says so."""
    calibration = settings.calibration.load(entry, setting, example)
    if calibration.description.get("source") == "example-input":
        log.warning("the search is scored on the example input it was reconstructed on (no "
                    "held-out data); pass --calib for a trustworthy search")
        return calibration, calibration
    return calibration.split(settings.search_samples)


def _timing_table(entry: ModelEntry, model: nn.Module, example: Any,
                  layers: Sequence[LayerInfo], backend: LatencyBackend, fingerprint: Any,
                  settings: RunSettings, out: Path, note: dict[str, Any],
                  progress: bool) -> TimingTable:
    """A table measured for this model on this backend setting: the first of
    settings.timings that matches, else out/timings.json when it does, else measured now
    (resumable) and saved there."""
    prunable = set(prunable_modules(model))
    warn_unmatched_excludes(settings.exclude, prunable)
    shapes = {layer.name: (layer.n, layer.k) for layer in layers}   # excluded: not timed
    options = list(settings.options or settings.measure_grid
                   or option_grid(backend.default_pattern))
    options = check_options_supported(backend, layers, options, grid=not settings.options)
    # the tables given first: a matching one is used as asked, even over the run's own copy
    for path in (*settings.timings, out / "timings.json"):
        if not Path(path).exists():
            continue
        try:
            table = TimingTable.load(path)
        except SpdyError as e:
            if Path(path) != out / "timings.json":
                raise                   # a table passed in is the user's to fix
            log.warning("not reusing %s: it is damaged (%s)", path, e)
            continue
        # a table the run measured must hold the grid asked for; one passed in with
        # --timings (and the run's copy of it) brings its own
        measured_here = Path(path) == out / "timings.json" and not settings.timings
        wanted = options if measured_here else settings.options
        why = _mismatch(table, entry.name, fingerprint, shapes, prunable, wanted)
        if why is None:
            note["reused"] = str(path)
            if list(table.options) != options:
                log.info("reusing %s with its own option grid (%d options; the grid of "
                         "--levels, --pattern and --block, %d options, applies to a table "
                         "measured here: leave out --timings to measure it)", path,
                         len(table.options), len(options))
            run_table = table.restricted_to(set(shapes))    # layers it times beyond: fixed
            if Path(path) != out / "timings.json" or run_table is not table:
                run_table.save(out / "timings.json")
            return run_table
        log.warning("not reusing %s: %s", path, why)
    log.info("measuring the timing table: %d layers x %d options on %s", len(layers),
             len(options), backend.name)
    table = backend.measure_table(model, example, layers, options, model_name=entry.name,
                                  checkpoint=out / "timings.json.partial", progress=progress)
    table = dataclasses.replace(table, provenance={
        **table.provenance, "made_by": f"spdy_gpu.run into {out}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname()})
    table.save(out / "timings.json")
    note["estimated" if table.estimated else "measured"] = True
    return table


def _refuse_a_database_of_other_work(entry: ModelEntry, model: nn.Module,
                                     layers: Sequence[LayerInfo], fit: Calibration,
                                     settings: RunSettings, out: Path) -> None:
    """Before anything is measured or cleared: a database of another model, other layers or
    shapes, or other calibration data is refused now, not after the timing table (minutes
    on a CPU) is measured and saved over the directory's own (other weights of the same
    shapes: when the database is built). --overwrite replaces the run's own database later
    instead."""
    from .reconstruct.database import calibration_record, other_model_in, other_work_error

    path = settings.database or out / "database"
    if settings.overwrite and settings.database is None:
        return
    other = other_model_in(path, entry.name, model, [layer.name for layer in layers],
                           calibration_record(fit.description, fit.batches))
    if other is not None:
        raise other_work_error(path, other)


def _mismatch(table: TimingTable, model: str, fingerprint: Any,
              shapes: Mapping[str, tuple[int, int]], prunable: set[str],
              options: Sequence[SparsityOption] | None) -> str | None:
    """Why `table` cannot stand for this run's measurements (None: it can). `shapes`:
    the layers this run prunes as {name: (N, K)} of their GEMMs; the table must time all of
    them, and may time more of the model's `prunable` layers (the run excludes those)."""
    if table.model != model:
        return (f"it is for model {table.model!r}, not {model!r} (a table of the same model "
                f"under that name is reused with --model {table.model}, or from a notebook "
                f"prune(name={table.model!r}))")
    differences = table.fingerprint.mismatches(fingerprint)
    if differences:
        return "measured in another setting (" + "; ".join(differences) + ")"
    timed = set(table.layer_names)
    if not set(shapes) <= timed:
        return f"it does not time {sorted(set(shapes) - timed)[0]}, which this run prunes"
    if not timed <= prunable:
        return f"its layer {sorted(timed - prunable)[0]} is not a layer of the model"
    resized = next((layer.name for layer in table.layers if layer.name in shapes
                    and tuple(layer.gemm[:2]) != shapes[layer.name]), None)
    if resized is not None:
        return f"its layer {resized} has another shape than the model's"
    if options is not None and list(table.options) != list(options):
        return "its option grid differs from the one asked for"
    return None


def _database(entry: ModelEntry, model: nn.Module, planner: Planner, fit: Calibration,
              settings: RunSettings, out: Path, progress: bool,
              note: dict[str, Any]) -> Database:
    from .reconstruct import build_database
    from .reconstruct.database import stored_entries

    path = settings.database or out / "database"
    before = stored_entries(path)
    # --overwrite replaces the run's own database when it is of other work, never a shared one
    database = build_database(model, planner.layers, planner.options, fit.batches, path,
                              "fast", model_name=entry.name, calibration=fit.description,
                              fast=settings.fast, progress=progress,
                              replace_other=settings.overwrite and settings.database is None)
    after = stored_entries(path)
    note["reused"] = bool(before) and after == before        # nothing built now
    note["resumed"] = bool(before) and before < after        # built on what was there
    return database


def _search(planner: Planner, database: Database, errors: Mapping[str, Any],
            scorer: HeldOutScorer, settings: RunSettings, out: Path,
            progress: bool) -> SearchResult:
    identity = {"database": database.fingerprint, "database_config": database.config,
                "calibration": database.calibration, "loss": scorer.loss_name,
                "search_samples": settings.search_samples}
    return search(planner, settings.speedup, scorer, errors=errors, config=settings.search,
                  checkpoint=out / "search-state.json", identity=identity,
                  replace_other=True, progress=progress)


def _base_errors(planner: Planner, database: Database,
                 settings: RunSettings) -> dict[str, Any]:
    """The per-option errors the searched coefficients scale. "auto": SPDY's prior on a grid
    of one family, the database's errors on a mixed one: the prior ranks options by
    sparsity alone, so 2:4 at 50% would count as worse than 64x64 blocks at 40% on every
    layer, and no coefficient could undo that."""
    families = {o.family for o in planner.options if o.pattern != "dense"}
    errors = settings.errors
    if errors == "auto":
        errors = "database" if len(families) > 1 else "prior"
        log.info("searching on %s errors (--errors auto: %s)", errors,
                 "one option family" if len(families) < 2 else f"{len(families)} option families")
    if errors == "prior":
        return planner.prior()
    return database.errors_by_layer(planner.layers, planner.options)



def _baselines(planner: Planner, database: Database, scorer: HeldOutScorer,
               settings: RunSettings, profile: Profile) -> dict[str, float | None]:
    """Held-out loss of the final profile and, at the same predicted budget, of the DP on
    the database's per-layer errors and of uniform sparsity (None: unreachable)."""
    target = profile.dense_total_ms / profile.budget_ms
    chosen = {name: profile.choices[name] for name in planner.layers}
    errors = database.errors_by_layer(planner.layers, planner.options)
    losses: dict[str, float | None] = {"spdy": scorer(chosen),
                                       "dp_database_errors": scorer(planner.choose(target,
                                                                                   errors))}
    uniform = uniform_choices(planner, target)
    losses["uniform"] = None if uniform is None else scorer(uniform)
    return losses


def uniform_choices(planner: Planner, speedup: float) -> dict[str, SparsityOption] | None:
    """Every searched layer at the least sparse option whose predicted time meets the
    target (a layer that cannot take it stays dense), or None when no option does."""
    budget = planner.table.dense_total_ms / speedup
    for column, option in sorted(enumerate(planner.options), key=lambda p: p[1].sparsity):
        times = planner.times[:, column]
        usable = [t if math.isfinite(t) else planner.times[i, 0] for i, t in enumerate(times)]
        if math.fsum([planner.fixed_ms, *usable]) <= budget:
            return {name: option if math.isfinite(times[i]) else SparsityOption.dense()
                    for i, name in enumerate(planner.layers)}
    return None


def _search_summary(result: SearchResult, loss: str) -> dict[str, Any]:
    return {"loss": loss, "score": result.score, "evaluations": result.evaluations,
            "candidates": result.candidates, "stopped": result.stopped,
            "seconds": round(result.seconds, 1), "improvements": len(result.history)}


def _export(backend: LatencyBackend, pruned: nn.Module, example: Any, profile: Profile,
            out: Path) -> dict[str, str]:
    from .deploy import save_pruned

    _remove(out, RESULTS)       # a killed export leaves no earlier run's files beside its own
    profile.save(out / "profile.json")
    outputs = {"profile": str(out / "profile.json"),
               "weights": str(save_pruned(pruned, out / "pruned.safetensors",
                                          profile=profile))}
    deployable = backend.export(pruned, example, profile, out)
    outputs["deployable"] = str(deployable)
    return outputs


# ---- report --------------------------------------------------------------------------------

def _write_report(report: RunReport, table: TimingTable, planner: Planner,
                  costs: Mapping[str, Any], out: Path) -> None:
    """report.json, report.md and report.png (the frontier under the searched costs and
    the chosen per-layer sparsity and times)."""
    from .jsonio import atomic_write_bytes
    from .plots import plot_profile

    if report.profile is not None:
        plot_profile(table, report.profile, planner.curve(costs),
                     planner.total_error(report.profile, costs), out / "report.png",
                     "total searched cost")
        report.outputs["plot"] = str(out / "report.png")
    report.outputs["report"] = str(out / "report.md")
    report.outputs["report_json"] = str(out / "report.json")
    save_json(out / "report.json", REPORT_FORMAT, REPORT_VERSION, report.to_json())
    atomic_write_bytes(out / "report.md", format_report(report).encode())


def format_report(report: RunReport) -> str:
    """The report as markdown: what was asked, predicted, measured, and at what quality."""
    p = report.profile
    lines = [f"# spdy-gpu run: {report.model} on {report.backend}, target "
             f"{report.target_speedup:g}x", "",
             "| | |", "|---|---|",
             f"| target speedup | {report.target_speedup:g}x |"]
    if p is not None:
        pruned = len(p.pruned_layers)
        lines += [f"| predicted | {p.predicted_speedup:.3f}x ({p.predicted_ms:.4g} ms vs "
                  f"{p.dense_total_ms:.4g} ms dense{', ESTIMATED' if p.estimated else ''}) |",
                  f"| layers pruned | {pruned} of {len(p.choices)} |"]
    m = report.measured
    kept = next((r for r in report.rounds if r.get("kept")), None)
    verdict = "" if kept is None else " (met)" if kept["met"] else " (**target not met**)"
    lines.append("| measured | " + ("not measured" if m is None else
                 f"**{m.speedup:.3f}x**{verdict} (dense {m.dense_ms:.4g} ms, spread "
                 f"{m.dense_spread_ms:.2g}; pruned {m.pruned_ms:.4g} ms, spread "
                 f"{m.pruned_spread_ms:.2g})") + " |")
    if report.rounds:
        lines += ["", "## Measured guarantee", "",
                  "| round | solved for | predicted | measured | dense ms | pruned ms | kept |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['solved_for']:.3f}x | {r['predicted_speedup']:.3f}x | "
                  f"{r['measured_speedup']:.3f}x | {r['dense_ms']:.4g} | {r['pruned_ms']:.4g} | "
                  f"{'yes' if r.get('kept') else ''} |" for r in report.rounds]
    if report.quality:
        lines += ["", "## Quality", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report.quality.items()]
    if report.held_out_loss:
        lines += ["", f"## Held-out loss ({report.search.get('loss', '')}, lower is better, "
                  "same predicted budget)", "", "| profile | loss |", "|---|---|"]
        lines += [f"| {k} | {'unreachable' if v is None else f'{v:.5g}'} |"
                  for k, v in report.held_out_loss.items()]
    lines += ["", "## Where the time went", "", "| stage | seconds | notes |", "|---|---|---|"]
    for name, stage in report.stages.items():
        notes = ", ".join(f"{k}: {v}" for k, v in stage.items() if k != "seconds")
        lines.append(f"| {name} | {stage['seconds']:.1f} | {notes} |")
    if report.search:
        lines += ["", "Search: " + ", ".join(f"{k} {v}" for k, v in report.search.items())]
    lines += [f"- {note}" for note in report.notes]
    lines += ["", "Outputs: " + ", ".join(f"{k} `{v}`" for k, v in report.outputs.items()), ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """`value` as plain JSON types (tuples to lists, numpy to floats)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))
