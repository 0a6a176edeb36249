"""spdy-gpu: prune a network to a guaranteed speedup on its real inference backend (SPDY).

Importing the package loads neither Triton, DeepSparse nor ONNX: backends and kernels are
imported when first used.
"""

from __future__ import annotations

from typing import Any

from .dp import Frontier, TimeGrid, dp_frontier, solve_dp
from .errors import InfeasibleTargetError, MissingDependencyError, SpdyError
from .layers import LayerInfo, discover_layers
from .masks import build_mask
from .options import SparsityOption, geometric_levels, option_grid
from .profile import Profile
from .solve import Planner, solve_profile
from .timing import Fingerprint, TimingTable

__version__ = "0.1.0"

__all__ = [
    "BlockSparseLinear",
    "Fingerprint",
    "Frontier",
    "InfeasibleTargetError",
    "LayerInfo",
    "MissingDependencyError",
    "Planner",
    "Profile",
    "SparsityOption",
    "SpdyError",
    "TimeGrid",
    "TimingTable",
    "build_mask",
    "discover_layers",
    "dp_frontier",
    "geometric_levels",
    "option_grid",
    "solve_dp",
    "solve_profile",
]


def __getattr__(name: str) -> Any:
    # The GPU layer lives beside its kernel; import it only when asked for.
    if name == "BlockSparseLinear":
        from .sparse_linear import BlockSparseLinear
        return BlockSparseLinear
    raise AttributeError(f"module 'spdy_gpu' has no attribute {name!r}")
