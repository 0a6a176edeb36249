"""Issue 13, integrity: nothing corrupt is used, a second writer is refused, a profile or
database of another model is refused, a killed database build resumes to the same result."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import spdy_gpu.reconstruct.database as database_module
from spdy_gpu import SpdyError
from spdy_gpu.data import CalibrationSpec
from spdy_gpu.locks import LOCK_NAME, exclusive_directory
from spdy_gpu.models import ModelEntry, ModelSetting
from spdy_gpu.options import SparsityOption, option_grid
from spdy_gpu.pipeline import global_adaprune_profile, run, verify_profile
from spdy_gpu.profile import check_for_model
from spdy_gpu.reconstruct import Database, build_database, model_fingerprint
from spdy_gpu.solve import Planner
from tests.test_pipeline import ENTRY, FakeBackend, build, calibration, settings

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["0", "2", "4"]
OPTIONS = option_grid("unstructured", 4)
SPARSE = OPTIONS[2]


def batches():
    return list(calibration(ModelSetting(batch_size=16), 64))


def build_toy_database(path):
    return build_database(build()[0], LAYERS, OPTIONS, batches(), path, model_name="toy",
                          calibration={"source": "toy"}, progress=False)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return build_toy_database(tmp_path_factory.mktemp("db") / "db")


@pytest.fixture
def copied(database, tmp_path):
    """A private copy of the database, free to damage."""
    shutil.copytree(database.path, tmp_path / "db")
    return tmp_path / "db"


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def entry_file(path, layer="2", option=SPARSE):
    return path / manifest(path)["entries"][layer][option.name]["file"]


def overwrite_values(file, value):
    """Every weight of a safetensors entry set to `value`, in place: same size, same header."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = np.full((len(data) - start) // 4, value, dtype=np.float32).tobytes()
    file.write_bytes(bytes(data))
    assert len(data) == file.stat().st_size


def toy_profile(model_name="toy"):
    model, example = build()
    table = FakeBackend().measure_table(
        model, example, __import__("spdy_gpu").discover_layers(model, example), OPTIONS,
        model_name=model_name)
    return Planner(table).solve(1.5)


def other_weights(setting=None):
    """The toy model's architecture and name, other dense weights (e.g. retrained)."""
    model, example = build()
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    return model, example


OTHER = ModelEntry("toy", "toy MLP, retrained", build=other_weights, calibration=calibration)


# ---- entries: corrupt, out of range, another entry's file ---------------------------------

@pytest.mark.parametrize("value", [np.nan, 1e30])
def test_an_entry_overwritten_in_place_is_refused_and_a_rerun_rebuilds_it(copied, value):
    good = Database.open(copied).weight("2", SPARSE)
    overwrite_values(entry_file(copied), value)
    with pytest.raises(SpdyError, match=r"layer 2, option unstructured@\S+: .* is corrupted "
                                        r".*rerun spdy-gpu database --out"):
        Database.open(copied).weight("2", SPARSE)
    rebuilt = build_toy_database(copied)          # what the message says to do
    torch.testing.assert_close(rebuilt.weight("2", SPARSE), good)


def test_non_finite_weights_are_refused_even_when_the_hash_matches(copied):
    file = entry_file(copied)
    overwrite_values(file, np.nan)
    doc = manifest(copied)
    doc["entries"]["2"][SPARSE.name]["blake2b"] = database_module._digest(file.read_bytes())
    (copied / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SpdyError, match="layer 2, option .* holds non-finite weights"):
        Database.open(copied).weight("2", SPARSE)


def test_an_entry_pointing_at_another_options_file_is_refused(copied):
    doc = manifest(copied)
    doc["entries"]["2"][SPARSE.name] = doc["entries"]["2"]["dense"]
    (copied / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SpdyError, match="holds layer '2' at option 'dense'"):
        Database.open(copied).weight("2", SPARSE)


def test_a_gap_on_a_corrupt_entry_writes_nothing(copied, tmp_path):
    overwrite_values(entry_file(copied, "2", SPARSE), np.nan)
    profile = dataclasses.replace(toy_profile(), choices=dict.fromkeys(LAYERS, SPARSE))
    with pytest.raises(SpdyError, match="corrupted"):
        global_adaprune_profile(ENTRY, ModelSetting(), Database.open(copied), profile,
                                CalibrationSpec(samples=32, batch_size=16),
                                tmp_path / "w.safetensors", progress=False)
    assert not (tmp_path / "w.safetensors").exists()


def test_a_reconstruction_gone_non_finite_is_never_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(database_module, "reconstruct_fast",
                        lambda stats, dense, *a, **k: torch.full_like(dense, torch.nan))
    with pytest.raises(SpdyError, match="layer 0: reconstruction at .* non-finite"):
        build_toy_database(tmp_path / "db")


