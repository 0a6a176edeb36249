"""spdy-gpu: prune a network to a guaranteed speedup on its real inference backend (SPDY).

The method as four verbs, each a library call:
- measure: `get_backend(name).measure_table(...)` -> TimingTable
- reconstruct: `build_database(...)` -> Database of pruned-and-reconstructed weights
- search: `Planner(table).solve(speedup, errors)` (the exact DP) and `search(...)` (SPDY's
  coefficient search scored on held-out data)
- deploy: `prune_` / `save_pruned` / `export_onnx_pruned` / `save_block_sparse`
and the whole method in one call: `prune(model, example, speedup=...)` (notebooks) or
`run(entry, setting, backend, RunSettings(...), out_dir)` (what `spdy-gpu run` calls).

Importing the package loads neither Triton, DeepSparse nor ONNX: backends and kernels are
imported when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .data import Calibration, CalibrationSpec
from .dp import Frontier, TimeGrid, dp_frontier, solve_dp
from .errors import InfeasibleTargetError, MissingDependencyError, SpdyError
from .layers import LayerInfo, discover_layers
from .masks import build_mask
from .models import ModelEntry, ModelSetting, load_model
from .options import SparsityOption, geometric_levels, option_grid
from .profile import Profile
from .search import SearchConfig, SearchResult, search
from .solve import Planner, solve_profile
from .timing import Fingerprint, TimingTable

__version__ = "0.1.0"

# Heavier parts, imported on first use: name -> module.
_LAZY = {
    "BlockSparseLinear": "sparse_linear",
    "BlockSparseConv1x1": "sparse_linear",
    "SemiStructuredLinear": "semi_structured",
    "sparsify_": "sparse_linear",
    "cuda_graphed": "deploy",
    "get_backend": "backends",
    "Database": "reconstruct",
    "build_database": "reconstruct",
    "prune_": "deploy",
    "save_pruned": "deploy",
    "load_pruned": "deploy",
    "export_onnx_pruned": "deploy",
    "save_block_sparse": "deploy",
    "load_block_sparse": "deploy",
    "GapSettings": "pipeline",
    "RunReport": "pipeline",
    "RunSettings": "pipeline",
    "prune": "pipeline",
    "run": "pipeline",
    "verify_profile": "pipeline",
}

__all__ = [
    "BlockSparseConv1x1",
    "BlockSparseLinear",
    "Calibration",
    "CalibrationSpec",
    "Database",
    "Fingerprint",
    "Frontier",
    "GapSettings",
    "InfeasibleTargetError",
    "LayerInfo",
    "MissingDependencyError",
    "ModelEntry",
    "ModelSetting",
    "Planner",
    "Profile",
    "RunReport",
    "RunSettings",
    "SearchConfig",
    "SearchResult",
    "SemiStructuredLinear",
    "SparsityOption",
    "SpdyError",
    "TimeGrid",
    "TimingTable",
    "build_database",
    "build_mask",
    "cuda_graphed",
    "discover_layers",
    "dp_frontier",
    "export_onnx_pruned",
    "geometric_levels",
    "get_backend",
    "load_block_sparse",
    "load_model",
    "load_pruned",
    "option_grid",
    "prune",
    "prune_",
    "run",
    "save_block_sparse",
    "save_pruned",
    "search",
    "solve_dp",
    "solve_profile",
    "sparsify_",
    "verify_profile",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'spdy_gpu' has no attribute {name!r}")
