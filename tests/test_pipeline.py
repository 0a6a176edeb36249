"""`run`, the whole method, on a tiny model with a fake latency backend whose end-to-end
time follows the sparsity of the weights it is given."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from spdy_gpu import InfeasibleTargetError, SpdyError
from spdy_gpu.data import CalibrationSpec
from spdy_gpu.models import ModelEntry, ModelSetting
from spdy_gpu.options import option_grid
from spdy_gpu.pipeline import RunSettings, run, uniform_choices
from spdy_gpu.profile import Profile
from spdy_gpu.reconstruct import model_fingerprint
from spdy_gpu.search import SearchConfig
from spdy_gpu.solve import Planner
from spdy_gpu.timing import Fingerprint, LayerTiming, TimingTable

FIXED_MS = 1.0


def build(setting=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 8)).eval()
    return model, torch.randn(4, 16)


def calibration(setting, samples):
    generator = torch.Generator().manual_seed(1)
    for start in range(0, samples, setting.batch_size):
        yield torch.randn(min(setting.batch_size, samples - start), 16, generator=generator)


ENTRY = ModelEntry("toy", "toy MLP", build=build, calibration=calibration)


def layer_ms(weight, sparsity):
    return weight.numel() / 512 * (1 - 0.8 * sparsity)


class FakeBackend:
    """Times are a function of each layer's sparsity; `slowdown` makes pruned models run
    slower than the table predicts (as a backend whose table is optimistic would)."""

    name = "fake"
    default_pattern = "unstructured"
    estimated = False

    def __init__(self, slowdown=1.0):
        self.slowdown = slowdown
        self.latency_calls = 0
        self.exported = None

    def fingerprint(self, example):
        return Fingerprint(backend="fake", backend_version="1", device="cpu", isa="x",
                           threads=1, batch_size=example.shape[0],
                           input_shape="x".join(map(str, example.shape)), dtype="float32")

    def supports(self, layer, option):
        return True

    def measure_table(self, model, example, layers, options, *, model_name, checkpoint=None,
                      progress=True):
        rows = []
        for layer in layers:
            weight = model.get_submodule(layer.name).weight
            times = tuple(layer_ms(weight, o.sparsity) for o in options)
            rows.append(LayerTiming(layer.name, "linear", (layer.n, layer.k, 4), times,
                                    (0.0,) * len(options)))
        dense = FIXED_MS + sum(r.median_ms[0] for r in rows)
        return TimingTable(self.fingerprint(example), tuple(options), tuple(rows), dense,
                           FIXED_MS, model=model_name)

    def latency(self, models, example):
        self.latency_calls += 1
        result = {}
        for name, model in models.items():
            total = FIXED_MS
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    sparsity = float((module.weight == 0).float().mean())
                    total += layer_ms(module.weight, sparsity) * (
                        self.slowdown if sparsity > 0 else 1.0)
            result[name] = SimpleNamespace(median_ms=total, spread_ms=0.0, slow_engines=0)
        return result

    def export(self, model, example, profile, out_dir):
        self.exported = out_dir / "model.fake"
        self.exported.write_text("ok")
        return self.exported


def settings(**changes):
    base = dict(speedup=1.6, measure_grid=tuple(option_grid("unstructured", 6)),
                calibration=CalibrationSpec(samples=96, batch_size=16), search_samples=32,
                search=SearchConfig(seed=0, random_candidates=8, patience=5))
    return RunSettings(**{**base, **changes})


def test_run_writes_everything_and_meets_the_target(tmp_path):
    backend = FakeBackend()
    report = run(ENTRY, ModelSetting(), backend, settings(), tmp_path / "run", progress=False)
    assert report.measured_speedup >= 1.6 * 0.97
    assert report.predicted_speedup >= 1.6
    out = tmp_path / "run"
    for name in ("timings.json", "database/manifest.json", "search-state.json", "profile.json",
                 "pruned.safetensors", "model.fake", "report.json", "report.md", "report.png"):
        assert (out / name).exists(), name
    doc = json.loads((out / "report.json").read_text())
    assert doc["format"] == "spdy-gpu/run-report" and doc["rounds"][0]["round"] == 1
    assert set(doc["held_out_loss"]) == {"spdy", "dp_database_errors", "uniform"}
    assert doc["held_out_loss"]["spdy"] <= doc["held_out_loss"]["uniform"]
    assert "Where the time went" in (out / "report.md").read_text()
    saved = Profile.load(out / "profile.json")        # made with the model: says which
    assert saved.model_fingerprint == model_fingerprint(build()[0], list(saved.choices))
    kept = next(r["round"] for r in doc["rounds"] if r.get("kept"))
    assert saved.provenance["run"] == str(out) and saved.provenance["round"] == kept
    assert saved.provenance["database"] == str(out / "database")


def test_a_second_run_reuses_every_stage_and_ends_the_same(tmp_path):
    first = run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    backend = FakeBackend()
    again = run(ENTRY, ModelSetting(), backend, settings(), tmp_path, progress=False)
    assert again.stages["timings"]["reused"] and again.stages["database"]["reused"]
    assert again.stages["guarantee"]["reused"] and backend.latency_calls == 0
    assert again.stages["search"]["resumed"] and "resumed" not in first.stages["search"]
    assert again.profile.choices == first.profile.choices
    assert again.search["evaluations"] == first.search["evaluations"]
    assert again.rounds == first.rounds and again.measured == first.measured


@pytest.mark.parametrize("edit", [
    lambda kept: kept.update(solved_for=kept["solved_for"] * 1.5),    # another profile
    lambda kept: kept.update(dense_ms=0),
    lambda kept: kept.update(measured_speedup="x"),
    lambda kept: kept.update(measured_speedup=kept["measured_speedup"] * 2),
    lambda kept: kept.update(met=not kept["met"]),
    lambda kept: kept.update(machine_slow=not kept["machine_slow"]),
    lambda kept: kept.update(kept=False),
    lambda kept: kept.pop("dense_spread_ms"),
])
def test_an_edited_guarantee_is_measured_again_not_reported(tmp_path, edit, caplog):
    first = run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    path = tmp_path / "guarantee.json"
    doc = json.loads(path.read_text())
    edit(next(r for r in doc["rounds"] if r.get("kept")))
    path.write_text(json.dumps(doc))
    backend = FakeBackend()
    with caplog.at_level("WARNING"):
        again = run(ENTRY, ModelSetting(), backend, settings(), tmp_path, progress=False)
    assert "not reusing" in caplog.text and "damaged ()" not in caplog.text
    assert backend.latency_calls > 0
    assert "reused" not in again.stages["guarantee"]
    assert again.profile.choices == first.profile.choices
    assert again.measured == first.measured


def test_a_kept_round_that_prunes_nothing_is_measured_again(tmp_path, caplog):
    """An older spdy-gpu could keep a loosened, all-dense round as 'met' (dense against
    dense: noise); a rerun reported it again."""
    from spdy_gpu.options import SparsityOption
    from spdy_gpu.profile import choices_digest
    first = run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    path = tmp_path / "guarantee.json"
    doc = json.loads(path.read_text())
    dense = {name: SparsityOption.dense() for name in first.profile.choices}
    next(r for r in doc["rounds"] if r.get("kept")).update(
        solved_for=0.5, choices_sha256=choices_digest(dense))
    path.write_text(json.dumps(doc))
    backend = FakeBackend()
    with caplog.at_level("WARNING"):
        again = run(ENTRY, ModelSetting(), backend, settings(), tmp_path, progress=False)
    assert "its kept round prunes no layer" in caplog.text and backend.latency_calls > 0
    assert again.profile.pruned_layers


def test_a_guarantee_whose_kept_mark_was_moved_is_measured_again(tmp_path, caplog):
    """Round 1 fell short, round 2 met the target and was kept; marking round 1 kept made a
    rerun report the shortfall as the result."""
    run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.3), settings(), tmp_path, progress=False)
    path = tmp_path / "guarantee.json"
    doc = json.loads(path.read_text())
    assert [(r["met"], r.get("kept", False)) for r in doc["rounds"]] == [(False, False),
                                                                          (True, True)]
    doc["rounds"][0]["kept"], doc["rounds"][1]["kept"] = True, False
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        again = run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.3), settings(), tmp_path,
                    progress=False)
    assert "the round marked kept is not the last one that met" in caplog.text
    assert again.measured.speedup >= 1.6 * 0.97


def test_the_rounds_running_out_above_the_target_is_noted(tmp_path):
    report = run(ENTRY, ModelSetting(), FakeBackend(slowdown=0.5), settings(max_rounds=1),
                 tmp_path, progress=False)
    assert report.measured.speedup > 1.6 * 1.05
    assert any("above the target 1.6x by more than 5% after 1 rounds" in n
               for n in report.notes)


def test_a_shortfall_near_the_tables_limit_tries_its_fastest_profile(tmp_path):
    """A tightened target above the table's largest speedup ended the guarantee; the
    fastest profile the table plans may still meet the target, and is tried once."""
    from spdy_gpu.solve import Planner
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path / "a", progress=False)
    table = tmp_path / "a" / "timings.json"
    fastest = math.floor(Planner(table).max_speedup * 1000) / 1000
    report = run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.15),
                 settings(speedup=round(0.95 * fastest, 3), timings=(table,)), tmp_path / "b",
                 progress=False)
    assert [r["met"] for r in report.rounds] == [False, True]
    assert report.rounds[-1]["solved_for"] == fastest and report.rounds[-1]["kept"]


def test_gap_on_a_profile_that_prunes_nothing_is_skipped_or_refused_up_front(tmp_path):
    """At 1x the profile is the dense model: gAP failed after the whole run with "gAP needs
    calibration batches and at least one pruned layer"."""
    from spdy_gpu.pipeline import GapSettings, global_adaprune_profile
    report = run(ENTRY, ModelSetting(), FakeBackend(), settings(speedup=1.0,
                 gap=GapSettings(epochs=1)), tmp_path / "r", progress=False)
    assert "gAP skipped: the profile prunes no layer" in report.notes
    with pytest.raises(SpdyError, match="the profile prunes no layer: gAP has nothing"):
        global_adaprune_profile(ENTRY, ModelSetting(), None, report.profile,
                                CalibrationSpec(), tmp_path / "w.safetensors")


