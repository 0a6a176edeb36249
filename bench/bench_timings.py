"""DeepSparse timing table: the adaptive protocol (`--repeats 0`) against fixed repeats.

Measures the same model's table twice in one process, nothing else in between: with the
adaptive protocol (two analysis calls per level a pass apart, more only where they
disagree or a level is off its neighbours' trend, fewer end-to-end engines) and with
`--repeats N` (default 5: N calls per option, 3 engines for dense and for every
calibration level). Writes
bench/results/NAME.json and NAME.md (default NAME: deepsparse-table-speed-MODEL-bBATCH):
the wall time of each, and per option the summed layer medians of both side by side, and
whether they differ by no more than the repeats' spread (max - min of its per-call sums).

Run it alone on a quiet machine (minilm b1: about 20 minutes):
  .venv/bin/python bench/bench_timings.py --model minilm --batch-size 1 --threads 2
Check that it runs, on a tiny model:
  PYTHONPATH=. .venv/bin/python bench/bench_timings.py \
      --model tests.test_cli_timings:toy_model --levels 3 --threads 1 --out-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

from spdy_gpu.backends.deepsparse import DeepSparseBackend, cpu_name  # noqa: E402
from spdy_gpu.cli.common import run_script
from spdy_gpu.jsonio import atomic_write_bytes, save_json, slug  # noqa: E402
from spdy_gpu.layers import discover_layers  # noqa: E402
from spdy_gpu.models import ModelSetting, load_model  # noqa: E402
from spdy_gpu.options import option_grid  # noqa: E402
from spdy_gpu.timing import TimingTable  # noqa: E402

log = logging.getLogger("bench_timings")
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    run(parse_args())


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entry = load_model(args.model)
    setting = ModelSetting(batch_size=args.batch_size, seq_len=args.seq_len)
    model, example = entry.build(setting)
    layers = discover_layers(model, example, entry.exclude)
    options = option_grid("unstructured", args.levels, args.min_sparsity, args.max_sparsity)
    runs = {}
    for side, repeats in (("new", 0), ("old", args.old_repeats)):
        backend = DeepSparseBackend(threads=args.threads, repeats=repeats)
        started = time.perf_counter()
        table = backend.measure_table(model, example, layers, options, model_name=entry.name)
        runs[side] = (table, time.perf_counter() - started)
        log.info("%s protocol: %.0f s", side, runs[side][1])
    result = compare(*runs["new"], *runs["old"])
    result.update(model=entry.name, batch_size=args.batch_size, seq_len=args.seq_len,
                  threads=args.threads, cpu=cpu_name(),
                  command=shlex.join(["python", *sys.argv]),
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out_dir) / (args.name or f"deepsparse-table-speed-{slug(entry.name)}"
                                              f"-b{args.batch_size}")
    save_json(stem.with_suffix(".json"), "spdy-gpu/bench-table-speed", 1, result)
    text = markdown(result)
    atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    print(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per input (default: the model's own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=int, default=41)
    parser.add_argument("--min-sparsity", type=float, default=0.40)
    parser.add_argument("--max-sparsity", type=float, default=0.99)
    parser.add_argument("--old-repeats", type=int, default=5,
                        help="calls per option of the old protocol (5, as the shipped table)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--name", default=None, help="output file stem")
    return parser.parse_args()


def compare(new: TimingTable, new_s: float, old: TimingTable, old_s: float) -> dict[str, Any]:
    """Wall times, and per option the summed layer medians of both protocols against the
    old protocol's per-call sums."""
    new_sums, old_sums = summed_medians(new), summed_medians(old)
    old_calls = old.provenance["layer_sums_per_call_ms"]
    new_calls = new.provenance["calls_per_option"]
    rows = []
    for j, option in enumerate(new.options):
        calls = old_calls[option.name]
        low, high = min(calls), max(calls)
        rows.append({"option": option.name, "new_ms": new_sums[j], "old_ms": old_sums[j],
                     "old_min_ms": low, "old_max_ms": high, "old_spread_ms": high - low,
                     "new_calls": new_calls[option.name], "old_calls": len(calls),
                     # like for like: both sums of per-layer medians, against the spread
                     "within": bool(abs(new_sums[j] - old_sums[j]) <= high - low),
                     "diff_pct": 100 * (new_sums[j] / old_sums[j] - 1)})
    return {"new_wall_s": round(new_s, 1), "old_wall_s": round(old_s, 1),
            "speedup": old_s / new_s,
            "within": sum(r["within"] for r in rows), "options": len(rows),
            "new_calls": sum(new_calls.values()),
            "old_calls": sum(len(c) for c in old_calls.values()),
            "new_dense_total_ms": new.dense_total_ms, "old_dense_total_ms": old.dense_total_ms,
            "new_fixed_ms": new.fixed_ms, "old_fixed_ms": old.fixed_ms, "rows": rows,
            "new_provenance": trimmed(new.provenance),
            "old_provenance": trimmed(old.provenance)}


def summed_medians(table: TimingTable) -> list[float]:
    """Per option, the sum over layers of their median times (unsupported: left out)."""
    times = table.times()
    return [float(np.where(np.isfinite(column), column, 0.0).sum()) for column in times.T]


def trimmed(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance without its per-call lists (kept in the rows)."""
    return {k: v for k, v in provenance.items() if k != "layer_sums_per_call_ms"}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"## DeepSparse timing table: adaptive protocol vs `--repeats` "
             f"({result['created']}, {result['cpu']})", "",
             f"Command: `{result['command']}`; {result['model']}, batch "
             f"{result['batch_size']}, {result['threads']} threads.", "",
             f"- adaptive protocol: **{result['new_wall_s']:.0f} s**, {result['new_calls']} "
             f"analysis calls; dense {result['new_dense_total_ms']:.3f} ms, fixed "
             f"{result['new_fixed_ms']:.3f} ms",
             f"- repeats: **{result['old_wall_s']:.0f} s**, {result['old_calls']} "
             f"analysis calls; dense {result['old_dense_total_ms']:.3f} ms, fixed "
             f"{result['old_fixed_ms']:.3f} ms",
             f"- the adaptive protocol took {1 / result['speedup']:.2f}x the wall time; its "
             f"summed layer medians differ from the repeats' by no more than their per-call "
             f"spread for **{result['within']} of {result['options']}** options",
             "", "| option | adaptive ms (calls) | repeats ms (calls) | repeats min..max ms | "
             "diff | within spread |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['option']} | {r['new_ms']:.3f} ({r['new_calls']}) | {r['old_ms']:.3f} "
              f"({r['old_calls']}) | {r['old_min_ms']:.3f}..{r['old_max_ms']:.3f} | "
              f"{r['diff_pct']:+.1f}% | {'yes' if r['within'] else 'no'} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_script(main)
