"""`compare`: every method at SPDY's guaranteed budget, each timed against dense, resumable, with
unreachable targets reported (a fake backend whose time follows the weights' sparsity)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from spdy_gpu.compare import METHODS, CompareSettings, compare, global_magnitude_choices
from spdy_gpu.models import ModelEntry, ModelSetting
from spdy_gpu.pipeline import GapSettings
from spdy_gpu.solve import Planner

from .test_pipeline import ENTRY, FakeBackend, build, settings


def agreement(pruned, dense):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        same = pruned(x).argmax(1) == dense(x).argmax(1)
    return {"agreement": 100.0 * float(same.float().mean())}


QUALITY_ENTRY = ModelEntry(ENTRY.name, ENTRY.description, build=ENTRY.build,
                           calibration=ENTRY.calibration, quality=agreement)


def compare_settings(*speedups, **changes):
    from spdy_gpu.search import SearchConfig
    run = settings(search=SearchConfig(seed=0, random_candidates=6, patience=4,
                                       max_evaluations=12))
    return CompareSettings(speedups=speedups, run=run, gap=GapSettings(lr=1e-4, epochs=1),
                           **changes)


def test_every_method_is_measured_at_spdys_budget(tmp_path):
    backend = FakeBackend()
    report = compare(QUALITY_ENTRY, ModelSetting(), backend, compare_settings(1.4, 1.8),
                     tmp_path, progress=False)
    assert [t["target"] for t in report.targets] == [1.4, 1.8]
    for target in report.targets:
        rows = {row["method"]: row for row in target["rows"]}
        assert list(rows) == ["dense", *METHODS]
        assert rows["dense"]["measured_speedup"] == pytest.approx(1.0)
        for method in METHODS:
            row = rows[method]
            assert row["predicted_speedup"] >= target["solved_for"] * (1 - 1e-9)
            assert row["measured_speedup"] > 1.0 and "agreement" in row["quality"]
            assert np.isfinite(row["held_out_loss"])
        assert rows["spdy"]["held_out_loss"] <= rows["spdy-magnitude"]["held_out_loss"] * 1.5
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert doc["format"] == "spdy-gpu/compare" and len(doc["targets"]) == 2
    assert "| spdy+gap |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert (tmp_path / "spdy-1.4x" / "profile.json").exists()


class DriftingBackend(FakeBackend):
    """Every session runs slower than the one before (as a busy machine, or a session of
    many engines, would), and records which models each session timed."""

    def __init__(self, step=0.01):
        super().__init__()
        self.sessions, self.step = [], step

    def latency(self, models, example):
        self.sessions.append(sorted(models))
        slower = 1.0 + self.step * len(self.sessions)
        return {name: type(t)(median_ms=t.median_ms * slower, spread_ms=0.0, slow_engines=0)
                for name, t in super().latency(models, example).items()}


def test_each_method_is_timed_against_dense_in_a_session_of_its_own(tmp_path):
    backend = DriftingBackend()
    methods = ("uniform", "spdy", "spdy-magnitude")
    report = compare(QUALITY_ENTRY, ModelSetting(), backend,
                     compare_settings(1.4, methods=methods), tmp_path, progress=False)
    assert backend.sessions[-3:] == [sorted(["dense", m]) for m in methods]
    rows = {row["method"]: row for row in report.targets[0]["rows"]}
    for method in methods:
        row = rows[method]
        assert row["measured_speedup"] == pytest.approx(row["dense_ms"] / row["ms"])
    dense_ms = [rows[m]["dense_ms"] for m in methods]
    assert len(set(dense_ms)) == 3                  # each pair's own dense time
    assert rows["dense"]["ms"] == pytest.approx(np.median(dense_ms))
    assert rows["dense"]["spread_ms"] == pytest.approx(max(dense_ms) - min(dense_ms))


def test_a_rerun_resumes_and_an_unreachable_target_is_reported(tmp_path):
    backend = FakeBackend()
    compare(QUALITY_ENTRY, ModelSetting(), backend, compare_settings(1.4), tmp_path,
            progress=False)
    calls = backend.latency_calls
    report = compare(QUALITY_ENTRY, ModelSetting(), backend, compare_settings(1.4, 50.0),
                     tmp_path, progress=False)
    assert backend.latency_calls == calls          # 1.4x kept; 50x fails before measuring
    unreachable = report.targets[-1]
    assert unreachable["target"] == 50.0 and unreachable["unreachable"]
    assert 1.0 < unreachable["max_speedup"] < 50.0
    assert "50x: unreachable (largest reachable" in (tmp_path / "compare.md").read_text()


def test_a_later_comparison_adds_its_targets_and_says_which_were_there(tmp_path, caplog):
    compare(QUALITY_ENTRY, ModelSetting(), FakeBackend(), compare_settings(50.0), tmp_path,
            progress=False)
    report = compare(QUALITY_ENTRY, ModelSetting(), FakeBackend(), compare_settings(60.0),
                     tmp_path, progress=False)
    assert [t["target"] for t in report.targets] == [50.0, 60.0]
    assert "also lists 50x, compared earlier" in caplog.text


def test_global_magnitude_uses_one_threshold_and_meets_the_budget(tmp_path):
    backend = FakeBackend()
    model, example = build()
    from spdy_gpu.layers import discover_layers
    from spdy_gpu.options import option_grid
    table = backend.measure_table(model, example, discover_layers(model, example),
                                  option_grid("unstructured", 11), model_name="toy")
    planner = Planner(table)
    choices = global_magnitude_choices(planner, model, 1.5)
    profile = planner.profile(1.5, choices)
    assert profile.predicted_ms <= profile.budget_ms
    assert global_magnitude_choices(planner, model, 1.0) == {
        name: choices[name].dense() for name in planner.layers}
    assert global_magnitude_choices(planner, model, planner.max_speedup * 1.01) is None


def test_a_comparison_without_spdy_is_refused():
    from spdy_gpu import SpdyError
    with pytest.raises(SpdyError, match="needs the spdy method"):
        compare_settings(1.5, methods=("uniform",))


@pytest.mark.slow
def test_compare_command_on_deepsparse(tmp_path, capsys):
    pytest.importorskip("deepsparse")
    from spdy_gpu.cli import main
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 64, 256), calib)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "tests.test_cli_run:mlp", "--backend", "deepsparse",
            "--threads", "1", "--repeats", "1", "--options", "dense", "unstructured@0.5",
            "unstructured@0.9", "--calib", str(calib), "--search-samples", "8", "--samples",
            "24", "--calib-batch-size", "8", "--random-candidates", "3", "--patience", "2",
            "--max-evaluations", "4", "--speedups", "1.3", "--methods", "uniform", "spdy",
            "evolution", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "1.3x: dense" in printed and "spdy" in printed and "evolution" in printed
    doc = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in doc["targets"][0]["rows"]] == [
        "dense", "uniform", "spdy", "evolution"]
    assert (out / "compare.png").exists() and (out / "spdy-1.3x" / "model.onnx").exists()


def test_a_comparison_of_other_settings_is_refused(tmp_path):
    from spdy_gpu import SpdyError
    compare(QUALITY_ENTRY, ModelSetting(), FakeBackend(), compare_settings(1.4), tmp_path,
            progress=False)
    with pytest.raises(SpdyError, match=r"holds a comparison of other settings \(differs in "
                                        r"setting.batch_size\); choose another --out"):
        compare(QUALITY_ENTRY, ModelSetting(batch_size=8), FakeBackend(),
                compare_settings(1.4), tmp_path, progress=False)
    with pytest.raises(SpdyError, match=r"other settings \(differs in identity.methods\)"):
        compare(QUALITY_ENTRY, ModelSetting(), FakeBackend(),
                compare_settings(1.4, methods=("uniform", "spdy")), tmp_path, progress=False)

    class TwoThreads(FakeBackend):          # the backend measuring elsewhere (--threads 2)
        def fingerprint(self, example):
            return dataclasses.replace(super().fingerprint(example), threads=2)

    with pytest.raises(SpdyError, match=r"other settings \(differs in fingerprint.threads\)"):
        compare(QUALITY_ENTRY, ModelSetting(), TwoThreads(), compare_settings(1.4), tmp_path,
                progress=False)


class SlowEveryOtherSession(FakeBackend):
    """Every second session runs in a slow state: dense 1.4x, pruned models 2x slower."""

    def __init__(self):
        super().__init__()
        self.sessions = 0

    def latency(self, models, example):
        self.sessions += 1
        slow = self.sessions % 2 == 0
        return {name: type(t)(median_ms=t.median_ms * (1.0 if not slow else
                                                      1.4 if name == "dense" else 2.0),
                              spread_ms=0.0, slow_engines=0)
                for name, t in super().latency(models, example).items()}


def test_a_pair_session_in_a_slow_state_is_timed_again(tmp_path):
    methods = ("uniform", "spdy")
    report = compare(QUALITY_ENTRY, ModelSetting(), SlowEveryOtherSession(),
                     compare_settings(1.4, methods=methods), tmp_path, progress=False)
    table = json.loads((tmp_path / "timings.json").read_text())
    rows = {row["method"]: row for row in report.targets[0]["rows"]}
    for method in methods:          # the kept pair is the one whose dense matches the table
        assert rows[method]["dense_ms"] == pytest.approx(table["dense_total_ms"], rel=0.01)


def test_unreachable_targets_first_share_one_table_and_nothing_is_listed_twice(tmp_path,
                                                                              capsys):
    from spdy_gpu.cli.compare import summary

    class CountingBackend(FakeBackend):
        tables = 0

        def measure_table(self, *args, **kwargs):
            CountingBackend.tables += 1
            return super().measure_table(*args, **kwargs)

    report = compare(QUALITY_ENTRY, ModelSetting(), CountingBackend(),
                     compare_settings(50.0, 60.0, 50.0), tmp_path, progress=False)
    assert CountingBackend.tables == 1 and (tmp_path / "timings.json").exists()
    assert [t["target"] for t in report.targets] == [50.0, 60.0]
    assert report.targets[0]["max_speedup"] == report.targets[1]["max_speedup"]
    assert not (tmp_path / "compare.png").exists()
    assert summary(report, str(tmp_path)).endswith(": compare.json, compare.md")
    assert compare_settings(2.0, methods=("spdy", "uniform", "spdy")).methods == \
        ("spdy", "uniform")


def test_an_estimated_backend_is_refused_before_any_work(tmp_path):
    from spdy_gpu.errors import SpdyError

    class Estimated(FakeBackend):
        estimated = True

    with pytest.raises(SpdyError, match="an estimated fake backend cannot; run it where"):
        compare(QUALITY_ENTRY, ModelSetting(), Estimated(), compare_settings(2.0), tmp_path,
                progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_markdown_table_has_one_cell_per_column_without_quality_metrics():
    from types import SimpleNamespace

    from spdy_gpu.compare import format_comparison
    row = {"method": "spdy", "predicted_speedup": 1.5, "measured_speedup": 1.49,
           "spread_ms": 0.01, "quality": {}, "held_out_loss": 0.1, "layers_pruned": 2,
           "mean_sparsity": 0.5}
    target = {"target": 1.5, "solved_for": 1.5, "evaluations": 10, "loss": "nmse",
              "rows": [row, {"method": "uniform", "unreachable": True}]}
    report = SimpleNamespace(model="m", backend="b", to_json=lambda: {"targets": [target]})
    table = [line for line in format_comparison(report).splitlines() if line.startswith("|")]
    assert len(table) == 4 and {line.count("|") for line in table} == {7}     # 6 columns
