import math
import re

import numpy as np
import pytest

from spdy_gpu import InfeasibleTargetError, SpdyError, solve_profile
from spdy_gpu.solve import (
    Planner,
    frontier_curve,
    load_errors,
    max_speedup,
    prior_errors,
    save_errors,
)

from .conftest import make_table


def test_prior_is_squared_rank(toy_table):
    assert prior_errors(toy_table.options).tolist() == [0.0, 1 / 9, 4 / 9, 1.0]


def test_budget_charges_fixed_time(toy_table):
    profile = solve_profile(toy_table, 2.0)      # budget 5 ms, of which 1 ms is fixed
    assert profile.budget_ms == 5.0 and profile.fixed_ms == 1.0
    assert profile.predicted_ms <= 5.0
    times = toy_table.times()
    chosen = [toy_table.options.index(o) for o in profile.choices.values()]
    assert profile.predicted_ms == pytest.approx(1.0 + times[range(3), chosen].sum())


def test_excluded_layers_are_fixed_dense_time(toy_table):
    profile = solve_profile(toy_table, 1.2, exclude=["layer0"])
    assert profile.fixed_ms == 1.0 + 4.0
    assert profile.choices["layer0"].pattern == "dense"
    assert profile.excluded == ("layer0",)
    assert profile.predicted_ms <= 10.0 / 1.2


def test_infeasible_target_reports_the_largest_speedup(toy_table):
    best = 10.0 / (1.0 + 1.0 + 0.5 + 2.0)
    assert max_speedup(toy_table) == pytest.approx(best)
    with pytest.raises(InfeasibleTargetError, match=f"largest achievable speedup .* {best:.3f}x"):
        solve_profile(toy_table, 2.3)
    profile = solve_profile(toy_table, best)       # exactly the maximum is reachable
    assert profile.predicted_speedup == pytest.approx(best)
    with pytest.raises(InfeasibleTargetError, match="fixed time alone"):
        solve_profile(make_table([[1.0, 0.5]], dense_total=10.0, fixed=9.0), 1.2)


def test_a_table_whose_parts_exceed_its_total_plans_dense_at_1x_and_says_why_not_more():
    """A tiny model's table can hold more fixed time than its dense total (separate
    measurements): 1x is the dense model, and a higher target names the cause, not a
    largest speedup below 1x to ask for."""
    table = make_table([[0.0, 0.0]], dense_total=0.00994, fixed=0.01018)
    assert solve_profile(table, 1.0).choices["layer0"].pattern == "dense"
    with pytest.raises(InfeasibleTargetError, match=r"pruning cannot make this model faster "
                                                    r"on this timing table \(its fastest "
                                                    r"profile is 0\.976x") as info:
        solve_profile(table, 1.2)
    assert info.value.max_speedup == pytest.approx(0.00994 / 0.01018)
    assert "no sparse option is faster than dense on any layer" in str(info.value)
    fixed = make_table([[0.01, 0.005]], dense_total=0.1, fixed=1.0)    # sparsity pays a bit
    with pytest.raises(InfeasibleTargetError, match="the time pruning cannot touch, 1 of 0.1 "
                                                    "ms, dominates"):
        solve_profile(fixed, 1.2)
    outliers = make_table([[1.0, 0.5]], dense_total=0.3, fixed=0.0)     # layers > the whole
    with pytest.raises(InfeasibleTargetError, match="its layers alone, at their fastest, take "
                                                    "0.5 ms, more than the whole model's 0.3 "
                                                    "ms: the layer times hold outliers"):
        solve_profile(outliers, 1.2)


def test_the_largest_speedup_named_is_rounded_down_so_asking_for_it_works(toy_table):
    planner = Planner(toy_table)
    with pytest.raises(InfeasibleTargetError, match=r"is (\d\.\d{3})x: ask") as info:
        planner.solve(100.0)
    shown = float(re.search(r"is (\d\.\d{3})x: ask", str(info.value))[1])
    assert shown <= planner.max_speedup and planner.solve(shown).predicted_speedup >= shown


