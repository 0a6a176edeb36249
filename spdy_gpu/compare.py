"""SPDY against the obvious alternatives, at equal predicted latency, each measured end to
end on the backend and scored by the model's own quality measures.

Per target, SPDY runs first (`pipeline.run`: search and measured guarantee); every other
method then gets the budget SPDY's guaranteed profile was solved for, so all methods are
predicted to run equally fast, and each is timed against the dense model in an interleaved
session of its own. Methods (reconstructed from the shared database unless "magnitude"):

- uniform: every layer at the least sparse level that meets the budget;
- global-magnitude: one magnitude threshold over all layers (each layer snapped to the
  nearest level), the lowest that meets the budget;
- dp-database-errors: the DP on the database's per-layer errors, no search;
- evolution: an EvoPress-style search (spdy_gpu.evolution) from the DP's profile, given as
  many evaluations as SPDY's search used;
- spdy, spdy+gap (global AdaPrune on top);
- uniform-magnitude, spdy-magnitude: those profiles with magnitude masks on the dense
  weights, no reconstruction (what reconstruction buys).

Results go to DIR/compare.{json,md,png}; every finished target is saved, so a rerun
resumes at the first unfinished one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .backends import Latency, LatencyBackend
from .errors import InfeasibleTargetError, SpdyError
from .evolution import EvolutionConfig, evolve
from .guarantee import measured_near_table
from .jsonio import atomic_write_bytes, changed_fields, load_json, save_json
from .locks import exclusive_directory
from .models import ModelEntry, ModelSetting
from .options import SparsityOption
from .pipeline import (
    GapSettings,
    RunSettings,
    calibration_split,
    masks_of,
    run,
    uniform_choices,
)
from .reconstruct import Database, global_adaprune_, stitch_
from .scoring import HeldOutScorer, held_out_scorer
from .solve import Planner
from .timing import TimingTable

log = logging.getLogger(__name__)

COMPARE_FORMAT, COMPARE_VERSION = "spdy-gpu/compare", 1
METHODS = ("uniform", "uniform-magnitude", "global-magnitude", "dp-database-errors",
           "evolution", "spdy", "spdy-magnitude", "spdy+gap")
RECONSTRUCTED = {"uniform", "global-magnitude", "dp-database-errors", "evolution", "spdy"}
NOT_RECONSTRUCTED = {"uniform-magnitude", "spdy-magnitude"}      # magnitude masks only

Choices = dict[str, SparsityOption]


@dataclass(frozen=True)
class CompareSettings:
    """The targets, and the run settings every SPDY run of the comparison uses (its
    `speedup` is replaced per target, gAP is this comparison's own `gap`)."""

    speedups: tuple[float, ...]
    run: RunSettings
    gap: GapSettings = GapSettings()
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        if not self.speedups:
            raise SpdyError("give at least one target speedup, e.g. --speedups 1.5 2 3")
        # each once (`--speedups 2 2` would run a target twice, list a method twice)
        object.__setattr__(self, "speedups", tuple(dict.fromkeys(self.speedups)))
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        for speedup in self.speedups:                  # each target's run checks it first
            dataclasses.replace(self.run, speedup=speedup)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SpdyError(f"unknown method {unknown[0]!r}; use some of {', '.join(METHODS)}")
        if "spdy" not in self.methods:
            raise SpdyError("the comparison needs the spdy method: every other method gets "
                            "the budget of SPDY's guaranteed profile")

    def identity(self) -> dict[str, Any]:
        return json_ready({"run": self.run.identity() | {"speedup": None},
                           "gap": dataclasses.asdict(self.gap), "methods": self.methods,
                           "timed": "each method against dense, in a session of its own"})


@dataclass
class CompareReport:
    model: str
    backend: str
    setting: dict[str, Any]
    targets: list[dict[str, Any]] = field(default_factory=list)   # one per finished target
    fingerprint: dict[str, Any] = field(default_factory=dict)     # where it is measured

    def to_json(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))


