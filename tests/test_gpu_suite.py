"""bench/gpu_suite.py without a GPU: its --cpu-check (correctness under Triton's interpreter,
the report on fake times), the matrix's coverage, the targets' verdicts on made-up rows;
and bench/bench_gpu.py's collection of run reports."""

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from spdy_gpu.gpu_specs import GPU_SPECS  # noqa: E402
from spdy_gpu.jsonio import load_json  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load("gpu_suite")
bench_gpu = _load("bench_gpu")
TARGET_NAMES = [t["name"] for t in suite.evaluate_targets([])]


def test_cpu_check_writes_json_and_markdown(tmp_path):
    assert suite.main(["--cpu-check", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("gpu-suite-cpu-check-*.json")
    doc = load_json(json_path, suite.SUITE_FORMAT, 2)
    assert doc["mode"] == "cpu-check" and doc["complete"] and doc["correctness"]["passed"]
    checks = doc["correctness"]["checks"]
    assert {tuple(c["block"]) for c in checks} == set(suite.BLOCKS)
    assert {c["tma"] for c in checks} >= {True, False} and {c["stream_k"] for c in checks} >= {
        None, 0}
    assert {c["layout"] for c in checks} == {"contiguous", "strided", "transposed",
                                             "misaligned", "3d"}
    assert any(c["sparsity"] == 1.0 for c in checks)                # the empty weight
    assert all(c["ok"] and c["rel_err"] < c["limit"] for c in checks)
    assert len(doc["cases"]) == len(suite.CPU_CASES)
    for row in doc["cases"]:
        assert row["rel_err_ok"] and len(row["ours"]["plain"]) == 3
        assert row["derived"]["speedup_vs_cublas"] > 0
        assert "error" in row["torch_bsr"] and "error" in row["semi_2_4"]   # CUDA only
    assert [t["name"] for t in doc["targets"]] == TARGET_NAMES
    host = doc["host_overhead"]["us_per_call"]              # every path ran (interpreted)
    assert len(host) == 6 and all(us > 0 for us in host.values())

    text = json_path.with_suffix(".md").read_text()
    assert "| BlockSparseLinear (direct call) |" in text
    assert doc["device"] in text and doc["date"] in text and "TIMES ARE FAKE" in text
    for name in TARGET_NAMES:
        assert re.search(rf"^- \*\*(MET|NOT MET|NO DATA)\*\* {re.escape(name)}: ", text, re.M)
    case_rows = [line for line in text.splitlines() if line.startswith("| 256x192 |")]
    assert len(case_rows) == 1 and "| 0.02 | 0.018 |" in case_rows[0]
    assert "PASSED: " in text and "| 3-D X [2, 24, K] | 64x64 | bf16 | 48 |" in text


def test_matrix_covers_every_axis():
    spec = GPU_SPECS["h100-sxm"]
    ceilings = {"peak_flops": spec.peak_flops["bf16"], "bandwidth": spec.bandwidth}
    for cases in (suite.QUICK, suite.MATRIX):
        assert {c.block for c in cases} == set(suite.BLOCKS)
        assert {c.m for c in cases} == set(suite.MS)
        assert {c.dtype for c in cases} == {"bf16", "fp16"}
        assert {c.sparsity for c in cases} == set(suite.SPARSITIES)
        assert any(c.tune_torch for c in cases) and any(c.sparsity == 0.5 for c in cases)
        assert {c.block for c in cases if c.m >= 2048} >= {(64, 64), (128, 128)}
        floors = [1e3 * suite.gemm_cost(c.n, c.k, c.m, 1 - c.sparsity, c.block)[1]
                  / ceilings["bandwidth"] for c in cases if c.m <= 64]
        assert max(floors) >= 0.015                     # a memory-bound target cell
    shapes = {(c.n, c.k) for c in suite.MATRIX}
    assert shapes == {s for group in suite.SHAPES.values() for s in group}
    even = {(c.n, c.k) for c in suite.MATRIX
            if c.block == (64, 64) and c.m == 64 and c.sparsity == 0.3}
    assert even == set(suite.LLAMA_SHAPES)
    assert len(set(suite.MATRIX)) == len(suite.MATRIX) and set(suite.QUICK) <= set(suite.MATRIX)


def _row(n, k, m, block, sparsity, ours, cublas, graph=None, tuned=None):
    """A measured row as measure_case returns it, with made-up medians (graph: ours only)."""
    def timing(ms, graph_ms=None):
        return None if ms is None else {"plain": [ms] * 3, "graph": [graph_ms or ms] * 3}

    row = {"case": {"n": n, "k": k, "m": m, "dtype": "bf16", "block": list(block),
                    "sparsity": sparsity, "goal": "cover", "tune_torch": tuned is not None},
           "density": 1 - sparsity, "ours": timing(ours, graph), "cublas": timing(cublas),
           "torch_bsr": {"error": "x"}, "torch_bsr_tuned": timing(tuned), "semi_2_4": None,
           "rel_err": 1e-3, "rel_err_ok": True, "stream_k": m <= 64,
           "config": {"BLOCK_T": 64, "num_warps": 4, "num_stages": 3}, "tma": True}
    ceilings = {"spec": {"peak_flops": 989e12, "bandwidth": 3.35e12},
                "measured": {"peak_flops": 700e12, "bandwidth": 3.0e12}}
    row["derived"] = suite.derive(row, ceilings)
    return row


def test_targets_met_and_not_met_with_numbers():
    bytes_moved = suite.gemm_cost(4096, 11008, 1, 0.5, (64, 64))[1]
    at_85_pct = 1e3 * bytes_moved / (0.85 * 3.0e12)             # ms at 0.85 of 3.0 TB/s
    rows = [_row(4096, 4096, 2048, (128, 128), 0.5, ours=0.5, cublas=1.0),     # bound 0.556
            _row(4096, 4096, 2048, (64, 64), 0.5, ours=0.7, cublas=1.0),       # bound 0.625
            _row(4096, 11008, 1, (64, 64), 0.5, ours=1.0, cublas=2.0, graph=at_85_pct),
            _row(11008, 4096, 64, (64, 64), 0.3, ours=0.024, cublas=0.03, tuned=0.048),
            _row(1024, 4096, 64, (64, 64), 0.3, ours=0.1, cublas=0.09)]
    targets = {t["name"]: t for t in suite.evaluate_targets(rows)}
    status = [targets[name]["status"] for name in TARGET_NAMES]
    assert status == ["met", "not met", "met", "met", "not met"]
    summaries = [targets[name]["summary"] for name in TARGET_NAMES]
    assert "1/1 cells; worst 4096x4096 M=2048 bf16 128x128 s50%: 0.5000 ms vs bound " \
           "0.5556 ms (0.90x the bound)" == summaries[0]
    assert "lowest 0.85 of the measured copy bandwidth" in summaries[2]
    assert "median 2.00x over 1 tuned cells" in summaries[3]
    assert "1/2 Llama shapes; slowest 0.90x cuBLAS (1024x4096 M=64" in summaries[4]

    doc = {"device": "Test GPU", "date": "2026-01-01", "command": "python x", "mode": "full",
           "software": {}, "ceilings": {}, "correctness": None, "cases": rows, "skipped": ["a"],
           "targets": list(targets.values()), "seconds": 1.0, "complete": False}
    text = suite.markdown(doc)
    assert "- **NOT MET** compute-bound 64x64" in text and "INCOMPLETE" in text
    assert "| 4096x4096 | 2048 | bf16 | 128x128 | 50% | 0.5 | 0.5 | 1 | 1 |" in text
    assert "## Not run (time budget)" in text


def test_kernel_comparisons_take_graph_times_where_both_sides_have_them():
    """Host overhead (plain time far above the graph replay) decides no kernel target."""
    host_bound = _row(4096, 4096, 2048, (128, 128), 0.5, ours=1.0, cublas=1.0, graph=0.5,
                      tuned=0.9)
    host_bound["torch_bsr_tuned"]["graph"] = [0.75] * 3
    host_bound["derived"] = suite.derive(host_bound, {})
    targets = {t["name"]: t for t in suite.evaluate_targets([host_bound])}
    compute, torch_tuned = targets[TARGET_NAMES[0]], targets[TARGET_NAMES[3]]
    assert compute["status"] == "met" and compute["cells"][0]["value"] == 0.5
    assert torch_tuned["cells"][0]["value"] == pytest.approx(1.5)     # 0.75 / 0.5, not 0.9
    assert host_bound["derived"]["compared"] == "graph"


def test_reevaluate_rewrites_derived_figures_and_targets_not_measurements(tmp_path, capsys):
    row = _row(4096, 4096, 2048, (128, 128), 0.5, ours=1.0, cublas=1.0, graph=0.5)
    row["derived"]["compared"] = "stale"                      # as an older version derived
    doc = {"device": "Test GPU", "date": "2026-01-01", "command": "python x", "mode": "full",
           "software": {}, "ceilings": {}, "correctness": None, "cases": [row],
           "skipped": [], "targets": [{"name": "old", "status": "not met", "summary": "",
                                       "cells": []}], "seconds": 12.5, "complete": True}
    suite.write(doc, tmp_path / "r")
    assert suite.main(["--reevaluate", str(tmp_path / "r.json")]) == 0
    again = load_json(tmp_path / "r.json", suite.SUITE_FORMAT, suite.SUITE_VERSION)
    assert again["cases"][0]["ours"] == row["ours"] and again["seconds"] == 12.5
    assert again["cases"][0]["derived"]["compared"] == "graph"
    assert again["targets"][0]["status"] == "met" and again["reevaluated"]["rule"]
    assert "re-evaluated from these measurements" in (tmp_path / "r.md").read_text()
    assert "MET  compute-bound 128x128" in capsys.readouterr().out


def test_reevaluate_refuses_what_is_not_a_results_file_in_one_line(tmp_path, capsys):
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "plain.txt").write_text("{}")
    broken = tmp_path / "broken.json"
    suite.write({"device": "x", "date": "d", "command": "c", "mode": "full", "software": {},
                 "ceilings": {}, "cases": [], "targets": []}, tmp_path / "broken")
    doc = json.loads(broken.read_text())
    doc["cases"] = "abc"
    broken.write_text(json.dumps(doc))
    before = broken.read_text()
    for path in ("missing.json", "other.json", "plain.txt", "broken.json"):
        assert suite.main(["--reevaluate", str(tmp_path / path)]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert broken.read_text() == before                      # nothing half-written


def test_reevaluate_keeps_a_dotted_name(tmp_path, capsys):
    row = _row(4096, 4096, 2048, (128, 128), 0.5, ours=1.0, cublas=1.0)
    suite.write({"device": "x", "date": "d", "command": "c", "mode": "full", "software": {},
                 "ceilings": {}, "correctness": None, "cases": [row], "skipped": [],
                 "targets": [], "seconds": 1.0}, tmp_path / "suite.v2")
    assert suite.main(["--reevaluate", str(tmp_path / "suite.v2.json")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.v2.json", "suite.v2.md"]
    assert "rewrote" in capsys.readouterr().out


def test_derived_roofline_matches_the_formula():
    row = _row(4096, 4096, 16, (64, 64), 0.5, ours=0.02, cublas=0.03)
    d = row["derived"]
    weight = 0.5 * 4096 * 4096 * (2 + 4 / 64**2)
    assert d["bytes"] == pytest.approx(weight + 2 * (4096 * 16 + 4096 * 16))
    assert d["flops"] == 2 * 0.5 * 4096 * 4096 * 16
    assert d["floor_ms"]["measured"] == pytest.approx(1e3 * d["bytes"] / 3.0e12)
    assert d["roofline_fraction"]["measured"] == pytest.approx(d["floor_ms"]["measured"] / 0.02)
    assert d["speedup_vs_cublas"] == pytest.approx(1.5)


def test_time_boxed_do_bench_caps_and_stops(monkeypatch):
    import triton.testing

    seen = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup=25, rep=100, **kw: seen.append((warmup, rep)) or 1.0)
    with suite.time_boxed_do_bench(60.0):
        assert triton.testing.do_bench(lambda: None, warmup=500, rep=100) == 1.0
    assert seen == [(10, 25)]
    with suite.time_boxed_do_bench(-1.0), pytest.raises(TimeoutError):
        triton.testing.do_bench(lambda: None, warmup=500, rep=100)
    assert triton.testing.do_bench(lambda: None) == 1.0          # restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_one_line_and_success(capsys, tmp_path):
    assert suite.main(["--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("\n") == 1 and not list(tmp_path.iterdir())


def test_bench_gpu_collects_run_reports(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"format": "spdy-gpu/run-report", "version": 1,
                                  "target_speedup": 2.0, "predicted_speedup": 2.1,
                                  "measured_speedup": 1.92}))
    row = bench_gpu.speedups(report)
    assert row == {"target": 2.0, "predicted": 2.1, "measured": 1.92, "within_5pct": True}
    assert bench_gpu.speedups(tmp_path / "missing.json")["error"].startswith("no ")
    doc = {"device": "Test GPU", "date": "2026-01-01",
           "runs": [{"name": "llama-decode b1 2x", "rc": 0, "seconds": 60.0, **row},
                    {"name": "llama-decode b1 3x", "rc": 1, "seconds": 5.0, "target": 3.0,
                     "measured": 2.5, "within_5pct": False}]}
    text = bench_gpu.markdown(doc)
    assert "| llama-decode b1 2x | 0 | 60.0 | 2.000x | 2.100x | 1.920x | yes |" in text
    assert "| llama-decode b1 3x | 1 | 5.0 | 3.000x | n/a | 2.500x | NO |" in text
    assert not math.isnan(bench_gpu.BAND)


def test_bench_gpu_records_why_a_run_failed(tmp_path, capsys):
    """A run that stops before its report is recorded with its last stderr line (the
    one-line error), not only "no report.json"."""
    import argparse
    import sys

    fails = [sys.executable, "-c", "import sys; print('progress', file=sys.stderr); "
             "sys.exit('spdy-gpu run: error: target speedup 3x is infeasible')"]
    args = argparse.Namespace(parts=["llama"], out=str(tmp_path), recorded=set())
    doc = {"device": "Test GPU", "date": "2026-01-01", "runs": [], "stem": str(tmp_path / "b")}
    bench_gpu.run_and_record(doc, "llama-decode b1 3x", fails, tmp_path / "run", args)
    run = doc["runs"][0]
    assert run["rc"] == 1 and run["error"].endswith("target speedup 3x is infeasible")
    assert "progress" in capsys.readouterr().err                  # shown as it came
    assert "infeasible" in (tmp_path / "b.md").read_text()


def test_bench_gpu_logs_a_commands_output_as_it_comes(tmp_path, capsys):
    """The CUDA tests' log keeps every line (stdout and stderr) even if the call is cut off
    later; the last line (pytest's summary) is returned."""
    import sys

    command = [sys.executable, "-c", "import sys; print('PASSED a', flush=True); "
               "print('warn', file=sys.stderr, flush=True); print('1 failed, 1 passed')"]
    log = tmp_path / "t.log"
    rc, _, last = bench_gpu.run_command(command, log)
    assert rc == 0 and last == "1 failed, 1 passed"
    assert log.read_text().splitlines() == ["PASSED a", "warn", "1 failed, 1 passed"]
    assert "PASSED a" in capsys.readouterr().out


def test_bench_gpu_budget_skips_runs_instead_of_starting_them(tmp_path):
    args = bench_gpu.parse_args(["--budget-s", "1", "--out", str(tmp_path)])
    args.deadline -= 2                              # the budget is spent
    doc = {"device": "Test GPU", "date": "2026-01-01", "runs": [], "stem": str(tmp_path / "b")}
    bench_gpu.run_llama(args, doc)                  # would start three runs per batch
    bench_gpu.run_suite(args, doc)
    names = [r["name"] for r in doc["runs"]]
    assert names == ["llama-decode b1 1.5x", "llama-decode b1 2x", "llama-decode b1 3x",
                     "llama-decode b16 1.5x", "llama-decode b16 2x", "llama-decode b16 3x",
                     "kernel suite"]
    assert all(r["rc"] is None and r["error"].startswith("skipped") for r in doc["runs"])
    assert "| kernel suite | skipped | 0.0 |" in (tmp_path / "b.md").read_text()
    assert math.isinf(bench_gpu.parse_args([]).deadline)
    saved = json.loads((tmp_path / "b.json").read_text(), parse_constant=pytest.fail)
    assert "deadline" not in saved["settings"]       # strict JSON, no clock readings


@pytest.mark.parametrize("flag", ["--budget-s", "--suite-budget-s"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "x"])
def test_bench_gpu_budgets_must_be_positive_seconds(flag, value, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args([flag, value])
    assert f"argument {flag}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.parse_args(["--budget-s", value])


def test_bench_gpu_suite_record_never_takes_an_older_runs_file(tmp_path, monkeypatch):
    """A suite that fails before writing is recorded with its error, not with the targets
    of an older results file in the same folder."""
    old = tmp_path / "gpu-suite-old-2026-01-01.json"
    old.write_text(json.dumps({"targets": [{"name": "t", "status": "met", "summary": "s"}]}))
    os.utime(old, (0, 1e9))                                        # written in 2001
    monkeypatch.setattr(bench_gpu, "run_command", lambda command: (1, 0.5, "CUDA error: x"))
    args = bench_gpu.parse_args(["--out", str(tmp_path)])
    doc = {"device": "Test GPU", "date": "2026-01-01", "runs": [], "stem": str(tmp_path / "b")}
    bench_gpu.run_suite(args, doc)
    (run,) = doc["runs"]
    assert run["file"] is None and run["targets"] == [] and run["error"] == "CUDA error: x"


def test_bench_gpu_paths_are_relative_to_where_it_is_called(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = bench_gpu.parse_args(["--out", "o", "--work", "w"])
    assert args.out == str(tmp_path / "o") and args.work == tmp_path / "w"


def test_bert_base_user_model_builds():
    pytest.importorskip("transformers")
    from spdy_gpu.models import ModelSetting, load_model

    model, example = load_model("bench.models:bert_base").build(
        ModelSetting(batch_size=2, seq_len=8))
    assert type(model).__name__ == "BertModel" and not model.training
    assert example["input_ids"].shape == (2, 8) == example["attention_mask"].shape


def test_a_small_m_case_names_each_schedules_best_tuning_time():
    row = {"stream_k": False, "tma": True,
           "config": {"BLOCK_T": 16, "GROUP_T": 8, "WAVES": 1, "STREAM_K": False,
                      "num_warps": 4, "num_stages": 4},
           "tune_configs": [{"STREAM_K": True, "ms": 0.0071}, {"STREAM_K": True, "ms": 0.0068},
                            {"STREAM_K": False, "ms": 0.0049}, {"STREAM_K": False, "ms": None}]}
    text = suite._config_text(row)
    assert text.startswith("direct TMA BLOCK_T=16")
    assert text.endswith("(tuning: stream-K 0.0068 ms, direct 0.0049 ms)")
    assert "tuning:" not in suite._config_text({**row, "tune_configs": row["tune_configs"][:2]})
