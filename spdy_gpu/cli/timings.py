"""`spdy-gpu timings`: measure a model's per-layer timing table on a latency backend."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..backends import check_options_supported
from ..errors import SpdyError
from ..jsonio import check_output_file
from ..layers import discover_layers, prunable_modules, warn_unmatched_excludes
from ..locks import exclusive_file
from ..plots import check_plot_file
from ..timing import TimingTable, checkpoint_path
from .common import (
    add_backend_args,
    add_model_args,
    add_option_args,
    backend_from_args,
    excluded_by,
    model_from_args,
    options_from_args,
)

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "timings", help="measure the per-layer timing table of a model on a backend",
        description="Time every prunable layer of the model under every sparsity option on "
                    "the chosen backend, plus the whole dense model; the difference is the "
                    "fixed time. Interrupted runs resume from OUT.partial when the same "
                    "command is run again.")
    add_model_args(parser)
    add_option_args(parser)
    add_backend_args(parser)
    parser.add_argument("--out", required=True, metavar="T.json", help="timing table to write")
    parser.add_argument("--plot", metavar="FIG", default=None,
                        help="also draw per-layer speedup curves and the uniform-sparsity time")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = check_output_file(args.out)
    if args.plot:
        check_plot_file(args.plot)
    entry, setting = model_from_args(args)
    backend = backend_from_args(args)
    options = options_from_args(args, backend.default_pattern)
    if args.plot and all(option.pattern == "dense" for option in options):
        raise SpdyError("--plot draws speedups over dense, and the grid has no sparse "
                        "option; add some (--options, --levels) or drop --plot")
    started = time.perf_counter()
    model, example = entry.build(setting)
    layers = discover_layers(model, example, excluded_by(args, entry))
    warn_unmatched_excludes(args.exclude, prunable_modules(model))
    options = check_options_supported(backend, layers, options, grid=not args.options)
    log.info("%s: %d prunable layers x %d options on %s", entry.name, len(layers),
             len(options), args.backend)
    with exclusive_file(out, "timing table"):      # and its OUT.partial
        table = backend.measure_table(model, example, layers, options, model_name=entry.name,
                                      checkpoint=checkpoint_path(out), progress=not args.quiet)
        table = dataclasses.replace(table, provenance={
            **table.provenance,
            "command": shlex.join(["spdy-gpu", *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "wall_s": round(time.perf_counter() - started, 1)})
        table.save(out)
    print(summary(table, out))
    if args.plot:
        from ..plots import plot_speedup_curves

        print(f"plot written to {plot_speedup_curves(table, args.plot)}")
    return 0


def summary(table: TimingTable, path: Path) -> str:
    dense = table.dense_times()
    prunable = float(dense.sum())
    tag = " [ESTIMATED]" if table.estimated else ""
    seconds = table.provenance.get("collection_s")
    took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    together = prunable + table.fixed_ms
    # DeepSparse's fixed time is fitted on uniform-sparsity runs: the parts need not add up
    apart = abs(together - table.dense_total_ms) > 0.01 * table.dense_total_ms
    fitted = f" (fitted: layers + fixed = {together:.4g} ms)" if apart else ""
    return (f"{table.model}: {len(table.layers)} layers x {len(table.options)} options{took}; "
            f"dense {table.dense_total_ms:.4g} ms end to end, prunable layers "
            f"{prunable:.4g} ms ({prunable / max(table.dense_total_ms, 1e-12):.0%}), fixed "
            f"{table.fixed_ms:.4g} ms{fitted}{tag}; written to {path}")
