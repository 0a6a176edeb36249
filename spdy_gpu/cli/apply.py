"""`spdy-gpu apply`: prune a model to a profile for good and save its weights."""

from __future__ import annotations

import argparse

from ..jsonio import check_output_file
from ..layers import prunable_modules, warn_unmatched_excludes
from .common import (
    add_model_args,
    excluded_by,
    model_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply", help="prune a model to a profile and save its weights",
        description="Give every layer of the profile its chosen option's weights "
                    "(reconstructed weights from --database, or magnitude masks) and save the "
                    "pruned model's state dict as safetensors, with the profile in its "
                    "metadata. Layers matching --exclude stay dense.")
    add_model_args(parser)
    parser.add_argument("--profile", required=True, metavar="P.json", help="profile to apply")
    parser.add_argument("--database", metavar="DIR", default=None,
                        help="reconstruction database (default: magnitude-pruned weights)")
    parser.add_argument("--out", required=True, metavar="W.safetensors",
                        help="pruned weights file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy import apply_profile

    check_output_file(args.out)
    entry, setting = model_from_args(args)
    model, _ = entry.build(setting)
    warn_unmatched_excludes(args.exclude, prunable_modules(model))
    result = apply_profile(model, args.profile, args.out, database=args.database,
                           model_name=entry.name, exclude=excluded_by(args, entry))
    print(f"pruned {result.pruned} layers to {result.sparsity:.1%} sparsity (zeros of their "
          f"weights); weights written to {result.path}")
    return 0
