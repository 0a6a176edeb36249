"""SPDY's coefficient search: reproducible, resumable to the same profile, caching, budgets,
and better than the plain prior on a score with hidden per-layer sensitivities."""

import math

import numpy as np
import pytest

from spdy_gpu import SpdyError
from spdy_gpu.search import SearchConfig, search
from spdy_gpu.solve import Planner

from .conftest import make_table

LAYERS = 8


@pytest.fixture
def planner():
    rng = np.random.default_rng(0)
    dense = rng.uniform(1.0, 3.0, size=LAYERS)
    speedups = np.linspace(1.0, 4.0, 9)                       # dense + 8 levels
    times = dense[:, None] / speedups[None, :]
    table = make_table(times.tolist(), dense_total=float(dense.sum()) + 1.0, fixed=1.0)
    return Planner(table)


SENSITIVITY = np.geomspace(0.01, 100.0, LAYERS)           # hidden: how much each layer cares


class Score:
    """A score the prior cannot see: per-layer sensitivity times sparsity squared."""

    def __init__(self, fail_after=None, value=None):
        self.calls = 0
        self.fail_after = fail_after
        self.value = value

    def __call__(self, choices):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        if self.value is not None:
            return self.value
        sparsity = np.array([o.sparsity for o in choices.values()])
        return float((SENSITIVITY * sparsity**2).sum())


SMALL = SearchConfig(seed=3, random_candidates=10, patience=8, start_fraction=0.5)


def test_search_beats_the_prior_and_meets_the_budget(planner):
    prior = planner.solve(2.0)
    result = search(planner, 2.0, Score(), config=SMALL, progress=False)
    searched = planner.profile(2.0, result.choices)
    assert searched.predicted_ms <= searched.budget_ms
    assert result.score < Score()({n: prior.choices[n] for n in planner.layers})
    assert result.stopped == "converged"
    assert [s for _, s in result.history] == sorted((s for _, s in result.history),
                                                    reverse=True)


def test_same_seed_same_result_and_each_profile_scored_once(planner):
    score = Score()
    first = search(planner, 2.0, score, config=SMALL, progress=False)
    assert score.calls == first.evaluations <= first.candidates
    again = search(planner, 2.0, Score(), config=SMALL, progress=False)
    assert again.choices == first.choices and again.score == first.score
    assert again.history == first.history


def test_killed_search_resumes_to_the_same_profile(planner, tmp_path):
    full = search(planner, 2.0, Score(), config=SMALL, progress=False)
    state = tmp_path / "state.json"
    for kill_at in (3, 11, 20):                               # random phase and local phase
        with pytest.raises(KeyboardInterrupt):
            search(planner, 2.0, Score(fail_after=kill_at), config=SMALL,
                   checkpoint=state, progress=False)
    resumed = search(planner, 2.0, Score(), config=SMALL, checkpoint=state, progress=False)
    assert resumed.choices == full.choices and resumed.score == full.score
    assert resumed.candidates == full.candidates and resumed.evaluations == full.evaluations


def test_evaluation_budget_and_extending_it(planner, tmp_path):
    state = tmp_path / "state.json"
    config = SearchConfig(seed=1, random_candidates=10, patience=8, max_evaluations=5)
    short = search(planner, 2.0, Score(), config=config, checkpoint=state, progress=False)
    assert short.evaluations == 5 and short.stopped == "evaluations"
    longer = SearchConfig(seed=1, random_candidates=10, patience=8, max_evaluations=12)
    assert search(planner, 2.0, Score(), config=longer, checkpoint=state,
                  progress=False).evaluations == 12


def test_another_search_in_the_checkpoint_is_refused(planner, tmp_path):
    state = tmp_path / "state.json"
    search(planner, 2.0, Score(), config=SearchConfig(max_evaluations=2), checkpoint=state,
           progress=False)
    with pytest.raises(SpdyError, match="another search"):
        search(planner, 2.5, Score(), config=SearchConfig(max_evaluations=2),
               checkpoint=state, progress=False)
    with pytest.raises(SpdyError, match="another search"):
        search(planner, 2.0, Score(), config=SearchConfig(seed=9, max_evaluations=2),
               checkpoint=state, progress=False)


def test_a_score_with_an_identity_resumes_only_under_the_same_one(planner, tmp_path):
    class Named(Score):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def identity(self):
            return {"loss": self.name}

    state = tmp_path / "state.json"
    config = SearchConfig(max_evaluations=2)
    search(planner, 2.0, Named("mse"), config=config, checkpoint=state, progress=False)
    assert search(planner, 2.0, Named("mse"), config=config, checkpoint=state,
                  progress=False).resumed
    with pytest.raises(SpdyError, match="another search"):
        search(planner, 2.0, Named("kl"), config=config, checkpoint=state, progress=False)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nan_loss_is_a_one_line_error(planner, value):
    with pytest.raises(SpdyError, match="loss returned") as info:
        search(planner, 2.0, Score(value=value), config=SMALL, progress=False)
    assert "\n" not in str(info.value)


def test_errors_by_name_steer_the_search(planner):
    errors = {name: [0.0] + [1.0] * (len(planner.options) - 1) for name in planner.layers}
    result = search(planner, 1.5, Score(), errors=errors, config=SMALL, progress=False)
    assert set(result.coefficients) == set(planner.layers)
    with pytest.raises(SpdyError, match="no errors for layer"):
        search(planner, 1.5, Score(), errors={"layer0": errors["layer0"]}, config=SMALL)


def test_bad_config_is_refused():
    with pytest.raises(SpdyError, match="max-evaluations"):
        SearchConfig(max_evaluations=0)
    with pytest.raises(SpdyError, match="start fraction"):
        SearchConfig(start_fraction=0.0)