def compare(entry: ModelEntry, setting: ModelSetting, backend: LatencyBackend,
            settings: CompareSettings, out_dir: str | os.PathLike, *,
            progress: bool = True) -> CompareReport:
    """Every method at every target: measured speedup, quality and held-out loss. SPDY's
    runs go to DIR/spdy-<target>x (sharing DIR/timings.json and the database, by default
    DIR/database)."""
    if backend.estimated:
        raise SpdyError(f"compare times every method end to end, which an estimated "
                        f"{backend.name} backend cannot; run it where the backend measures "
                        "(without --estimate)")
    with exclusive_directory(out_dir, "comparison directory") as out:
        report = _resume(out, entry, backend, setting, settings)
        done = {t["target"] for t in report.targets}
        earlier = sorted(done - set(settings.speedups))
        if earlier:
            log.warning("the report also lists %s, compared earlier in %s (use another --out "
                        "for the new targets alone)", ", ".join(f"{t:g}x" for t in earlier), out)
        for target in settings.speedups:
            if target in done:
                log.info("target %gx: already compared, kept", target)
                continue
            report.targets.append(_compare_target(entry, setting, backend, settings, target,
                                                  out, progress))
            report.targets.sort(key=lambda t: t["target"])
            _save(report, settings, out)
        _save(report, settings, out)
        return report


def _resume(out: Path, entry: ModelEntry, backend: LatencyBackend, setting: ModelSetting,
            settings: CompareSettings) -> CompareReport:
    path = out / "compare.json"
    _, example = entry.build(setting)
    fresh = CompareReport(entry.name, backend.name, json_ready(dataclasses.asdict(setting)),
                          fingerprint=json_ready(dataclasses.asdict(
                              backend.fingerprint(example))))
    if not path.exists():
        return fresh
    doc = load_json(path, COMPARE_FORMAT, COMPARE_VERSION)
    keys = ("model", "backend", "setting", "fingerprint", "identity")
    stored = {key: doc.get(key) for key in keys}
    now = {"model": entry.name, "backend": backend.name, "setting": fresh.setting,
           "fingerprint": fresh.fingerprint, "identity": settings.identity()}
    changed = changed_fields(stored, now)
    if changed:
        raise SpdyError(f"{path} holds a comparison of other settings (differs in "
                        f"{', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); "
                        "choose another --out or delete it")
    return dataclasses.replace(fresh, targets=list(doc.get("targets", [])))


def _compare_target(entry: ModelEntry, setting: ModelSetting, backend: LatencyBackend,
                    settings: CompareSettings, target: float, out: Path,
                    progress: bool) -> dict[str, Any]:
    """One target: SPDY's run, then every other method at its budget, all measured."""
    run_dir = out / f"spdy-{target:g}x"
    shared_table = out / "timings.json"
    database_dir = settings.run.database or out / "database"
    run_settings = dataclasses.replace(
        settings.run, speedup=target, gap=None, overwrite=True, database=database_dir,
        timings=(shared_table, *settings.run.timings))
    model, example = entry.build(setting)
    try:
        spdy = run(entry, setting, backend, run_settings, run_dir, progress=progress)
    except InfeasibleTargetError as e:
        log.warning("target %gx: %s", target, e)
        _share_table(run_dir, shared_table)
        return {"target": target, "unreachable": True, "max_speedup": e.max_speedup}
    table = _share_table(run_dir, shared_table)
    planner = Planner(table, (*entry.exclude, *run_settings.exclude))
    database = Database.open(database_dir)
    fit, held_out = calibration_split(entry, setting, example, run_settings)
    scorer = held_out_scorer(model, held_out.batches, database,
                             run_settings.loss or entry.loss)
    budget_target = spdy.profile.dense_total_ms / spdy.profile.budget_ms
    choices = _method_choices(planner, model, database, scorer, spdy, budget_target,
                              settings, progress)
    models = {method: _pruned(model, picks, database if method in RECONSTRUCTED else None)
              for method, picks in choices.items() if picks is not None}
    if "spdy+gap" in settings.methods:
        models["spdy+gap"] = _with_gap(models["spdy"], model, choices["spdy"], fit.batches,
                                       settings.gap, progress)
        choices["spdy+gap"] = choices["spdy"]
    dense_latency, pairs = _time_against_dense(backend, model, models, example, target,
                                               table.dense_total_ms)
    rows = [_row("dense", None, planner, budget_target, dense_latency,
                 dense_latency.median_ms, entry.quality_of(model, model), 0.0)]
    for method in settings.methods:
        picks = choices.get(method)
        if picks is None:
            rows.append({"method": method, "unreachable": True,
                         "note": "no profile of this method meets the budget"})
            continue
        pruned, pair = models[method], pairs[method]
        rows.append(_row(method, picks, planner, budget_target, pair[method],
                         pair["dense"].median_ms, entry.quality_of(pruned, model),
                         scorer.loss_of(pruned)))
    return {"target": target, "solved_for": budget_target, "run_dir": str(run_dir),
            "spdy_measured_speedup": spdy.measured_speedup,
            "evaluations": spdy.search.get("evaluations"), "loss": scorer.loss_name,
            "rows": rows}


