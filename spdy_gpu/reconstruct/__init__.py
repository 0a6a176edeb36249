"""Reconstruction: calibration statistics, layer solvers (fast Gram-matrix solver and
faithful AdaPrune), the on-disk database of reconstructed weights, stitching, and global
AdaPrune."""

from .adaprune import AdaPruneConfig, adaprune
from .capture import LayerStats, capture_inputs, capture_statistics
from .database import Database, build_database, model_fingerprint, option_chains
from .fast import FastConfig, reconstruct_fast, solve_masked
from .gap import GapReport, global_adaprune_
from .stitch import Backup, restore_, stitch_

__all__ = [
    "AdaPruneConfig",
    "Backup",
    "Database",
    "FastConfig",
    "GapReport",
    "LayerStats",
    "adaprune",
    "build_database",
    "capture_inputs",
    "capture_statistics",
    "global_adaprune_",
    "model_fingerprint",
    "option_chains",
    "reconstruct_fast",
    "restore_",
    "solve_masked",
    "stitch_",
]
