"""From a timing table and a target speedup to a profile: the budget, fixed time and errors
around the pure DP of dp.py.

A `Planner` is built once per (timing table, excluded layers) and then solves any number of
error sets and targets; the search calls it for every candidate. Errors are always keyed by
layer name, so they can never pair with the wrong row of a table.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .dp import Frontier, TimeGrid
from .errors import InfeasibleTargetError, SpdyError
from .jsonio import is_number, load_json, require, save_json
from .layers import exclude_patterns
from .options import SparsityOption
from .profile import Profile
from .timing import TimingTable

ERRORS_FORMAT, ERRORS_VERSION = "spdy-gpu/errors", 1

LayerErrors = Mapping[str, Sequence[float]]     # layer name -> error per option of the table


def prior_errors(options: Sequence[SparsityOption]) -> np.ndarray:
    """The reference's shared prior: (rank of the option by sparsity / (count - 1))^2, dense 0."""
    ranks = np.argsort(np.argsort([o.sparsity for o in options], kind="stable"), kind="stable")
    return (ranks / max(len(options) - 1, 1)) ** 2


def check_target(speedup: Any) -> float:
    """A target speedup a user may ask for: a finite number of at least 1 (below 1 the dense
    model already meets it). The library's Planner takes any target > 0 (budget arithmetic
    of the guarantee and the baselines: positive_target)."""
    speedup = positive_target(speedup)
    if speedup < 1:
        raise SpdyError(f"target speedup {speedup:g}x is below 1x: the dense model already "
                        "meets it; ask for a speedup of at least 1")
    return speedup


def positive_target(speedup: Any) -> float:
    """A target speedup the DP can budget for: a finite number > 0."""
    if not (is_number(speedup) and math.isfinite(speedup) and speedup > 0):
        raise SpdyError(f"target speedup {speedup!r} must be a finite number > 0, e.g. 2.0")
    return float(speedup)


