"""`spdy-gpu verify`: measure a profile's end-to-end speedup next to the predicted one."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..backends import backend_names, get_backend
from ..errors import SpdyError
from ..jsonio import save_json
from ..profile import Profile
from ..timing import Fingerprint
from .common import add_model_args, model_from_args
from .timings import backend_config

log = logging.getLogger(__name__)

REPORT_FORMAT, REPORT_VERSION = "spdy-gpu/verify", 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="measure a profile's end-to-end speedup against the prediction",
        description="Prune the model to the profile (reconstructed weights from --database, "
                    "or magnitude masks), time it and the dense model end to end on the "
                    "backend, and print the measured speedup next to the predicted one.")
    add_model_args(parser)
    parser.add_argument("--profile", required=True, metavar="P.json", help="profile to verify")
    parser.add_argument("--database", metavar="DIR", default=None,
                        help="reconstruction database (default: magnitude-pruned weights)")
    parser.add_argument("--backend", required=True, choices=backend_names())
    parser.add_argument("--threads", type=int, default=None, help="deepsparse: cores to use")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timing rounds (default: the backend's)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="triton: dtype (default bf16)")
    parser.add_argument("--force", action="store_true",
                        help="verify even if the profile was planned for another setting")
    parser.add_argument("--out", metavar="R.json", default=None,
                        help="also write the result as JSON (format spdy-gpu/verify)")
    parser.set_defaults(run=run, estimate=None)


def check_fingerprint(planned: Fingerprint, here: Fingerprint, force: bool) -> list[str]:
    """Refuse a profile planned on a table from another setting unless forced."""
    differences = planned.mismatches(here)
    if differences and not force:
        raise SpdyError("the profile was planned on timings from another setting ("
                        + "; ".join(differences) + "); re-measure and re-plan here, "
                        "or pass --force")
    for difference in differences:
        log.warning("forced: profile and this machine differ in %s", difference)
    return differences


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    if profile.estimated:
        log.warning("the profile was planned on ESTIMATED times")
    entry, setting = model_from_args(args)
    if profile.model and profile.model != entry.name:
        raise SpdyError(f"the profile is for model {profile.model!r}, not {entry.name!r}; "
                        f"pass --model {profile.model}")
    if args.backend == "triton" and not _has_cuda():
        raise SpdyError("verify --backend triton measures end-to-end latency on a GPU and this "
                        "machine has no CUDA device; run it where the profile's timings were "
                        "measured")
    backend = get_backend(args.backend, **backend_config(args))
    differences = check_fingerprint(profile.fingerprint, backend.fingerprint(setting),
                                    args.force)
    database = None
    if args.database is not None:
        from ..reconstruct import Database
        database = Database.open(args.database)
    from ..reconstruct import restore_, stitch_

    model, example = entry.build(setting)
    dense_ms, dense_spread = backend.latency_ms(model, example, setting)
    backup = stitch_(model, profile.choices, database)
    try:
        pruned_ms, pruned_spread = backend.latency_ms(model, example, setting)
    finally:
        restore_(model, backup)
    result = verify_result(profile, dense_ms, dense_spread, pruned_ms, pruned_spread)
    result["forced_differences"] = differences
    if args.out:
        save_json(Path(args.out), REPORT_FORMAT, REPORT_VERSION, {
            **result, "model": entry.name, "profile": str(args.profile),
            "weights": args.database or "magnitude",
            "command": shlex.join(["spdy-gpu", *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(format_result(result, profile))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def verify_result(profile: Profile, dense_ms: float, dense_spread: float, pruned_ms: float,
                  pruned_spread: float) -> dict[str, Any]:
    """Measured against predicted; error_pct = (predicted - measured) / measured time."""
    return {
        "target_speedup": profile.target_speedup,
        "predicted_ms": profile.predicted_ms,
        "predicted_speedup": profile.predicted_speedup,
        "measured_dense_ms": dense_ms, "measured_dense_spread_ms": dense_spread,
        "measured_pruned_ms": pruned_ms, "measured_pruned_spread_ms": pruned_spread,
        "measured_speedup": dense_ms / pruned_ms,
        "table_dense_ms": profile.dense_total_ms,
        "time_error_pct": 100.0 * (profile.predicted_ms - pruned_ms) / pruned_ms,
        "estimated": profile.estimated,
    }


def format_result(result: dict[str, Any], profile: Profile) -> str:
    tag = " [planned on ESTIMATED times]" if profile.estimated else ""
    return (f"dense {result['measured_dense_ms']:.4g} ms (spread "
            f"{result['measured_dense_spread_ms']:.2g}, table {result['table_dense_ms']:.4g}),"
            f" pruned {result['measured_pruned_ms']:.4g} ms (spread "
            f"{result['measured_pruned_spread_ms']:.2g}, predicted "
            f"{result['predicted_ms']:.4g}, error {result['time_error_pct']:+.1f}%): measured "
            f"speedup {result['measured_speedup']:.3f}x, predicted "
            f"{result['predicted_speedup']:.3f}x, target {result['target_speedup']:g}x{tag}")