def _method_choices(planner: Planner, model: nn.Module, database: Database,
                    scorer: HeldOutScorer, spdy: Any, target: float,
                    settings: CompareSettings, progress: bool) -> dict[str, Choices | None]:
    """Each method's profile at the budget of `target` (None: none meets it)."""
    errors = database.errors_by_layer(planner.layers, planner.options)
    chosen: dict[str, Choices | None] = {
        "spdy": {name: spdy.profile.choices[name] for name in planner.layers}}
    chosen["spdy-magnitude"] = chosen["spdy"]
    chosen["uniform"] = chosen["uniform-magnitude"] = uniform_choices(planner, target)
    chosen["global-magnitude"] = global_magnitude_choices(planner, model, target)
    chosen["dp-database-errors"] = planner.choose(target, errors)
    if "evolution" in settings.methods:
        config = EvolutionConfig(seed=settings.run.search.seed,
                                 max_evaluations=max(1, int(spdy.search["evaluations"])))
        chosen["evolution"] = evolve(planner, target, scorer, chosen["dp-database-errors"],
                                     config=config, progress=progress).choices
    return {m: chosen[m] for m in settings.methods if m in chosen}


def global_magnitude_choices(planner: Planner, model: nn.Module,
                             speedup: float) -> Choices | None:
    """One magnitude threshold over every searched layer that can be pruned: each layer
    takes the level nearest the share of its weights under the threshold, and the lowest
    threshold whose profile's predicted time meets the target wins (None: none does)."""
    modules = dict(model.named_modules())
    prunable = [i for i, name in enumerate(planner.layers)
                if np.isfinite(planner.times[i, 1:]).any()]
    magnitudes = [np.sort(modules[planner.layers[i]].weight.detach().abs().flatten().numpy())
                  for i in prunable]
    pooled = np.sort(np.concatenate(magnitudes)) if magnitudes else np.zeros(0)
    for share in np.linspace(0.0, 0.995, 400):
        threshold = pooled[int(share * (len(pooled) - 1))] if len(pooled) else 0.0
        choices = {name: SparsityOption.dense() for name in planner.layers}
        for i, sorted_weights in zip(prunable, magnitudes):
            below = np.searchsorted(sorted_weights, threshold) / len(sorted_weights)
            choices[planner.layers[i]] = _nearest_level(planner, i, below)
        if not planner.profile(speedup, choices).over_budget:
            return choices
    return None


def _nearest_level(planner: Planner, row: int, sparsity: float) -> SparsityOption:
    usable = [o for j, o in enumerate(planner.options) if math.isfinite(planner.times[row, j])]
    return min(usable, key=lambda o: (abs(o.sparsity - sparsity), o.sparsity))


def _pruned(dense: nn.Module, choices: Choices, database: Database | None) -> nn.Module:
    model = copy.deepcopy(dense)
    stitch_(model, choices, database)
    return model


def _with_gap(pruned: nn.Module, dense: nn.Module, choices: Choices, batches: Sequence[Any],
              gap: GapSettings, progress: bool) -> nn.Module:
    model = copy.deepcopy(pruned)
    masks = masks_of(model, choices)
    if not masks:                               # nothing pruned: gAP would change nothing
        return model
    global_adaprune_(model, dense, masks, batches, lr=gap.lr,
                     epochs=gap.epochs, patience=gap.patience, only_pruned=gap.only_pruned,
                     progress=progress)
    return model


def _time_against_dense(backend: LatencyBackend, dense: nn.Module,
                        models: Mapping[str, nn.Module], example: Any, target: float,
                        table_dense_ms: float
                        ) -> tuple[Latency, dict[str, dict[str, Latency]]]:
    """Each pruned model timed against the dense one in a session of their own (interleaved,
    as the run's guarantee times them): a session of many models ran every model slower
    here (DeepSparse b16, nine models: dense 8.8-9.1 ms against 7.8 ms in pairs). A session
    whose dense time is far off the table's (a backend in a slow state, which slows sparse
    kernels more) is run once more and the one closer to the table kept, as the guarantee
    does. Returns the dense model's latency over the sessions (median of their medians,
    spread across them) and each method's pair."""
    pairs = {}
    for i, (method, pruned) in enumerate(models.items(), 1):
        log.info("target %gx: timing %s against dense (%d of %d)", target, method, i,
                 len(models))
        pairs[method], taken = measured_near_table(
            partial(backend.latency, {"dense": dense, method: pruned}, example),
            lambda pair: pair["dense"].median_ms, table_dense_ms)
        if len(taken) > 1:
            log.info("dense measured %.4g ms against the table's %.4g ms: timed %s again",
                     taken[0]["dense"].median_ms, table_dense_ms, method)
    dense_ms = [pair["dense"].median_ms for pair in pairs.values()]
    if not dense_ms:                                 # no method met the budget
        return backend.latency({"dense": dense}, example)["dense"], pairs
    return Latency(float(np.median(dense_ms)), max(dense_ms) - min(dense_ms),
                   tuple(dense_ms)), pairs


