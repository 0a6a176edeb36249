"""`spdy-gpu run` end to end on DeepSparse with a small user model: every stage, the
report, reuse on a second run, and bad input as one-line errors."""

import json

import pytest
import torch
from torch import nn

from spdy_gpu.cli import main

pytest.importorskip("deepsparse")
SPEC = "tests.test_cli_run:mlp"


def mlp(batch_size: int = 1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
    return model.eval(), torch.randn(batch_size, 64, 256)


def args(out, *more, speedup="1.3"):
    return ["run", "--model", SPEC, "--backend", "deepsparse", "--threads", "1",
            "--repeats", "1", "--options", "dense", "unstructured@0.5", "unstructured@0.9",
            "--search-samples", "8", "--samples", "24", "--calib-batch-size", "8",
            "--random-candidates", "3", "--patience", "2", "--max-evaluations", "6",
            "--speedup", speedup, "--out", str(out), "--quiet", *more]


@pytest.mark.slow
def test_run_end_to_end_then_reuse(tmp_path, capsys):
    out = tmp_path / "run"
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 64, 256), calib)
    assert main(args(out, "--calib", str(calib))) == 0
    printed = capsys.readouterr().out
    assert "target 1.3x -> predicted" in printed and "measured" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["measured_speedup"] > 0 and report["rounds"]
    for name in ("model.onnx", "pruned.safetensors", "profile.json", "report.md"):
        assert (out / name).exists()
    assert main(args(out, "--calib", str(calib))) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["stages"]["timings"]["reused"] and again["stages"]["database"]["reused"]
    assert "(reused)" in capsys.readouterr().out


def error_line(err):
    """The error printed after any progress bars: one line, the last."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0])
    return lines[0]


def test_bad_input_is_one_line(tmp_path, capsys):
    code = main(args(tmp_path / "a", speedup="100"))
    err = capsys.readouterr().err
    assert code == 2 and "largest achievable speedup" in error_line(err)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("x")
    code = main(args(taken))
    err = capsys.readouterr().err
    assert code == 2 and "not a spdy-gpu run directory" in error_line(err)
    bad = tmp_path / "bad.pt"
    torch.save(torch.randn(32, 64, 7), bad)
    code = main(args(tmp_path / "b", "--calib", str(bad)))
    err = capsys.readouterr().err
    assert code == 2 and "the model failed on its input" in error_line(err)
