"""Issue 13, output side: outputs checked before any work, partial state kept until the final
file is written, no temporary files left, records that tell the truth, one-line errors
(with --debug for the traceback) instead of tracebacks."""

import json
import os

import pytest
import torch
from torch import nn

from spdy_gpu.cli import main
from spdy_gpu.data import CalibrationSpec
from spdy_gpu.errors import SpdyError
from spdy_gpu.jsonio import check_output_dir, check_output_file
from spdy_gpu.models import ModelEntry, ModelSetting
from spdy_gpu.options import SparsityOption
from spdy_gpu.solve import save_errors
from spdy_gpu.timing import TimingTable, checkpoint_path

MODEL = "tests.test_reliability_io:tiny"
BUILDS = []                         # every build of `tiny`, to tell whether work was started


def tiny(batch_size: int = 4):
    """A user model: (model, example input)."""
    BUILDS.append(batch_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return model, torch.randn(batch_size, 8)


def one_error_line(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def table_file(tmp_path, toy_table):
    path = tmp_path / "t.json"
    toy_table.save(path)
    return path


# ---- 1. output paths are checked before any work ------------------------------------------

def test_output_checks_name_the_path_and_the_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpdyError, match=f"--out {tmp_path} is a directory; give the path of a"):
        check_output_file(tmp_path)
    with pytest.raises(SpdyError, match="is a file, not a directory; choose another location"):
        check_output_file(tmp_path / "file" / "t.json")
    with pytest.raises(SpdyError, match="--plot /proc/spdy-test/p.png: cannot write in /proc"):
        check_output_file("/proc/spdy-test/p.png", "--plot")
    with pytest.raises(SpdyError, match="is a file, not a directory; give a directory path"):
        check_output_dir(tmp_path / "file")
    assert check_output_file(tmp_path / "new" / "deeper" / "t.json")   # made when written
    assert check_output_dir(tmp_path / "db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "a check creates nothing"


def commands(tmp_path, table_file):
    """Every command with OUT where its output goes (the inputs need not be valid: the
    output is checked first)."""
    profile, model = str(tmp_path / "p.json"), ["--model", MODEL]
    return {
        "timings": ["timings", *model, "--backend", "deepsparse", "--out", "OUT"],
        "timings --plot": ["timings", *model, "--backend", "deepsparse",
                           "--out", str(tmp_path / "t2.json"), "--plot", "OUT"],
        "solve": ["solve", "--timings", str(table_file), "--speedup", "1.2", "--out", "OUT"],
        "solve --plot": ["solve", "--timings", str(table_file), "--speedup", "1.2",
                         "--out", str(tmp_path / "p2.json"), "--plot", "OUT"],
        "verify": ["verify", *model, "--backend", "deepsparse", "--profile", profile,
                   "--out", "OUT"],
        "gap": ["gap", *model, "--database", str(tmp_path), "--profile", profile,
                "--out", "OUT"],
        "apply": ["apply", *model, "--profile", profile, "--out", "OUT"],
        "export": ["export", *model, "--profile", profile, "--format", "onnx", "--out", "OUT"],
    }


@pytest.mark.parametrize("command", ["timings", "timings --plot", "solve", "solve --plot",
                                     "verify", "gap", "apply", "export"])
@pytest.mark.parametrize("where", ["directory", "unwritable", "under a file"])
def test_every_file_output_is_checked_before_any_work(command, where, tmp_path, table_file,
                                                      capsys):
    (tmp_path / "a-file").write_text("x")
    out = {"directory": tmp_path, "unwritable": "/proc/spdy-test/out",
           "under a file": tmp_path / "a-file" / "out"}[where]
    argv = [str(out) if a == "OUT" else a for a in commands(tmp_path, table_file)[command]]
    BUILDS.clear()
    err = one_error_line(capsys, argv)
    assert str(out) in err and ("choose" in err or "give the path of a file" in err)
    assert not BUILDS, "refused before the model was built"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("argv", [
    ["database", "--model", MODEL, "--options", "dense", "unstructured@0.5", "--out"],
    ["run", "--model", MODEL, "--backend", "deepsparse", "--speedup", "1.5", "--out"],
    ["run", "--model", MODEL, "--backend", "deepsparse", "--speedup", "1.5",
     "--out", "/tmp/spdy-unused-run", "--database"],
])
def test_directory_outputs_are_checked_before_any_work(argv, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    BUILDS.clear()
    err = one_error_line(capsys, [*argv, str(a_file)])
    assert f"{a_file} is a file, not a directory" in err and not BUILDS
    err = one_error_line(capsys, [*argv, "/proc/spdy-test/dir"])
    assert "cannot write in /proc" in err and not BUILDS


def test_a_table_checkpoint_is_kept_until_the_table_is_written(tmp_path, toy_table,
                                                                monkeypatch):
    out = tmp_path / "t.json"
    checkpoint_path(out).write_text("{}")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(SpdyError, match=r"cannot write .*t.json \(disk full\)"):
        toy_table.save(out)
    assert checkpoint_path(out).exists(), "the measurements survive a failed write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json.partial"], "no temp file"
    monkeypatch.undo()
    toy_table.save(out)
    assert not checkpoint_path(out).exists()


@pytest.mark.parametrize("plot", ["speedup_curves", "profile"])
def test_a_failed_plot_leaves_no_temporary_file(plot, tmp_path, toy_table, monkeypatch):
    from spdy_gpu import plots
    from spdy_gpu.solve import Planner
    planner = Planner(toy_table)
    draw = {"speedup_curves": lambda path: plots.plot_speedup_curves(toy_table, path),
            "profile": lambda path: plots.plot_profile(toy_table, planner.solve(1.2),
                                                       planner.curve(), 0.0, path)}[plot]
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(SpdyError, match="cannot write"):
        draw(tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []


# ---- 2. records tell the truth ------------------------------------------------------------

def test_deepsparse_resume_key_holds_shapes_grid_and_protocol():
    pytest.importorskip("deepsparse")
    from spdy_gpu.backends.deepsparse import DeepSparseBackend
    from spdy_gpu.layers import LayerInfo
    from tests.conftest import fingerprint
    options = [SparsityOption.dense(), SparsityOption.unstructured(0.5)]
    layers = [LayerInfo("fc", "linear", (16, 8), m=4)]

    def key(backend=None, layers=layers, options=options):
        backend = backend or DeepSparseBackend(threads=1, repeats=3)
        return backend._checkpoint_key(fingerprint(), options, layers, "toy")

    base = key()
    assert key() == base
    assert key(layers=[LayerInfo("fc", "linear", (32, 8), m=4)]) != base    # weight shape
    assert key(layers=[LayerInfo("fc", "linear", (16, 8), m=8)]) != base    # GEMM rows
    assert key(options=options + [SparsityOption.unstructured(0.9)]) != base
    assert key(DeepSparseBackend(threads=1, repeats=5)) != base
    assert key(DeepSparseBackend(threads=1, repeats=3, iterations=7)) != base


def test_database_records_the_calibration_really_used(tmp_path, capsys):
    from spdy_gpu.reconstruct import Database
    options = ["--options", "dense", "unstructured@0.5", "--quiet"]
    assert main(["database", "--model", MODEL, "--out", str(tmp_path / "a"), *options]) == 0
    recorded = Database.open(tmp_path / "a").calibration
    assert recorded["source"] == "example-input"
    assert (recorded["samples"], recorded["batch_size"]) == (4, 4)    # not 1024 in 32s
    torch.save(torch.randn(256, 8), tmp_path / "c.pt")
    assert main(["database", "--model", MODEL, "--out", str(tmp_path / "b"),
                 "--calib", str(tmp_path / "c.pt"), *options]) == 0
    recorded = Database.open(tmp_path / "b").calibration
    assert (recorded["samples"], recorded["requested"], recorded["batch_size"]) == (256, 1024, 32)


# ---- 3. one-line errors instead of tracebacks ---------------------------------------------

@pytest.mark.parametrize("data, message", [
    (torch.randn(64, 5), "the model failed on its input"),          # caught by the model
    (torch.randint(0, 5, (64, 8)), "is int64, but the model's example input is float32"),
], ids=["feature size", "dtype"])
def test_calibration_tensors_the_model_cannot_take(data, message, tmp_path, capsys):
    torch.save(data, tmp_path / "c.pt")
    err = one_error_line(capsys, ["database", "--model", MODEL, "--calib", str(tmp_path / "c.pt"),
                                  "--out", str(tmp_path / "db"), "--quiet"])
    assert message in err and "--calib" in err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(dense_total_ms=0), "dense_total_ms = 0.0 must be finite and > 0"),
    (lambda d: d.update(dense_total_ms=-1.0), "dense_total_ms = -1.0 must be finite and > 0"),
    (lambda d: d.update(dense_total_ms=float("nan")), "dense_total_ms = nan must be finite"),
    (lambda d: d["layers"][0]["median_ms"].__setitem__(1, -0.5), "has time -0.5; times and"),
    (lambda d: d.update(layers=[]), "the timing table has no layers"),
])
def test_tables_that_cannot_be_planned_on(edit, message, table_file, tmp_path, capsys):
    document = json.loads(table_file.read_text())
    edit(document)
    table_file.write_text(json.dumps(document))
    err = one_error_line(capsys, ["solve", "--timings", str(table_file), "--speedup", "1.2",
                                  "--out", str(tmp_path / "p.json")])
    assert message in err and "every layer is excluded" not in err