def _row(method: str, choices: Choices | None, planner: Planner, target: float,
         latency: Any, dense_ms: float, quality: Mapping[str, float],
         loss: float) -> dict[str, Any]:
    predicted = 1.0 if choices is None else planner.profile(target, choices).predicted_speedup
    sparsities = [o.sparsity for o in (choices or {}).values()]
    return {"method": method, "predicted_speedup": predicted,
            "measured_speedup": dense_ms / latency.median_ms, "ms": latency.median_ms,
            "spread_ms": latency.spread_ms, "dense_ms": dense_ms, "quality": dict(quality),
            "held_out_loss": loss,
            "layers_pruned": sum(s > 0 for s in sparsities),
            "mean_sparsity": float(np.mean(sparsities)) if sparsities else 0.0}


# ---- outputs ---------------------------------------------------------------------------

def _share_table(run_dir: Path, shared: Path) -> TimingTable:
    """The first target's table, measured by its run, serves every later target (an
    unreachable target's too: each would measure its own and name another largest speedup)."""
    table = TimingTable.load(run_dir / "timings.json")
    if not shared.exists():
        table.save(shared)
    return table


def _save(report: CompareReport, settings: CompareSettings, out: Path) -> None:
    from .plots import plot_comparison

    save_json(out / "compare.json", COMPARE_FORMAT, COMPARE_VERSION,
              {**report.to_json(), "identity": settings.identity(),
               "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    atomic_write_bytes(out / "compare.md", format_comparison(report).encode())
    if any(not t.get("unreachable") for t in report.targets):
        plot_comparison(report.to_json(), out / "compare.png")


def headline_metric(report: Mapping[str, Any]) -> str:
    """The measure a comparison is plotted by: the first quality measure the model
    reports, else the held-out loss."""
    for target in report["targets"]:
        for row in target.get("rows", []):
            if row.get("quality"):
                return next(iter(row["quality"]))
    return "held_out_loss"


def metric_of(row: Mapping[str, Any], metric: str) -> float | None:
    if row.get("unreachable"):
        return None
    return row["held_out_loss"] if metric == "held_out_loss" else row["quality"].get(metric)


def format_comparison(report: CompareReport) -> str:
    doc = report.to_json()
    lines = [f"# spdy-gpu compare: {report.model} on {report.backend}", ""]
    for target in doc["targets"]:
        if target.get("unreachable"):
            lines += [f"## {target['target']:g}x: unreachable (largest reachable "
                      f"{target['max_speedup']:.3f}x)", ""]
            continue
        metrics = _metric_names(target)
        lines += [f"## {target['target']:g}x (every method solved for "
                  f"{target['solved_for']:.3f}x, SPDY's guaranteed budget; evolution given "
                  f"{target['evaluations']} evaluations like SPDY; loss: {target['loss']})", "",
                  _table_row(["method", "predicted", "measured (spread ms)", *metrics,
                              "held-out loss", "layers pruned", "mean sparsity"]),
                  "|---" * (6 + len(metrics)) + "|"]
        for row in target["rows"]:
            if row.get("unreachable"):
                lines.append(_table_row([row["method"], "unreachable", "",
                                         *("" for _ in metrics), "", "", ""]))
                continue
            lines.append(_table_row([
                row["method"], f"{row['predicted_speedup']:.3f}x",
                f"{row['measured_speedup']:.3f}x ({row['spread_ms']:.2g})",
                *(_number(row["quality"].get(m)) for m in metrics),
                f"{row['held_out_loss']:.4g}", str(row["layers_pruned"]),
                f"{row['mean_sparsity']:.2f}"]))
        lines.append("")
    return "\n".join(lines)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _metric_names(target: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for row in target["rows"]:
        names += [k for k in row.get("quality", {}) if k not in names]
    return names


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def json_ready(value: Any) -> Any:
    import json
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))
