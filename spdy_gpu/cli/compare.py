"""`spdy-gpu compare`: SPDY against uniform, global magnitude, the DP on database errors,
an evolutionary search, magnitude without reconstruction and gAP, at equal predicted
latency, each measured end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..compare import (
    METHODS,
    CompareReport,
    CompareSettings,
    compare,
    headline_metric,
    metric_of,
)
from ..pipeline import GapSettings
from .common import backend_from_args, model_from_args
from .run import add_method_args, check_method_outputs, gap_from_args, run_settings_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="SPDY against the obvious alternatives at equal measured speedup",
        description="For each target: run SPDY (search and measured guarantee) into "
                    "DIR/spdy-<X>x, give every other method the budget SPDY's guaranteed "
                    "profile was solved for, time each against the dense model in an "
                    "interleaved session of its own and score each with the model's quality "
                    "measures and held-out loss. Writes DIR/compare.{json,md,png}; a rerun "
                    "resumes at the first unfinished target. Methods: " + ", ".join(METHODS))
    parser.add_argument("--speedups", required=True, type=float, nargs="+", metavar="X",
                        help="target speedups, e.g. 1.5 2 3")
    parser.add_argument("--out", required=True, metavar="DIR", help="comparison directory")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to compare (default: all; spdy is required)")
    add_method_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    check_method_outputs(args)
    entry, setting = model_from_args(args)
    backend = backend_from_args(args, for_latency=True)
    settings = CompareSettings(
        speedups=tuple(args.speedups),
        run=run_settings_from_args(args, entry, backend, args.speedups[0], None),
        gap=gap_from_args(args, "spdy+gap" in args.methods,
                          "without spdy+gap in --methods") or GapSettings(),
        methods=tuple(args.methods))
    report = compare(entry, setting, backend, settings, args.out, progress=not args.quiet)
    print(summary(report, args.out))
    return 0


def summary(report: CompareReport, out: str) -> str:
    """Per target, each method's measured speedup and headline measure."""
    doc = report.to_json()
    metric = headline_metric(doc)
    lines = [f"{report.model} on {report.backend} ({metric}, measured speedup):"]
    for target in doc["targets"]:
        if target.get("unreachable"):
            lines.append(f"  {target['target']:g}x: unreachable (largest reachable "
                         f"{target['max_speedup']:.3f}x)")
            continue
        cells = []
        for row in target["rows"]:
            if row.get("unreachable"):
                cells.append(f"{row['method']} unreachable")
                continue
            value = metric_of(row, metric)
            shown = "n/a" if value is None else f"{value:.4g}"
            cells.append(f"{row['method']} {shown} @ {row['measured_speedup']:.2f}x")
        lines.append(f"  {target['target']:g}x: " + "; ".join(cells))
    written = [n for n in ("compare.json", "compare.md", "compare.png") if (Path(out) / n).exists()]
    lines.append(f"written to {out}: {', '.join(written)}")
    return "\n".join(lines)
