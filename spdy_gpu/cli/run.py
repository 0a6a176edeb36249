"""`spdy-gpu run`: the whole method, from a model and a target to a pruned model with its
measured speedup and quality."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import LatencyBackend
from ..errors import SpdyError
from ..jsonio import check_output_dir
from ..losses import LOSSES
from ..models import ModelEntry
from ..pipeline import GapSettings, RunReport, RunSettings, require_files, run
from ..reconstruct import FastConfig
from ..search import SearchConfig
from .common import (
    add_backend_args,
    add_model_args,
    add_option_args,
    backend_from_args,
    excluded_by,
    model_from_args,
    options_from_args,
)
from .database import add_calibration_args, calibration_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="the whole method: timings, database, search, measured guarantee, export",
        description="Prune the model to a speedup guaranteed on the backend: measure (or "
                    "reuse) its timing table, build the reconstruction database, search "
                    "per-layer coefficients scored on held-out calibration data, measure the "
                    "pruned model against dense end to end (tightening the budget and "
                    "re-solving while it falls short), optionally run global AdaPrune, and "
                    "write the profile, pruned weights, deployable model and a report to "
                    "DIR. Rerunning the same command resumes or reuses every stage.")
    parser.add_argument("--speedup", required=True, type=float, metavar="X",
                        help="target speedup over the dense model, e.g. 2.0")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory")
    add_method_args(parser)
    parser.add_argument("--gap", action="store_true", help="fine-tune the pruned model (gAP)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another run's files in DIR (matching measurements stay)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_command)


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Everything that says how SPDY runs (model, backend, options, calibration, search,
    guarantee, gAP settings): shared by `run` and `compare`."""
    add_model_args(parser)
    add_backend_args(parser)
    add_option_args(parser)
    add_calibration_args(parser)
    parser.add_argument("--timings", action="append", default=[], metavar="T.json",
                        help="a timing table to reuse when it matches this model and backend "
                             "setting (repeatable; otherwise the table is measured)")
    parser.add_argument("--database", metavar="DIR", type=Path, default=None,
                        help="reconstruction database to build, resume or reuse (default: "
                             "DIR/database); share one between runs of several targets")
    group = parser.add_argument_group("search")
    group.add_argument("--search-samples", type=int, default=32,
                       help="calibration samples held out from the database and scored by the "
                            "search (32)")
    group.add_argument("--errors", choices=["auto", "prior", "database"], default="auto",
                       help="per-option errors the coefficients scale: SPDY's squared-rank "
                            "prior, the database's per-layer errors, or auto (default): the "
                            "prior on a grid of one family, the database's on a mixed one")
    group.add_argument("--loss", choices=sorted(LOSSES), default=None,
                       help="model-level loss against the dense outputs (default: the "
                            "model's own, else nmse)")
    group.add_argument("--seed", type=int, default=0, help="search seed (0)")
    group.add_argument("--random-candidates", type=int, default=100,
                       help="random candidates before the local search (100)")
    group.add_argument("--patience", type=int, default=100,
                       help="failed local steps before the step shrinks (100)")
    group.add_argument("--max-evaluations", type=int, default=500,
                       help="profiles scored at most (500; 0: until the search converges)")
    group.add_argument("--max-minutes", type=float, default=None,
                       help="search wall time at most")
    group = parser.add_argument_group("measured guarantee")
    group.add_argument("--tolerance", type=float, default=0.03,
                       help="how far the measured speedup may fall short of the target "
                            "before the budget is tightened (0.03)")
    group.add_argument("--max-rounds", type=int, default=5,
                       help="measure / tighten / re-solve rounds at most (5)")
    group = parser.add_argument_group("global AdaPrune")
    # Defaults None: given where gAP does not run, they are refused (they would be ignored).
    group.add_argument("--gap-lr", type=float, default=None, help="Adam lr (1e-5)")
    group.add_argument("--gap-epochs", type=int, default=None, help="epochs at most (10)")


