"""Reconstruction database on all-MiniLM-L6-v2: fast Gram-matrix solver vs faithful AdaPrune.

Measures (1) the whole fast database (36 Linears x dense + `--levels` levels) end to end,
(2) both methods on `--compare-layers` at every level, on the same calibration samples, with
time and relative layer error per level, (3) GEMM vs batched Cholesky throughput (why the
fast solver is CG, not per-row factorisations). Writes JSON + markdown to bench/results/.

    flock /tmp/spdy-cpu.lock .venv/bin/python bench/bench_reconstruct.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spdy_gpu.cli.common import run_script
from spdy_gpu.layers import prunable_modules  # noqa: E402
from spdy_gpu.models import ModelSetting, load_model  # noqa: E402
from spdy_gpu.options import option_grid  # noqa: E402
from spdy_gpu.reconstruct import AdaPruneConfig, FastConfig, build_database  # noqa: E402

BLOCK0 = "bert.encoder.layer.0."
DEFAULT_COMPARE = [BLOCK0 + "attention.self.query", BLOCK0 + "intermediate.dense",
                   BLOCK0 + "output.dense"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def linalg_throughput() -> dict[str, float]:
    """GFLOPS of one large GEMM and of batched Cholesky at the fast solver's shapes."""
    result = {}
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).removeprefix("torch.")
        a = torch.randn(4096, 1536, dtype=dtype)
        began = time.perf_counter()
        a.T @ a
        seconds = time.perf_counter() - began
        result[f"gemm_4096x1536x1536_{tag}"] = 2 * 4096 * 1536**2 / seconds / 1e9
        for n, batch in ((920, 64), (230, 384)):
            x = torch.randn(batch, n, n + 8, dtype=dtype)
            spd = x @ x.transpose(1, 2)
            began = time.perf_counter()
            torch.linalg.cholesky(spd)
            seconds = time.perf_counter() - began
            result[f"batched_cholesky_{batch}x{n}_{tag}"] = batch * n**3 / 3 / seconds / 1e9
    return result


def build(model, layers, options, batches, path, method, config=None, fast=None):
    began = time.perf_counter()
    db = build_database(model, layers, options, batches, path, method, model_name="minilm",
                        adaprune_config=config, fast=fast, progress=True)
    return db, time.perf_counter() - began


