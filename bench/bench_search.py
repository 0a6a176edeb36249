"""Quality at equal predicted speedup, in one run: SPDY's search against the DP on the
database's per-layer errors, the DP on the prior, and uniform sparsity, on minilm with a
timing table (default: the shipped DeepSparse b1 table), all stitched from one database.

    python bench/bench_search.py --targets 1.5 2 3 [--gap] [--max-evaluations N]

Prints and writes bench/results/search-quality-<model>-<date>.{json,md}: per target and
method the predicted speedup, the held-out loss the search minimises, and the model's own
quality metrics (minilm: Lee-similarity Pearson, cosine to the dense embeddings), plus the
search's time and evaluations. The database is built in --work (reused when it matches).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import date
from pathlib import Path

from spdy_gpu.cli.common import run_script
from spdy_gpu.data import CalibrationSpec
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.pipeline import GapSettings, masks_of, uniform_choices
from spdy_gpu.reconstruct import build_database, global_adaprune_, stitch_
from spdy_gpu.scoring import held_out_scorer
from spdy_gpu.search import SearchConfig, search
from spdy_gpu.solve import Planner
from spdy_gpu.timing import TimingTable

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--timings", default="examples/minilm-deepsparse-b1.timings.json")
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--search-samples", type=int, default=64)
    parser.add_argument("--max-evaluations", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", action="store_true", help="also gAP the searched profile")
    parser.add_argument("--work", default="runs/bench-search")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    entry, setting = load_model(args.model), ModelSetting()
    model, example = entry.build(setting)
    table = TimingTable.load(args.timings)
    planner = Planner(table)
    fit, held_out = CalibrationSpec(samples=1024 + args.search_samples).load(
        entry, setting, example).split(args.search_samples)
    began = time.perf_counter()
    database = build_database(model, planner.layers, planner.options, fit.batches,
                              Path(args.work) / "database", model_name=entry.name,
                              calibration=fit.description)
    database_s = time.perf_counter() - began
    scorer = held_out_scorer(model, held_out.batches, database, entry.loss)
    db_errors = database.errors_by_layer(planner.layers, planner.options)
    rows = []
    for target in args.targets:
        config = SearchConfig(seed=args.seed, max_evaluations=args.max_evaluations,
                              max_minutes=args.max_minutes)
        result = search(planner, target, scorer, config=config,
                        checkpoint=Path(args.work) / f"search-{target:g}x.json")
        methods = {"spdy search (prior)": result.choices,
                   "dp on database errors": planner.choose(target, db_errors),
                   "dp on prior": planner.choose(target),
                   "uniform": uniform_choices(planner, target)}
        for method, choices in methods.items():
            rows.append(evaluate(entry, model, planner, database, scorer, target, method,
                                 choices))
        rows[-4]["search"] = {"seconds": round(result.seconds, 1),
                              "evaluations": result.evaluations,
                              "candidates": result.candidates, "stopped": result.stopped}
        if args.gap:
            rows.append(evaluate(entry, model, planner, database, scorer, target,
                                 "spdy search + gAP", result.choices,
                                 gap=(fit.batches[:8], GapSettings(epochs=3))))
        print_row_block(rows, target)
    write(args, rows, database_s)


def evaluate(entry, model, planner, database, scorer, target, method, choices, gap=None):
    if choices is None:
        return {"target": target, "method": method, "reachable": False}
    pruned = copy.deepcopy(model)
    stitch_(pruned, choices, database)
    extra = {}
    if gap is not None:
        batches, settings = gap
        began = time.perf_counter()
        report = global_adaprune_(pruned, model, masks_of(pruned, choices), batches,
                                  lr=settings.lr, epochs=settings.epochs,
                                  patience=settings.patience)
        extra["gap"] = {"loss_before": report.loss_before, "loss_after": report.loss_after,
                        "seconds": round(time.perf_counter() - began, 1)}
    profile = planner.profile(target, choices)
    row = {"target": target, "method": method, "reachable": True,
           "predicted_speedup": profile.predicted_speedup,
           "held_out_loss": scorer.loss_of(pruned), **extra}
    if entry.quality is not None:
        row.update(entry.quality(pruned, model))
    return row


def print_row_block(rows, target):
    for row in rows:
        if row["target"] != target:
            continue
        if not row["reachable"]:
            print(f"{target:g}x {row['method']:<24} unreachable")
            continue
        quality = ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                            if k in ("lee_pearson", "lee_pearson_dense", "cosine_to_dense"))
        print(f"{target:g}x {row['method']:<24} predicted {row['predicted_speedup']:.3f}x "
              f"held-out loss {row['held_out_loss']:.5f} {quality}")


def write(args, rows, database_s):
    name = args.name or f"search-quality-{args.model}-{date.today()}"
    RESULTS.mkdir(exist_ok=True)
    doc = {"command": "python bench/bench_search.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v),
           "date": str(date.today()), "timings": args.timings,
           "database_s": round(database_s, 1), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Search quality: {args.model}, table `{args.timings}`", "",
             f"`{doc['command']}` ({doc['date']}); database {database_s:.0f} s "
             "(0 when reused)", "",
             "| target | method | predicted | held-out loss | Lee Pearson (dense) | "
             "cosine to dense | search |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["reachable"]:
            lines.append(f"| {r['target']:g}x | {r['method']} | unreachable | | | | |")
            continue
        search_note = (f"{r['search']['evaluations']} evals, {r['search']['seconds']:.0f} s"
                       if "search" in r else "")
        lines.append(f"| {r['target']:g}x | {r['method']} | {r['predicted_speedup']:.3f}x | "
                     f"{r['held_out_loss']:.5f} | {r.get('lee_pearson', float('nan')):.4f} "
                     f"({r.get('lee_pearson_dense', float('nan')):.4f}) | "
                     f"{r.get('cosine_to_dense', float('nan')):.4f} | {search_note} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS / name}.{{json,md}}")


if __name__ == "__main__":
    run_script(main)