@pytest.mark.parametrize("speedup", [0.0, -1.0, math.nan, math.inf])
def test_bad_speedup(toy_table, speedup):
    with pytest.raises(SpdyError, match="target speedup"):
        solve_profile(toy_table, speedup)


def test_error_files_round_trip_and_drive_the_choice(tmp_path, toy_table):
    errors = np.zeros((3, 4))
    errors[0, 1:] = 100.0                       # layer0 must stay dense
    save_errors(tmp_path / "e.json", toy_table.options,
                {name: row for name, row in zip(toy_table.layer_names, errors)})
    loaded = load_errors(tmp_path / "e.json", toy_table.options)
    assert np.array_equal([loaded[name] for name in toy_table.layer_names], errors)
    profile = solve_profile(toy_table, 1.2, loaded)
    assert profile.choices["layer0"].pattern == "dense"


def test_errors_are_matched_by_name_not_position(toy_table):
    planner = Planner(toy_table)
    errors = {"layer2": [0, 0, 0, 0], "layer1": [0, 0, 0, 0], "layer0": [0, 9, 9, 9]}
    assert planner.solve(1.2, errors).choices["layer0"].pattern == "dense"
    with pytest.raises(SpdyError, match="no errors for layer 'layer1'"):
        planner.solve(1.2, {"layer0": [0] * 4, "layer2": [0] * 4})
    with pytest.raises(SpdyError, match="'extra', which is not in the timing table"):
        planner.solve(1.2, {**errors, "extra": [0] * 4})
    with pytest.raises(SpdyError, match="keyed by layer name"):
        planner.solve(1.2, np.zeros((3, 4)))
    with pytest.raises(SpdyError, match="finite and >= 0"):
        planner.solve(1.2, {**errors, "layer0": [0, -1, 0, 0]})
    for odd in (["0", "0.1", "0", "0"], [0, 10**400, 0, 0]):
        with pytest.raises(SpdyError, match="errors must be lists of numbers"):
            planner.solve(1.2, {**errors, "layer0": odd})
    with pytest.raises(SpdyError, match="4 errors per layer"):
        planner.solve(1.2, {**errors, "layer0": [0, 1]})
    # an excluded layer's errors are ignored, not refused
    assert Planner(toy_table, ["layer0"]).solve(1.1, errors).choices["layer0"].pattern == "dense"


def test_infeasible_fields_mean_the_whole_model(toy_table):
    planner = Planner(toy_table, ["layer0"])
    with pytest.raises(InfeasibleTargetError) as info:
        planner.solve(3.0)
    assert info.value.max_speedup == pytest.approx(planner.max_speedup)
    assert info.value.min_time == pytest.approx(toy_table.dense_total_ms / planner.max_speedup)


def test_planner_refuses_tables_it_cannot_plan_on(toy_table):
    import dataclasses
    with pytest.raises(SpdyError, match="dense_total_ms = 0.0 must be finite and > 0"):
        Planner(dataclasses.replace(toy_table, dense_total_ms=0.0))
    with pytest.raises(SpdyError, match="the timing table has no layers"):
        Planner(dataclasses.replace(toy_table, layers=()))
    with pytest.raises(SpdyError, match="every layer is excluded"):
        Planner(toy_table, exclude=["layer*"])


@pytest.mark.parametrize("seed", range(20))
def test_random_tables_meet_the_target(seed):
    rng = np.random.default_rng(seed)
    times = rng.uniform(0.1, 2.0, size=(12, 8))
    dense_total = times[:, 0].sum() + 1.0
    table = make_table(times.tolist(), dense_total=dense_total, fixed=1.0)
    target = float(rng.uniform(1.0, max_speedup(table)))
    profile = solve_profile(table, target, buckets=500)
    assert profile.predicted_ms <= dense_total / target
    assert profile.predicted_speedup >= target