def test_a_run_killed_in_gap_keeps_its_guarantee_and_resumes_gap(tmp_path, monkeypatch,
                                                                caplog):
    from spdy_gpu.pipeline import GapSettings
    gap = settings(gap=GapSettings(lr=1e-3, epochs=3, patience=10))
    real_step, steps = torch.optim.Adam.step, []

    def step_then_die(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 5:                         # in gAP's second epoch (4 fit batches)
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.1), gap, tmp_path, progress=False)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert (tmp_path / "guarantee.json").exists() and (tmp_path / "gap-checkpoint.pt").exists()
    backend = FakeBackend(slowdown=1.1)
    with caplog.at_level("INFO"):
        report = run(ENTRY, ModelSetting(), backend, gap, tmp_path, progress=False)
    assert backend.latency_calls == 0 and report.stages["guarantee"]["reused"]
    assert "gAP resumes after epoch 1 of 3" in caplog.text
    assert not (tmp_path / "gap-checkpoint.pt").exists()


def test_overwrite_to_add_gap_keeps_the_finished_search(tmp_path):
    from spdy_gpu.pipeline import GapSettings
    first = run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    gapped = run(ENTRY, ModelSetting(), FakeBackend(),
                 settings(gap=GapSettings(lr=1e-3, epochs=1), overwrite=True), tmp_path,
                 progress=False)
    assert gapped.profile.choices == first.profile.choices
    assert gapped.stages["search"]["seconds"] < first.stages["search"]["seconds"] + 1
    assert "spdy+gap" in gapped.held_out_loss


