"""The GPU benchmarks in one command (`make bench-gpu`): the kernel suite, then SPDY end to end
on the Triton backend, each run's measured speedup against its target.

    python bench/bench_gpu.py [--parts tests suite llama bert] [--quick] [--budget-s S]
                              [--out bench/results]

Parts (default all four, in this order; split them over several calls where one call has a
time limit, results of the same day are merged; with --budget-s no run starts after S
seconds and the suite's cases stop by then too: the rest are recorded as skipped):
- tests: the CUDA-only tests (`pytest -k "cuda or gpu"` on the kernel, 2:4, CUDA-graph,
  backend, solver, database and scoring test files), so a broken GPU path shows before
  anything is timed.
- suite: `python bench/gpu_suite.py [--quick] --out OUT` (172 s on an H200).
- llama: `spdy-gpu run --model llama-decode --backend triton --batch-size B --speedup X
  --compile` (decode as deployed: torch.compile fuses the norms, rotary and SwiGLU glue,
  CUDA graphs replay it) for B in 1 and 16 and X in 1.5, 2, 3 into
  runs/bench-gpu/llama-decode-bB-X; the runs of
  one batch share one timing table and one reconstruction database. Small --levels,
  --samples and --max-evaluations keep each run to a few minutes.
- bert: BERT-base (bench.models:bert_base, batch 32 x 128 tokens): its Triton timing table
  under --compile first, then `spdy-gpu run ... --compile` (end-to-end and fixed time under
  torch.compile) at the largest target the table allows:
  0.95 x spdy_gpu.solve.max_speedup, rounded down to 0.01.
Writes OUT/bench-gpu-<gpu>-<date>.{json,md} (format spdy-gpu/bench-gpu v1) after every run:
per run the command, exit status, seconds, target / predicted / measured speedup from its
report.json and whether measured lies within 5% of the target; the suite's target lines.

Without a CUDA device: one line saying so, then (part llama) the plan from the H100
estimate for each --batches B: `spdy-gpu timings --model llama-decode --backend triton
--estimate h100-sxm --batch-size B --compile` into
runs/bench-gpu/llama-decode-bB.estimate.timings.json and `spdy-gpu solve` on it at
1.5/2/3x, recorded with predicted speedups only in OUT/bench-gpu-estimate-h100-sxm-<date>.
{json,md}; exit status 0 unless a timing table cannot be built (an infeasible target is a
row with its error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spdy_gpu.cli.common import positive_seconds, run_script
from spdy_gpu.jsonio import check_output_dir

REPO = Path(__file__).resolve().parent.parent
FORMAT, VERSION = "spdy-gpu/bench-gpu", 1
TARGETS = (1.5, 2.0, 3.0)
BERT = "bench.models:bert_base"
BAND = 0.05                     # measured within 5% of the target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device: nothing measured; planning {args.model} from the "
              f"{args.estimate} estimate instead")
        return plan_without_gpu(args)
    device = torch.cuda.get_device_name()
    doc = load_or_new(results_stem(args.out, device), device)
    for part in args.parts:
        {"tests": run_tests, "suite": run_suite, "llama": run_llama,
         "bert": run_bert}[part](args, doc)
    print(markdown(doc))
    ours = [r for r in doc["runs"] if r["name"] in args.recorded]   # not earlier calls'
    return 0 if all(r["rc"] == 0 for r in ours) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("tests", "suite", "llama", "bert"),
                        default=["tests", "suite", "llama", "bert"],
                        help="what to run, in this order (default: all four)")
    parser.add_argument("--quick", action="store_true", help="the suite's --quick subset")
    parser.add_argument("--suite-budget-s", type=positive_seconds, default=None,
                        help="the suite's --budget-s: no case starts after this many seconds")
    parser.add_argument("--budget-s", type=positive_seconds, default=None,
                        help="no run starts after this many seconds (the rest are recorded "
                             "as skipped), so a call with a time limit loses nothing midway")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"),
                        help="results folder (default bench/results)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-gpu"),
                        help="run directories")
    parser.add_argument("--model", default="llama-decode", help="the decode model (built-in)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                        help="decode batch sizes (1 16); one per call where calls are short")
    parser.add_argument("--levels", type=int, default=6, help="block sparsity levels (6)")
    parser.add_argument("--block", type=int, default=64, help="square block (64)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (64)")
    parser.add_argument("--max-evaluations", type=int, default=30,
                        help="profiles the search scores at most (30)")
    parser.add_argument("--max-minutes", type=float, default=1.0, help="search minutes (1)")
    parser.add_argument("--estimate", default="h100-sxm", help="without a GPU: the spec")
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.levels < 1 or args.samples < 1:
        parser.error("--batches, --levels and --samples must be >= 1")
    check_output_dir(args.out)
    # Paths as given from here; the commands run in the repository root (bench.models).
    args.out, args.work = str(Path(args.out).resolve()), Path(args.work).resolve()
    args.deadline = time.monotonic() + (math.inf if args.budget_s is None else args.budget_s)
    args.recorded = set()                   # the runs this call records
    return args


# ---- running commands ---------------------------------------------------------------------

def cli(*args: Any) -> list[str]:
    """`spdy-gpu ARGS` through this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-c", "import sys; from spdy_gpu.cli import main; sys.exit(main())",
            *map(str, args)]


