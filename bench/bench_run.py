"""The whole method at several targets on one model and backend, as `spdy-gpu run` does it,
sharing one timing table and one database: measured against target speedup, quality, and
where the time went.

    python bench/bench_run.py --targets 1.5 2 3 \
        --timings examples/minilm-deepsparse-b1.timings.json [--gap]

Writes bench/results/run-<model>-<backend>-<date>.{json,md}: per target the predicted and
measured speedup (median and spread of the interleaved dense/pruned timing, rounds of
tightening), whether measured lies in [0.97, 1.05] x target, the model's quality metrics
against dense, the held-out loss next to the DP on database errors and uniform sparsity,
and the seconds of every stage.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from spdy_gpu.backends import get_backend
from spdy_gpu.cli.common import run_script
from spdy_gpu.errors import SpdyError
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.pipeline import GapSettings, RunSettings, require_files, run
from spdy_gpu.search import SearchConfig

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--backend", default="deepsparse")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--timings", nargs="*", default=[])
    parser.add_argument("--max-evaluations", type=int, default=500)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--gap", action="store_true")
    parser.add_argument("--gap-lr", type=float, default=1e-5)
    parser.add_argument("--gap-epochs", type=int, default=10)
    parser.add_argument("--work", default="runs/bench-run")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    timings = tuple(Path(t) for t in args.timings)
    require_files(timings, "--timings")
    if any(not target > 1 for target in args.targets):
        raise SpdyError(f"--targets {args.targets}: every target speedup must be > 1")
    entry, setting = load_model(args.model), ModelSetting()
    config = {} if args.threads is None else {"threads": args.threads}
    backend = get_backend(args.backend, **config)
    work = Path(args.work)
    rows = []
    for target in args.targets:
        settings = RunSettings(
            speedup=target, timings=timings,
            database=work / "database",
            search=SearchConfig(max_evaluations=args.max_evaluations,
                                max_minutes=args.max_minutes),
            gap=GapSettings(lr=args.gap_lr, epochs=args.gap_epochs) if args.gap else None,
            overwrite=True)          # a rerun re-measures; table, database and search stay
        report = run(entry, setting, backend, settings, work / f"{target:g}x")
        row = report.to_json()
        row["in_band"] = (report.measured_speedup is not None
                          and 0.97 * target <= report.measured_speedup <= 1.05 * target)
        rows.append(row)
        print(f"{target:g}x: predicted {report.predicted_speedup:.3f}x, measured "
              f"{report.measured_speedup}, quality {report.quality}, held-out "
              f"{report.held_out_loss}")
    write(args, rows)


def write(args, rows) -> None:
    name = args.name or f"run-{args.model}-{args.backend}-{date.today()}"
    command = "python bench/bench_run.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v not in (None, False, []))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"command": command, "date": str(date.today()), "rows": rows}, indent=1) + "\n")
    lines = [f"# `spdy-gpu run` on {args.model} / {args.backend}", "", f"`{command}`", "",
             "| target | predicted | measured (dense / pruned ms, spread) | rounds | in "
             "[0.97, 1.05] | quality | held-out loss: spdy / dp db errors / uniform | "
             "search | stage seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]
        measured = ("-" if m is None else
                    f"{r['measured_speedup']:.3f}x ({m['dense_ms']:.3g} / {m['pruned_ms']:.3g},"
                    f" {m['dense_spread_ms']:.2g} / {m['pruned_spread_ms']:.2g})")
        quality = ", ".join(f"{k} {v:.3f}" for k, v in r["quality"].items())
        loss = " / ".join("-" if r["held_out_loss"].get(k) is None else
                          f"{r['held_out_loss'][k]:.4f}"
                          for k in ("spdy", "dp_database_errors", "uniform"))
        if "spdy+gap" in r["held_out_loss"]:
            loss += f" (after gAP {r['held_out_loss']['spdy+gap']:.4f})"
        search = f"{r['search']['evaluations']} evals, {r['search']['stopped']}"
        stages = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in r["stages"].items())
        lines.append(f"| {r['target_speedup']:g}x | {r['predicted_speedup']:.3f}x | "
                     f"{measured} | {len(r['rounds'])} | {'yes' if r['in_band'] else 'no'} | "
                     f"{quality} | {loss} | {search} | {stages} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS / name}.{{json,md}}")


if __name__ == "__main__":
    run_script(main)
