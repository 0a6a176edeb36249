"""`spdy-gpu database`: build the reconstruction database; `spdy-gpu gap`: global AdaPrune
of a profile stitched from it."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping

import numpy as np
from torch import nn

from ..data import CalibrationSpec
from ..errors import SpdyError
from ..jsonio import check_output_dir, check_output_file
from ..layers import discover_layers, prunable_modules, warn_unmatched_excludes
from ..options import SparsityOption, blocks_left_out
from .common import (
    add_model_args,
    add_option_args,
    excluded_by,
    model_from_args,
    options_from_args,
)

log = logging.getLogger(__name__)
DEFAULT_PATTERN = "unstructured"    # a database serves any backend: no backend to ask


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "database", help="reconstruct every layer at every option (the search's database)",
        description="Capture calibration statistics of the dense model, then reconstruct every "
                    "prunable layer at every option (nested masks, level by level) and store "
                    "the weights in DIR (one safetensors file per layer and option, plus "
                    "manifest.json). Rerunning the same command resumes an interrupted build.")
    add_model_args(parser)
    add_option_args(parser, DEFAULT_PATTERN)
    add_calibration_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="database directory")
    parser.add_argument("--method", choices=["fast", "adaprune"], default="fast",
                        help="fast: exact masked least squares on the Gram matrix (default); "
                             "adaprune: faithful AdaPrune (Adam on stored inputs, much slower)")
    group = parser.add_argument_group("solvers")
    # Defaults None: a flag given for the other method is refused (it would be ignored).
    group.add_argument("--solver", choices=["cg", "cholesky"], default=None,
                       help="fast: conjugate gradients on all rows (default) or one exact "
                            "Cholesky solve per row")
    group.add_argument("--damp", type=float, default=None,
                       help="fast: damping, fraction of H's mean diagonal (0.01)")
    group.add_argument("--max-iters", type=int, default=None,
                       help="fast: CG iterations per level at most (100)")
    group.add_argument("--tol", type=float, default=None,
                       help="fast: stop when an iteration gains < tol of the error (1e-4)")
    group.add_argument("--lr", type=float, default=None, help="adaprune: Adam lr (1e-3)")
    group.add_argument("--passes", type=int, default=None, help="adaprune: passes (10)")
    group.add_argument("--step-samples", type=int, default=None,
                       help="adaprune: samples per Adam step (32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
    add_gap_parser(subparsers)


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib", metavar="FILE",
                       help="calibration inputs: a torch.save'd tensor/tuple/dict whose first "
                            "dimension is samples, or a directory of such files "
                            "(default: the model's own data)")
    group.add_argument("--samples", type=int, default=1024,
                       help="calibration samples (1024, as the SPDY reference)")
    group.add_argument("--calib-batch-size", type=int, default=32,
                       help="samples per calibration forward (32)")


def calibration_from_args(args: argparse.Namespace) -> CalibrationSpec:
    return CalibrationSpec(args.calib, args.samples, args.calib_batch_size)


def run(args: argparse.Namespace) -> int:
    from ..reconstruct import AdaPruneConfig, FastConfig, build_database
    check_output_dir(args.out)
    # the solvers' settings are checked before the model is built and the data loaded
    fast_flags = {"solver": args.solver, "damp": args.damp, "max_iters": args.max_iters,
                  "tol": args.tol}
    adaprune_flags = {"lr": args.lr, "passes": args.passes, "batch_size": args.step_samples}
    ignored = fast_flags if args.method == "adaprune" else adaprune_flags
    given = next((name for name, value in ignored.items() if value is not None), None)
    if given is not None:
        flag = "--" + {"batch_size": "step-samples"}.get(given, given).replace("_", "-")
        raise SpdyError(f"{flag} tunes the other --method, not {args.method}, which would "
                        "ignore it; drop it or change --method")
    if args.solver == "cholesky" and (args.max_iters, args.tol) != (None, None):
        raise SpdyError("--max-iters and --tol tune --solver cg; the Cholesky solve is exact "
                        "and would ignore them: drop them or use --solver cg")
    fast = FastConfig(**{k: v for k, v in fast_flags.items() if v is not None})
    adaprune_config = AdaPruneConfig(samples=args.samples, **{
        k: v for k, v in adaprune_flags.items() if v is not None})
    spec = calibration_from_args(args)
    entry, setting = model_from_args(args)
    model, example = entry.build(setting)
    # the layers timings measures: called on the example input, weights not tied
    modules = {layer.name: model.get_submodule(layer.name)
               for layer in discover_layers(model, example, excluded_by(args, entry))}
    warn_unmatched_excludes(args.exclude, prunable_modules(model))
    options = options_from_args(args, DEFAULT_PATTERN)
    if not args.options:        # a grid's family no layer can take is dropped, as timings does
        options = _takeable(options, modules)
    calibration = spec.load(entry, setting, example)
    began = time.perf_counter()
    db = build_database(
        model, list(modules), options, calibration.batches, args.out, args.method,
        model_name=entry.name, calibration=calibration.description,
        fast=fast, adaprune_config=adaprune_config, progress=not args.quiet)
    sparsest = max(db.options, key=lambda o: o.sparsity)
    errors = db.errors_matrix(db.layers, [sparsest])[:, 0]
    taken = errors[np.isfinite(errors)]
    print(f"database {args.out}: {len(db.layers)} layers x {len(db.options)} options "
          f"({args.method}) in {time.perf_counter() - began:.1f} s; mean relative layer error "
          f"at the sparsest option, {sparsest.name}, {taken.mean():.4g} ({len(taken)} layers)")
    return 0


def _takeable(options: list[SparsityOption], modules: Mapping[str, nn.Module]
              ) -> list[SparsityOption]:
    """`options` without those no layer can take (a block larger than some layers), with a
    warning; unless nothing sparse would be left (build_database then names the problem).
    A block shape no layer takes at all is refused: the --block asked for has to change."""
    from ..reconstruct.database import options_no_layer_takes

    dropped = options_no_layer_takes(modules, options)
    kept = [o for o in options if o not in dropped]
    shapes = blocks_left_out(options, dropped)
    if shapes:
        raise SpdyError(f"no layer of this model can take blocks of {shapes}; choose another "
                        "--block")
    if not dropped or not any(o.pattern != "dense" for o in kept):
        return options
    log.warning("no layer of this model can take %s: left out of the grid",
                ", ".join(o.name for o in dropped))
    return kept


def add_gap_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gap", help="global AdaPrune of a profile stitched from a database",
        description="Stitch PROFILE's choices from the database, fine-tune the stitched model "
                    "against the dense model's layer outputs (masks kept, early stopping) and "
                    "save its weights (safetensors state dict).")
    add_model_args(parser, exclude=False)   # the profile as planned
    add_calibration_args(parser)
    parser.add_argument("--database", required=True, metavar="DIR")
    parser.add_argument("--profile", required=True, metavar="P.json")
    parser.add_argument("--out", required=True, metavar="W.safetensors")
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam lr (1e-5)")
    parser.add_argument("--epochs", type=int, default=10, help="at most (10)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without gain (2)")
    parser.add_argument("--only-pruned", action="store_true",
                        help="train only the pruned weights (default: all parameters)")
    parser.set_defaults(run=run_gap)


def run_gap(args: argparse.Namespace) -> int:
    from ..pipeline import GapSettings, global_adaprune_profile
    from ..profile import Profile
    from ..reconstruct import Database
    check_output_file(args.out)
    gap = GapSettings(lr=args.lr, epochs=args.epochs, patience=args.patience,
                      only_pruned=args.only_pruned)
    spec = calibration_from_args(args)
    entry, setting = model_from_args(args)
    database = Database.open(args.database)
    profile = Profile.load(args.profile)
    report = global_adaprune_profile(entry, setting, database, profile, spec, args.out,
                                     gap=gap, metadata={"profile": str(args.profile)})
    print(f"gAP: loss {report.loss_before:.5g} -> {report.loss_after:.5g} in {report.epochs} "
          f"epochs ({report.steps} steps{', stopped early' if report.stopped_early else ''}); "
          f"weights written to {args.out}")
    return 0