def test_measured_shortfall_tightens_the_budget(tmp_path):
    report = run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.25), settings(max_rounds=4),
                 tmp_path, progress=False)
    assert len(report.rounds) >= 2
    assert report.rounds[1]["solved_for"] > report.rounds[0]["solved_for"]
    assert report.measured_speedup >= 1.6 * 0.97


class DiesInRound(FakeBackend):
    """Interrupted (Ctrl-C) when asked for its `dies_at`-th end-to-end measurement."""

    def __init__(self, slowdown, dies_at):
        super().__init__(slowdown)
        self.dies_at = dies_at

    def latency(self, models, example):
        if self.latency_calls + 1 == self.dies_at:
            raise KeyboardInterrupt
        return super().latency(models, example)


def test_an_interrupted_guarantee_resumes_with_the_rounds_it_measured(tmp_path, caplog):
    whole = run(ENTRY, ModelSetting(), FakeBackend(slowdown=1.25), settings(max_rounds=4),
                tmp_path / "whole", progress=False)
    assert len(whole.rounds) >= 2
    with pytest.raises(KeyboardInterrupt):
        run(ENTRY, ModelSetting(), DiesInRound(1.25, dies_at=2), settings(max_rounds=4),
            tmp_path / "cut", progress=False)
    saved = json.loads((tmp_path / "cut" / "guarantee.json").read_text())
    assert saved["complete"] is False and len(saved["rounds"]) == 1
    backend = FakeBackend(slowdown=1.25)
    with caplog.at_level("INFO"):
        resumed = run(ENTRY, ModelSetting(), backend, settings(max_rounds=4), tmp_path / "cut",
                      progress=False)
    assert "round 1: measured" in caplog.text and "before the interruption" in caplog.text
    assert backend.latency_calls == len(whole.rounds) - 1
    assert resumed.rounds == whole.rounds and resumed.profile.choices == whole.profile.choices
    assert resumed.stages["guarantee"]["resumed"]
    assert json.loads((tmp_path / "cut" / "guarantee.json").read_text())["complete"] is True


def test_overshoot_loosens_the_budget_and_keeps_a_round_that_met_the_target(tmp_path):
    report = run(ENTRY, ModelSetting(), FakeBackend(slowdown=0.7), settings(max_rounds=4),
                 tmp_path, progress=False)
    assert report.rounds[0]["measured_speedup"] > 1.6 * 1.05            # overshoot first
    assert report.rounds[1]["solved_for"] < report.rounds[0]["solved_for"]
    assert report.measured_speedup >= 1.6 * 0.97
    assert all(r["met"] == (r["measured_speedup"] >= 1.6 * 0.97) for r in report.rounds)


def test_an_overshoot_from_a_coarse_grid_is_kept_not_loosened_to_below_one(tmp_path):
    """One sparse level: the cheapest profile meeting 1.2x predicts (and measures) far
    above it. Loosening by measured / target would solve for < 1x (all dense, short) and
    spend every round; the target corrected by the table's error picks the same profile."""
    from spdy_gpu.options import SparsityOption
    grid = (SparsityOption.dense(), SparsityOption.unstructured(0.9))
    report = run(ENTRY, ModelSetting(), FakeBackend(), settings(measure_grid=grid,
                                                                speedup=1.2, max_rounds=4),
                 tmp_path, progress=False)
    assert report.rounds[0]["measured_speedup"] > 1.2 * 1.05
    assert len(report.rounds) == 1 and report.rounds[0]["kept"]
    assert any("a looser budget picks the same profile" in n for n in report.notes)
    assert "| yes |" in (tmp_path / "report.md").read_text()


