"""`spdy-gpu apply` and `spdy-gpu export` on a small user model: round trips, and one-line
errors (exit status 2) that leave no output or temporary file behind."""

import pytest
import torch
from torch import nn

from spdy_gpu.cli import main
from spdy_gpu.deploy import load_block_sparse, load_pruned, prune_
from spdy_gpu.options import SparsityOption
from spdy_gpu.profile import Profile
from spdy_gpu.reconstruct import build_database
from spdy_gpu.sparse_linear import BlockSparseLinear
from tests.conftest import fingerprint

MODEL = "tests.test_cli_deploy:toy"
CHOICES = {"0": "block16x16@0.5", "2": "unstructured@0.75"}


def toy(batch_size=2, seed=0):
    """A user model in the 'package.module:function' form: (model, example input)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    return model, torch.randn(batch_size, 32)


def other_toy():
    return toy(seed=1)


def write_profile(path, choices=CHOICES, model=MODEL):
    Profile(model=model, choices={k: SparsityOption.parse(v) for k, v in choices.items()},
            target_speedup=1.5, budget_ms=1.0, predicted_ms=1.0, dense_total_ms=1.5,
            fixed_ms=0.1, fingerprint=fingerprint()).save(path)
    return str(path)


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def pruned_toy():
    model, _ = toy()
    prune_(model, CHOICES)
    return model


@pytest.fixture
def work(tmp_path):
    """A profile in tmp_path, and the outputs directory out/ (empty)."""
    write_profile(tmp_path / "p.json")
    (tmp_path / "out").mkdir()
    return tmp_path


def test_apply_then_load_gives_the_pruned_model(work, capsys):
    out = work / "out" / "w.safetensors"
    assert main(["apply", "--model", MODEL, "--profile", str(work / "p.json"),
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "pruned 2 layers to 58.3% sparsity" in line
    assert str(out) in line
    loaded = load_pruned(toy(seed=7)[0], out)
    x = torch.randn(4, 32)
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned_toy(), x), rtol=0, atol=0)
    assert int((loaded[2].weight == 0).sum()) == 16 * 64 * 3 // 4


def test_apply_with_a_database_and_exclude(work, capsys):
    db = build_database(toy()[0], ["0", "2"], [SparsityOption.parse(o) for o in
                        ("dense", "block16x16@0.5", "unstructured@0.75")],
                        [torch.randn(64, 32)], work / "db", model_name=MODEL, progress=False)
    out = work / "out" / "w.safetensors"
    assert main(["apply", "--model", MODEL, "--profile", str(work / "p.json"), "--database",
                 str(work / "db"), "--exclude", "2", "--out", str(out)]) == 0
    assert "pruned 1 layers to 50.0% sparsity" in capsys.readouterr().out
    loaded = load_pruned(toy()[0], out)
    assert torch.equal(loaded[0].weight, db.weight("0", SparsityOption.parse(CHOICES["0"])))
    assert torch.equal(loaded[2].weight, toy()[0][2].weight), "excluded: stays dense"


def test_export_onnx_matches_the_pruned_model(work, capsys):
    onnx = pytest.importorskip("onnx")
    out = work / "out" / "m.onnx"
    assert main(["export", "--model", MODEL, "--profile", str(work / "p.json"),
                 "--format", "onnx", "--out", str(out)]) == 0
    assert "as onnx to" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)))
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 32)
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input_0": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), outputs(pruned_toy(), x),
                               rtol=1e-5, atol=1e-5)


def test_export_triton_from_applied_weights(work, capsys):
    weights = work / "w.safetensors"
    assert main(["apply", "--model", MODEL, "--profile", str(work / "p.json"),
                 "--out", str(weights)]) == 0
    out = work / "out" / "m.safetensors"
    assert main(["export", "--model", MODEL, "--profile", str(work / "p.json"), "--weights",
                 str(weights), "--format", "triton", "--out", str(out)]) == 0
    assert "1 block-sparse, 0 2:4" in capsys.readouterr().out
    loaded = load_block_sparse(lambda: toy()[0], out)
    assert isinstance(loaded[0], BlockSparseLinear) and type(loaded[2]) is nn.Linear
    x = torch.randn(3, 32)
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned_toy(), x),
                               rtol=1e-5, atol=1e-5)


def error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_inputs_are_one_line_errors_that_write_nothing(work, capsys):
    out = str(work / "out" / "w.safetensors")
    profile = str(work / "p.json")
    apply = ["apply", "--model", MODEL, "--out", out]
    assert "no such file" in error_line(capsys, apply + ["--profile", str(work / "none.json")])
    other = write_profile(work / "other.json", model="some.module:build")
    assert "pass --model some.module:build" in error_line(capsys, apply + ["--profile", other])
    empty = write_profile(work / "empty.json", choices={})
    assert "nothing to prune" in error_line(capsys, apply + ["--profile", empty])
    missing = write_profile(work / "missing.json", choices={"7": "unstructured@0.5"})
    assert "layer 7 is not a Linear or Conv2d" in error_line(capsys, apply + ["--profile", missing])
    assert "is a directory" in error_line(capsys, ["apply", "--model", MODEL, "--profile",
                                                   profile, "--out", str(work / "out")])
    build_database(other_toy()[0], ["0", "2"], [SparsityOption.dense()],
                   [torch.randn(8, 32)], work / "db", model_name=MODEL, progress=False)
    assert "dense weights are not those" in error_line(
        capsys, apply + ["--profile", profile, "--database", str(work / "db")])
    assert list((work / "out").iterdir()) == []


def test_export_refuses_wrong_weights_and_writes_nothing(work, capsys):
    export = ["export", "--model", MODEL, "--profile", str(work / "p.json"), "--format",
              "triton", "--out", str(work / "out" / "m.safetensors")]
    dense = work / "dense.safetensors"
    assert main(["apply", "--model", MODEL, "--profile",
                 write_profile(work / "d.json", choices={"0": "dense"}),
                 "--out", str(dense)]) == 0
    assert "was pruned to another profile (layer 0: dense there, block16x16@0.5 here)" in \
        error_line(capsys, export + ["--weights", str(dense)])
    excluded = work / "excluded.safetensors"              # apply --exclude: layer 0 left out
    assert main(["apply", "--model", MODEL, "--profile", str(work / "p.json"), "--exclude",
                 "0", "--out", str(excluded)]) == 0
    assert ("(layer 0: dense (left out, e.g. by --exclude) there, block16x16@0.5 here); pass "
            "the weights made for this profile, or the same --exclude") in error_line(
        capsys, export + ["--weights", str(excluded)])
    from safetensors.torch import save_model
    unrecorded = work / "unrecorded.safetensors"          # no choices in its metadata
    save_model(toy()[0], str(unrecorded))
    assert "outside the block16x16@0.5 pattern" in error_line(
        capsys, export + ["--weights", str(unrecorded)])
    alien = work / "alien.safetensors"
    save_model(nn.Sequential(nn.Linear(32, 8)), str(alien))
    assert "does not fit this model: 0.weight has shape" in error_line(
        capsys, export + ["--weights", str(alien)])
    assert "nothing to prune" in error_line(
        capsys, export + ["--exclude", "*"])
    assert list((work / "out").iterdir()) == []


def test_export_triton_of_a_profile_nothing_of_which_runs_sparse_on_a_gpu_is_refused(
        work, capsys):
    profile = write_profile(work / "u.json", {"0": "unstructured@0.5", "2": "dense"})
    out = work / "out" / "u.safetensors"
    assert ("none of the profile's 1 pruned layers runs sparse on a GPU (they are "
            "unstructured;" in error_line(capsys, ["export", "--model", MODEL, "--profile",
                                                   profile, "--format", "triton", "--out",
                                                   str(out)]))
    assert not out.exists()


def test_export_triton_names_the_pruned_layers_that_stay_dense(work, caplog):
    profile = write_profile(work / "m.json", {"0": "unstructured@0.5", "2": "block16x16@0.5"})
    with caplog.at_level("WARNING"):
        assert main(["export", "--model", MODEL, "--profile", profile, "--format", "triton",
                     "--out", str(work / "out" / "m.safetensors")]) == 0
    assert "1 of the 2 pruned layers run dense on a GPU" in caplog.text and ": 0" in caplog.text