def test_frontier_curve_spans_one_to_the_largest_speedup_and_contains_each_solve(toy_table):
    speedups, errors = frontier_curve(toy_table)
    assert speedups[-1] == pytest.approx(max_speedup(toy_table))
    assert speedups[0] <= 1.0 + 1e-9 and errors[0] == 0.0          # all dense fits at 1x
    assert np.all(np.diff(speedups) > 0) and np.all(np.diff(errors) >= 0)
    prior = prior_errors(toy_table.options)
    for target in (1.2, 1.6, 2.0):
        profile = solve_profile(toy_table, target)
        total = sum(prior[toy_table.options.index(o)] for o in profile.choices.values())
        # the solve's error lies between the curve's points either side of the target
        above = np.searchsorted(speedups, target)
        assert errors[above - 1] <= total <= errors[above]


def test_total_error_is_the_dp_objective_at_a_profile_and_ignores_excluded_layers(toy_table):
    planner = Planner(toy_table, exclude=["layer0"])
    errors = {name: np.arange(4.0) * (i + 1) for i, name in enumerate(toy_table.layer_names)}
    profile = planner.solve(1.2, errors)
    expected = sum(errors[name][toy_table.options.index(profile.choices[name])]
                   for name in ("layer1", "layer2"))
    assert expected > 0 and planner.total_error(profile, errors) == pytest.approx(expected)
    prior = prior_errors(toy_table.options)
    assert planner.total_error(profile) == pytest.approx(
        sum(prior[toy_table.options.index(profile.choices[n])] for n in ("layer1", "layer2")))


def test_all_dense_at_1x_when_the_layers_and_fixed_time_add_up_to_the_dense_time(toy_table):
    """1 + 4 + 2 + 3 = 10 ms exactly: the DP's buckets, rounded up per layer, missed it."""
    profile = solve_profile(toy_table, 1.0)
    assert all(o.pattern == "dense" for o in profile.choices.values())
    assert profile.predicted_ms == profile.budget_ms == 10.0
    # the least-error choice is taken only where it fits: layer2's (3.5 ms) exceeds 10 ms
    errors = {"layer0": [0.0, 1, 2, 3], "layer1": [0.0, 1, 2, 3], "layer2": [1.0, 0, 2, 3]}
    profile = Planner(toy_table).solve(1.0, errors)
    assert profile.predicted_ms <= profile.budget_ms
    assert [o.name for o in profile.choices.values()] != [o.name for o in toy_table.options[:1]
                                                           * 2 + toy_table.options[1:2]]


def test_a_planner_takes_one_exclude_string_as_one_pattern(toy_table):
    assert Planner(toy_table, exclude="layer0").excluded == ("layer0",)


def test_a_profile_of_chosen_options_counts_every_layer_and_says_when_over_budget(toy_table):
    planner, times = Planner(toy_table), toy_table.times()
    fast = toy_table.options[-1]
    profile = planner.profile(2.0, {"layer1": fast.name})        # the others stay dense
    assert profile.choices["layer0"].pattern == "dense" and profile.choices["layer1"] == fast
    assert profile.predicted_ms == pytest.approx(1.0 + times[0, 0] + times[1, -1] + times[2, 0])
    assert profile.over_budget and not planner.solve(2.0).over_budget
    with pytest.raises(SpdyError, match="choice for layer 'layer9', which is not in the "
                                        "timing table"):
        planner.profile(2.0, {"layer9": fast})
    with pytest.raises(SpdyError, match="layer layer0: block32x32@0.5 is not an option of "
                                        "the timing table"):
        planner.profile(2.0, {"layer0": "block32x32@0.5"})
    with pytest.raises(SpdyError, match="choice for layer 'layer0', which is excluded"):
        Planner(toy_table, exclude="layer0").profile(1.2, {"layer0": fast})