def run_command(command: list[str], log: Path | None = None) -> tuple[int, float, str]:
    """Run in the repository root (so bench.models imports), output shown as it comes:
    (exit status, seconds, the last line it wrote to stderr, which names a failure). With
    `log`, stdout and stderr are appended to that file too, line by line, so a call cut off
    keeps what was printed, and the last line is the last of either."""
    print(f"$ {shown(command)}", flush=True)
    started = time.perf_counter()
    if log is None:
        process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        stream, echo = process.stderr, sys.stderr
    else:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        stream, echo = process.stdout, sys.stdout
    last = ""
    with open(log, "a") if log else contextlib.nullcontext() as copy:
        for line in stream:
            echo.write(line)
            if copy:
                copy.write(line)
                copy.flush()
            last = line.strip() or last
    rc = process.wait()
    return rc, round(time.perf_counter() - started, 1), last


def shown(command: list[str]) -> str:
    """The command as a person would type it."""
    if command[1:2] == ["-c"]:
        return shlex.join(["spdy-gpu", *command[3:]])
    return shlex.join(command)


def search_flags(args: argparse.Namespace) -> list[str]:
    """The option grid and search budget every run shares (small: minutes, not hours)."""
    return ["--levels", str(args.levels), "--block", str(args.block),
            "--samples", str(args.samples), "--search-samples", "16",
            "--random-candidates", "10", "--max-evaluations", str(args.max_evaluations),
            "--max-minutes", str(args.max_minutes), "--overwrite", "--quiet"]


# ---- the parts (GPU) ----------------------------------------------------------------------

# The test files holding the CUDA-only tests (kernel, 2:4, CUDA graphs, the measuring
# backend, the solver on the GPU), selected by name; they need no DeepSparse or model data.
GPU_TEST_FILES = ("tests/test_bsr_kernel.py", "tests/test_semi_structured.py",
                  "tests/test_llama_decode.py", "tests/test_reconstruct_solvers.py",
                  "tests/test_triton_backend.py", "tests/test_pointwise_conv.py",
                  "tests/test_reconstruct_database.py", "tests/test_scoring.py")


def out_of_time(doc: dict[str, Any], name: str, args: argparse.Namespace) -> bool:
    """Whether --budget-s is spent; if so `name` is recorded as skipped instead of started."""
    if time.monotonic() < args.deadline:
        return False
    record(doc, {"name": name, "rc": None, "seconds": 0.0,
                 "error": "skipped: --budget-s was spent before it could start"}, args)
    return True


def run_tests(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """The CUDA-only tests, first: a broken GPU path shows here before anything is timed."""
    if out_of_time(doc, "CUDA tests", args):
        return
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=short", "-p",
               "no:cacheprovider", *GPU_TEST_FILES, "-k", "cuda or gpu"]
    log = Path(f"{doc['stem']}-cuda-tests.log")     # each test's outcome as it finishes
    rc, seconds, last = run_command(command, log)
    record(doc, {"name": "CUDA tests", "command": shown(command), "rc": rc,
                 "seconds": seconds, "summary": last, "log": str(log)}, args)