def test_a_noisy_overshoot_never_loosens_the_budget_to_an_all_dense_profile(tmp_path):
    """A busy machine measured the pruned model 6x too fast: loosening by that solves for
    < 1x, whose profile prunes nothing and would measure dense against dense (noise that
    can read as 'met'). The profile that overshot stays, flagged as measured on a busy
    machine."""
    class NoisyOnce(FakeBackend):
        def latency(self, models, example):
            result = super().latency(models, example)
            if self.latency_calls == 1:
                pruned = result["pruned"]
                result["pruned"] = SimpleNamespace(median_ms=pruned.median_ms / 6,
                                                   spread_ms=pruned.median_ms * 3,
                                                   slow_engines=0)
            return result

    report = run(ENTRY, ModelSetting(), NoisyOnce(), settings(max_rounds=4), tmp_path,
                 progress=False)
    assert len(report.rounds) == 1 and report.rounds[0]["kept"]
    assert report.profile.pruned_layers
    assert any("a looser budget prunes no layer" in n for n in report.notes)
    assert any("the machine was busy" in n for n in report.notes)


def test_a_kept_round_whose_dense_ran_far_faster_than_the_table_is_flagged(tmp_path):
    class FastDense(FakeBackend):
        def latency(self, models, example):
            result = super().latency(models, example)
            for name in result:                     # the table was timed on a busy machine
                result[name].median_ms *= 0.5
            return result

    report = run(ENTRY, ModelSetting(), FastDense(), settings(), tmp_path, progress=False)
    assert any("far faster than the table's" in n for n in report.notes)


def test_a_dense_measurement_far_off_the_table_is_repeated(tmp_path):
    class SlowDenseOnce(FakeBackend):
        def latency(self, models, example):
            result = super().latency(models, example)
            if self.latency_calls == 1:            # every dense engine settled slow
                dense = result["dense"]
                result["dense"] = SimpleNamespace(median_ms=dense.median_ms * 1.4,
                                                  spread_ms=0.0, slow_engines=0)
            return result

    backend = SlowDenseOnce()
    report = run(ENTRY, ModelSetting(), backend, settings(), tmp_path, progress=False)
    assert backend.latency_calls >= 2 and any("measured again" in n for n in report.notes)
    assert report.rounds[0]["dense_ms"] == pytest.approx(report.profile.dense_total_ms)


def test_a_machine_stuck_slow_is_not_used_to_tighten_the_budget(tmp_path):
    class AlwaysSlow(FakeBackend):
        def latency(self, models, example):
            result = super().latency(models, example)
            return {name: SimpleNamespace(median_ms=t.median_ms * (1.3 if name == "dense"
                                                                   else 1.6),
                                          spread_ms=0.0, slow_engines=0)
                    for name, t in result.items()}

    report = run(ENTRY, ModelSetting(), AlwaysSlow(), settings(max_rounds=3), tmp_path,
                 progress=False)
    assert len(report.rounds) == 3 and all(r["machine_slow"] for r in report.rounds)
    assert {r["solved_for"] for r in report.rounds} == {1.6}      # never tightened on it
    assert any("slow state" in note for note in report.notes)
    assert report.predicted_speedup == pytest.approx(report.rounds[0]["predicted_speedup"])


def test_a_slow_round_is_measured_again_at_the_same_budget(tmp_path):
    class SlowAtFirst(FakeBackend):
        def latency(self, models, example):
            result = super().latency(models, example)
            if self.latency_calls > 2:              # both first measurements were slow
                return result
            return {name: SimpleNamespace(median_ms=t.median_ms * (1.3 if name == "dense"
                                                                   else 1.6),
                                          spread_ms=0.0, slow_engines=0)
                    for name, t in result.items()}

    report = run(ENTRY, ModelSetting(), SlowAtFirst(), settings(), tmp_path, progress=False)
    first, second = report.rounds[:2]
    assert first["machine_slow"] and not second["machine_slow"]
    assert second["solved_for"] == first["solved_for"] and second["met"]
    assert not any("slow state" in note for note in report.notes)


def test_another_runs_directory_is_refused_unless_overwrite(tmp_path):
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    with pytest.raises(SpdyError, match="holds another run"):
        run(ENTRY, ModelSetting(), FakeBackend(), settings(speedup=1.4), tmp_path,
            progress=False)
    report = run(ENTRY, ModelSetting(), FakeBackend(), settings(speedup=1.4, overwrite=True),
                 tmp_path, progress=False)
    assert report.stages["timings"]["reused"]          # same model and backend: kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SpdyError, match="not a spdy-gpu run directory"):
        run(ENTRY, ModelSetting(), FakeBackend(), settings(), other, progress=False)


