"""The measured guarantee: the searched profile timed against dense on the backend, and
re-solved with the searched costs until the measured speedup meets the target.

Every round is saved (guarantee.json) as soon as it is measured: a rerun replays the rounds
an interruption left instead of measuring them again, and keeps the profile of a finished
guarantee (spdy-gpu verify re-measures it).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from torch import nn

from .backends import LatencyBackend
from .errors import SpdyError
from .jsonio import is_number, load_json, save_json
from .profile import Profile, choices_digest
from .reconstruct import Database, stitch_
from .solve import Planner
from .timing import TimingTable

if TYPE_CHECKING:
    from .pipeline import RunReport, RunSettings

log = logging.getLogger(__name__)

GUARANTEE_FORMAT, GUARANTEE_VERSION = "spdy-gpu/guarantee", 1
OVERSHOOT = 0.05        # measured above target by more than this: the budget is loosened
DENSE_DRIFT = 0.15      # measured dense slower than the table by more than this: suspect
T = TypeVar("T")


@dataclass(frozen=True)
class Measurement:
    """Dense against pruned, end to end, measured in one interleaved session."""

    dense_ms: float
    dense_spread_ms: float
    pruned_ms: float
    pruned_spread_ms: float
    slow_engines: int = 0           # engines left out as settled in a slow state

    def __post_init__(self) -> None:
        times = (self.dense_ms, self.pruned_ms)
        spreads = (self.dense_spread_ms, self.pruned_spread_ms)
        if not (all(_finite_number(t) and t > 0 for t in times)
                and all(_finite_number(s) and s >= 0 for s in spreads)
                and isinstance(self.slow_engines, numbers.Integral) and self.slow_engines >= 0):
            raise SpdyError(f"a measurement needs finite times > 0 and spreads >= 0, got "
                            f"{times} ms (spreads {spreads}, {self.slow_engines!r} slow "
                            "engines)")

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.pruned_ms

    @property
    def noisy(self) -> bool:
        """Rounds spread wider than their median (one took over twice as long as the
        median): something else ran on the machine meanwhile."""
        return self.dense_spread_ms > self.dense_ms or self.pruned_spread_ms > self.pruned_ms

    def describe(self) -> str:
        return (f"dense {self.dense_ms:.4g} ms (spread {self.dense_spread_ms:.4g}), pruned "
                f"{self.pruned_ms:.4g} ms (spread {self.pruned_spread_ms:.4g})")


def _finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def measure_speedup(backend: LatencyBackend, dense: nn.Module, pruned: nn.Module,
                    example: Any) -> Measurement:
    """Time the dense and the pruned model on the backend, interleaved."""
    result = backend.latency({"dense": dense, "pruned": pruned}, example)
    d, p = result["dense"], result["pruned"]
    return Measurement(d.median_ms, d.spread_ms, p.median_ms, p.spread_ms,
                       d.slow_engines + p.slow_engines)


def guaranteed_profile(backend: LatencyBackend, planner: Planner, database: Database,
                       costs: Mapping[str, Any], dense: nn.Module, example: Any,
                       settings: RunSettings, report: RunReport, path: Path,
                       note: dict[str, Any]) -> tuple[Profile, nn.Module]:
    """The profile `_guarantee` keeps and its pruned model, resumed from the guarantee saved
    at `path` where it belongs to this very search; its rounds go to `report`."""
    saved = _saved_guarantee(planner, costs, settings, path)
    profile, pruned = _kept_guarantee(planner, database, costs, dense, settings, report,
                                      saved, note)
    if profile is None:
        earlier_notes = len(report.notes)
        measured_before, notes_before = _interrupted_guarantee(saved)
        report.notes.extend(notes_before)

        def save(complete: bool = False) -> None:     # after every round: resumable
            _save_guarantee(planner, costs, settings, report.rounds,
                            report.notes[earlier_notes:], path, complete)

        profile, pruned = _guarantee(backend, planner, database, costs, dense, example,
                                     settings, report, measured_before=measured_before,
                                     after_round=save)
        save(complete=True)
        if measured_before:
            note["resumed"] = True
    return profile, pruned


def _guarantee(backend: LatencyBackend, planner: Planner, database: Database,
               costs: Mapping[str, Any], dense: nn.Module, example: Any,
               settings: RunSettings, report: RunReport, *,
               measured_before: Sequence[dict[str, Any]] = (),
               after_round: Callable[[], None] = lambda: None) -> tuple[Profile, nn.Module]:
    """Measure the searched profile against dense and re-solve (with the searched costs)
    until the measured speedup lies in [target * (1 - tolerance), target * (1 + OVERSHOOT)]
    or the rounds run out: a shortfall tightens the budget by the measured gap, an
    overshoot (quality given away) loosens it, and once both are known the next target is
    interpolated between them. Returns the last round that met the target (else the last
    round, with a note) and its pruned model; its round is marked "kept". The rounds of
    `measured_before` (an interrupted guarantee's) stand in for measurements while they
    measured the budget and profile this one reaches; `after_round()` saves each round."""
    target, solve_for = settings.speedup, settings.speedup
    replay = list(measured_before)                 # an interrupted guarantee's rounds
    short: tuple[float, float] | None = None       # (solved for, measured) falling short
    over: tuple[float, float] | None = None        # ... overshooting
    accepted = None
    for round_ in range(1, settings.max_rounds + 1):
        profile = dataclasses.replace(planner.solve(solve_for, costs), target_speedup=target)
        if accepted is not None and profile.choices == accepted[0].choices:
            # the loosened budget picks the same profile: the overshoot is the grid's step
            report.notes.append(f"the profile measured {accepted[2].speedup:.3f}x, above the "
                                f"target; a looser budget picks the same profile, so it stays")
            break
        if accepted is not None and not profile.pruned_layers:
            # dense against dense measures only noise: an overshoot so large that the
            # loosened budget prunes nothing keeps the profile that overshot
            report.notes.append(f"the profile measured {accepted[2].speedup:.3f}x, above the "
                                "target; a looser budget prunes no layer, so it stays")
            break
        pruned = copy.deepcopy(dense)
        stitch_(pruned, profile.choices, database)
        if planner.table.estimated:
            report.notes.append("the timing table is ESTIMATED: the speedup was not measured")
            return profile, pruned
        earlier = replay.pop(0) if replay else None
        if (earlier is not None and earlier["solved_for"] == solve_for
                and earlier.get("choices_sha256") == choices_digest(profile.choices)):
            measured = _measurement_of(earlier)
            log.info("round %d: measured %.3fx before the interruption, reused", round_,
                     measured.speedup)
        else:                           # (the rounds after a different one are not replayed)
            replay.clear()
            measured = _measure_checked(backend, dense, pruned, example, planner.table, report)
        met = measured.speedup >= target * (1 - settings.tolerance)
        slow = dense_off_table(measured.dense_ms, planner.table.dense_total_ms)
        report.rounds.append({"round": round_, "solved_for": solve_for,
                              "choices_sha256": choices_digest(profile.choices),
                              "predicted_speedup": profile.predicted_speedup,
                              **dataclasses.asdict(measured),
                              "measured_speedup": measured.speedup, "met": met,
                              "machine_slow": slow})
        after_round()
        log.info("round %d: predicted %.3fx, measured %.3fx (target %gx)", round_,
                 profile.predicted_speedup, measured.speedup, target)
        if slow and not met:
            # Sparse kernels suffer more than dense ones in DeepSparse's slow state
            # (measured: dense +21%, pruned +50%): re-solving on it would over-prune, so
            # the next round measures the same budget again on fresh engines.
            continue
        if met:
            accepted = (profile, pruned, measured, len(report.rounds) - 1)
            if measured.speedup <= target * (1 + OVERSHOOT):
                break
            over = (solve_for, measured.speedup)
        else:
            short = (solve_for, measured.speedup)
        tried = solve_for
        solve_for = _next_target(target, profile.predicted_speedup, measured.speedup, short,
                                 over)
        fastest = planner.largest_target
        if solve_for > fastest:
            if tried >= fastest:
                report.notes.append(f"the table cannot plan beyond {planner.max_speedup:.3f}x, "
                                    "so the budget cannot be tightened further")
                break
            solve_for = fastest                 # the fastest profile the table plans, once
    else:                                       # the rounds ran out
        if accepted is not None and accepted[2].speedup > target * (1 + OVERSHOOT):
            report.notes.append(f"measured {accepted[2].speedup:.3f}x is above the target "
                                f"{target:g}x by more than {OVERSHOOT:.0%} after "
                                f"{len(report.rounds)} rounds (quality given away); more "
                                "--max-rounds may loosen the budget")
    if accepted is None and report.rounds[-1]["machine_slow"]:
        report.notes.append("the backend ran in a slow state (dense far slower than the "
                            "table) in the last round; the budget was not tightened on it: "
                            "run spdy-gpu verify on this profile later")
    if accepted is None:
        report.notes.append(f"measured {measured.speedup:.3f}x is below the target {target:g}x "
                            f"by more than {settings.tolerance:.0%} after {len(report.rounds)}"
                            " rounds")
        accepted = (profile, pruned, measured, len(report.rounds) - 1)
    profile, pruned, report.measured, kept = accepted
    report.rounds[kept]["kept"] = True
    report.notes.extend(_suspicions(report.measured, planner.table.dense_total_ms))
    return profile, pruned


def _suspicions(measured: Measurement, table_dense_ms: float) -> list[str]:
    """Notes on a kept measurement that a busy machine may have skewed."""
    notes = []
    if measured.noisy:
        notes.append(f"the kept round's timings spread wider than their median "
                     f"({measured.describe()}): the machine was busy, so its speedup is "
                     "suspect; run spdy-gpu verify on this profile with nothing else running")
    if measured.dense_ms * (1 + DENSE_DRIFT) < table_dense_ms:
        notes.append(f"dense ran {measured.dense_ms:.4g} ms in the kept round, far faster "
                     f"than the table's {table_dense_ms:.4g} ms: the table or this round was "
                     "timed on a busy machine; measure the table again with nothing else "
                     "running")
    return notes


def _guarantee_key(planner: Planner, costs: Mapping[str, Any],
                   settings: RunSettings) -> str:
    """A digest of what the guarantee's rounds depend on besides the measurements: the
    table's times, the searched costs, the target and the rules."""
    described = json.dumps({
        **planner.identity(),
        "costs": {name: [float(c) for c in costs[name]] for name in planner.layers},
        "speedup": settings.speedup, "tolerance": settings.tolerance,
        "max_rounds": settings.max_rounds}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()


def _save_guarantee(planner: Planner, costs: Mapping[str, Any], settings: RunSettings,
                    rounds: list[dict[str, Any]], notes: list[str], path: Path,
                    complete: bool) -> None:
    """The measured rounds and the guarantee's notes: once `complete`, a rerun (after a kill
    in gAP or the export, say) keeps the profile they chose instead of measuring again
    (spdy-gpu verify re-measures); before, a rerun keeps the rounds measured so far."""
    if rounds:                                          # estimated tables measure nothing
        save_json(path, GUARANTEE_FORMAT, GUARANTEE_VERSION, {
            "key": _guarantee_key(planner, costs, settings), "rounds": rounds,
            "notes": notes, "complete": complete})


def _saved_guarantee(planner: Planner, costs: Mapping[str, Any], settings: RunSettings,
                     path: Path) -> dict[str, Any] | None:
    """guarantee.json as written for this very search (same key), its rounds and notes
    checked, with its `path`; None where there is none, it is of other work, or damaged
    (with a warning)."""
    if not path.exists():
        return None
    try:
        doc = load_json(path, GUARANTEE_FORMAT, GUARANTEE_VERSION)
        doc["rounds"] = _checked_rounds(doc["rounds"], settings, planner.table.dense_total_ms,
                                        complete=doc.get("complete", True))
        doc["notes"] = [str(n) for n in doc.get("notes", [])]
    except (SpdyError, KeyError, TypeError, AttributeError) as e:
        log.warning("not reusing %s: it is damaged (%s)", path, e)
        return None
    if doc.get("key") != _guarantee_key(planner, costs, settings):
        return None
    return doc | {"path": path}


def _interrupted_guarantee(saved: dict[str, Any] | None
                           ) -> tuple[list[dict[str, Any]], list[str]]:
    """The rounds and notes of a saved guarantee that was interrupted (complete: false),
    for `_guarantee` to replay instead of measuring them again."""
    if saved is None or saved.get("complete", True):
        return [], []
    log.info("resuming the guarantee after %d measured rounds (%s)", len(saved["rounds"]),
             saved["path"])
    return saved["rounds"], saved["notes"]


def _kept_guarantee(planner: Planner, database: Database, costs: Mapping[str, Any],
                    dense: nn.Module, settings: RunSettings, report: RunReport,
                    saved: dict[str, Any] | None,
                    note: dict[str, Any]) -> tuple[Profile | None, nn.Module | None]:
    """The profile and pruned model of a saved, finished guarantee, re-solved from its kept
    round (the DP is exact and deterministic), or (None, None)."""
    if saved is None or not saved.get("complete", True):   # interrupted: rounds replayed
        return None, None
    path = saved["path"]
    kept = next(r for r in saved["rounds"] if r.get("kept"))     # one (_checked_rounds)
    profile = dataclasses.replace(planner.solve(kept["solved_for"], costs),
                                  target_speedup=settings.speedup)
    if "choices_sha256" not in kept:
        log.warning("not reusing %s: written by an older spdy-gpu (its rounds do not say "
                    "which profile they measured); measuring again", path)
        return None, None
    if choices_digest(profile.choices) != kept["choices_sha256"]:
        log.warning("not reusing %s: its kept round measured another profile than the one "
                    "it re-solves to (edited?); measuring again", path)
        return None, None
    if not profile.pruned_layers:       # kept by an older spdy-gpu: dense against dense
        log.warning("not reusing %s: its kept round prunes no layer, so its speedup is "
                    "noise; measuring again", path)
        return None, None
    pruned = copy.deepcopy(dense)
    stitch_(pruned, profile.choices, database)
    report.rounds, report.measured = saved["rounds"], _measurement_of(kept)
    report.notes.extend(saved["notes"])
    note["reused"] = str(path)
    log.info("keeping the measured guarantee of %s: %.3fx (spdy-gpu verify re-measures)",
             path, report.measured.speedup)
    return profile, pruned


def _measurement_of(round_: Mapping[str, Any]) -> Measurement:
    """The Measurement a saved round records (checked by Measurement itself)."""
    return Measurement(**{f.name: round_[f.name] for f in dataclasses.fields(Measurement)})


def _checked_rounds(rounds: Any, settings: RunSettings, table_dense_ms: float,
                    complete: bool) -> list[dict[str, Any]]:
    """A guarantee.json's rounds, refused (SpdyError) where a number the report prints is
    not a finite number > 0, or a measured speedup is not its dense / pruned time, or
    'met' and 'machine_slow' are not what the rules make of the measurement, or (complete)
    the round marked kept is not the one _guarantee keeps: the last that met, else the
    last."""
    if not isinstance(rounds, list) or not rounds:
        raise SpdyError("it holds no rounds")
    for r in rounds:
        for key in ("solved_for", "predicted_speedup", "measured_speedup", "dense_ms",
                    "pruned_ms"):
            if not (_finite_number(r.get(key)) and r[key] > 0):
                raise SpdyError(f"round {r.get('round')!r}: {key} {r.get(key)!r} is not a "
                                "finite number > 0")
        _measurement_of(r)              # its spreads and slow engines too
        if not math.isclose(r["measured_speedup"], r["dense_ms"] / r["pruned_ms"],
                            rel_tol=1e-9):
            raise SpdyError(f"round {r.get('round')!r}: measured_speedup is not dense_ms / "
                            "pruned_ms")
        met = r["measured_speedup"] >= settings.speedup * (1 - settings.tolerance)
        slow = dense_off_table(r["dense_ms"], table_dense_ms)
        if r.get("met") is not met or r.get("machine_slow") is not slow:
            raise SpdyError(f"round {r.get('round')!r}: its met / machine_slow flags are not "
                            "what its measurement gives")
    marked = [r for r in rounds if r.get("kept")]
    if complete and marked != [([r for r in rounds if r["met"]] or rounds)[-1]]:
        raise SpdyError("the round marked kept is not the last one that met the target "
                        "(else the last round)")
    return rounds



def dense_off_table(dense_ms: float, table_dense_ms: float) -> bool:
    """Dense ran far slower than the table says: the backend is likely in a slow state."""
    return dense_ms > table_dense_ms * (1 + DENSE_DRIFT)


def measured_near_table(measure: Callable[[], T], dense_ms: Callable[[T], float],
                        table_dense_ms: float) -> tuple[T, list[T]]:
    """measure(), and once more when its dense time is far off the table's (a speedup
    measured with the backend in a slow state is off too): the measurement whose dense time
    is closer to the table's, and every one taken."""
    taken = [measure()]
    if dense_off_table(dense_ms(taken[0]), table_dense_ms):
        taken.append(measure())
    return min(taken, key=lambda m: abs(dense_ms(m) - table_dense_ms)), taken


def _next_target(target: float, predicted: float, measured: float,
                 short: tuple[float, float] | None,
                 over: tuple[float, float] | None) -> float:
    """The speedup to solve for next: between a shortfall and an overshoot, where the line
    through them meets the target; otherwise the target scaled by the table's error on the
    last profile (predicted / measured). Not the solved-for target: a coarse grid's profile
    can predict far above it (solved 2x, predicted 5.49x, measured 5.24x), and scaling that
    by the overshoot would solve for 0.76x."""
    if short is not None and over is not None and over[1] > short[1]:
        return short[0] + (target - short[1]) * (over[0] - short[0]) / (over[1] - short[1])
    return target * predicted / measured


def _measure_checked(backend: LatencyBackend, dense: nn.Module, pruned: nn.Module,
                     example: Any, table: TimingTable, report: RunReport) -> Measurement:
    """measure_speedup, once more when the dense model measured far slower than the table
    says (every dense engine settled in a slow state would inflate the speedup); of the
    two, the measurement whose dense time is closer to the table's is kept."""
    measured, taken = measured_near_table(
        lambda: measure_speedup(backend, dense, pruned, example), lambda m: m.dense_ms,
        table.dense_total_ms)
    if len(taken) > 1:
        report.notes.append(f"dense measured {taken[0].dense_ms:.4g} ms against the table's "
                            f"{table.dense_total_ms:.4g} ms: measured again "
                            f"({taken[1].dense_ms:.4g} ms)")
    return measured