class Planner:
    """Solves SPDY's DP on one timing table with some layers kept dense.

    Budget for target x: dense_total / x; the searched layers get that minus the fixed time
    (the table's unattributed time plus the dense time of excluded layers). The bucketed
    time grid of each target is built once and reused for every error set.
    """

    def __init__(self, table: TimingTable | str | os.PathLike, exclude: str | Sequence[str] = (),
                 buckets: int = 10_000):
        if isinstance(table, (str, os.PathLike)):
            table = TimingTable.load(table)
        if not isinstance(table, TimingTable):
            raise SpdyError(f"a Planner plans on a TimingTable (or its file), not "
                            f"{type(table).__name__}")
        exclude = exclude_patterns(exclude)
        # A TimingTable always has layers and a positive dense total (TimingTable.validate).
        excluded = [name for name in table.layer_names
                    if any(fnmatch.fnmatchcase(name, p) for p in exclude)]
        if len(excluded) == len(table.layers):
            raise SpdyError("every layer is excluded; loosen the --exclude patterns")
        self.table = table
        self.exclude = tuple(exclude)
        self.buckets = buckets
        self.excluded = tuple(excluded)
        rows = [i for i, name in enumerate(table.layer_names) if name not in excluded]
        self.layers = tuple(table.layer_names[i] for i in rows)
        times = table.times()
        self.times = times[rows]                                   # [searched, options]
        self.fixed_ms = math.fsum([table.fixed_ms, *times[[i for i in range(len(times))
                                                             if i not in rows], 0]])
        self.min_time_ms = math.fsum([self.fixed_ms, *self.times.min(axis=1)])
        self._grids: dict[float, TimeGrid] = {}

    @property
    def options(self) -> tuple[SparsityOption, ...]:
        return self.table.options

    def identity(self) -> dict[str, Any]:
        """What the DP solves on, for the keys of saved work derived from it (the search's
        state, the guarantee's rounds): the table's model, setting, layers, options, the
        searched layers' times and the fixed time."""
        return {"model": self.table.model,
                "fingerprint": dataclasses.asdict(self.table.fingerprint),
                "layers": list(self.layers), "options": [o.name for o in self.options],
                "times": self.times.tolist(), "fixed_ms": self.fixed_ms}

    @property
    def max_speedup(self) -> float:
        """Speedup with every searched layer at its fastest option."""
        return self.table.dense_total_ms / self.min_time_ms

    @property
    def largest_target(self) -> float:
        """max_speedup rounded down to 0.001: the largest target that asking for works (the
        DP's buckets round each layer's time up, so the exact maximum may not fit them)."""
        return math.floor(self.max_speedup * 1000) / 1000

    def prior(self) -> dict[str, np.ndarray]:
        """SPDY's shared prior for every searched layer."""
        row = prior_errors(self.options)
        return {name: row for name in self.layers}

    def error_matrix(self, errors: LayerErrors | None) -> np.ndarray:
        """[searched layers, options] from errors keyed by layer name (None: the prior)."""
        if errors is None:
            errors = self.prior()
        if not isinstance(errors, Mapping):
            raise SpdyError("errors must be keyed by layer name ({layer: [error per option]}), "
                            "not given by position")
        # Errors of excluded layers are ignored (they stay dense); unknown names are refused.
        extra = [name for name in errors if name not in self.layers + self.excluded]
        missing = [name for name in self.layers if name not in errors]
        if missing:
            raise SpdyError(f"no errors for layer {missing[0]!r} ({len(missing)} layers "
                            "missing); give errors for every searched layer of the table")
        if extra:
            raise SpdyError(f"errors given for layer {extra[0]!r}, which is not in the timing "
                            "table; the errors belong to another model or table")
        try:
            rows = [np.asarray(errors[name]) for name in self.layers]
            if any(row.dtype.kind not in "iuf" for row in rows):   # (strings, objects, bools)
                raise TypeError
            rows = [row.astype(np.float64) for row in rows]
        except (TypeError, ValueError, OverflowError):
            raise SpdyError("errors must be lists of numbers, one per option of the "
                            "table") from None
        if any(row.shape != (len(self.options),) for row in rows):
            raise SpdyError(f"expected {len(self.options)} errors per layer (one per option "
                            "of the timing table); compute errors for the table's grid")
        # An option a layer cannot run (infinite time) is never chosen: its error does not
        # count (a database has none: inf) and is stored as 0.
        matrix = np.where(np.isfinite(self.times), np.stack(rows), 0.0)
        if not np.isfinite(matrix).all() or (matrix < 0).any():
            raise SpdyError("errors must be finite and >= 0 where the timing table can run "
                            "the option (a NaN, inf or negative error would steer the DP "
                            "arbitrarily); recompute them")
        return matrix

    def grid(self, speedup: float) -> TimeGrid:
        """The bucketed time side of the DP for a target (cached)."""
        speedup = positive_target(speedup)
        if speedup not in self._grids:
            layer_budget = self.table.dense_total_ms / speedup - self.fixed_ms
            if layer_budget <= 0:
                raise self._infeasible(speedup, "the fixed time alone exceeds the budget")
            try:
                self._grids[speedup] = TimeGrid.build(self.times, layer_budget, self.buckets)
            except InfeasibleTargetError:
                raise self._infeasible(
                    speedup, "even every layer at its fastest option is too slow") from None
        return self._grids[speedup]

    def frontier(self, speedup: float, errors: LayerErrors | None = None) -> Frontier:
        """The DP frontier for `speedup`: it answers every larger target too."""
        return self.grid(speedup).frontier(self.error_matrix(errors))

    def choose(self, speedup: float, errors: LayerErrors | None = None,
               matrix: np.ndarray | None = None) -> dict[str, SparsityOption]:
        """Chosen option per searched layer. `matrix` (from error_matrix) skips the name
        check in hot loops that already hold a checked matrix."""
        matrix = self.error_matrix(errors) if matrix is None else matrix
        # 1x or less is met by the dense model, even where a table's parts add up to a bit
        # more than its measured whole (separate measurements)
        if positive_target(speedup) <= 1:
            return {name: SparsityOption.dense() for name in self.layers}
        grid = self.grid(speedup)
        # Every layer at its least-error option is optimal when it fits; checked on exact
        # times, since the DP's buckets round each layer's time up and can miss an exact fit
        # (all dense at 1x on a table whose layers and fixed time add up to the dense time).
        picks = matrix.argmin(axis=1)
        rows = np.arange(len(self.layers))
        if math.fsum([self.fixed_ms, *self.times[rows, picks]]) > \
                self.table.dense_total_ms / speedup:
            picks = grid.solve(matrix)
        return {name: self.options[p] for name, p in zip(self.layers, picks)}

    def solve(self, speedup: float, errors: LayerErrors | None = None) -> Profile:
        """The least-error profile whose predicted time is guaranteed <= dense / speedup."""
        return self.profile(speedup, self.choose(speedup, errors))

    def profile(self, speedup: float,
                choices: Mapping[str, SparsityOption | str]) -> Profile:
        """A Profile for chosen options (or their names) of searched layers: layers left out,
        and excluded layers, stay dense. Choices need not fit the budget: a profile over it
        says so (`over_budget`)."""
        table, index = self.table, {o: i for i, o in enumerate(self.options)}
        chosen = self._checked_choices(choices)
        predicted = math.fsum([self.fixed_ms, *(self.times[row, index[chosen[name]]]
                                                for row, name in enumerate(self.layers))])
        dense = SparsityOption.dense()
        return Profile(
            model=table.model,
            choices={name: chosen.get(name, dense) for name in table.layer_names},
            target_speedup=speedup,
            budget_ms=table.dense_total_ms / speedup,
            predicted_ms=predicted,
            dense_total_ms=table.dense_total_ms,
            fixed_ms=self.fixed_ms,
            fingerprint=table.fingerprint,
            excluded=self.excluded,
            estimated=table.estimated)

    def _checked_choices(self, choices: Mapping[str, SparsityOption | str]
                         ) -> dict[str, SparsityOption]:
        """An option of the table for every searched layer (dense where none is given)."""
        if not isinstance(choices, Mapping):
            raise SpdyError(f"choices must map layer names to options, not "
                            f"{type(choices).__name__}; e.g. {{'fc1': 'unstructured@0.5'}}")
        dense, chosen = SparsityOption.dense(), {}
        for name, option in choices.items():
            option = SparsityOption.parse(option) if isinstance(option, str) else option
            if name in self.excluded and option == dense:
                continue
            if name not in self.layers:
                why = "is excluded (it stays dense)" if name in self.excluded else \
                    "is not in the timing table"
                raise SpdyError(f"choice for layer {name!r}, which {why}; choose among "
                                "planner.layers")
            if option not in self.options:
                raise SpdyError(f"layer {name}: {option} is not an option of the timing "
                                f"table ({', '.join(o.name for o in self.options)})")
            chosen[name] = option
        return {name: chosen.get(name, dense) for name in self.layers}

    def total_error(self, profile: Profile, errors: LayerErrors | None = None) -> float:
        """The DP's objective at `profile`: the summed errors of its searched layers' options
        (its point on the curve below; excluded layers add none)."""
        matrix, index = self.error_matrix(errors), {o: i for i, o in enumerate(self.options)}
        return math.fsum(matrix[row, index[profile.choices[name]]]
                         for row, name in enumerate(self.layers))

    def curve(self, errors: LayerErrors | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(speedup, least total error), ascending, at every bucket of one DP pass from 1x
        (or the table's slowest choice) to the largest achievable speedup."""
        finite = np.where(np.isfinite(self.times), self.times, np.nan)
        slowest = self.table.dense_total_ms / (self.fixed_ms + np.nanmax(finite, 1).sum())
        frontier = self.frontier(min(1.0, slowest), errors)
        reachable = np.isfinite(frontier.best_error)
        budgets = self.fixed_ms + frontier.budget_ms(np.arange(frontier.buckets + 1))
        speedups = self.table.dense_total_ms / budgets[reachable]
        return speedups[::-1], frontier.best_error[reachable][::-1]

    def _infeasible(self, speedup: float, why: str) -> InfeasibleTargetError:
        best, shown = self.max_speedup, self.largest_target
        if shown <= 1:
            finite = np.where(np.isfinite(self.times), self.times, np.nan)
            dense_layers = float(np.nansum(self.times[:, 0]))
            fastest_layers = float(np.nansum(np.nanmin(finite, 1)))
            if dense_layers <= fastest_layers:
                cause = "no sparse option is faster than dense on any layer"
            elif self.fixed_ms >= fastest_layers:
                cause = (f"the time pruning cannot touch, {self.fixed_ms:.4g} of "
                         f"{self.table.dense_total_ms:.4g} ms, dominates")
            else:
                cause = (f"its layers alone, at their fastest, take {fastest_layers:.4g} ms, "
                         f"more than the whole model's {self.table.dense_total_ms:.4g} ms: "
                         "the layer times hold outliers; re-measure the table")
            return InfeasibleTargetError(
                f"target speedup {speedup:g}x is infeasible: pruning cannot make this model "
                f"faster on this timing table (its fastest profile is {best:.3f}x of dense; "
                f"{cause}); exclude fewer layers, or time a larger batch",
                min_time=self.min_time_ms, max_speedup=best)
        return InfeasibleTargetError(
            f"target speedup {speedup:g}x is infeasible ({why}); the largest achievable "
            f"speedup on this timing table is {shown:.3f}x: ask for at most that",
            min_time=self.min_time_ms, max_speedup=best)


def solve_profile(table: TimingTable, speedup: float, errors: LayerErrors | None = None,
                  exclude: Sequence[str] = (), buckets: int = 10_000) -> Profile:
    """The least-error profile whose predicted time is guaranteed <= dense time / speedup;
    errors keyed by layer name (None: SPDY's prior for every layer)."""
    return Planner(table, exclude, buckets).solve(speedup, errors)


def max_speedup(table: TimingTable, exclude: Sequence[str] = ()) -> float:
    """Speedup with every searched layer at its fastest option."""
    return Planner(table, exclude).max_speedup


def frontier_curve(table: TimingTable, errors: LayerErrors | None = None,
                   exclude: Sequence[str] = (), buckets: int = 10_000
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The whole error-speedup trade-off of one DP pass (see Planner.curve)."""
    return Planner(table, exclude, buckets).curve(errors)


def save_errors(path: str | os.PathLike, options: Sequence[SparsityOption],
                errors: LayerErrors) -> None:
    """Per-layer, per-option errors for `spdy-gpu solve --errors`."""
    save_json(path, ERRORS_FORMAT, ERRORS_VERSION, {
        "options": [o.name for o in options],
        "layers": {name: [float(e) for e in row] for name, row in errors.items()}})


def load_errors(path: str | os.PathLike, options: Sequence[SparsityOption]
                ) -> dict[str, list[float]]:
    """Errors keyed by layer name from a file written by save_errors, for this option grid
    (Planner.error_matrix checks them against the table's layers)."""
    doc = load_json(path, ERRORS_FORMAT, ERRORS_VERSION)
    if require(doc, "options", list, path) != [o.name for o in options]:
        raise SpdyError(f"{path}: its options differ from the timing table's; "
                        "compute the errors for the table's option grid")
    rows = require(doc, "layers", dict, path)
    if not all(isinstance(row, list) and all(is_number(v) for v in row)
               for row in rows.values()):
        raise SpdyError(f"{path}: errors must be lists of numbers; regenerate the file")
    return rows
