import itertools
import math

import numpy as np
import pytest

from spdy_gpu import InfeasibleTargetError, SpdyError, dp_frontier, solve_dp


def _random_instance(rng, layers, options):
    """Non-monotone times, options slower than dense, unsupported options, negative errors."""
    times = rng.uniform(0.1, 10.0, size=(layers, options))
    times[rng.random((layers, options)) < 0.2] = np.inf
    times[:, 0] = rng.uniform(0.1, 10.0, size=layers)       # dense always runs
    errors = rng.normal(size=(layers, options))
    return errors, times


def _brute_force(errors, cost, limit):
    """Least total error over all choices with summed cost <= limit (None if none fits)."""
    best = None
    for combo in itertools.product(range(errors.shape[1]), repeat=errors.shape[0]):
        rows = np.arange(len(combo))
        if cost[rows, combo].sum() <= limit:
            error = errors[rows, combo].sum()
            best = error if best is None or error < best else best
    return best


@pytest.mark.parametrize("seed", range(150))
def test_exact_for_the_bucketed_problem_and_guaranteed_in_real_time(seed):
    rng = np.random.default_rng(seed)
    errors, times = _random_instance(rng, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    budget = float(rng.uniform(0.5, 1.2) * times.min(axis=1).sum() + rng.uniform(0, 8))
    buckets = int(rng.choice([7, 50, 1000]))
    try:
        frontier = dp_frontier(errors, times, budget, buckets)
    except InfeasibleTargetError:
        assert math.fsum(times.min(axis=1)) > budget
        return
    picks = frontier.solution()
    rows = np.arange(len(picks))
    assert times[rows, picks].sum() <= budget
    expected = _brute_force(errors, frontier.excess.astype(float), buckets)
    assert errors[rows, picks].sum() == pytest.approx(expected, abs=1e-9)
    assert frontier.best_error[-1] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_frontier_answers_every_smaller_budget(seed):
    rng = np.random.default_rng(1000 + seed)
    errors, times = _random_instance(rng, 3, 4)
    budget = float(times.max(axis=1, where=np.isfinite(times), initial=0).sum())
    frontier = dp_frontier(errors, times, budget, buckets=200)
    for smaller in np.linspace(frontier.base_ms, budget, 7):
        picks = frontier.solution(smaller)
        rows = np.arange(len(picks))
        assert times[rows, picks].sum() <= smaller + 1e-12
        limit = math.floor((smaller - frontier.base_ms) / frontier.bucket_ms)
        expected = _brute_force(errors, frontier.excess.astype(float), min(limit, 200))
        assert errors[rows, picks].sum() == pytest.approx(expected, abs=1e-9)
    assert np.all(np.diff(frontier.best_error) <= 0), "more budget never hurts"


def test_guarantee_holds_where_round_to_nearest_would_break_it():
    # 10 layers of 1.04 buckets each: rounding to nearest would claim 10 buckets for 10.4 real.
    times = np.array([[1.04, 0.0]] * 10)
    errors = np.array([[0.0, 1.0]] * 10)
    picks = solve_dp(errors, times, budget=10.0, buckets=10)
    assert times[np.arange(10), picks].sum() <= 10.0


def test_prefers_options_slower_than_dense_only_when_they_help():
    times = np.array([[1.0, 2.0, 0.5]])         # option 1 is slower than dense
    errors = np.array([[0.5, 0.0, 1.0]])
    assert solve_dp(errors, times, budget=2.01).tolist() == [1]
    assert solve_dp(errors, times, budget=1.5).tolist() == [0]
    assert solve_dp(errors, times, budget=0.6).tolist() == [2]


def test_infeasible_names_the_fastest_time():
    times = np.array([[2.0, 1.0], [3.0, np.inf]])
    with pytest.raises(InfeasibleTargetError, match="fastest possible time 4") as info:
        solve_dp(np.zeros((2, 2)), times, budget=3.9)
    assert isinstance(info.value, ValueError) and info.value.min_time == 4.0


def test_exact_fastest_budget_is_feasible():
    times = np.array([[2.0, 1.0], [3.0, 1.5]])
    assert solve_dp(np.array([[0, 1.0], [0, 1.0]]), times, budget=2.5).tolist() == [1, 1]


@pytest.mark.parametrize("errors, times, budget, buckets, message", [
    (np.zeros((2, 3)), np.ones((3, 2)), 1.0, 10, "same, non-zero shape"),
    (np.zeros(3), np.ones(3), 1.0, 10, "same, non-zero shape"),
    (np.zeros((0, 2)), np.ones((0, 2)), 1.0, 10, "same, non-zero shape"),
    (np.full((1, 2), np.nan), np.ones((1, 2)), 1.0, 10, "NaN or inf"),
    (np.zeros((1, 2)), np.array([[1.0, np.nan]]), 1.0, 10, "NaN or negative"),
    (np.zeros((1, 2)), np.array([[1.0, -0.5]]), 1.0, 10, "NaN or negative"),
    (np.zeros((1, 2)), np.full((1, 2), np.inf), 1.0, 10, "no supported option"),
    (np.zeros((1, 2)), np.ones((1, 2)), float("nan"), 10, "budget"),
    (np.zeros((1, 2)), np.ones((1, 2)), -1.0, 10, "budget"),
    (np.zeros((1, 2)), np.ones((1, 2)), 1.0, 0, "buckets"),
])
def test_bad_input_is_refused_in_one_line(errors, times, budget, buckets, message):
    with pytest.raises(SpdyError, match=message) as info:
        solve_dp(errors, times, budget, buckets)
    assert "\n" not in str(info.value)


def test_errors_whose_sums_overflow_are_solved_as_their_scaled_copy():
    times = np.array([[4.0, 2.0, 1.0]] * 3)          # 7 ms: two layers at least must shrink
    errors = np.array([[0.0, 0.9, 1.0], [0.0, 0.8, 1.0], [0.0, 0.7, 0.95]])
    expected = solve_dp(errors, times, 7.0)
    huge = solve_dp(errors * 1e308, times, 7.0)       # any two of them sum to inf
    assert huge.tolist() == expected.tolist()
    assert times[np.arange(3), huge].sum() <= 7.0