def test_a_database_of_the_previous_format_says_rebuild(copied):
    doc = manifest(copied)
    doc["version"] = 1
    (copied / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(SpdyError, match="format version 1, whose entries carry no content "
                                        "hash; delete it and rerun spdy-gpu database"):
        Database.open(copied)


# ---- an option outside the database's grid ------------------------------------------------

def test_an_option_outside_the_grid_names_it_and_the_fix(database):
    outside = SparsityOption.unstructured(0.5)
    for use in (lambda: database.check_options([SPARSE, outside]),
                lambda: database.weight("2", outside)):
        with pytest.raises(SpdyError) as info:
            use()
        message = str(info.value)
        assert "unstructured@0.5" in message and "incomplete" not in message
        assert "spdy-gpu database --options" in message and SPARSE.name in message


# ---- exclusive locks ------------------------------------------------------------------------

HOLD = ("import sys, time\nfrom spdy_gpu.locks import exclusive_directory\n"
        "with exclusive_directory(sys.argv[1]):\n    print('held', flush=True)\n"
        "    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock on tmp_path/'dir' until killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "dir")], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(holder, tmp_path):
    directory = tmp_path / "dir"
    with pytest.raises(SpdyError, match=rf"being written by .*pid {holder.pid} on host .*lock "
                                        rf"file {directory / LOCK_NAME}") as info:
        build_toy_database(directory)
    assert "\n" not in str(info.value)
    with pytest.raises(SpdyError, match=rf"pid {holder.pid}"):
        run(ENTRY, ModelSetting(), FakeBackend(), settings(), directory, progress=False)


def test_a_file_in_a_held_directory_and_a_directory_holding_a_held_file_are_refused(
        holder, tmp_path):
    """`timings --out DIR/timings.json` beside a run measuring into DIR threw away the run's
    progress and wrote the same .partial."""
    from spdy_gpu.locks import exclusive_file
    with pytest.raises(SpdyError, match=rf"timing table .*\(pid {holder.pid}"):
        with exclusive_file(tmp_path / "dir" / "timings.json", "timing table"):
            pass
    holds_file = HOLD.replace("exclusive_directory", "exclusive_file")
    other = subprocess.Popen([sys.executable, "-c", holds_file, str(tmp_path / "d2" / "t.json")],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(SpdyError, match=rf"run directory .*\(pid {other.pid}"):
            with exclusive_directory(tmp_path / "d2", "run directory"):
                pass
    finally:
        other.kill()
        other.wait()


def test_a_killed_holders_lock_is_taken_over(holder, tmp_path, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "dir" / LOCK_NAME).exists()            # left behind by the dead
    with caplog.at_level(logging.WARNING), exclusive_directory(tmp_path / "dir"):
        pass
    assert f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
    assert not (tmp_path / "dir" / LOCK_NAME).exists()


def test_a_lock_is_released_and_a_failed_writer_leaves_no_directory(tmp_path):
    with exclusive_directory(tmp_path / "new"):
        with pytest.raises(SpdyError, match="being written by"):
            with exclusive_directory(tmp_path / "new"):
                pass
    assert not (tmp_path / "new").exists()
    with exclusive_directory(tmp_path / "kept"):
        (tmp_path / "kept" / "result").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["result"]
    (tmp_path / "link").symlink_to(tmp_path / "made" / "here")     # dangling: "File exists"
    with exclusive_directory(tmp_path / "link"):
        (tmp_path / "link" / "result").write_text("x")
    assert os.listdir(tmp_path / "made" / "here") == ["result"]


# ---- belongs to this model: one rule for every command --------------------------------------

def test_verify_refuses_a_database_of_other_weights_with_the_same_layers(database):
    with pytest.raises(SpdyError, match="layer 2: its dense weights are not those"):
        verify_profile(OTHER, ModelSetting(), FakeBackend(), toy_profile(), database)


def test_gap_refuses_a_profile_of_another_model(database, tmp_path):
    profile = dataclasses.replace(toy_profile(), model="another")
    with pytest.raises(SpdyError, match="the profile is for model 'another', not 'toy'"):
        global_adaprune_profile(ENTRY, ModelSetting(), database, profile,
                                CalibrationSpec(samples=32, batch_size=16),
                                tmp_path / "w.safetensors", progress=False)


def test_a_profile_made_with_the_model_refuses_other_weights(database):
    profile = toy_profile()
    recorded = dataclasses.replace(
        profile, model_fingerprint=model_fingerprint(build()[0], list(profile.choices)))
    check_for_model(build()[0], "toy", recorded, database)
    with pytest.raises(SpdyError, match="made for other dense weights"):
        check_for_model(other_weights()[0], "toy", recorded)
    for use in (lambda: verify_profile(OTHER, ModelSetting(), FakeBackend(), recorded),
                lambda: global_adaprune_profile(OTHER, ModelSetting(), database, recorded,
                                                CalibrationSpec(samples=32, batch_size=16),
                                                "unused.safetensors", progress=False)):
        with pytest.raises(SpdyError, match="other dense weights"):
            use()


def test_a_profile_naming_a_layer_the_model_lacks_is_refused():
    profile = toy_profile()
    profile = dataclasses.replace(profile, choices={**profile.choices, "9": SPARSE})
    with pytest.raises(SpdyError, match="layer 9 is not a Linear or Conv2d of this model"):
        check_for_model(build()[0], "toy", profile)


# ---- kill -9 in the middle of a database build ---------------------------------------------

KILLED_BUILD = """
import sys, time
import spdy_gpu.reconstruct.database as d
from tests.test_reliability_integrity import build_toy_database
real, calls = d.reconstruct_fast, []
def stopping(*args, **kwargs):
    if len(calls) == int(sys.argv[2]):
        print("in flight", flush=True)
        time.sleep(120)
    calls.append(1)
    return real(*args, **kwargs)
d.reconstruct_fast = stopping
build_toy_database(sys.argv[1])
"""


def test_a_build_killed_mid_entry_loses_only_that_entry_and_resumes_the_same(
        database, tmp_path, monkeypatch, caplog):
    finished = 4
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "db"),
                                str(finished)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "in flight"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    calls = []
    real = database_module.reconstruct_fast
    monkeypatch.setattr(database_module, "reconstruct_fast",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with caplog.at_level(logging.WARNING):
        resumed = build_toy_database(tmp_path / "db")
    assert "stale lock" in caplog.text
    assert len(calls) == len(LAYERS) * (len(OPTIONS) - 1) - finished
    np.testing.assert_array_equal(resumed.errors_matrix(LAYERS, OPTIONS),
                                  database.errors_matrix(LAYERS, OPTIONS))
    for layer in LAYERS:
        for option in OPTIONS:
            torch.testing.assert_close(resumed.weight(layer, option),
                                       database.weight(layer, option), rtol=0, atol=0)


def test_scratch_directories_a_killed_process_left_are_removed_and_live_ones_kept(
        tmp_path, monkeypatch):
    import os
    import tempfile

    from spdy_gpu.locks import LOCK_NAME, exclusive_directory, scratch_directory
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    abandoned, fresh, unlocked = (tmp_path / f"spdy-test-{name}" for name in "afu")
    for path in (abandoned, fresh, unlocked):
        path.mkdir()
        (path / "model.onnx").write_bytes(b"x" * 100)
    (abandoned / LOCK_NAME).write_text("pid 999999\nhost gone\n")     # nobody holds it
    os.utime(abandoned / LOCK_NAME, (1, 1))
    (fresh / LOCK_NAME).write_text("pid 1\n")       # young: its process may be locking it
    with exclusive_directory(tmp_path / "spdy-test-held") as held:    # a live one
        os.utime(held / LOCK_NAME, (1, 1))
        with scratch_directory("spdy-test-") as scratch:
            assert scratch.parent == tmp_path and (scratch / LOCK_NAME).exists()
        assert not abandoned.exists() and not scratch.exists()
        assert fresh.exists() and unlocked.exists() and held.exists()


def test_taking_a_directory_removes_the_temporaries_a_killed_writer_left(tmp_path):
    stale = tmp_path / ".model.onnx.0123456789ab.tmp"     # as jsonio.replacing names them
    stale.write_bytes(b"half")
    mine = tmp_path / ".notes.tmp"                        # not replacing's: kept
    mine.write_bytes(b"")
    with exclusive_directory(tmp_path):
        assert not stale.exists() and mine.exists()


def test_the_temporaries_below_a_directory_go_too_but_not_inside_another_lock(tmp_path):
    entries = tmp_path / "database" / "entries" / "fc"
    entries.mkdir(parents=True)
    stale = entries / ".dense.safetensors.0123456789ab.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / "shared"                           # locked by a writer of its own
    other.mkdir()
    (other / LOCK_NAME).write_text("pid 1\n")
    theirs = other / ".manifest.json.0123456789ab.tmp"
    theirs.write_bytes(b"")
    held = tmp_path / ".extra.json.spdy-gpu.lock"       # a file lock: `timings --out DIR/...`
    held.write_text("pid 1\n")
    in_flight = tmp_path / ".extra.json.partial.0123456789ab.tmp"
    in_flight.write_bytes(b"")
    with exclusive_directory(tmp_path):
        assert not stale.exists() and theirs.exists() and in_flight.exists()


def test_one_output_file_is_held_and_its_leftovers_removed(tmp_path):
    from spdy_gpu.locks import exclusive_file

    out = tmp_path / "t.json"
    stale = tmp_path / ".t.json.0123456789ab.tmp"
    stale.write_bytes(b"half")
    other = tmp_path / ".u.json.0123456789ab.tmp"         # another output's: kept
    other.write_bytes(b"half")
    side = tmp_path / ".t.json.partial.0123456789ab.tmp"   # its checkpoint's: removed
    side.write_bytes(b"half")
    with exclusive_file(out, "timing table") as held:
        assert held == out and not stale.exists() and not side.exists() and other.exists()
        with pytest.raises(SpdyError, match=rf"the timing table {out} is being written by "
                                            rf"another spdy-gpu process \(pid {os.getpid()}"):
            with exclusive_file(out, "timing table"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".u.json.0123456789ab.tmp"]
    with exclusive_file("/dev/null"):                     # written through, unlocked
        pass
    from spdy_gpu.timing import checkpoint_path
    assert checkpoint_path("/dev/null") is None            # so no shared /dev/null.partial
    assert checkpoint_path(out) == tmp_path / "t.json.partial"