def run_suite(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    if out_of_time(doc, "kernel suite", args):
        return
    budget = args.suite_budget_s
    if math.isfinite(args.deadline):        # no suite case starts after our own deadline
        budget = max(1.0, min(budget or math.inf, args.deadline - time.monotonic()))
    command = [sys.executable, str(REPO / "bench" / "gpu_suite.py"), "--out", args.out,
               *(["--quick"] if args.quick else []),
               *(["--budget-s", f"{budget:.1f}"] if budget else [])]
    started = time.time()
    rc, took, last = run_command(command)
    # Only a file this call wrote (1 s of slack for coarse file-system clocks).
    written = [p for p in Path(args.out).glob("gpu-suite-*.json")
               if p.stat().st_mtime >= started - 1.0]
    found = max(written, key=lambda p: p.stat().st_mtime, default=None)
    suite = json.loads(found.read_text()) if found else {}
    record(doc, {"name": "kernel suite", "command": shown(command), "rc": rc,
                 "seconds": took, "file": str(found) if found else None,
                 **({"error": last} if rc and last else {}),
                 "targets": [{k: t[k] for k in ("name", "status", "summary")}
                             for t in suite.get("targets", [])]}, args)


def run_llama(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    work = args.work
    for batch in args.batches:
        first = work / f"{args.model}-b{batch}-{TARGETS[0]:g}"
        for target in TARGETS:
            out = work / f"{args.model}-b{batch}-{target:g}"
            if out_of_time(doc, f"{args.model} b{batch} {target:g}x", args):
                continue
            table = first / "timings.json"
            reuse = ["--timings", str(table)] if out != first and table.is_file() else []
            command = cli("run", "--model", args.model, "--backend", "triton",
                          "--batch-size", batch, "--speedup", target, "--out", out,
                          "--database", work / f"{args.model}-b{batch}-database", *reuse,
                          "--compile", *search_flags(args))
            run_and_record(doc, f"{args.model} b{batch} {target:g}x", command, out, args)


def run_bert(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    work = args.work
    if out_of_time(doc, "bert-base timings", args):
        return
    table = work / "bert-base.timings.json"
    grid = ["--levels", str(args.levels), "--block", str(args.block)]
    rc, seconds, last = run_command(cli("timings", "--model", BERT, "--backend", "triton",
                                        *grid, "--compile", "--out", table))
    target = bert_target(table) if rc == 0 else None
    if target is None:
        record(doc, {"name": "bert-base timings", "rc": rc or 1, "seconds": seconds,
                     "error": last if rc else "no target above 1.05x on the table"}, args)
        return
    out = work / f"bert-base-{target:g}"
    if out_of_time(doc, f"bert-base {target:g}x compiled", args):
        return
    command = cli("run", "--model", BERT, "--backend", "triton", "--speedup", target,
                  "--timings", table, "--out", out, "--compile", *search_flags(args))
    run_and_record(doc, f"bert-base {target:g}x compiled", command, out, args)


def bert_target(table_path: Path) -> float | None:
    """0.95 x the table's largest reachable speedup, rounded down to 0.01 (None below 1.05)."""
    from spdy_gpu.solve import max_speedup
    from spdy_gpu.timing import TimingTable

    target = math.floor(95 * max_speedup(TimingTable.load(table_path))) / 100
    return target if target >= 1.05 else None


def run_and_record(doc: dict[str, Any], name: str, command: list[str], out: Path,
                   args: argparse.Namespace) -> None:
    (out / "report.json").unlink(missing_ok=True)       # never read an older run's report
    rc, seconds, last = run_command(command)
    row = speedups(out / "report.json")
    if rc and "error" in row:
        row["error"] = last or row["error"]
    record(doc, {"name": name, "command": shown(command), "rc": rc, "seconds": seconds,
                 "out": str(out), **row}, args)


def speedups(report_path: Path) -> dict[str, Any]:
    """Target / predicted / measured speedup from a run's report.json, and the 5% band."""
    if not report_path.is_file():
        return {"error": f"no {report_path.name} (the run failed before its report)"}
    report = json.loads(report_path.read_text())
    target, measured = report.get("target_speedup"), report.get("measured_speedup")
    within = None if not (target and measured) else abs(measured / target - 1) <= BAND
    return {"target": target, "predicted": report.get("predicted_speedup"),
            "measured": measured, "within_5pct": within}


# ---- results ------------------------------------------------------------------------------

def results_stem(out: str, device: str) -> Path:
    from spdy_gpu.jsonio import slug

    name = slug(device) or "gpu"
    return Path(out) / f"bench-gpu-{name}-{datetime.now(timezone.utc):%Y-%m-%d}"


def load_or_new(stem: Path, device: str) -> dict[str, Any]:
    """Today's results file for this GPU (runs of another call kept), or a new one."""
    path = stem.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        doc = {"device": device, "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "runs": []}
    doc.pop("format", None)
    doc.pop("version", None)
    doc["stem"] = str(stem)
    return doc


def record(doc: dict[str, Any], run: dict[str, Any], args: argparse.Namespace) -> None:
    """Add (or replace, by name) one run and rewrite both files atomically."""
    from spdy_gpu.jsonio import atomic_write_bytes, save_json

    doc["runs"] = [r for r in doc["runs"] if r["name"] != run["name"]] + [run]
    args.recorded.add(run["name"])
    doc["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                       if k not in ("parts", "deadline", "recorded")}
    stem = Path(doc["stem"])
    save_json(stem.with_suffix(".json"), FORMAT, VERSION,
              {k: v for k, v in doc.items() if k != "stem"})
    atomic_write_bytes(stem.with_suffix(".md"), markdown(doc).encode())


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# GPU benchmarks: {doc['device']}, {doc['date']}", "",
             "| run | exit | seconds | target | predicted | measured | within 5% |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        within = {True: "yes", False: "NO", None: "n/a"}[r.get("within_5pct")]
        rc = "skipped" if r["rc"] is None else r["rc"]
        lines.append(f"| {r['name']} | {rc} | {r['seconds']} | {_x(r.get('target'))} | "
                     f"{_x(r.get('predicted'))} | {_x(r.get('measured'))} | {within} |")
    for r in doc["runs"]:
        for key in ("error", "note"):
            if r.get(key):
                lines.append(f"\n{r['name']}: {r[key]}")
        if r.get("targets"):
            lines += ["", f"Kernel suite targets ({r.get('file')}):", ""]
            lines += [f"- **{t['status'].upper()}** {t['name']}: {t['summary']}"
                      for t in r["targets"]]
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


# ---- without a GPU ------------------------------------------------------------------------

def plan_without_gpu(args: argparse.Namespace) -> int:
    """The estimate's timing table of each batch and the DP's profile at each target (no
    measurement), recorded in OUT/bench-gpu-estimate-<spec>-<date>.{json,md}: predicted
    speedups only, every row marked ESTIMATED."""
    if "llama" not in args.parts:
        print(f"parts {' '.join(args.parts)} need a GPU; only llama plans from the estimate")
        return 0
    work = args.work
    doc = load_or_new(results_stem(args.out, f"estimate {args.estimate}"),
                      f"{args.estimate} (ESTIMATED: analytic roofline, nothing measured)")
    for batch in args.batches:
        name = f"{args.model}-b{batch}"
        table = work / f"{name}.estimate.timings.json"
        rc, seconds, last = run_command(cli(
            "timings", "--model", args.model, "--backend", "triton", "--estimate",
            args.estimate, "--batch-size", batch, "--compile", "--levels", args.levels,
            "--block", args.block, "--out", table))
        if rc != 0:
            record(doc, {"name": f"{name} timings (estimated)", "rc": rc, "seconds": seconds,
                         "error": last}, args)
            return rc
        for target in TARGETS:
            stem = work / f"{name}.estimate.{target:g}x"
            command = cli("solve", "--timings", table, "--speedup", target, "--quiet",
                          "--out", f"{stem}.profile.json", "--plot", f"{stem}.profile.png")
            rc, seconds, last = run_command(command)
            profile = Path(f"{stem}.profile.json")
            predicted = (json.loads(profile.read_text())["predicted_speedup"]
                         if rc == 0 else None)
            record(doc, {"name": f"{args.model} b{batch} {target:g}x (estimated)",
                         "command": shown(command), "rc": rc, "seconds": seconds,
                         "target": target, "predicted": predicted, "measured": None,
                         "within_5pct": None, **({"error": last} if rc else {})}, args)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    run_script(main)
