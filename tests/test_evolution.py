"""The evolutionary baseline: children stay within the latency budget, the search improves
on its start, is reproducible, counts distinct evaluations, and steps over options a layer
cannot take."""

import math

import numpy as np
import pytest

from spdy_gpu import SpdyError
from spdy_gpu.evolution import EvolutionConfig, evolve, project
from spdy_gpu.solve import Planner

from .conftest import make_table
from .test_search import LAYERS, Score, planner  # noqa: F401  (fixture)


def test_evolution_improves_on_its_start_within_the_budget(planner):  # noqa: F811
    start = planner.choose(2.0)
    result = evolve(planner, 2.0, Score(), start, config=EvolutionConfig(max_evaluations=60),
                    progress=False)
    profile = planner.profile(2.0, result.choices)
    assert profile.predicted_ms <= profile.budget_ms
    assert result.score < Score()(start)
    assert result.evaluations == 60 and result.stopped == "evaluations"
    assert [s for _, s in result.history] == sorted((s for _, s in result.history), reverse=True)


def test_evolution_is_reproducible_and_scores_each_profile_once(planner):  # noqa: F811
    seen = []

    def score(choices):
        key = tuple(o.name for o in choices.values())
        assert key not in seen
        seen.append(key)
        return Score()(choices)

    config = EvolutionConfig(seed=5, max_evaluations=30)
    first = evolve(planner, 2.0, score, planner.choose(2.0), config=config, progress=False)
    second = evolve(planner, 2.0, Score(), planner.choose(2.0), config=config, progress=False)
    assert first.choices == second.choices and first.score == second.score
    assert len(seen) == first.evaluations == 30


def test_projection_keeps_a_feasible_profile_and_repairs_an_infeasible_one(planner):  # noqa: F811
    feasible = np.array([8] * LAYERS)                      # everything at the sparsest level
    assert project(planner, 2.0, feasible) == tuple([8] * LAYERS)
    repaired = project(planner, 2.0, np.zeros(LAYERS, dtype=int))     # all dense: too slow
    profile = planner.profile(2.0, {n: planner.options[p]
                                    for n, p in zip(planner.layers, repaired)})
    assert profile.predicted_ms <= profile.budget_ms and any(p > 0 for p in repaired)


def test_unsupported_options_are_never_chosen():
    times = [[2.0, 1.5, 1.0, 0.5]] * 3 + [[2.0, math.inf, math.inf, math.inf]]
    small = Planner(make_table(times, dense_total=9.0, fixed=1.0))
    result = evolve(small, 1.5, lambda choices: sum(o.sparsity for o in choices.values()),
                    small.choose(1.5), config=EvolutionConfig(max_evaluations=20),
                    progress=False)
    assert result.choices[small.layers[3]].pattern == "dense"


def test_a_start_without_every_layer_is_refused(planner):  # noqa: F811
    start = planner.choose(2.0)
    start.pop(planner.layers[0])
    with pytest.raises(SpdyError, match="no option for layer"):
        evolve(planner, 2.0, Score(), start, progress=False)
