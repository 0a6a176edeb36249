"""The DP at the reference's ResNet50 scale: 52 layers x 42 options x 10,000 buckets.

Run: pytest bench/test_bench_dp.py --benchmark-only
"""

import numpy as np
import pytest

from spdy_gpu import solve_dp


@pytest.mark.benchmark(group="DP 52 layers x 42 options x 10,000 buckets")
def test_dp_resnet50_scale(benchmark):
    rng = np.random.default_rng(0)
    times = rng.uniform(0.05, 1.0, size=(52, 42))
    errors = rng.uniform(0.0, 1.0, size=(52, 42))
    budget = 0.5 * times[:, 0].sum()
    picks = benchmark(solve_dp, errors, times, budget, 10_000)
    assert times[np.arange(52), picks].sum() <= budget
