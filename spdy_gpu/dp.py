"""The exact dynamic program of SPDY: a multiple-choice knapsack over discretised time.

Choose one option per layer minimising the summed error subject to the summed time staying
within a budget. Pure numpy: no model, file or backend in sight.

Guarantee. Each layer's time is first reduced by its fastest option's time (that part is
spent whatever we choose), and the remaining excess is rounded UP to whole buckets of width
(budget - sum of fastest times) / buckets. Any choice whose bucketed excess fits therefore
fits in real time, and the fastest choice always fits when anything does, so rounding can
never turn a feasible target into an infeasible one. The answer is exact for the bucketed
problem (tested against brute force).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InfeasibleTargetError, SpdyError


@dataclass(frozen=True)
class Frontier:
    """Everything one DP pass computes: the best error for every budget up to the one given.

    best_error[b]: least total error of a choice whose bucketed excess time is <= b buckets
    (inf where none is); budget b costs base_ms + b * bucket_ms in real time.
    """

    best_error: np.ndarray      # [buckets + 1]
    base_ms: float              # sum over layers of the fastest option's time
    bucket_ms: float
    choice: np.ndarray          # [layers, buckets + 1] best option of layer l given b buckets
    excess: np.ndarray          # [layers, options] bucketed excess times (> buckets: never fits)

    @property
    def buckets(self) -> int:
        return self.best_error.size - 1

    def budget_ms(self, b: np.ndarray | int) -> np.ndarray | float:
        """Real-time budget that bucket count b stands for."""
        return self.base_ms + np.asarray(b) * self.bucket_ms

    def solution(self, budget: float | None = None) -> np.ndarray:
        """Option index per layer, optimal (at this bucket width) for any budget up to the
        one solved for; None means the full budget."""
        b = self.buckets if budget is None else self._buckets_within(budget)
        picks = np.empty(self.choice.shape[0], dtype=np.int64)
        for layer in range(self.choice.shape[0] - 1, -1, -1):
            picks[layer] = self.choice[layer, b]
            b -= int(self.excess[layer, picks[layer]])
        return picks

    def _buckets_within(self, budget: float) -> int:
        if budget < self.base_ms:
            raise InfeasibleTargetError(
                f"budget {budget:.6g} is below the fastest possible time {self.base_ms:.6g}",
                min_time=self.base_ms)
        slack = budget - self.base_ms
        b = self.buckets if self.bucket_ms == 0 else math.floor(slack / self.bucket_ms)
        return min(b, self.buckets)


@dataclass(frozen=True)
class TimeGrid:
    """The time side of the DP for one budget, computed once: each layer's excess over its
    fastest option in whole buckets. Many error vectors can then be solved against it."""

    base_ms: float              # sum over layers of the fastest option's time
    bucket_ms: float
    buckets: int
    excess: np.ndarray          # [layers, options] bucketed excess times (> buckets: never fits)

    @classmethod
    def build(cls, times: np.ndarray, budget: float, buckets: int = 10_000) -> TimeGrid:
        """Bucket `times` [layers, options] (inf: unsupported) for `budget`."""
        times = _validated_times(times)
        _check_budget(budget, buckets)
        fastest = times.min(axis=1)
        base = math.fsum(fastest)
        if base > budget:
            raise InfeasibleTargetError(
                f"budget {budget:.6g} is below the fastest possible time {base:.6g} "
                "(every layer at its fastest option)", min_time=base)
        bucket = (budget - base) / buckets
        return cls(base, bucket, buckets, _bucketize(times - fastest[:, None], bucket, buckets))

    def frontier(self, errors: np.ndarray) -> Frontier:
        """The DP for `errors` [layers, options]: best error for every budget up to this one."""
        errors = _validated_errors(errors, self.excess.shape)
        best, choice = _run_dp(errors, self.excess, self.buckets)
        return Frontier(best_error=best, base_ms=self.base_ms, bucket_ms=self.bucket_ms,
                        choice=choice, excess=self.excess)

    def solve(self, errors: np.ndarray) -> np.ndarray:
        """Option index per layer: least summed error within the budget."""
        return self.frontier(errors).solution()


def dp_frontier(errors: np.ndarray, times: np.ndarray, budget: float,
                buckets: int = 10_000) -> Frontier:
    """Solve the DP once for `budget`; the result answers every smaller budget too.

    errors, times: [layers, options]; an inf time marks an option a layer cannot take.
    """
    errors = _validated_errors(errors, np.shape(times))
    return TimeGrid.build(times, budget, buckets).frontier(errors)


def solve_dp(errors: np.ndarray, times: np.ndarray, budget: float,
             buckets: int = 10_000) -> np.ndarray:
    """Option index per layer minimising sum(errors) subject to sum(times) <= budget.

    Raises InfeasibleTargetError (a ValueError) when even the fastest choice exceeds budget.
    """
    return dp_frontier(errors, times, budget, buckets).solution()


def _bucketize(excess_ms: np.ndarray, bucket: float, buckets: int) -> np.ndarray:
    """Whole buckets per excess time, rounded up; unsupported (inf) becomes buckets + 1."""
    if bucket == 0:   # no slack at all: only the fastest options (excess 0) fit
        return np.where(excess_ms == 0, 0, buckets + 1).astype(np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        # nextafter guards against a quotient that rounds down across an integer
        scaled = np.nextafter(excess_ms / bucket, np.inf)
        return np.where(np.isfinite(scaled), np.minimum(np.ceil(scaled), buckets + 1),
                        buckets + 1).astype(np.int64) * (excess_ms > 0)


def _run_dp(errors: np.ndarray, excess: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """best[b] over layers so far, with total bucketed excess <= b; vectorised over b."""
    layers, options = errors.shape
    best = np.zeros(buckets + 1)
    choice = np.zeros((layers, buckets + 1), dtype=np.int16 if options < 2**15 else np.int32)
    for layer in range(layers):
        new = np.full(buckets + 1, np.inf)
        pick = choice[layer]
        for option in range(options):
            t = int(excess[layer, option])
            if t > buckets:
                continue
            candidate = best[: buckets + 1 - t] + errors[layer, option]
            better = candidate < new[t:]
            new[t:][better] = candidate[better]
            pick[t:][better] = option
        best = new
    return best, choice


def _validated_errors(errors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2 or errors.shape != tuple(shape) or 0 in errors.shape:
        raise SpdyError(f"errors {errors.shape} and times {tuple(shape)} must both be "
                        "[layers, options] with the same, non-zero shape")
    if not np.isfinite(errors).all():
        raise SpdyError("errors contain NaN or inf; give every option a finite error "
                        "(mark an option a layer cannot take with an inf time instead)")
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(np.abs(errors).max(axis=1).sum())
    if overflows:
        # Sums of huge errors would overflow to inf and tie every choice: one common scale
        # changes no comparison the DP makes.
        errors = errors / np.abs(errors).max()
    return errors


def _validated_times(times: np.ndarray) -> np.ndarray:
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 2 or 0 in times.shape:
        raise SpdyError(f"times {times.shape} must be [layers, options] with a non-zero shape "
                        "(the same as the errors)")
    if np.isnan(times).any() or (times < 0).any():
        raise SpdyError("times contain NaN or negative values; times must be >= 0 "
                        "(inf marks an unsupported option)")
    if not np.isfinite(times).any(axis=1).all():
        bad = int(np.flatnonzero(~np.isfinite(times).any(axis=1))[0])
        raise SpdyError(f"layer {bad} has no supported option (all times inf); "
                        "every layer needs at least one finite time, e.g. dense")
    return times


def _check_budget(budget: float, buckets: int) -> None:
    if not (isinstance(budget, (int, float, np.floating)) and math.isfinite(budget) and budget > 0):
        raise SpdyError(f"budget {budget!r} must be a finite number > 0")
    if not (isinstance(buckets, (int, np.integer)) and 1 <= buckets <= 10_000_000):
        raise SpdyError(f"buckets {buckets!r} must be an integer in 1..10,000,000")
