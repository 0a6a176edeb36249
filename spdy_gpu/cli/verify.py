"""`spdy-gpu verify`: measure a profile's end-to-end speedup next to the predicted one."""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from typing import Any

from ..jsonio import check_output_file, save_json
from ..pipeline import verify_profile
from ..profile import Profile
from .common import add_backend_args, add_model_args, backend_from_args, model_from_args

REPORT_FORMAT, REPORT_VERSION = "spdy-gpu/verify", 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="measure a profile's end-to-end speedup against the prediction",
        description="Prune the model to the profile (reconstructed weights from --database, "
                    "or magnitude masks), time it and the dense model end to end on the "
                    "backend, interleaved, and print the measured speedup next to the "
                    "predicted one.")
    add_model_args(parser, exclude=False)   # it measures the profile as planned
    add_backend_args(parser)
    parser.add_argument("--profile", required=True, metavar="P.json", help="profile to verify")
    parser.add_argument("--database", metavar="DIR", default=None,
                        help="reconstruction database (default: magnitude-pruned weights)")
    parser.add_argument("--force", action="store_true",
                        help="verify even if the profile was planned for another setting")
    parser.add_argument("--out", metavar="R.json", default=None,
                        help="also write the result as JSON (format spdy-gpu/verify)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_file(args.out)
    profile = Profile.load(args.profile)
    entry, setting = model_from_args(args)
    backend = backend_from_args(args, for_latency=True)
    database = None
    if args.database is not None:
        from ..reconstruct import Database
        database = Database.open(args.database)
    result = verify_profile(entry, setting, backend, profile, database, force=args.force)
    if args.out:
        save_json(args.out, REPORT_FORMAT, REPORT_VERSION, {
            **result, "profile": str(args.profile),
            "command": shlex.join(["spdy-gpu", *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(format_result(result))
    return 0


def format_result(result: dict[str, Any]) -> str:
    tag = " [planned on ESTIMATED times]" if result["estimated"] else ""
    return (f"dense {result['measured_dense_ms']:.4g} ms (spread "
            f"{result['measured_dense_spread_ms']:.2g} ms, table "
            f"{result['table_dense_ms']:.4g} ms), pruned {result['measured_pruned_ms']:.4g} ms "
            f"(spread {result['measured_pruned_spread_ms']:.2g} ms, predicted "
            f"{result['predicted_ms']:.4g}, error {result['time_error_pct']:+.1f}%): measured "
            f"speedup {result['measured_speedup']:.3f}x, predicted "
            f"{result['predicted_speedup']:.3f}x, target {result['target_speedup']:g}x{tag}"
            + (f" ({result['slow_engines']} engines settled slow, left out)"
               if result.get("slow_engines") else ""))