@pytest.mark.parametrize("rows, message", [
    ({"layer0": [0, -1, 2, 3], "layer1": [0, 1, 2, 3], "layer2": [0, 1, 2, 3]},
     "finite and >= 0"),
    ({"layer0": [0, 1, 2, 3], "layer1": [0, 1, 2, 3], "layer2": [0, 1, 2, 3],
      "extra": [0, 1, 2, 3]}, "'extra', which is not in the timing table"),
])
def test_solve_refuses_bad_errors(rows, message, table_file, toy_table, tmp_path, capsys):
    save_errors(tmp_path / "e.json", toy_table.options, rows)
    err = one_error_line(capsys, ["solve", "--timings", str(table_file), "--speedup", "1.2",
                                  "--errors", str(tmp_path / "e.json"),
                                  "--out", str(tmp_path / "p.json")])
    assert message in err


@pytest.mark.parametrize("options, message", [
    (["dense", "unstructured@0.5", "block7x7@0.5"],
     "runs block7x7@0.5 on no layer of this model (linear); it runs unstructured@0.5"),
    (["dense", "block7x7@0.5", "nm2:4"], "supports none of the options block7x7@0.5, nm2:4"),
])
def test_options_the_backend_cannot_run_are_refused(options, message, tmp_path, capsys):
    pytest.importorskip("deepsparse")
    err = one_error_line(capsys, ["timings", "--model", MODEL, "--backend", "deepsparse",
                                  "--threads", "1", "--repeats", "1", "--options", *options,
                                  "--out", str(tmp_path / "t.json")])
    assert message in err and "SparsityOption(" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_option_is_named_not_repr_d():
    with pytest.raises(SpdyError) as error:
        SparsityOption("block", 0.5, (0, 4))
    assert "SparsityOption(" not in str(error.value)
    assert "invalid block sparsity option (sparsity 0.5, block (0, 4))" in str(error.value)


