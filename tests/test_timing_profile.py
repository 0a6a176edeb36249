import dataclasses
import json
import math

import pytest
import torch

from spdy_gpu import Profile, SpdyError, TimingTable, solve_profile

from .conftest import fingerprint


def test_table_round_trips(tmp_path, toy_table):
    path = tmp_path / "t.json"
    toy_table.save(path)
    loaded = TimingTable.load(path)
    assert loaded == toy_table
    assert math.isinf(loaded.times()[2, 3])
    assert json.loads(path.read_text())["layers"][2]["median_ms"][3] is None


def test_profile_round_trips(tmp_path, toy_table):
    profile = solve_profile(toy_table, 1.5)
    profile.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded == profile
    assert loaded.predicted_speedup == pytest.approx(10.0 / loaded.predicted_ms)


def _corrupt(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["choices"].update(layer1="unstructured@0.9"),
     "its choices or predicted times were edited after it was solved, so its prediction no "
     "longer holds"),
    (lambda d: d.update(predicted_ms=d["predicted_ms"] / 100), "were edited after it was "
                                                                "solved"),
    (lambda d: d.update(estimated="no"), "field 'estimated' has type str"),
    (lambda d: d["choices"].update(layer1=3), "the choice of layer layer1 is 3, not an option "
                                              "name"),
    (lambda d: d.update(target_speedup=-2), "target_speedup -2 must be a finite number > 0"),
    (lambda d: d.update(excluded="layer1"), "field 'excluded' has type str"),
    (lambda d: d.update(excluded=["layer1"]), "layer layer1 is excluded yet pruned"),
])
def test_edited_or_malformed_profiles_are_refused_in_one_line(tmp_path, toy_table, edit,
                                                              message):
    path = tmp_path / "p.json"
    profile = solve_profile(toy_table, 1.5)
    assert profile.choices["layer1"].pattern != "dense"
    profile.save(path)
    _corrupt(path, edit)
    with pytest.raises(SpdyError, match=message) as info:
        Profile.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="spdy-gpu/profile"), "expected a 'spdy-gpu/timing-table'"),
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.pop("fixed_ms"), "missing field 'fixed_ms'"),
    (lambda d: d.update(fixed_ms="1"), "field 'fixed_ms' has type str"),
    (lambda d: d.update(dense_total_ms=-1), "must be finite and > 0"),
    (lambda d: d.update(dense_total_ms=0), "must be finite and > 0"),
    (lambda d: d.update(layers=[]), "has no layers"),
    (lambda d: d["layers"][0]["median_ms"].pop(), "has 3 times and 4 spreads for 4 options"),
    (lambda d: d["layers"][0]["median_ms"].__setitem__(1, -2.0), "finite and >= 0"),
    (lambda d: d["layers"][0]["median_ms"].__setitem__(0, None), "no dense time"),
    (lambda d: d["layers"][0].pop("gemm"), "malformed layer entry"),
    (lambda d: d["options"].__setitem__(0, "unstructured@0.3"), "start with 'dense'"),
    (lambda d: d["fingerprint"].pop("threads"), "incomplete fingerprint"),
    (lambda d: d["layers"][1].update(name="layer0"), "duplicate layer names"),
    (lambda d: d["layers"][0]["spread_ms"].__setitem__(1, float("nan")), "has spread nan"),
    (lambda d: d["layers"][0].update(gemm=[8, -8, 4]), r"GEMM \[8, -8, 4\]; it must be"),
    (lambda d: d.update(layers={}), "field 'layers' has type dict; the file is malformed, "
                                    "regenerate it$"),
    (lambda d: d["layers"].__setitem__(0, [1, 2]), "layer entry 0 is a list, not an object"),
    (lambda d: d.update(estimated="no"), "field 'estimated' has type str"),
    (lambda d: d.update(model=3), "field 'model' has type int"),
    (lambda d: d.update(provenance=[1]), "field 'provenance' has type list"),
    (lambda d: d["layers"][0].update(gemm=[8, 8.5, 4]), "GEMM size 8.5 is not a whole number"),
    (lambda d: d["layers"][0].update(kind="lstm"), "is of kind 'lstm'; a table times linear"),
    (lambda d: [layer.update(median_ms=[1e308] * 4) for layer in d["layers"]],
     "too large to add up"),
    (lambda d: d.update(dense_total_ms=1e308), "dense_total_ms 1e\\+308 is not within 1000x "
                                               "of fixed_ms plus the layers' dense times"),
])
def test_malformed_tables_are_refused_in_one_line(tmp_path, toy_table, edit, message):
    path = tmp_path / "t.json"
    toy_table.save(path)
    _corrupt(path, edit)
    with pytest.raises(SpdyError, match=message) as info:
        TimingTable.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_and_missing_files(tmp_path, toy_table):
    path = tmp_path / "t.json"
    toy_table.save(path)
    path.write_text(path.read_text()[:100])
    with pytest.raises(SpdyError, match="corrupted or truncated"):
        TimingTable.load(path)
    with pytest.raises(SpdyError, match="no such file"):
        TimingTable.load(tmp_path / "absent.json")


def test_fingerprint_mismatch_names_the_difference(toy_table):
    toy_table.check_compatible(fingerprint())
    with pytest.raises(SpdyError, match=r"threads: 2 != 8.*--force"):
        toy_table.check_compatible(fingerprint(threads=8))
    toy_table.check_compatible(fingerprint(threads=8), force=True)


def test_saving_is_atomic(tmp_path, toy_table, monkeypatch):
    path = tmp_path / "t.json"
    toy_table.save(path)
    before = path.read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("os.fsync", explode)
    with pytest.raises(SpdyError, match=r"cannot write .* \(disk full\)"):
        toy_table.save(path)
    assert path.read_text() == before
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"


def test_a_profile_whose_weights_fingerprint_matches_is_taken_under_another_model_name(
        toy_table):
    """prune(name="cnn") in a notebook, then --model cnn:build on the command line."""
    from spdy_gpu.reconstruct.database import model_fingerprint
    from spdy_gpu.solve import Planner

    model = torch.nn.ModuleDict({f"layer{i}": torch.nn.Linear(8, 8) for i in range(3)})
    profile = Planner(toy_table).solve(1.2)
    made = dataclasses.replace(profile, model="cnn",
                               model_fingerprint=model_fingerprint(model, list(profile.choices)))
    made.check_model("cnn:build", model)
    with pytest.raises(SpdyError, match="pass --model cnn$"):
        dataclasses.replace(made, model_fingerprint=None).check_model("cnn:build", model)
    other = torch.nn.ModuleDict({f"layer{i}": torch.nn.Linear(8, 8) for i in range(3)})
    with pytest.raises(SpdyError, match="other dense weights of 'cnn'"):
        made.check_model("cnn", other)