def run_command(args: argparse.Namespace) -> int:
    check_method_outputs(args)
    entry, setting = model_from_args(args)
    backend = backend_from_args(args)
    settings = run_settings_from_args(args, entry, backend, args.speedup,
                                      gap_from_args(args, args.gap, "without --gap"))
    report = run(entry, setting, backend, settings, args.out, progress=not args.quiet)
    print(summary(report))
    return 0


def gap_from_args(args: argparse.Namespace, runs_gap: bool, unless: str) -> GapSettings | None:
    """The gAP settings of --gap-lr / --gap-epochs where gAP runs; given where it does not
    (`unless` says why), they are refused."""
    given = {name: value for name, value in (("lr", args.gap_lr), ("epochs", args.gap_epochs))
             if value is not None}
    if not runs_gap and given:
        flag = f"--gap-{next(iter(given))}"
        raise SpdyError(f"{flag} tunes gAP, which does not run {unless}, so it would be "
                        "ignored; drop it")
    return GapSettings(**given) if runs_gap else None


def check_method_outputs(args: argparse.Namespace) -> None:
    """--out and --database must be writable directories, checked before any work."""
    check_output_dir(args.out)
    if args.database is not None:
        check_output_dir(args.database, "--database")


def run_settings_from_args(args: argparse.Namespace, entry: ModelEntry,
                           backend: LatencyBackend, speedup: float,
                           gap: GapSettings | None) -> RunSettings:
    """The RunSettings the arguments of add_method_args describe, for one target."""
    return RunSettings(
        speedup=speedup,
        options=None if args.options is None else tuple(options_from_args(args, "")),
        measure_grid=tuple(options_from_args(args, backend.default_pattern)),
        exclude=tuple(excluded_by(args, entry)),
        timings=timing_tables(args), database=args.database,
        calibration=calibration_from_args(args),
        search_samples=args.search_samples,
        search=SearchConfig(seed=args.seed, random_candidates=args.random_candidates,
                            patience=args.patience,
                            max_evaluations=args.max_evaluations or None,
                            max_minutes=args.max_minutes),
        errors=args.errors, loss=args.loss, fast=FastConfig(),
        gap=gap,
        tolerance=args.tolerance, max_rounds=args.max_rounds,
        overwrite=getattr(args, "overwrite", False))


def timing_tables(args: argparse.Namespace) -> tuple[Path, ...]:
    """The --timings tables, each a file (require_files)."""
    paths = tuple(Path(t) for t in args.timings)
    require_files(paths, "--timings")
    return paths


def summary(report: RunReport) -> str:
    """Target, predicted and measured speedup, quality against dense, where it all went."""
    measured = ("not measured" if report.measured is None else
                f"measured {report.measured.speedup:.3f}x (dense {report.measured.dense_ms:.4g}"
                f" ms, pruned {report.measured.pruned_ms:.4g} ms)")
    lines = [f"{report.model} on {report.backend}: target {report.target_speedup:g}x -> "
             f"predicted {report.predicted_speedup:.3f}x, {measured}"]
    if report.quality:
        lines.append("quality: " + ", ".join(f"{k} {v:.4f}" for k, v in report.quality.items()))
    if report.held_out_loss:
        lines.append("held-out loss: " + ", ".join(
            f"{k} {'unreachable' if v is None else f'{v:.4g}'}"
            for k, v in report.held_out_loss.items()))
    lines.append("time: " + ", ".join(f"{name} {stage['seconds']:.0f} s"
                                      + (" (reused)" if stage.get("reused") else "")
                                      + (" (resumed)" if stage.get("resumed") else "")
                                      for name, stage in report.stages.items()))
    lines += [f"note: {note}" for note in report.notes]
    lines.append(f"written to {Path(report.outputs.get('report', '.')).parent}: "
                 + ", ".join(Path(v).name for v in report.outputs.values()))
    return "\n".join(lines)
