import math

import pytest

from spdy_gpu import SparsityOption, SpdyError, geometric_levels, option_grid
from spdy_gpu.options import parse_options


def test_reference_grid_is_geometric_in_density():
    levels = geometric_levels()
    assert len(levels) == 41
    assert levels[0] == pytest.approx(0.40) and levels[-1] == pytest.approx(0.99)
    for k, s in enumerate(levels):
        assert s == pytest.approx(1 - 0.6 * (0.01 / 0.6) ** (k / 40), abs=1e-6)
    ratios = [(1 - b) / (1 - a) for a, b in zip(levels, levels[1:])]
    assert max(ratios) - min(ratios) < 1e-4


def test_grid_is_configurable_and_starts_dense():
    grid = option_grid("block", count=5, min_sparsity=0.5, max_sparsity=0.9, block=64)
    assert grid[0] == SparsityOption.dense()
    assert [o.block for o in grid[1:]] == [(64, 64)] * 5
    assert grid[1].sparsity == pytest.approx(0.5) and grid[-1].sparsity == pytest.approx(0.9)
    assert option_grid("nm") == [SparsityOption.dense(), SparsityOption.n_of_m(2, 4)]


@pytest.mark.parametrize("option", [
    SparsityOption.dense(), SparsityOption.unstructured(0.558877),
    SparsityOption.blocked(0.75, 16), SparsityOption.blocked(0.5, 32, 64),
    SparsityOption.n_of_m(2, 4), *option_grid(), *option_grid("block", block=128)])
def test_names_round_trip(option):
    assert SparsityOption.parse(option.name) == option


def test_nm_sparsity_and_density():
    option = SparsityOption.n_of_m(2, 4)
    assert option.sparsity == 0.5 and option.density == 0.5 and option.name == "nm2:4"


@pytest.mark.parametrize("text", ["", "sparse@0.5", "unstructured@1.5", "unstructured@0",
                                  "block0x32@0.5", "nm4:4", "nm0:4", "block32@0.5"])
def test_bad_option_text_is_refused(text):
    with pytest.raises(SpdyError):
        SparsityOption.parse(text)


def test_option_lists_must_start_dense_without_duplicates():
    with pytest.raises(SpdyError, match="start with 'dense'"):
        parse_options(["unstructured@0.5"])
    with pytest.raises(SpdyError, match="duplicate"):
        parse_options(["dense", "unstructured@0.5", "unstructured@0.5"])


@pytest.mark.parametrize("args", [(0, 0.4, 0.9), (5, 0.0, 0.9), (5, 0.9, 0.5), (5, 0.4, 1.0)])
def test_bad_grid_is_refused(args):
    with pytest.raises(SpdyError):
        geometric_levels(*args)


def test_single_level_grid():
    assert geometric_levels(1, 0.6, 0.6) == [0.6]
    assert math.isclose(option_grid(count=1, min_sparsity=0.6)[1].sparsity, 0.6)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(pattern="block", count=2, block=[32, 32]), ["dense", "block32x32@0.4",
                                                     "block32x32@0.99"]),
    (dict(count=3, min_sparsity=0.5, max_sparsity=0.5), ["dense", "unstructured@0.5"]),
    (dict(pattern="nm+block+nm", count=1, min_sparsity=0.5, max_sparsity=0.5, block=16),
     ["dense", "nm2:4", "block16x16@0.5"]),
])
def test_a_grid_lists_each_option_once(kwargs, expected):
    assert [o.name for o in option_grid(**kwargs)] == expected


def test_a_block_side_below_one_names_the_flag():
    with pytest.raises(SpdyError, match=r"^--block 0x0: block sides must be >= 1"):
        option_grid("block", 4, block=[0])
