"""Sparsity options: what a layer can be pruned to, and the default grid of levels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import SpdyError, check_types

Pattern = Literal["dense", "unstructured", "block", "nm"]

_NAME_RE = re.compile(
    r"^(?:(?P<dense>dense)"
    r"|unstructured@(?P<u>[0-9.]+)"
    r"|block(?P<br>\d+)x(?P<bc>\d+)@(?P<b>[0-9.]+)"
    r"|nm(?P<n>\d+):(?P<m>\d+))$"
)


@dataclass(frozen=True)
class SparsityOption:
    """One way to prune a layer.

    pattern: "dense"; "unstructured" (any weights); "block" (whole `block` tiles of the
    GEMM view [out, in * kernel area / groups]); "nm" (n kept of every m along the input).
    sparsity: fraction of weights (unstructured) or of blocks (block) removed; for N:M it
    is 1 - n/m.
    """

    pattern: Pattern
    sparsity: float = 0.0
    block: tuple[int, int] | None = None
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.pattern == "dense":
            ok = self.sparsity == 0.0 and self.block is None and self.n == self.m == 0
        elif self.pattern == "unstructured":
            ok = 0.0 < self.sparsity < 1.0 and self.block is None
        elif self.pattern == "block":
            ok = (0.0 < self.sparsity < 1.0 and self.block is not None
                  and len(self.block) == 2 and min(self.block) >= 1)
        elif self.pattern == "nm":
            ok = 0 < self.n < self.m and abs(self.sparsity - (1 - self.n / self.m)) < 1e-12
        else:
            ok = False
        if not ok:
            shape = {"block": f", block {self.block}",
                     "nm": f", {self.n}:{self.m}"}.get(self.pattern, "")
            raise SpdyError(f"invalid {self.pattern} sparsity option (sparsity "
                            f"{self.sparsity:g}{shape}); sparsity must lie in (0, 1), blocks "
                            "need two positive sizes, N:M needs 0 < N < M")

    @classmethod
    def dense(cls) -> SparsityOption:
        return cls("dense")

    @classmethod
    def unstructured(cls, sparsity: float) -> SparsityOption:
        return cls("unstructured", round(float(sparsity), 6))

    @classmethod
    def blocked(cls, sparsity: float, rows: int, cols: int | None = None) -> SparsityOption:
        return cls("block", round(float(sparsity), 6), (int(rows), int(cols or rows)))

    @classmethod
    def n_of_m(cls, n: int, m: int) -> SparsityOption:
        return cls("nm", 1 - n / m, None, int(n), int(m))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def family(self) -> tuple[Any, ...]:
        """What the option's levels vary within: the pattern and its shape (block, N:M)."""
        return (self.pattern, self.block, self.n, self.m)

    @property
    def name(self) -> str:
        """Stable text form used in every file; `parse(name)` gives the option back."""
        if self.pattern == "dense":
            return "dense"
        if self.pattern == "unstructured":
            return f"unstructured@{_fmt(self.sparsity)}"
        if self.pattern == "block":
            return f"block{self.block[0]}x{self.block[1]}@{_fmt(self.sparsity)}"
        return f"nm{self.n}:{self.m}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> SparsityOption:
        if not isinstance(text, str):
            raise SpdyError(f"a sparsity option's name is a string such as 'unstructured@0.5', "
                            f"'block32x32@0.5' or 'nm2:4', not {type(text).__name__} {text!r}")
        match = _NAME_RE.match(text.strip())
        if match is None:
            raise SpdyError(f"cannot parse sparsity option {text!r}; expected 'dense', "
                            "'unstructured@0.5', 'block32x32@0.5' or 'nm2:4'")
        g = match.groupdict()
        if g["dense"]:
            return cls.dense()
        if g["u"] is not None:
            return cls.unstructured(float(g["u"]))
        if g["b"] is not None:
            return cls.blocked(float(g["b"]), int(g["br"]), int(g["bc"]))
        return cls.n_of_m(int(g["n"]), int(g["m"]))


