"""SPDY's search: per-layer coefficients over a per-option error, each candidate solved by
the exact DP and scored on held-out calibration data.

A candidate is a coefficient c_l in [0, 1] per searched layer; layer l's cost of option o
is c_l * e_l(o), with e the shared squared-rank prior (default) or the database's per-layer
errors. The DP turns the costs into the least-cost profile within the latency budget, and
`score(choices)` (lower is better) says how good the stitched model really is. The search:
`random_candidates` uniform random vectors, then local search from the best: resample k
random coordinates, accept an improvement at once, and after `patience` failures in a row
move from k to k - 1, starting at k = round(start_fraction * layers) (reference defaults).

Reproducible and resumable: one seeded generator drives every draw, distinct profiles are
scored once (cached by their choices), and the whole state, generator included, is saved
atomically after every candidate, so a killed search resumes where it stopped and ends
with the same profile as an uninterrupted run with the same seed and evaluation budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .errors import SpdyError, as_path, check_types
from .jsonio import load_json, save_json
from .options import SparsityOption
from .solve import LayerErrors, Planner
from .timing import TimingTable

log = logging.getLogger(__name__)

STATE_FORMAT, STATE_VERSION = "spdy-gpu/search-state", 1

Choices = dict[str, SparsityOption]
Score = Callable[[Choices], float]
# SearchResult.stopped, as the log says it
STOPPED = {"converged": "converged", "evaluations": "reached --max-evaluations",
           "minutes": "reached --max-minutes"}


@dataclass(frozen=True)
class SearchConfig:
    """How long and how widely to search (defaults: the SPDY reference's)."""

    seed: int = 0
    random_candidates: int = 100
    patience: int = 100              # failures in a row before k shrinks
    start_fraction: float = 0.1      # first k = round(start_fraction * layers), at least 1
    max_evaluations: int | None = None   # distinct profiles scored, at most
    max_minutes: float | None = None     # wall time, at most (resumed runs included)

    def __post_init__(self) -> None:
        check_types({"--seed": (self.seed, int),
                     "--random-candidates": (self.random_candidates, int),
                     "--patience": (self.patience, int),
                     "start fraction": (self.start_fraction, float),
                     "--max-evaluations": (self.max_evaluations, (int, type(None))),
                     "--max-minutes": (self.max_minutes, (float, type(None)))})
        if self.seed < 0:
            raise SpdyError(f"--seed {self.seed} must be >= 0")
        if self.random_candidates < 1:
            raise SpdyError(f"--random-candidates {self.random_candidates} must be >= 1")
        if self.patience < 1:
            raise SpdyError(f"--patience {self.patience} must be >= 1")
        if not 0 < self.start_fraction <= 1:
            raise SpdyError(f"start fraction {self.start_fraction} must be in (0, 1]")
        if self.max_evaluations is not None and self.max_evaluations < 1:
            # the CLI's 0 arrives here as None
            raise SpdyError(f"--max-evaluations {self.max_evaluations} must be >= 1, or 0 to "
                            "search until it converges (max_evaluations=None in SearchConfig)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise SpdyError(f"--max-minutes {self.max_minutes} must be > 0")


@dataclass(frozen=True)
class SearchResult:
    coefficients: dict[str, float]      # searched layer -> c_l of the best candidate
    choices: Choices                     # its profile (searched layers only)
    score: float
    evaluations: int                     # distinct profiles scored
    candidates: int                      # coefficient vectors tried
    stopped: str                         # "converged", "evaluations" or "minutes"
    seconds: float
    history: list[tuple[int, float]]     # (candidates tried, best score) at each improvement
    resumed: bool = False                # went on from a saved state of this search


@dataclass
class _State:
    """Everything needed to continue a search exactly where it stopped."""

    rng: np.random.Generator
    phase: str = "random"                # "random", then "local", then "done"
    drawn: int = 0                       # random-phase candidates drawn
    k: int = 0                           # coordinates resampled per local step
    failures: int = 0                    # local steps in a row without improvement
    best: np.ndarray | None = None
    best_score: float = math.inf
    evaluations: int = 0
    candidates: int = 0
    seconds: float = 0.0
    cache: dict[tuple[int, ...], float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)

    def next_candidate(self, layers: int) -> np.ndarray | None:
        """The next coefficient vector to try, or None when the search has converged."""
        if self.phase == "random":
            self.drawn += 1
            return self.rng.random(layers)
        if self.phase == "done":
            return None
        candidate = self.best.copy()
        chosen = self.rng.choice(layers, size=self.k, replace=False)
        candidate[chosen] = self.rng.random(self.k)
        return candidate

    def record(self, config: SearchConfig, candidate: np.ndarray, score: float) -> None:
        """Keep an improvement at once; in the local phase count failures and shrink k."""
        self.candidates += 1
        if score < self.best_score:
            self.best, self.best_score, self.failures = candidate, score, 0
            self.history.append((self.candidates, score))
        elif self.phase == "local":
            self.failures += 1
            if self.failures >= config.patience:
                self.k, self.failures = self.k - 1, 0
                self.phase = "local" if self.k > 0 else "done"
        if self.phase == "random" and self.drawn >= config.random_candidates:
            self.phase = "local"
            self.k = max(1, round(config.start_fraction * len(candidate)))

    def to_json(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "phase": self.phase,
                "drawn": self.drawn, "k": self.k,
                "failures": self.failures,
                "best": None if self.best is None else self.best.tolist(),
                "best_score": self.best_score, "evaluations": self.evaluations,
                "candidates": self.candidates, "seconds": self.seconds,
                "cache": [[list(key), score] for key, score in self.cache.items()],
                "history": self.history}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> _State:
        rng = np.random.default_rng()
        rng.bit_generator.state = doc["rng"]
        best = None if doc["best"] is None else np.asarray(doc["best"], dtype=np.float64)
        return cls(rng=rng, phase=str(doc["phase"]), drawn=int(doc["drawn"]), k=int(doc["k"]),
                   failures=int(doc["failures"]), best=best,
                   best_score=float(doc["best_score"]), evaluations=int(doc["evaluations"]),
                   candidates=int(doc["candidates"]), seconds=float(doc["seconds"]),
                   cache={tuple(key): float(score) for key, score in doc["cache"]},
                   history=[(int(c), float(s)) for c, s in doc["history"]])


def search(planner: Planner, speedup: float, score: Score, *,
           errors: LayerErrors | None = None, config: SearchConfig = SearchConfig(),
           checkpoint: str | os.PathLike | None = None,
           identity: Mapping[str, Any] | None = None, replace_other: bool = False,
           progress: bool = True) -> SearchResult:
    """Search per-layer coefficients for the profile at `speedup` that `score` likes best.

    errors: base per-option errors keyed by layer name (None: SPDY's prior). checkpoint: a
    JSON file the state is saved to after every candidate and resumed from; `identity`
    describes what is scored (database, data, loss) and must match to resume (default: the
    score's own `identity()`, e.g. a HeldOutScorer's); the state of another search there is
    an error, or (replace_other) started afresh.
    """
    if isinstance(planner, (str, os.PathLike, TimingTable)):
        planner = Planner(planner)                   # a timing table (or its file), as Planner
    check_types({"planner": (planner, Planner), "config": (config, SearchConfig)})
    if not callable(score):
        raise SpdyError(f"score must be a function of the choices (e.g. a HeldOutScorer), not "
                        f"{type(score).__name__}")
    if identity is None and callable(getattr(score, "identity", None)):
        identity = score.identity()
    base = planner.error_matrix(errors)                           # [layers, options]
    layers = len(planner.layers)
    key = _state_key(planner, speedup, base, config, identity)
    resumed = _resume(checkpoint, key, replace_other, layers)
    state = resumed or _State(rng=np.random.default_rng(config.seed))
    option_index = {o: i for i, o in enumerate(planner.options)}
    started = time.monotonic() - state.seconds
    stopped = "converged"
    with tqdm(total=config.max_evaluations, initial=state.evaluations, desc="SPDY search",
              unit="eval", disable=not progress) as bar:
        while True:
            if config.max_evaluations is not None and state.evaluations >= config.max_evaluations:
                stopped = "evaluations"
                break
            elapsed = time.monotonic() - started
            out_of_time = config.max_minutes is not None and elapsed >= 60 * config.max_minutes
            if out_of_time and state.best is not None:
                stopped = "minutes"
                break
            candidate = state.next_candidate(layers)
            if candidate is None:
                break
            choices = planner.choose(speedup, matrix=candidate[:, None] * base)
            picks = tuple(option_index[choices[name]] for name in planner.layers)
            if picks not in state.cache:
                state.cache[picks] = _checked(score(choices), choices)
                state.evaluations += 1
                bar.update()
            state.record(config, candidate, state.cache[picks])
            state.seconds = time.monotonic() - started
            bar.set_postfix(best=f"{state.best_score:.5g}", k=state.k)
            if checkpoint is not None:
                save_json(checkpoint, STATE_FORMAT, STATE_VERSION,
                          {"key": key, "state": state.to_json()})
    best = planner.choose(speedup, matrix=state.best[:, None] * base)
    log.info("search %s after %d candidates, %d evaluations: best score %.6g",
             STOPPED[stopped], state.candidates, state.evaluations, state.best_score)
    return SearchResult(
        coefficients=dict(zip(planner.layers, state.best.tolist())), choices=best,
        score=state.best_score, evaluations=state.evaluations, candidates=state.candidates,
        stopped=stopped, seconds=state.seconds, history=list(state.history),
        resumed=resumed is not None)


def _checked(value: float, choices: Choices) -> float:
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        value = float(value)           # a number, or a one-element tensor or array
    except (TypeError, ValueError, RuntimeError):
        raise SpdyError(f"the score function returned {type(value).__name__} {value!r}, not "
                        "a number; return the loss of the profile as a float") from None
    if not math.isfinite(value):
        sparsest = max(choices.values(), key=lambda o: o.sparsity)
        raise SpdyError(f"the search loss returned {value} for a profile (sparsest layer "
                        f"{sparsest}); check the loss function and the calibration data")
    return value


def _state_key(planner: Planner, speedup: float, base: np.ndarray, config: SearchConfig,
               identity: Mapping[str, Any]) -> dict[str, Any]:
    """What a saved state belongs to: resuming under anything else would be a different
    search. The budgets are left out, so a finished search can be extended."""
    settings = dataclasses.asdict(config)
    settings.pop("max_evaluations")
    settings.pop("max_minutes")
    return {**planner.identity(), "speedup": speedup, "errors": base.tolist(),
            "config": settings, "identity": dict(identity or {})}


def _resume(checkpoint: str | os.PathLike | None, key: dict[str, Any],
            replace_other: bool, layers: int) -> _State | None:
    """The saved state of this search, or None (none saved; or, with `replace_other`, one of
    another search or a damaged one, with a log line: the caller owns the file)."""
    if checkpoint is None or not as_path(checkpoint, "checkpoint").exists():
        return None
    if Path(checkpoint).is_dir():
        raise SpdyError(f"checkpoint {checkpoint} is a directory; give the path of a file for "
                        "the search state")
    try:
        saved_key, state = _read_state(checkpoint, layers)
    except (SpdyError, KeyError, TypeError, ValueError) as e:
        if replace_other:
            log.warning("%s is damaged (%s); starting the search afresh", checkpoint, e)
            return None
        raise SpdyError(f"{checkpoint}: malformed search state ({e}); delete it to start "
                        "afresh") from None
    if saved_key != _normalised(key):
        if replace_other:
            log.info("%s holds another search; starting afresh", checkpoint)
            return None
        raise SpdyError(f"{checkpoint} holds the state of another search (other table, "
                        "target, errors, seed or data); delete it or choose another output")
    log.info("resuming the search from %s: %d candidates, %d evaluations done", checkpoint,
             state.candidates, state.evaluations)
    return state


def _read_state(checkpoint: str | os.PathLike, layers: int) -> tuple[Any, _State]:
    """(the search's key, its state) from a state file; raises where the file is damaged."""
    doc = load_json(checkpoint, STATE_FORMAT, STATE_VERSION)
    state = _State.from_json(doc["state"])
    if state.best is not None and state.best.shape != (layers,):
        raise ValueError(f"its best vector has {state.best.size} coefficients for {layers} "
                         "layers")
    return doc.get("key"), state


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, floats stay exact)."""
    import json
    return json.loads(json.dumps(value))
