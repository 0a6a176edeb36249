"""`spdy-gpu database` and `spdy-gpu gap` on a small user model."""

import logging

import pytest
import torch
from torch import nn

from spdy_gpu.cli import main
from spdy_gpu.profile import Profile
from spdy_gpu.reconstruct import Database
from tests.conftest import fingerprint


def toy(batch_size=4):
    """A user model in the 'package.module:function' form: (model, example input)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    return model, torch.randn(batch_size, 8)


MODEL = "tests.test_reconstruct_cli:toy"
OPTIONS = ["--options", "dense", "unstructured@0.5", "unstructured@0.75", "nm2:4"]


def test_database_from_the_example_input_warns(tmp_path, caplog, capsys):
    out = tmp_path / "db"
    with caplog.at_level(logging.WARNING):
        assert main(["database", "--model", MODEL, "--out", str(out), *OPTIONS, "--quiet"]) == 0
    assert "real data" in caplog.text
    db = Database.open(out)
    assert db.calibration["source"] == "example-input" and len(db.layers) == 2
    assert "2 layers x 4 options" in capsys.readouterr().out


def test_database_from_calibration_files_then_gap(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        torch.save(torch.randn(40, 8), calib / f"part{i}.pt")
    out = tmp_path / "db"
    args = ["--model", MODEL, "--calib", str(calib), "--samples", "60",
            "--calib-batch-size", "16"]
    assert main(["database", *args, "--out", str(out), *OPTIONS, "--quiet"]) == 0
    db = Database.open(out)
    assert db.calibration["source"] == f"file:{calib}"
    choices = {"0": db.options[2], "2": db.options[3]}
    Profile(model=MODEL, choices=choices, target_speedup=1.5, budget_ms=1.0,
            predicted_ms=1.0, dense_total_ms=1.5, fixed_ms=0.1,
            fingerprint=fingerprint()).save(tmp_path / "p.json")
    weights = tmp_path / "gap.safetensors"
    assert main(["gap", *args, "--database", str(out), "--profile", str(tmp_path / "p.json"),
                 "--out", str(weights), "--lr", "1e-3", "--epochs", "2"]) == 0
    from safetensors.torch import load_file
    state = load_file(str(weights))
    assert ((state["0.weight"] != 0).float().mean() - 0.25).abs() < 1e-6
    assert "gAP: loss" in capsys.readouterr().out


def test_bad_block_and_bad_calib_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "db"
    code = main(["database", "--model", MODEL, "--out", str(out), "--options", "dense",
                 "block32x32@0.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no layer can take option block32x32@0.5" in err
    assert err.count("\n") == 1
    assert not out.exists()
    code = main(["database", "--model", MODEL, "--out", str(out), "--calib",
                 str(tmp_path / "missing.pt"), "--quiet"])
    assert code == 2 and "no such file" in capsys.readouterr().err


def head(batch_size=4):
    """A 64x64 body and a 10-class head, narrower than a 32x32 block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    return model, torch.randn(batch_size, 64)


def test_a_head_narrower_than_the_block_stays_dense(tmp_path, caplog, capsys):
    out = tmp_path / "db"
    with caplog.at_level(logging.WARNING):
        assert main(["database", "--model", "tests.test_reconstruct_cli:head", "--out",
                     str(out), "--pattern", "block", "--block", "32", "--levels", "3",
                     "--quiet"]) == 0
    assert "1 layer(s) cannot take block32x32 and keep their other options: 2" in caplog.text
    db = Database.open(out)
    assert [o.name for o in db.options_of("0")] == [o.name for o in db.options]
    assert [o.name for o in db.options_of("2")] == ["dense"]
    printed = capsys.readouterr().out
    assert f"sparsest option, {db.options[-1].name}," in printed and "(1 layers)" in printed


def test_a_block_shape_no_layer_takes_is_refused_not_dropped(tmp_path, capsys):
    code = main(["database", "--model", "tests.test_reconstruct_cli:head", "--out",
                 str(tmp_path / "db"), "--pattern", "block", "--block", "32", "128",
                 "--levels", "3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no layer of this model can take blocks of 128x128; choose another " \
        "--block" in err and "Traceback" not in err
    assert not (tmp_path / "db").exists()


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.unused = nn.Linear(96, 96)         # defined, never called by forward

    def forward(self, x):
        return self.body(x)


def with_unused_layer(batch_size=4):
    torch.manual_seed(0)
    return WithUnusedLayer().eval(), torch.randn(batch_size, 16)


def test_a_layer_the_forward_never_calls_gets_no_entries(tmp_path, caplog):
    out = tmp_path / "db"
    with caplog.at_level(logging.INFO):
        assert main(["database", "--model", "tests.test_reconstruct_cli:with_unused_layer",
                     "--out", str(out), "--levels", "2", "--quiet"]) == 0
    assert "never called on the example input, so not pruned: unused" in caplog.text
    assert Database.open(out).layers == ("body.0", "body.2")


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e-3"], "--lr tunes the other --method, not fast"),
    (["--method", "adaprune", "--solver", "cholesky"],
     "--solver tunes the other --method, not adaprune"),
    (["--method", "adaprune", "--max-iters", "5"], "--max-iters tunes the other --method"),
    (["--solver", "cholesky", "--tol", "0.5"], "--max-iters and --tol tune --solver cg"),
    (["--block", "32"], "--block sets the block family's blocks, and the grid is "
                        "unstructured, which would ignore it"),
])
def test_a_solver_flag_of_the_other_method_is_refused(tmp_path, capsys, flags, message):
    """database --method fast --lr 1e-3 built normally, ignoring --lr."""
    assert main(["database", "--model", "resnet-fmnist", "--out", str(tmp_path / "db"),
                 *flags]) == 2
    assert message in capsys.readouterr().err
