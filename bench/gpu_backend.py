"""The Triton backend on a real GPU, in one run: the timing table of the built-in `minilm`
and a check of SPDY's additive latency model against measured end-to-end latency.

For each batch size (default 1 and 32, seq 128, bf16):
  1. the Triton timing table (dense cuBLAS + BSR kernel, block 32, `--levels` sparsities);
  2. predicted time (fixed + sum of chosen layer times) against the measured end-to-end
     latency of the model with its pruned Linears run as BlockSparseLinear (CUDA graph
     where capture works), for uniform profiles and for DP-solved mixed profiles;
  3. the analytic estimate (roofline) from datasheet ceilings and from ceilings measured
     here, against the measured table.
Writes, under --out (default bench/results/): minilm-triton-b{B}.timings.json per batch,
the measured GPU spec, and gpu-backend-{gpu}-{date}.json / .md with every figure.

Usage: python bench/gpu_backend.py [--batch-sizes 1 32] [--levels 41] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spdy_gpu.backends.triton import TritonBackend
from spdy_gpu.backends.triton_estimate import TritonEstimateBackend
from spdy_gpu.cli.common import run_script
from spdy_gpu.errors import InfeasibleTargetError
from spdy_gpu.gpu_specs import GPU_SPECS, GpuSpec, datasheet_for
from spdy_gpu.jsonio import atomic_write_bytes, save_json, slug
from spdy_gpu.layers import discover_layers
from spdy_gpu.masks import block_mask
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.options import SparsityOption, option_grid
from spdy_gpu.roofline import measure_ceilings
from spdy_gpu.solve import max_speedup, solve_profile
from spdy_gpu.sparse_linear import detect_block
from spdy_gpu.timing import TimingTable

log = logging.getLogger("gpu_backend")
UNIFORM = (0.5, 0.75, 0.9)                 # uniform block sparsities (nearest grid level)
MIXED = (0.33, 0.66, 0.95)                 # mixed targets, as fractions of the reachable speedup


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_backend.py: no CUDA device; run it on a machine with an NVIDIA GPU "
                 "(without one, plan with `spdy-gpu timings --backend triton --estimate GPU`)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    device = torch.cuda.get_device_name()
    today = datetime.now(timezone.utc)
    out = Path(args.out)
    measured_spec = measure_spec(device, today)
    name = slug(device)
    measured_spec.save(out / f"{name}-spec.json")
    datasheet = args.datasheet or datasheet_for(device)

    runs = []
    for batch in args.batch_sizes:
        runs.append(run_batch(batch, args, out, measured_spec, datasheet))
    report = {"device": device, "date": today.isoformat(timespec="seconds"),
              "software": {"torch": torch.__version__, "triton": _triton_version(),
                           "cuda": str(torch.version.cuda)},
              "command": " ".join(["python", *sys.argv]),
              "measured_spec": dataclasses.asdict(measured_spec), "datasheet": datasheet,
              "duration_s": round(time.perf_counter() - started, 1), "batches": runs}
    stem = out / f"gpu-backend-{name}-{today:%Y%m%d}"
    save_json(stem.with_suffix(".json"), "spdy-gpu/bench-gpu-backend", 1, report)
    atomic_write_bytes(stem.with_suffix(".md"), markdown(report).encode())
    print(f"wrote {stem}.json and {stem}.md in {report['duration_s']} s")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--levels", type=int, default=41, help="block sparsity levels (41)")
    parser.add_argument("--block", type=int, default=32, help="square block (32)")
    parser.add_argument("--repeats", type=int, default=3, help="do_bench calls per kernel")
    parser.add_argument("--datasheet", choices=sorted(GPU_SPECS), default=None,
                        help="datasheet spec to compare the estimate with (default: guessed)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="timing cache folder")
    parser.add_argument("--out", default="bench/results")
    return parser.parse_args()


def measure_spec(device: str, today: datetime) -> GpuSpec:
    """Ceilings measured here: bf16 matmul, device copy, and the shortest kernel."""
    from triton.testing import do_bench

    ceilings = measure_ceilings("bfloat16")
    tiny = torch.ones(1, device="cuda")
    floor_ms = do_bench(lambda: tiny.add_(1), warmup=25, rep=100, return_mode="median")
    props = torch.cuda.get_device_properties(0)
    return GpuSpec(name=device, arch=f"sm_{props.major}{props.minor}",
                   sm_count=props.multi_processor_count, bandwidth=ceilings.bandwidth,
                   peak_flops={"bf16": ceilings.peak_flops, "fp16": ceilings.peak_flops},
                   source=f"measured by bench/gpu_backend.py on {today:%Y-%m-%d} "
                          "(8192^3 bf16 matmul, 1 GiB copy, 1-element add)",
                   kernel_floor_ms=floor_ms)


def run_batch(batch: int, args: argparse.Namespace, out: Path, measured_spec: GpuSpec,
              datasheet: str | None) -> dict[str, Any]:
    setting = ModelSetting(batch_size=batch, seq_len=args.seq_len)
    model, example = load_model("minilm").build(setting)
    layers = discover_layers(model, example)
    options = option_grid("block", count=args.levels, block=args.block)
    backend = TritonBackend(dtype="bf16", repeats=args.repeats, cache_dir=args.cache_dir)

    started = time.perf_counter()
    table = backend.measure_table(model, example, layers, options, model_name="minilm")
    collection_s = time.perf_counter() - started
    table.save(out / f"minilm-triton-b{batch}.timings.json")

    checks = [additive_check(name, choices, table, backend, model, example)
              for name, choices in profiles(table)]
    estimates = {"measured-ceilings": estimate_error(table, model, example, layers, options,
                                                     measured_spec)}
    if datasheet is not None:
        estimates[f"datasheet-{datasheet}"] = estimate_error(
            table, model, example, layers, options, GPU_SPECS[datasheet])
    return {"batch_size": batch, "seq_len": args.seq_len, "table": table_summary(table),
            "collection_s": round(collection_s, 1), "additive": checks, "estimate": estimates}


def table_summary(table: TimingTable) -> dict[str, Any]:
    times = table.times()
    dense = times[:, 0]
    best = times.min(axis=1)
    by_shape = {}
    for row, layer in enumerate(table.layers):
        by_shape.setdefault(layer.gemm, row)
    curves = {f"{n}x{k}x{m}": {"dense_ms": float(dense[row]),
                               "speedup": {o.name: float(dense[row] / times[row, i])
                                           for i, o in enumerate(table.options)}}
              for (n, k, m), row in by_shape.items()}
    return {"dense_total_ms": table.dense_total_ms, "fixed_ms": table.fixed_ms,
            "prunable_fraction": float(dense.sum() / table.dense_total_ms),
            "max_speedup": max_speedup(table),
            "layers_faster_sparse": int((best < dense).sum()),
            "per_shape": curves, "provenance": table.provenance}


def profiles(table: TimingTable) -> list[tuple[str, dict[str, SparsityOption]]]:
    """Uniform profiles at UNIFORM sparsities and DP profiles at MIXED fractions of the
    reachable speedup (prior errors; the check is about time, not accuracy)."""
    found = []
    runnable = np.isfinite(table.times())
    nearest = {min(range(1, len(table.options)),
                   key=lambda i: abs(table.options[i].sparsity - target)) for target in UNIFORM}
    for i in sorted(nearest):
        found.append((f"uniform {table.options[i].name}",
                      {layer.name: table.options[i if runnable[row, i] else 0]
                       for row, layer in enumerate(table.layers)}))
    reachable = max_speedup(table)
    if reachable < 1.001:
        log.warning("no sparse option beats dense enough (reachable %.4fx): no DP profiles",
                    reachable)
        return found
    for fraction in MIXED:
        target = 1 + fraction * (reachable - 1)
        try:
            profile = solve_profile(table, target)
        except InfeasibleTargetError as e:
            log.warning("skipping mixed target %.3fx: %s", target, e)
            continue
        found.append((f"DP {target:.3f}x", profile.choices))
    return found


def additive_check(name: str, choices: dict[str, SparsityOption], table: TimingTable,
                   backend: TritonBackend, model: torch.nn.Module,
                   example: Any) -> dict[str, Any]:
    """Predicted fixed + sum of chosen layer times vs measured end-to-end of the pruned
    model (block-pruned weights; the backend runs them as BlockSparseLinear)."""
    times = table.times()
    index = {o: i for i, o in enumerate(table.options)}
    predicted = math.fsum([table.fixed_ms, *(times[row, index[choices[layer.name]]]
                                             for row, layer in enumerate(table.layers))])
    pruned = copy.deepcopy(model)
    sparse = 0
    with torch.no_grad():
        for layer in table.layers:
            option = choices[layer.name]
            if option.pattern == "block":
                weight = pruned.get_submodule(layer.name).weight
                weight.mul_(block_mask(weight, option.block, option.sparsity))
                sparse += detect_block(weight) is not None
    result = backend.latency({"dense": model, "pruned": pruned}, example)   # interleaved
    measured = result["pruned"].median_ms
    return {"profile": name, "sparse_layers": sparse,
            "mean_sparsity": statistics.fmean(o.sparsity for o in choices.values()),
            "predicted_ms": predicted, "measured_ms": measured,
            "spread_ms": result["pruned"].spread_ms, "dense_ms": result["dense"].median_ms,
            "predicted_speedup": table.dense_total_ms / predicted,
            "measured_speedup": result["dense"].median_ms / measured,
            "error": (predicted - measured) / measured}


def estimate_error(table: TimingTable, model: torch.nn.Module, example: Any, layers: list,
                   options: list, spec: GpuSpec) -> dict[str, Any]:
    """How far the analytic estimate from `spec` lies from the measured table."""
    estimate = TritonEstimateBackend(spec, dtype="bf16").measure_table(
        model, example, layers, options, model_name="minilm")
    ratio = estimate.times() / table.times()
    finite = ratio[np.isfinite(ratio)]
    return {"spec": spec.name, "dense_total_ratio": estimate.dense_total_ms / table.dense_total_ms,
            "fixed_ratio": (estimate.fixed_ms / table.fixed_ms) if table.fixed_ms else None,
            "layer_ratio_median": float(np.median(finite)),
            "layer_ratio_min": float(finite.min()), "layer_ratio_max": float(finite.max())}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Triton backend on {report['device']} ({report['date']})", "",
             f"`{report['command']}`; torch {report['software']['torch']}, triton "
             f"{report['software']['triton']}, CUDA {report['software']['cuda']}; "
             f"{report['duration_s']} s in all.", "",
             f"Measured ceilings: {report['measured_spec']['peak_flops']['bf16'] / 1e12:.0f} "
             f"TFLOP/s bf16, {report['measured_spec']['bandwidth'] / 1e12:.2f} TB/s, shortest "
             f"kernel {report['measured_spec']['kernel_floor_ms'] * 1e3:.1f} us.", ""]
    for run in report["batches"]:
        t = run["table"]
        lines += [f"## minilm, batch {run['batch_size']}, seq {run['seq_len']}, bf16", "",
                  f"Dense end to end {t['dense_total_ms']:.4f} ms; prunable (sum of dense "
                  f"layer times) {100 * t['prunable_fraction']:.1f}%; fixed "
                  f"{t['fixed_ms']:.4f} ms; {t['layers_faster_sparse']} of 36 layers run "
                  f"faster sparse; largest reachable speedup {t['max_speedup']:.3f}x; "
                  f"table collected in {run['collection_s']} s.", "",
                  "| GEMM N x K x M | dense ms | speedup at 50% | 75% | 90% | 99% |",
                  "|---|---|---|---|---|---|"]
        for shape, curve in t["per_shape"].items():
            speedups = curve["speedup"]
            cells = [_nearest(speedups, s) for s in (0.5, 0.75, 0.9, 0.99)]
            lines.append(f"| {shape} | {curve['dense_ms']:.4f} | "
                         + " | ".join(f"{c:.2f}x" for c in cells) + " |")
        lines += ["", "| profile | sparse layers | predicted ms | measured ms | error | "
                  "predicted speedup | measured speedup |", "|---|---|---|---|---|---|---|"]
        for c in run["additive"]:
            lines.append(f"| {c['profile']} | {c['sparse_layers']} | {c['predicted_ms']:.4f} | "
                         f"{c['measured_ms']:.4f} | {100 * c['error']:+.1f}% | "
                         f"{c['predicted_speedup']:.3f}x | {c['measured_speedup']:.3f}x |")
        lines += ["", "| ESTIMATED from | dense total / measured | fixed / measured | "
                  "layer times / measured (median, min..max) |", "|---|---|---|---|"]
        for name, e in run["estimate"].items():
            fixed = "n/a" if e["fixed_ratio"] is None else f"{e['fixed_ratio']:.2f}"
            lines.append(f"| {name} | {e['dense_total_ratio']:.2f} | {fixed} | "
                         f"{e['layer_ratio_median']:.2f} ({e['layer_ratio_min']:.2f}.."
                         f"{e['layer_ratio_max']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def _nearest(speedups: dict[str, float], sparsity: float) -> float:
    options = [SparsityOption.parse(name) for name in speedups if name != "dense"]
    best = min(options, key=lambda o: abs(o.sparsity - sparsity))
    return speedups[best.name]


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    run_script(main)