def test_unreachable_target_names_the_largest(tmp_path):
    with pytest.raises(InfeasibleTargetError, match="largest achievable speedup") as info:
        run(ENTRY, ModelSetting(), FakeBackend(), settings(speedup=50.0), tmp_path,
            progress=False)
    assert 1 < info.value.max_speedup < 50


def test_nan_loss_is_a_one_line_error(tmp_path):
    def nan_loss(pruned, dense, batch):
        return torch.tensor(math.nan)
    entry = ModelEntry("toy", "toy", build=build, calibration=calibration, loss=nan_loss)
    with pytest.raises(SpdyError, match="loss returned nan"):
        run(entry, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)


def test_calibration_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    torch.save(torch.randn(64, 7), tmp_path / "bad.pt")
    with pytest.raises(SpdyError, match="the model failed on its input") as info:
        run(ENTRY, ModelSetting(), FakeBackend(),
            settings(calibration=CalibrationSpec(tmp_path / "bad.pt", 64, 16)),
            tmp_path / "run", progress=False)
    assert "\n" not in str(info.value)


def test_uniform_baseline_is_the_least_sparse_level_that_fits():
    model, example = build()
    table = FakeBackend().measure_table(model, example, __import__(
        "spdy_gpu").discover_layers(model, example), option_grid("unstructured", 6),
        model_name="toy")
    planner = Planner(table)
    chosen = uniform_choices(planner, 1.6)
    levels = {o for o in chosen.values()}
    assert len(levels) == 1
    (level,) = levels
    lower = [o for o in table.options if o.sparsity < level.sparsity]
    assert all(uniform_choices(planner, 1.6) != dict.fromkeys(planner.layers, o)
               for o in lower)
    assert uniform_choices(planner, 100.0) is None


def test_prune_from_a_notebook_returns_the_pruned_copy(tmp_path):
    from spdy_gpu import prune
    model, example = build()
    batches = list(calibration(ModelSetting(batch_size=16), 96))
    pruned, report = prune(model, example, speedup=1.6, backend=FakeBackend(),
                           calibration=batches, out_dir=tmp_path,
                           measure_grid=tuple(option_grid("unstructured", 6)),
                           search_samples=32,
                           search=SearchConfig(seed=0, random_candidates=8, patience=5))
    assert report.measured_speedup >= 1.6 * 0.97
    assert all(float((p == 0).float().mean()) == 0 for p in model.parameters())  # untouched
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules()
                if isinstance(m, nn.Linear))
    assert zeros > 0


def test_prune_takes_one_tensor_of_samples_and_returns_an_eval_model(tmp_path):
    from spdy_gpu import prune
    model, example = build()
    samples = torch.cat(list(calibration(ModelSetting(batch_size=16), 96)))      # [96, 16]
    pruned, report = prune(model.train(), example, speedup=1.6, backend=FakeBackend(),
                           calibration=samples, out_dir=tmp_path,   # option names are parsed
                           measure_grid=[o.name for o in option_grid("unstructured", 6)],
                           search_samples=32,
                           search=SearchConfig(seed=0, random_candidates=8, patience=5))
    assert not pruned.training and report.stages["calibration"]["samples"] == \
        {"database": 64, "search": 32}
    _, report = prune(model, example, speedup=1.3, backend=FakeBackend(),
                      calibration=samples, calibration_samples=80, calibration_batch_size=20,
                      out_dir=tmp_path / "sized", measure_grid=["dense", "unstructured@0.5"],
                      search_samples=20, search=SearchConfig(seed=0, random_candidates=4,
                                                             patience=2))
    assert report.stages["calibration"]["samples"] == {"database": 60, "search": 20}
    with pytest.raises(SpdyError, match="calibration is a list of batches, used as it is"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), calibration=list(samples),
              calibration_samples=8, out_dir=tmp_path / "list")
    with pytest.raises(SpdyError, match="calibration_batch_size=0 must be >= 1"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), calibration=samples,
              calibration_batch_size=0, out_dir=tmp_path / "zero")
    with pytest.raises(SpdyError, match="calibration: the tensor of shape \\[96\\] holds"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), calibration=samples[:, 0],
              out_dir=tmp_path / "b")
    with pytest.raises(SpdyError, match="\\(batch 0\\): the tensor of shape \\[16\\] holds "
                                        "samples of shape \\[\\]"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), calibration=list(samples),
              out_dir=tmp_path / "unbatched")                 # a list of single samples
    with pytest.raises(SpdyError, match="timings= t.json does not exist"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), calibration=samples,
              timings="t.json", out_dir=tmp_path / "missing")
    with pytest.raises(SpdyError, match="--max-rounds must be an integer, not float 2.5"):
        prune(model, example, speedup=1.6, backend=FakeBackend(), max_rounds=2.5,
              out_dir=tmp_path / "rounds")
    with pytest.raises(SpdyError, match="--seed must be an integer, not str"):
        SearchConfig(seed="1")
    with pytest.raises(SpdyError, match="backend must be a backend name .* not NoneType"):
        prune(model, example, speedup=1.6, backend=None, out_dir=tmp_path / "c")
    with pytest.raises(SpdyError, match="prune\\(\\) has no setting 'speeed'; it takes .*"
                                        "max_rounds"):
        prune(model, example, speedup=1.6, speeed=3, out_dir=tmp_path / "d")
    with pytest.raises(SpdyError, match="prune needs the model .* got function"):
        prune(lambda x: x, example, speedup=1.6, out_dir=tmp_path / "e")
    from spdy_gpu import get_backend
    with pytest.raises(SpdyError, match="backend 'deepsparse' has no setting 'thread'; its "
                                        "settings: threads, repeats"):
        get_backend("deepsparse", thread=2)
    with pytest.raises(SpdyError, match="backend 'triton' has no setting 'repeat'; .*repeats"):
        get_backend("triton", estimate="h100-sxm", repeat=2)
    for threads in ("x", 1.5):
        with pytest.raises(SpdyError, match="--threads must be an integer or None, not"):
            get_backend("deepsparse", threads=threads)
    with pytest.raises(SpdyError, match="--threads 999 is not possible here"):
        get_backend("deepsparse", threads=999)