def compare_solvers(model, options, batches, layers, work: Path) -> list[dict]:
    """The fast method's two solvers (CG, per-row Cholesky) on whole level chains."""
    rows = []
    for layer in layers:
        result = {"layer": layer}
        errors = {}
        for solver in ("cg", "cholesky"):
            db, _ = build(model, [layer], options, batches, work / f"{solver}-{layer}", "fast",
                          fast=FastConfig(solver=solver))
            result[f"{solver}_reconstruct_s"] = db.timing_s["reconstruct"]
            errors[solver] = db.errors_matrix([layer], options)[0]
        result["shape"] = db.layer_shapes[layer]
        ratio = errors["cg"][1:] / errors["cholesky"][1:]
        result["cg_over_cholesky_error"] = {"min": float(ratio.min()), "max": float(ratio.max())}
        rows.append(result)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024,
                        help="calibration samples of the full fast database (1024)")
    parser.add_argument("--compare-samples", type=int, default=64,
                        help="samples both methods see in the comparison (64; AdaPrune's "
                             "reference is 1024, which takes hours on 2 cores)")
    parser.add_argument("--compare-layers", nargs="+", default=DEFAULT_COMPARE,
                        help="layers to run both methods on, or 'all' (default: three of "
                             "block 0, one per weight shape)")
    parser.add_argument("--levels", type=int, default=41)
    parser.add_argument("--skip-full", action="store_true", help="skip the full fast database")
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--name", default=None,
                        help="file stem of the results (default reconstruct[-solvers]-DATE)")
    parser.add_argument("--solvers", action="store_true",
                        help="only compare the fast method's solvers (CG vs per-row Cholesky) "
                             "on --compare-layers with --compare-samples")
    args = parser.parse_args()

    entry = load_model("minilm")
    setting = ModelSetting(batch_size=32, seq_len=128)
    model, _ = entry.build(setting)
    layers = list(prunable_modules(model))
    if args.compare_layers == ["all"]:
        args.compare_layers = layers
    options = option_grid("unstructured", args.levels)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report: dict = {
        "date": date, "cpu": cpu_name(),
        "stem": args.name or f"reconstruct{'-solvers' if args.solvers else ''}-{date[:10]}",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": shlex.join([sys.executable, *sys.argv]),
        "model": "minilm", "layers": len(layers), "options": len(options),
        "linalg_gflops": linalg_throughput(),
    }
    if args.solvers:
        batches = list(entry.calibration(setting, args.compare_samples))
        with tempfile.TemporaryDirectory() as work:
            report["solvers"] = compare_solvers(model, options, batches, args.compare_layers,
                                                Path(work))
        report["samples"] = args.compare_samples
        write_solvers(report, Path(args.out_dir))
        return 0
    with tempfile.TemporaryDirectory() as work:
        if not args.skip_full:
            batches = list(entry.calibration(setting, args.samples))
            db, seconds = build(model, layers, options, batches, Path(work) / "full", "fast")
            report["full_fast"] = {"samples": args.samples, "seconds": seconds,
                                   "phases_s": db.timing_s, "entries": len(layers) * len(options)}
            partial(report, Path(args.out_dir))
        batches = list(entry.calibration(setting, args.compare_samples))
        ada_config = AdaPruneConfig(samples=args.compare_samples)
        rows = []
        for layer in args.compare_layers:
            fast, _ = build(model, [layer], options, batches, Path(work) / f"f-{layer}", "fast")
            ada, _ = build(model, [layer], options, batches, Path(work) / f"a-{layer}",
                           "adaprune", ada_config)
            fe = fast.errors_matrix([layer], options)[0]
            ae = ada.errors_matrix([layer], options)[0]
            per_level = ada_config.passes * -(-args.compare_samples // ada_config.batch_size)
            steps = args.levels * per_level
            rows.append({
                "layer": layer, "shape": fast.layer_shapes[layer],
                "fast_reconstruct_s": fast.timing_s["reconstruct"],
                "adaprune_reconstruct_s": ada.timing_s["reconstruct"],
                "adaprune_s_per_step": ada.timing_s["reconstruct"] / steps,
                "levels_fast_le_adaprune": int((fe[1:] <= ae[1:]).sum()),
                "levels": args.levels,
                "errors": [{"option": o.name, "fast": float(f), "adaprune": float(a)}
                           for o, f, a in zip(options, fe, ae)]})
            partial(report | {"compare_so_far": rows}, Path(args.out_dir))
        report["compare"] = {"samples": args.compare_samples, "layers": rows,
                             "adaprune": {"lr": ada_config.lr, "passes": ada_config.passes,
                                          "batch_size": ada_config.batch_size}}
    report["adaprune_full_estimate"] = estimate_full_adaprune(model, layers, rows, args.levels)
    write(report, Path(args.out_dir))
    return 0


def partial(report: dict, out_dir: Path) -> None:
    """Save what is measured so far (a long comparison can be stopped without losing it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{report['stem']}.partial.json"
    path.write_text(json.dumps(report, indent=1) + "\n")


def estimate_full_adaprune(model, layers, rows, levels) -> dict:
    """Faithful AdaPrune for every layer at reference settings (1024 samples, 10 passes of 32:
    320 steps per level), from the measured seconds per step of the layer of the same shape."""
    per_shape = {tuple(r["shape"]): r["adaprune_s_per_step"] for r in rows}
    modules = dict(model.named_modules())
    shapes = [tuple(modules[name].weight.shape) for name in layers]
    covered = [s for s in shapes if s in per_shape]
    seconds = sum(per_shape[s] for s in covered) * levels * 320
    return {"seconds": seconds, "layers_covered": len(covered), "layers": len(shapes),
            "basis": "measured s/step per weight shape x 320 steps x levels (an estimate)"}


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report["stem"]
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Reconstruction database: fast solver vs faithful AdaPrune ({report['date']})",
             "", f"CPU: {report['cpu']}, {report['threads']} threads, torch {report['torch']}",
             f"Command: `{report['command']}`", ""]
    if "full_fast" in report:
        full = report["full_fast"]
        lines += [f"Full fast database: {report['layers']} layers x {report['options']} options, "
                  f"{full['samples']} calibration samples: **{full['seconds']:.1f} s** "
                  f"(capture {full['phases_s']['capture']:.1f} s, reconstruct "
                  f"{full['phases_s']['reconstruct']:.1f} s).", ""]
    est = report["adaprune_full_estimate"]
    lines += [f"Faithful AdaPrune for the same database at reference settings (estimate from "
              f"measured s/step, {est['layers_covered']}/{est['layers']} layers covered): "
              f"{est['seconds'] / 3600:.1f} h.", "",
              f"Comparison on {report['compare']['samples']} samples (both methods, same data; "
              f"AdaPrune {report['compare']['adaprune']}; errors are relative layer errors on "
              "those samples, every level of the nested chain):",
              "", "| layer | shape | fast s | AdaPrune s | levels fast <= AdaPrune | "
              "max fast/AdaPrune error |", "|---|---|---|---|---|---|"]
    for r in report["compare"]["layers"]:
        ratio = max(e["fast"] / e["adaprune"] for e in r["errors"] if e["adaprune"] > 0)
        lines.append(f"| {r['layer']} | {r['shape']} | {r['fast_reconstruct_s']:.1f} | "
                     f"{r['adaprune_reconstruct_s']:.1f} | {r['levels_fast_le_adaprune']}/"
                     f"{r['levels']} | {ratio:.3f} |")
    rows = report["compare"]["layers"]
    ratios = [e["fast"] / e["adaprune"] for r in rows for e in r["errors"] if e["adaprune"] > 0]
    levels_ok = sum(r["levels_fast_le_adaprune"] for r in rows)
    layers_ok = sum(r["levels_fast_le_adaprune"] == r["levels"] for r in rows)
    lines += ["", f"All compared layers: fast <= AdaPrune at {levels_ok}/"
              f"{sum(r['levels'] for r in rows)} levels; {layers_ok}/{len(rows)} layers at "
              f"every level; fast/AdaPrune error max {max(ratios):.3f}, median "
              f"{sorted(ratios)[len(ratios) // 2]:.3f}."]
    lines += ["", "Linear algebra throughput (GFLOPS): " + ", ".join(
        f"{k} {v:.1f}" for k, v in report["linalg_gflops"].items()), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)
    print("\n".join(lines))



def write_solvers(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report["stem"]
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Fast method: CG vs per-row Cholesky ({report['date']})", "",
             f"CPU: {report['cpu']}, {report['threads']} threads, torch {report['torch']}; "
             f"{report['samples']} calibration samples; {report['options']} options per layer",
             f"Command: `{report['command']}`", "",
             "| layer | shape | CG s | Cholesky s | CG / Cholesky error (min..max) |",
             "|---|---|---|---|---|"]
    for r in report["solvers"]:
        ratio = r["cg_over_cholesky_error"]
        lines.append(f"| {r['layer']} | {r['shape']} | {r['cg_reconstruct_s']:.1f} | "
                     f"{r['cholesky_reconstruct_s']:.1f} | "
                     f"{ratio['min']:.4f}..{ratio['max']:.4f} |")
    lines += ["", "Linear algebra throughput (GFLOPS): " + ", ".join(
        f"{k} {v:.1f}" for k, v in report["linalg_gflops"].items()), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
