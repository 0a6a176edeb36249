"""From a timing table and a target speedup to a profile: the budget, fixed time and errors
around the pure DP of dp.py."""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Sequence

import numpy as np

from .dp import Frontier, dp_frontier
from .errors import InfeasibleTargetError, SpdyError
from .jsonio import load_json, require, save_json
from .options import SparsityOption
from .profile import Profile
from .timing import TimingTable

ERRORS_FORMAT, ERRORS_VERSION = "spdy-gpu/errors", 1


def prior_errors(options: Sequence[SparsityOption]) -> np.ndarray:
    """The reference's shared prior: (rank of the option by sparsity / (count - 1))^2, dense 0."""
    ranks = np.argsort(np.argsort([o.sparsity for o in options], kind="stable"), kind="stable")
    return (ranks / max(len(options) - 1, 1)) ** 2


def save_errors(path: str | os.PathLike, options: Sequence[SparsityOption],
                errors: dict[str, Sequence[float]]) -> None:
    """Per-layer, per-option errors for `spdy-gpu solve --errors`."""
    save_json(path, ERRORS_FORMAT, ERRORS_VERSION, {
        "options": [o.name for o in options],
        "layers": {name: [float(e) for e in row] for name, row in errors.items()}})


def load_errors(path: str | os.PathLike, table: TimingTable, layers: Sequence[str]) -> np.ndarray:
    """[len(layers), options] errors from a file written by save_errors, checked against `table`."""
    doc = load_json(path, ERRORS_FORMAT, ERRORS_VERSION)
    if require(doc, "options", list, path) != [o.name for o in table.options]:
        raise SpdyError(f"{path}: its options differ from the timing table's; "
                        "compute the errors for the table's option grid")
    rows = require(doc, "layers", dict, path)
    missing = [name for name in layers if name not in rows]
    if missing:
        raise SpdyError(f"{path}: no errors for layer {missing[0]!r} "
                        f"({len(missing)} layers missing); compute errors for every layer")
    try:
        errors = np.array([rows[name] for name in layers], dtype=np.float64)
    except (TypeError, ValueError):
        raise SpdyError(f"{path}: errors must be lists of numbers; regenerate the file") from None
    if errors.shape != (len(layers), len(table.options)):
        raise SpdyError(f"{path}: expected {len(table.options)} errors per layer; "
                        "regenerate the file for this table")
    return errors


def searched_layers(table: TimingTable, exclude: Sequence[str] = ()) -> tuple[list[int], list[int]]:
    """Indices of the layers the search may prune, and of those kept dense by `exclude`."""
    excluded = [i for i, name in enumerate(table.layer_names)
                if any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    return [i for i in range(len(table.layers)) if i not in excluded], excluded


def fixed_time(table: TimingTable, excluded: Sequence[int]) -> float:
    """Time the search cannot change: unattributed time plus excluded layers at dense."""
    return math.fsum([table.fixed_ms, *table.dense_times()[list(excluded)]])


def max_speedup(table: TimingTable, exclude: Sequence[str] = ()) -> float:
    """Speedup with every searched layer at its fastest option."""
    searched, excluded = searched_layers(table, exclude)
    fastest = table.times()[searched].min(axis=1)
    return table.dense_total_ms / math.fsum([fixed_time(table, excluded), *fastest])


def solve_frontier(table: TimingTable, speedup: float, errors: np.ndarray | None = None,
                   exclude: Sequence[str] = (), buckets: int = 10_000
                   ) -> tuple[Frontier, list[int], float]:
    """DP frontier over the searched layers: one pass answers `speedup` and every larger
    target (every smaller budget).

    errors: [searched layers, options]; None uses the prior for every layer.
    Returns (frontier, searched layer indices, fixed time).
    """
    if not (math.isfinite(speedup) and speedup > 0):
        raise SpdyError(f"target speedup {speedup} must be a finite number > 0, e.g. 1.5")
    searched, excluded = searched_layers(table, exclude)
    if not searched:
        raise SpdyError("every layer is excluded; loosen the --exclude patterns")
    fixed = fixed_time(table, excluded)
    if errors is None:
        errors = np.tile(prior_errors(table.options), (len(searched), 1))
    layer_budget = table.dense_total_ms / speedup - fixed
    best = max_speedup(table, exclude)
    if layer_budget <= 0:
        raise _infeasible(table, speedup, best, "the fixed time alone exceeds the budget")
    try:
        frontier = dp_frontier(errors, table.times()[searched], layer_budget, buckets)
    except InfeasibleTargetError:
        raise _infeasible(table, speedup, best,
                          "even every layer at its fastest option is too slow") from None
    return frontier, searched, fixed


def solve_profile(table: TimingTable, speedup: float, errors: np.ndarray | None = None,
                  exclude: Sequence[str] = (), buckets: int = 10_000) -> Profile:
    """The least-error profile whose predicted time is guaranteed <= dense time / speedup."""
    frontier, searched, fixed = solve_frontier(table, speedup, errors, exclude, buckets)
    return profile_from_picks(table, speedup, dict(zip(searched, frontier.solution())), fixed)


def frontier_curve(table: TimingTable, errors: np.ndarray | None = None,
                   exclude: Sequence[str] = (), buckets: int = 10_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(speedup, least total error), ascending, at every bucket of one DP pass from 1x (or
    the table's slowest choice) to the largest achievable speedup: the whole trade-off."""
    times = table.times()
    slowest_ms = table.fixed_ms + np.nanmax(np.where(np.isfinite(times), times, np.nan), 1).sum()
    slowest = table.dense_total_ms / slowest_ms
    frontier, _, fixed = solve_frontier(table, min(1.0, slowest), errors, exclude, buckets)
    reachable = np.isfinite(frontier.best_error)
    budgets = fixed + frontier.budget_ms(np.arange(frontier.buckets + 1))
    speedups = table.dense_total_ms / budgets[reachable]
    return speedups[::-1], frontier.best_error[reachable][::-1]      # ascending speedup


def profile_from_picks(table: TimingTable, speedup: float, picks: dict[int, int],
                       fixed: float) -> Profile:
    """A Profile for chosen option indices (searched layer index -> option index); the layers
    not in `picks` are the excluded ones and stay dense."""
    times = table.times()
    chosen = [picks.get(i, 0) for i in range(len(table.layers))]
    predicted = math.fsum([fixed, *(times[i, chosen[i]] for i in picks)])
    return Profile(
        model=table.model,
        choices={layer.name: table.options[o] for layer, o in zip(table.layers, chosen)},
        target_speedup=speedup,
        budget_ms=table.dense_total_ms / speedup,
        predicted_ms=predicted,
        dense_total_ms=table.dense_total_ms,
        fixed_ms=fixed,
        fingerprint=table.fingerprint,
        excluded=tuple(table.layer_names[i] for i in range(len(table.layers)) if i not in picks),
        estimated=table.estimated)


def _infeasible(table: TimingTable, speedup: float, best: float,
                why: str) -> InfeasibleTargetError:
    return InfeasibleTargetError(
        f"target speedup {speedup:g}x is infeasible ({why}); the largest achievable speedup "
        f"on this timing table is {best:.3f}x: ask for at most that",
        min_time=table.dense_total_ms / best, max_speedup=best)