def test_run_mixes_block_sizes_and_two_four_in_one_profile(tmp_path):
    """A grid of several families (block 4x4 and 8x8 levels plus 2:4): the database, the DP
    and the search treat them as one option list, each layer gets one, and the pruned
    weights have the chosen structure."""
    grid = tuple(option_grid("block+nm", 4, block=[4, 8]))
    assert [o.name for o in grid][-1] == "nm2:4" and len(grid) == 1 + 4 + 4 + 1
    report = run(ENTRY, ModelSetting(), FakeBackend(), settings(measure_grid=grid, speedup=1.3),
                 tmp_path / "run", progress=False)
    assert report.measured_speedup >= 1.3 * 0.97
    profile = Profile.load(tmp_path / "run" / "profile.json")
    assert set(profile.choices.values()) <= set(grid)
    model, _ = build()
    from spdy_gpu.deploy import load_pruned
    load_pruned(model, tmp_path / "run" / "pruned.safetensors")
    for name, option in profile.choices.items():
        weight = model.get_submodule(name).weight
        if option.pattern == "nm":
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()
        elif option.pattern == "block":
            rows, cols = option.block
            tiles = (weight != 0).reshape(weight.shape[0] // rows, rows, -1, cols).any(3).any(1)
            assert abs((1 - tiles.float().mean()) - option.sparsity) < 0.2


def test_excluded_layers_are_not_timed_and_a_table_of_more_layers_is_reused(tmp_path, caplog):
    backend = FakeBackend()
    run(ENTRY, ModelSetting(), backend, settings(exclude=("0",), speedup=1.2), tmp_path / "a",
        progress=False)
    assert TimingTable.load(tmp_path / "a" / "timings.json").layer_names == ["2", "4"]
    model, example = build()
    full = tmp_path / "full.json"
    backend.measure_table(model, example, __import__("spdy_gpu").discover_layers(
        model, example), option_grid("unstructured", 6), model_name="toy").save(full)
    report = run(ENTRY, ModelSetting(), backend,
                 settings(exclude=("0",), speedup=1.2, timings=(full,)), tmp_path / "b",
                 progress=False)
    assert report.stages["timings"]["reused"] == str(full)
    # the run's copy times only what it prunes: the excluded layer's dense time is fixed
    kept, whole = TimingTable.load(tmp_path / "b" / "timings.json"), TimingTable.load(full)
    assert kept.layer_names == ["2", "4"]
    assert kept.fixed_ms == pytest.approx(whole.fixed_ms + whole.layers[0].median_ms[0])
    saved = Profile.load(tmp_path / "b" / "profile.json")
    assert saved.choices.get("0") is None and saved.excluded == ("0",)
    # the other way round: a table missing a layer the run prunes is measured again
    with caplog.at_level("WARNING"):
        run(ENTRY, ModelSetting(), backend,
            settings(timings=(tmp_path / "a" / "timings.json",)), tmp_path / "c",
            progress=False)
    assert "it does not time 0, which this run prunes" in caplog.text


def test_a_run_stopped_before_its_search_is_replaced_and_a_finished_one_names_the_change(
        tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SpdyError, match="--calib-batch-size"):        # batches too big
        run(ENTRY, ModelSetting(), FakeBackend(),
            settings(calibration=CalibrationSpec(samples=40, batch_size=40)), out,
            progress=False)
    assert not out.exists()                 # refused before the directory was claimed
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), out, progress=False)  # no --overwrite
    with pytest.raises(SpdyError, match=r"differs in speedup\); pass --overwrite"):
        run(ENTRY, ModelSetting(), FakeBackend(), settings(speedup=1.5), out, progress=False)


