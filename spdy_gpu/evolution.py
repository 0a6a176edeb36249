"""An evolutionary search over per-layer options under the latency budget: the comparison
point for SPDY's coefficient search, after EvoPress (Sieberling et al., arXiv 2410.14649),
which evolves per-layer compression levels under a parameter budget.

A candidate is a profile (one option per searched layer). An offspring makes 1 to
`max_swaps` level swaps on its parent (one random layer a step sparser, another a step
denser), and the result is projected back onto the latency budget by the exact DP: the
feasible profile at the least squared level distance from it. Selection is (1 + lambda):
the best of the parent and its `offspring` scored children survives. Distinct profiles are
scored once and counted as evaluations, as in SPDY's search, so both can be given the same
number of evaluations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .errors import SpdyError
from .options import SparsityOption
from .solve import Planner

log = logging.getLogger(__name__)

Choices = dict[str, SparsityOption]


@dataclass(frozen=True)
class EvolutionConfig:
    seed: int = 0
    offspring: int = 8              # children scored per generation
    max_swaps: int = 3              # level swaps per child, drawn from 1..max_swaps
    max_evaluations: int = 500      # distinct profiles scored, at most
    max_draws: int = 200            # children drawn per generation before giving up

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise SpdyError(f"--seed {self.seed} must be >= 0")
        for name in ("offspring", "max_swaps", "max_evaluations", "max_draws"):
            if getattr(self, name) < 1:
                raise SpdyError(f"evolution {name} {getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class EvolutionResult:
    choices: Choices                     # searched layers only
    score: float
    evaluations: int
    generations: int
    stopped: str                         # "evaluations" or "converged" (no new child)
    seconds: float
    history: list[tuple[int, float]]     # (evaluations, best score) at each improvement


def evolve(planner: Planner, speedup: float, score: Callable[[Choices], float],
           start: Mapping[str, SparsityOption], *,
           config: EvolutionConfig = EvolutionConfig(),
           progress: bool = True) -> EvolutionResult:
    """Evolve the profile at `speedup` that `score` likes best (lower is better), from
    `start` (projected onto the budget first)."""
    index = {o: i for i, o in enumerate(planner.options)}
    missing = [name for name in planner.layers if name not in start]
    if missing:
        raise SpdyError(f"the start profile has no option for layer {missing[0]!r}; give "
                        "one for every searched layer")
    rng = np.random.default_rng(config.seed)
    started = time.monotonic()
    scored: dict[tuple[int, ...], float] = {}

    def evaluate(picks: tuple[int, ...]) -> float:
        value = float(score(_choices(planner, picks)))
        if not math.isfinite(value):
            raise SpdyError(f"the search loss returned {value}; check the loss function and "
                            "the calibration data")
        scored[picks] = value
        bar.update()
        return value

    with tqdm(total=config.max_evaluations, desc="evolution", unit="eval",
              disable=not progress) as bar:
        ranks = _ranks(planner)
        parent = project(planner, speedup,
                         ranks[[index[start[name]] for name in planner.layers]])
        best = evaluate(parent)
        history, generations, stopped = [(1, best)], 0, "evaluations"
        while len(scored) < config.max_evaluations:
            children = _offspring(planner, speedup, parent, scored, rng, config)
            if not children:
                stopped = "converged"
                break
            generations += 1
            for child in children[:config.max_evaluations - len(scored)]:
                value = evaluate(child)
                if value < best:
                    parent, best = child, value
                    history.append((len(scored), best))
            bar.set_postfix(best=f"{best:.5g}")
    log.info("evolution %s after %d generations, %d evaluations: best score %.6g",
             "reached its evaluation budget" if stopped == "evaluations" else "converged",
             generations, len(scored), best)
    return EvolutionResult(choices=_choices(planner, parent), score=best,
                           evaluations=len(scored), generations=generations, stopped=stopped,
                           seconds=time.monotonic() - started, history=history)


def project(planner: Planner, speedup: float, levels: np.ndarray) -> tuple[int, ...]:
    """The profile (option index per searched layer) within the budget of `speedup` nearest
    to `levels` (a sparsity rank per layer, see _ranks), by least squared rank distance: the
    DP with distances as errors."""
    distance = (_ranks(planner)[None, :] - np.asarray(levels)[:, None]).astype(np.float64) ** 2
    return tuple(int(p) for p in planner.grid(speedup).solve(distance))


def _ranks(planner: Planner) -> np.ndarray:
    """Each option's position when the options are sorted by sparsity (its level)."""
    order = sorted(range(len(planner.options)), key=lambda i: planner.options[i].sparsity)
    return np.argsort(order)


def _offspring(planner: Planner, speedup: float, parent: tuple[int, ...],
               scored: Mapping[tuple[int, ...], float], rng: np.random.Generator,
               config: EvolutionConfig) -> list[tuple[int, ...]]:
    """Up to `offspring` distinct children no profile scored so far equals."""
    ranks = _ranks(planner)
    usable = np.isfinite(planner.times)[:, np.argsort(ranks)]  # [layers, levels]
    children: list[tuple[int, ...]] = []
    for _ in range(config.max_draws):
        if len(children) == config.offspring:
            break
        levels = ranks[list(parent)]
        for _ in range(int(rng.integers(1, config.max_swaps + 1))):
            sparser, denser = rng.choice(len(levels), size=2, replace=len(levels) < 2)
            levels[sparser] = _step(usable[sparser], levels[sparser], +1)
            levels[denser] = _step(usable[denser], levels[denser], -1)
        child = project(planner, speedup, levels)
        if child not in scored and child not in children:
            children.append(child)
    return children


def _step(usable: np.ndarray, level: int, direction: int) -> int:
    """The next level the layer can take in `direction`, or `level` at the end."""
    for candidate in range(level + direction, len(usable) if direction > 0 else -1, direction):
        if usable[candidate]:
            return candidate
    return int(level)


def _choices(planner: Planner, picks: tuple[int, ...]) -> Choices:
    return {name: planner.options[p] for name, p in zip(planner.layers, picks)}
