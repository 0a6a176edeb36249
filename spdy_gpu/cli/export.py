"""`spdy-gpu export`: the pruned model as an engine runs it (ONNX for DeepSparse, the
block-sparse artifact for the Triton kernel)."""

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
        "export", help="write the pruned model for its engine (ONNX or Triton block-sparse)",
        description="Prune the model to the profile (reconstructed weights from --database, "
                    "pruned weights from --weights, or magnitude masks) and write it: "
                    "--format onnx: an ONNX file (opset 14) that DeepSparse runs; --format "
                    "triton: one safetensors file whose block-pruned Linears load back as "
                    "BlockSparseLinear with spdy_gpu.deploy.load_block_sparse.")
    add_model_args(parser)
    parser.add_argument("--profile", required=True, metavar="P.json", help="profile to deploy")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--database", metavar="DIR", default=None,
                        help="reconstruction database (default: magnitude-pruned weights)")
    source.add_argument("--weights", metavar="W.safetensors", default=None,
                        help="weights already pruned to the profile (spdy-gpu apply or gap)")
    parser.add_argument("--format", required=True, choices=["onnx", "triton"],
                        help="onnx: for DeepSparse; triton: BlockSparseLinear artifact")
    parser.add_argument("--out", required=True, metavar="PATH", help="file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy import export_profile

    check_output_file(args.out)
    entry, setting = model_from_args(args)
    model, example = entry.build(setting)
    warn_unmatched_excludes(args.exclude, prunable_modules(model))
    result = export_profile(model, example, args.profile, args.out, format=args.format,
                            database=args.database, weights=args.weights,
                            model_name=entry.name, exclude=excluded_by(args, entry))
    stored = (f"; {result.block_sparse} block-sparse, {result.semi_structured} 2:4"
              if args.format == "triton" else "")
    print(f"exported {result.pruned} pruned layers ({result.sparsity:.1%} sparsity{stored}) "
          f"as {args.format} to {result.path}")
    return 0