# ---- 4. user code fails at the boundary; --debug shows the traceback ----------------------

def test_a_failing_calibration_function_is_one_line_naming_it():
    def broken_calibration(setting, samples):
        raise KeyError("tokenizer")
    entry = ModelEntry("toy", "", tiny, calibration=broken_calibration)
    with pytest.raises(SpdyError, match=r"the calibration function .*broken_calibration of "
                                        r"model toy raised KeyError: 'tokenizer'") as error:
        CalibrationSpec().load(entry, ModelSetting(), None)
    assert isinstance(error.value.__cause__, KeyError), "the original kept for --debug"


def test_debug_prints_the_traceback_with_the_hidden_cause(table_file, tmp_path, capsys):
    table_file.write_text(table_file.read_text().replace('"fixed_ms": 1.0', '"fixed_ms": -1'))
    argv = ["solve", "--timings", str(table_file), "--speedup", "1.2",
            "--out", str(tmp_path / "p.json")]
    one_error_line(capsys, argv)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in validate" in err, "where the hidden original was raised"
    assert err.count("SpdyError") >= 2, "the located error and the original it replaced"
    assert err.strip().splitlines()[-1].startswith("spdy-gpu solve: error:")
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_internal_errors(table_file, tmp_path, capsys,
                                                        monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("float division by zero\nsecond line")
    monkeypatch.setattr(TimingTable, "load", bug)
    argv = ["solve", "--timings", str(table_file), "--speedup", "1.2",
            "--out", str(tmp_path / "p.json")]
    err = one_error_line(capsys, argv, code=1)
    assert err == ("spdy-gpu solve: internal error: ZeroDivisionError: float division by zero "
                   "(rerun with --debug for the traceback)\n")
    assert main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in bug" in err


def test_a_failing_loss_or_quality_function_is_one_line_naming_it():
    from spdy_gpu.scoring import HeldOutScorer

    def broken_loss(pruned, dense, batch):
        raise ZeroDivisionError("labels missing")

    def broken_quality(pruned, dense):
        raise OSError("test set not found")

    model, example = tiny()
    with pytest.raises(SpdyError, match="the loss broken_loss raised ZeroDivisionError: "
                                        "labels missing; fix the model's loss") as error:
        HeldOutScorer(model, [example], None, broken_loss)     # tried on the dense outputs
    assert isinstance(error.value.__cause__, ZeroDivisionError)
    entry = ModelEntry("toy", "", tiny, quality=broken_quality)
    with pytest.raises(SpdyError, match="quality function of model toy raised OSError"):
        entry.quality_of(model, model)
    assert ModelEntry("toy", "", tiny).quality_of(model, model) == {}


def test_an_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path,
                                                                              toy_table):
    toy_table.save(tmp_path / "t.json")
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.2",
                 "--out", str(tmp_path / "link.json"), "--quiet"]) == 0
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text())["format"] == "spdy-gpu/profile"


def test_an_output_to_a_pipe_is_written_through_it_not_replaced(tmp_path, toy_table):
    """A device or pipe (e.g. --out /dev/null) cannot be replaced by a file: a rename over
    /dev/null would break the machine's /dev/null."""
    import threading

    toy_table.save(tmp_path / "t.json")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    code = main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.2",
                 "--out", str(fifo), "--quiet"])
    reader.join(timeout=30)
    assert code == 0 and not fifo.is_file() and fifo.is_fifo()
    assert json.loads(received[0])["format"] == "spdy-gpu/profile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "t.json"]
