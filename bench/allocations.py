"""Where the per-layer allocation differs between two timing tables of one model (e.g.
DeepSparse at batch 1 and batch 16): the DP on the same database errors, solved at the same
targets on each table, so every difference comes from the timings alone.

    python bench/allocations.py --database runs/compare-minilm-b1/database \
        --tables examples/minilm-deepsparse-b1.timings.json \
                 examples/minilm-deepsparse-b16.timings.json --targets 1.5 2 3 \
        --name allocations-minilm-deepsparse

Writes bench/results/<name>-<date>.{md,png}: per target, each table's predicted speedup and
mean sparsity, the layers whose choice differs, and the per-layer sparsity plot at the
middle target.
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from spdy_gpu.cli.common import run_script
from spdy_gpu.plots import plot_profile_sparsity
from spdy_gpu.reconstruct import Database
from spdy_gpu.solve import Planner
from spdy_gpu.timing import TimingTable

RESULTS = Path(__file__).parent / "results"


def label(table: TimingTable) -> str:
    return f"batch {table.fingerprint.batch_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True, type=Path)
    parser.add_argument("--tables", required=True, nargs=2, type=Path)
    parser.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    database = Database.open(args.database)
    planners = [Planner(TimingTable.load(path)) for path in args.tables]
    lines = [f"# Per-layer allocation by timing table: {planners[0].table.model}", "",
             f"`python bench/allocations.py --database {args.database} --tables "
             f"{' '.join(map(str, args.tables))} --targets "
             f"{' '.join(f'{t:g}' for t in args.targets)} --name {args.name}`", "",
             "The DP on the database's per-layer errors (the same errors for both tables), "
             "solved at each target on each table: every difference below comes from the "
             "measured timings alone.", ""]
    middle = args.targets[len(args.targets) // 2]
    shown = {}
    for target in args.targets:
        profiles = {}
        for planner in planners:
            errors = database.errors_by_layer(planner.layers, planner.options)
            profiles[label(planner.table)] = planner.solve(target, errors)
        (a, pa), (b, pb) = profiles.items()
        differ = [name for name in pa.choices if pa.choices[name] != pb.choices[name]]
        lines += [f"## {target:g}x", "", "| table | predicted | mean sparsity | layers pruned |",
                  "|---|---|---|---|"]
        for name, profile in profiles.items():
            sparsity = [o.sparsity for o in profile.choices.values()]
            lines.append(f"| {name} | {profile.predicted_speedup:.3f}x | "
                         f"{np.mean(sparsity):.2f} | {sum(s > 0 for s in sparsity)} |")
        lines += ["", f"{len(differ)} of {len(pa.choices)} layers differ:", ""]
        lines += [f"- {name}: {a} {pa.choices[name].name}, {b} {pb.choices[name].name}"
                  for name in differ]
        lines.append("")
        if target == middle:
            shown = {f"{k} ({target:g}x)": v for k, v in profiles.items()}
    stem = f"{args.name}-{date.today().isoformat()}"
    plot_profile_sparsity(shown, RESULTS / f"{stem}.png")
    lines.append(f"![per-layer sparsity]({stem}.png)")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
