"""`spdy-gpu solve`: the exact DP on a timing table for one target speedup."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from datetime import datetime, timezone

from ..jsonio import check_output_file
from ..layers import warn_unmatched_excludes
from ..plots import check_plot_file
from ..profile import Profile
from ..solve import Planner, check_target, load_errors
from ..timing import TimingTable


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "solve", help="pick per-layer options for a target speedup (exact DP)",
        description="Solve SPDY's dynamic program on a timing table: the least-error choice of "
                    "one option per layer whose predicted time is guaranteed within "
                    "dense time / speedup. Without --errors it uses the reference prior "
                    "((rank of the level / (levels - 1))^2) for every layer.")
    parser.add_argument("--timings", required=True, metavar="T.json", help="timing table")
    parser.add_argument("--speedup", required=True, type=float, metavar="X",
                        help="target speedup over the dense model, e.g. 1.5")
    parser.add_argument("--errors", metavar="E.json",
                        help="per-layer, per-option errors (format spdy-gpu/errors)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="layer name pattern kept dense (its time counts as fixed)")
    parser.add_argument("--buckets", type=int, default=10_000,
                        help="time resolution of the DP (default 10000)")
    parser.add_argument("--out", required=True, metavar="profile.json", help="profile to write")
    parser.add_argument("--plot", metavar="FIG", default=None,
                        help="also draw the error-speedup frontier and the chosen profile")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    speedup = check_target(args.speedup)
    check_output_file(args.out)
    if args.plot:
        check_plot_file(args.plot)
    table = TimingTable.load(args.timings)
    planner = Planner(table, args.exclude, args.buckets)
    warn_unmatched_excludes(args.exclude, table.layer_names)
    errors = None if args.errors is None else load_errors(args.errors, table.options)
    profile = planner.solve(speedup, errors)
    profile = dataclasses.replace(profile, provenance={
        "command": shlex.join(["spdy-gpu", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": str(args.timings), "errors": args.errors or "prior"})
    profile.save(args.out)
    if args.plot:
        from ..plots import plot_profile

        curve = planner.curve(errors)
        label = "total error (prior)" if errors is None else "total error"
        written = plot_profile(table, profile, curve, planner.total_error(profile, errors),
                               args.plot, label)
        print(f"plot written to {written}")
    if not args.quiet:
        print_profile(table, profile)
    print(summary_line(profile, args.out))
    return 0


def summary_line(profile: Profile, path: str) -> str:
    tag = " [ESTIMATED times]" if profile.estimated else ""
    return (f"target {profile.target_speedup:g}x -> predicted {profile.predicted_ms:.4g} ms "
            f"(dense {profile.dense_total_ms:.4g} ms, budget {profile.budget_ms:.4g} ms): "
            f"{profile.predicted_speedup:.3f}x{tag}; profile written to {path}")


def print_profile(table: TimingTable, profile: Profile) -> None:
    """One line per layer: chosen option and its time against dense. The rows add up to the
    prediction: excluded layers are listed with their time in the fixed row, not their own."""
    times = table.times()
    index = {o: i for i, o in enumerate(table.options)}
    label = "fixed (other ops, excluded)" if profile.excluded else "fixed (other ops)"
    width = max(len(label), *(len(name) for name in profile.choices))
    print(f"{'layer':<{width}}  {'option':<22} {'dense ms':>9} {'chosen ms':>9}")
    for row, (name, option) in enumerate(profile.choices.items()):
        if name in profile.excluded:
            print(f"{name:<{width}}  excluded: in fixed")
        else:
            print(f"{name:<{width}}  {option.name:<22} {times[row, 0]:9.4f} "
                  f"{times[row, index[option]]:9.4f}")
    print(f"{label:<{width}}  {'':<22} {profile.fixed_ms:9.4f} {profile.fixed_ms:9.4f}")
    dense = profile.fixed_ms + sum(times[row, 0] for row, name in enumerate(profile.choices)
                                   if name not in profile.excluded)
    print(f"{'total':<{width}}  {'':<22} {dense:9.4f} {profile.predicted_ms:9.4f}")