def test_overwrite_rebuilds_the_runs_own_database_when_the_weights_changed(tmp_path):
    def retrained(setting=None):
        model, example = build()
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        return model, example

    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    table = (tmp_path / "timings.json").read_bytes()
    changed = ModelEntry("toy", "toy MLP, retrained", build=retrained, calibration=calibration)
    with pytest.raises(SpdyError, match=r"other dense weights .*run --overwrite replaces it"):
        run(changed, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    assert (tmp_path / "timings.json").read_bytes() == table    # same shapes: reused as is
    run(changed, ModelSetting(), FakeBackend(), settings(overwrite=True), tmp_path,
        progress=False)
    from spdy_gpu.reconstruct import Database
    Database.open(tmp_path / "database").check_model(retrained()[0])


def test_a_database_of_a_reshaped_model_is_refused_before_anything_is_measured(tmp_path):
    def wider(setting=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                              nn.Linear(32, 8)).eval()
        return model, torch.randn(4, 16)

    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    table = (tmp_path / "timings.json").read_bytes()
    measured = []

    class Counting(FakeBackend):
        def measure_table(self, *args, **kwargs):
            measured.append(1)
            return super().measure_table(*args, **kwargs)

    changed = ModelEntry("toy", "toy MLP, wider", build=wider, calibration=calibration)
    with pytest.raises(SpdyError, match=r"other layer shapes \(0: \[32, 16\] stored, \[64, 16\] "
                                        r"now; 2: \[32, 32\] stored, \[32, 64\] now\); delete"):
        run(changed, ModelSetting(), Counting(), settings(), tmp_path, progress=False)
    assert not measured and (tmp_path / "timings.json").read_bytes() == table


def test_a_shared_database_of_other_data_is_refused_before_overwrite_clears_the_run(tmp_path):
    """run --overwrite with more samples and a shared --database: the refusal came at the
    database stage, after the finished run's profile, report and weights were deleted."""
    shared = settings(database=tmp_path / "db")
    run(ENTRY, ModelSetting(), FakeBackend(), shared, tmp_path / "run", progress=False)
    kept = sorted(p.name for p in (tmp_path / "run").iterdir())
    more = dataclasses.replace(shared, overwrite=True,
                               calibration=CalibrationSpec(samples=128, batch_size=16))
    with pytest.raises(SpdyError, match="holds a database of another calibration"):
        run(ENTRY, ModelSetting(), FakeBackend(), more, tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == kept


def test_another_grid_is_refused_and_with_overwrite_measured_anew(tmp_path):
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    five = settings(measure_grid=tuple(option_grid("unstructured", 5)))
    with pytest.raises(SpdyError, match=r"differs in grid\); pass --overwrite"):
        run(ENTRY, ModelSetting(), FakeBackend(), five, tmp_path, progress=False)
    report = run(ENTRY, ModelSetting(), FakeBackend(), dataclasses.replace(five, overwrite=True),
                 tmp_path, progress=False)
    assert report.stages["timings"].get("measured") and not report.stages["timings"].get(
        "reused")
    assert list(TimingTable.load(tmp_path / "timings.json").options) == list(five.measure_grid)
    assert not report.stages["database"]["reused"] and not report.stages["database"]["resumed"]
    from spdy_gpu.reconstruct import Database
    assert list(Database.open(tmp_path / "database").options) == list(five.measure_grid)


def test_an_export_killed_midway_leaves_no_earlier_runs_outputs_beside_its_own(tmp_path):
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)

    class KilledInExport(FakeBackend):
        def export(self, model, example, profile, out_dir):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(ENTRY, ModelSetting(), KilledInExport(), settings(), tmp_path, progress=False)
    left = {p.name for p in tmp_path.iterdir()}
    assert {"profile.json", "pruned.safetensors"} <= left          # this run's, written
    assert not left & {"report.json", "report.md", "report.png"}     # no finished run here
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    assert (tmp_path / "report.json").exists()


def test_auto_errors_are_the_prior_on_one_family_and_the_databases_on_a_mixed_grid():
    from spdy_gpu.options import SparsityOption
    from spdy_gpu.pipeline import _base_errors

    class Stub:
        def __init__(self, options):
            self.options, self.layers = options, ["0"]

        def prior(self):
            return "prior"

        def errors_by_layer(self, layers, options):
            return "database"

    dense = SparsityOption.dense()
    one = [dense, SparsityOption.blocked(0.5, 32), SparsityOption.blocked(0.9, 32)]
    mixed = [dense, SparsityOption.blocked(0.4, 64), SparsityOption.n_of_m(2, 4)]
    sizes = [dense, SparsityOption.blocked(0.5, 32), SparsityOption.blocked(0.5, 64)]
    auto, prior = settings(), settings(errors="prior")
    assert _base_errors(Stub(one), Stub(one), auto) == "prior"
    assert _base_errors(Stub(mixed), Stub(mixed), auto) == "database"
    assert _base_errors(Stub(sizes), Stub(sizes), auto) == "database"   # two block sizes
    assert _base_errors(Stub(mixed), Stub(mixed), prior) == "prior"


class _Argmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x).argmax(-1)