def _fmt(sparsity: float) -> str:
    """Shortest exact text of a sparsity rounded to 6 decimals (so names round-trip)."""
    return f"{sparsity:.6f}".rstrip("0").rstrip(".")


def geometric_levels(count: int = 41, min_sparsity: float = 0.40,
                     max_sparsity: float = 0.99) -> list[float]:
    """Sparsities spaced geometrically in density, as in the SPDY reference grid.

    s_k = 1 - d0 * (d1 / d0) ** (k / (count - 1)) with d0 = 1 - min, d1 = 1 - max.
    """
    check_types({"count": (count, int), "min_sparsity": (min_sparsity, float),
                 "max_sparsity": (max_sparsity, float)})
    if count < 1 or not 0.0 < min_sparsity <= max_sparsity < 1.0:
        raise SpdyError(f"bad level grid (count={count}, {min_sparsity}..{max_sparsity}); "
                        "need count >= 1 and 0 < min <= max < 1")
    if count == 1:
        return [round(min_sparsity, 6)]
    d0, d1 = 1.0 - min_sparsity, 1.0 - max_sparsity
    k = np.arange(count) / (count - 1)
    return [round(float(s), 6) for s in 1.0 - d0 * (d1 / d0) ** k]


def option_grid(pattern: str = "unstructured", count: int = 41, min_sparsity: float = 0.40,
                max_sparsity: float = 0.99,
                block: int | tuple[int, int] | list[int | tuple[int, int]] = 32,
                nm: tuple[int, int] = (2, 4)) -> list[SparsityOption]:
    """Dense followed by the levels of a pattern, or of several joined by "+" ("block+nm":
    the block levels, then N:M), so one profile can mix them per layer. Dense is always
    option 0. block: one side, one (rows, cols) pair, or a list of them (levels for each)."""
    options = [SparsityOption.dense()]
    for family in pattern.split("+"):
        options += _family(family, count, min_sparsity, max_sparsity, block, nm)
    return list(dict.fromkeys(options))     # each once: `--block 32 32`, min = max sparsity


def _family(pattern: str, count: int, min_sparsity: float, max_sparsity: float,
            block: int | tuple[int, int] | list[int | tuple[int, int]],
            nm: tuple[int, int]) -> list[SparsityOption]:
    if pattern == "dense":
        return []
    if pattern == "nm":
        return [SparsityOption.n_of_m(*nm)]
    levels = geometric_levels(count, min_sparsity, max_sparsity)
    if pattern == "unstructured":
        return [SparsityOption.unstructured(s) for s in levels]
    if pattern == "block":
        blocks = block if isinstance(block, list) else [block]
        pairs = [(b, b) if isinstance(b, int) else tuple(b) for b in blocks]
        wrong = next((pair for pair in pairs if min(pair) < 1), None)
        if wrong is not None:
            raise SpdyError(f"--block {'x'.join(map(str, wrong))}: block sides must be >= 1 "
                            "(e.g. --block 32)")
        return [SparsityOption.blocked(s, rows, cols) for rows, cols in pairs for s in levels]
    raise SpdyError(f"unknown sparsity pattern {pattern!r}; use unstructured, block or nm, or "
                    "several joined by '+' (e.g. block+nm)")


def blocks_left_out(options: list[SparsityOption], dropped: list[SparsityOption]) -> str:
    """The block shapes of a grid that would lose every level if `dropped` were left out,
    as "24x24, 1024x1024" ("" if none). A grid may lose options no layer can run, but not a
    whole block shape: that shape (the --block asked for) is what has to change."""
    gone = set(dropped)
    shapes = sorted({o.block for o in options if o.pattern == "block"
                     and all(x in gone for x in options if x.block == o.block)})
    return ", ".join(f"{rows}x{cols}" for rows, cols in shapes)


def parse_options(names: list[str]) -> list[SparsityOption]:
    """Parse option names; the list must start with dense and hold no duplicates."""
    options = [SparsityOption.parse(n) for n in names]
    if not options or options[0].pattern != "dense":
        raise SpdyError("option lists must start with 'dense' (dense is always a choice)")
    if len(set(options)) != len(options):
        raise SpdyError("option list has duplicate entries; list each option once")
    return options