def test_an_output_no_loss_can_compare_stops_the_run_before_any_timing(tmp_path):
    entry = ModelEntry("argmax", "toy classifier returning predictions",
                       build=lambda setting=None: (_Argmax().eval(), torch.randn(4, 16)),
                       calibration=calibration)

    class NeverTimed(FakeBackend):
        def measure_table(self, *args, **kwargs):
            raise AssertionError("timed a model the search cannot score")

    with pytest.raises(SpdyError, match="output is int64 \\[16\\], which no loss can tell"):
        run(entry, ModelSetting(), NeverTimed(), settings(), tmp_path / "run", progress=False)


@pytest.mark.parametrize("speedup", ["2", True, None])
def test_a_speedup_that_is_not_a_number_is_one_line(speedup):
    with pytest.raises(SpdyError, match="must be a finite number > 0, e.g. 2.0"):
        settings(speedup=speedup)


@pytest.mark.parametrize("damaged", ["timings.json", "search-state.json",
                                     "database/manifest.json", "run.json"])
def test_a_damaged_file_of_the_runs_own_is_rebuilt_or_names_the_fix(tmp_path, damaged, caplog):
    first = run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[:40])                          # truncated
    if damaged in ("run.json", "database/manifest.json"):            # refused, fix named
        with pytest.raises(SpdyError, match="(pass|run) --overwrite") as error:
            run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
        assert "regenerate" not in str(error.value)
    with caplog.at_level("WARNING"):
        again = run(ENTRY, ModelSetting(), FakeBackend(),
                    settings(overwrite=damaged in ("run.json", "database/manifest.json")),
                    tmp_path, progress=False)
    assert "damaged" in caplog.text or "unreadable" in caplog.text
    assert again.measured.speedup == pytest.approx(first.measured.speedup, rel=0.05)
    if damaged != "timings.json":                  # the other measurements were kept
        assert again.stages["timings"].get("reused")


def test_the_runs_copy_of_a_table_passed_in_is_reused_whatever_grid_is_asked(tmp_path):
    shipped = tmp_path / "shipped.timings.json"
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path / "first", progress=False)
    (tmp_path / "first" / "timings.json").rename(shipped)         # 6 levels
    eleven = settings(measure_grid=tuple(option_grid("unstructured", 11)), timings=(shipped,))
    for _ in range(2):                                 # as make demo, twice
        report = run(ENTRY, ModelSetting(), FakeBackend(), eleven, tmp_path / "demo",
                     progress=False)
        assert report.stages["timings"].get("reused") and not report.stages["timings"].get(
            "measured")


def test_a_table_of_another_model_name_is_not_reused_and_the_name_to_give_is_said(tmp_path,
                                                                                   caplog):
    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path / "first", progress=False)
    table = tmp_path / "first" / "timings.json"
    with caplog.at_level("WARNING"):
        report = run(dataclasses.replace(ENTRY, name="renamed"), ModelSetting(), FakeBackend(),
                     settings(timings=(table,)), tmp_path / "second", progress=False)
    assert report.stages["timings"].get("measured")
    assert f"it is for model {ENTRY.name!r}, not 'renamed'" in caplog.text
    assert f"prune(name={ENTRY.name!r})" in caplog.text


class SlowStateBackend(FakeBackend):
    """Every model runs `factor` slower than the table says (a backend in a slow state)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def latency(self, models, example):
        result = super().latency(models, example)
        return {name: SimpleNamespace(median_ms=r.median_ms * self.factor, spread_ms=0.0,
                                      slow_engines=0) for name, r in result.items()}


def test_verify_measures_again_and_warns_when_dense_is_far_off_the_table(tmp_path, caplog):
    from spdy_gpu.pipeline import verify_profile

    run(ENTRY, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    profile = Profile.load(tmp_path / "profile.json")
    backend = SlowStateBackend(1.0)
    steady = verify_profile(ENTRY, ModelSetting(), backend, profile)
    assert steady["sessions"] == 1 and backend.latency_calls == 1
    assert "slow state" not in caplog.text
    backend = SlowStateBackend(1.3)
    slow = verify_profile(ENTRY, ModelSetting(), backend, profile)
    assert slow["sessions"] == 2 and backend.latency_calls == 2
    assert "is in a slow state or the machine is busy" in caplog.text


def test_a_rerun_keeps_the_quality_of_the_same_weights(tmp_path):
    calls = []

    def quality(pruned, dense):
        calls.append(1)
        return {"zeros": float(sum(int((p == 0).sum()) for p in pruned.parameters()))}

    entry = ModelEntry(ENTRY.name, ENTRY.description, build=build,
                       calibration=ENTRY.calibration, quality=quality)
    first = run(entry, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    again = run(entry, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    assert len(calls) == 1 and again.quality == first.quality
    assert again.stages["quality"]["reused"] == str(tmp_path / "quality.json")
    doc = json.loads((tmp_path / "quality.json").read_text())
    doc["key"] = "toy 0000"                                 # other weights: measured again
    (tmp_path / "quality.json").write_text(json.dumps(doc))
    run(entry, ModelSetting(), FakeBackend(), settings(), tmp_path, progress=False)
    assert len(calls) == 2
