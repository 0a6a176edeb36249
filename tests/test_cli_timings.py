"""`spdy-gpu timings` and `spdy-gpu verify` on small user models, and their bad input."""

import json

import pytest
import torch
from torch import nn

from spdy_gpu.cli import main
from spdy_gpu.options import SparsityOption
from spdy_gpu.profile import Profile
from spdy_gpu.timing import TimingTable
from tests.conftest import fingerprint

pytest.importorskip("deepsparse")
SPEC = "tests.test_cli_timings:toy_model"
FAST = ["--threads", "1", "--repeats", "1"]


def toy_model(batch_size: int = 1):
    """User-model entry point: (model, example input) for `--model SPEC`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128))
    return model.eval(), torch.randn(batch_size, 32, 128)


def fixed_batch_model():
    return toy_model(1)


def depthwise_model():
    return nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)).eval(), torch.randn(1, 8, 16, 16)


def no_layer_model():
    return nn.Sequential(nn.ReLU()).eval(), torch.randn(1, 4)


@pytest.mark.parametrize("quiet", [False, True])
def test_timings_writes_a_table_with_provenance(quiet, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["timings", "--model", SPEC, "--backend", "deepsparse", *FAST, "--options",
                 "dense", "unstructured@0.5", "unstructured@0.9", "--out", str(out),
                 *["--quiet"] * quiet]) == 0
    table = TimingTable.load(out)
    assert table.layer_names == ["0", "2"] and len(table.options) == 3
    assert table.model == SPEC and table.fingerprint.threads == 1
    assert {"command", "created", "collection_s"} <= set(table.provenance)
    assert table.provenance["calls_per_option"] == {"dense": 1, "unstructured@0.5": 1,
                                                    "unstructured@0.9": 1}   # --repeats 1
    assert not (tmp_path / "t.json.partial").exists()
    captured = capsys.readouterr()
    assert "2 layers x 3 options" in captured.out
    assert ("deepsparse " + SPEC in captured.err) is not quiet       # the progress bar


@pytest.mark.parametrize("model, match", [
    ("tests.test_cli_timings:depthwise_model", "supports none of the options"),
    ("tests.test_cli_timings:no_layer_model", "no Linear or Conv2d layer"),
])
def test_models_without_prunable_layers_are_refused(model, match, tmp_path, capsys):
    code = main(["timings", "--model", model, "--backend", "deepsparse", *FAST,
                 "--out", str(tmp_path / "t.json")])
    assert code == 2 and match in capsys.readouterr().err


def test_batch_size_the_model_cannot_take(tmp_path, capsys):
    code = main(["timings", "--model", "tests.test_cli_timings:fixed_batch_model",
                 "--backend", "deepsparse", "--batch-size", "4", *FAST,
                 "--options", "dense", "--out", str(tmp_path / "t.json")])
    assert code == 2 and "batch 1, not --batch-size 4" in capsys.readouterr().err


def batch_four_model():
    return toy_model(4)


@pytest.mark.parametrize("extra", [[], ["--batch-size", "4"]])
def test_a_model_without_batch_keyword_runs_at_its_examples_batch(extra, tmp_path):
    out = tmp_path / "t.json"
    assert main(["timings", "--model", "tests.test_cli_timings:batch_four_model",
                 "--backend", "deepsparse", *extra, *FAST, "--options", "dense",
                 "--out", str(out)]) == 0
    assert TimingTable.load(out).fingerprint.batch_size == 4


def test_unknown_backend_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["timings", "--backend", "onnxruntime", "--out", "t.json"])
    assert "choose from 'deepsparse', 'triton'" in capsys.readouterr().err


def _profile(path, **changes):
    choices = {"0": SparsityOption.unstructured(0.9), "2": SparsityOption.dense()}
    fields = dict(model=SPEC, choices=choices, target_speedup=1.2, budget_ms=1.0,
                  predicted_ms=1.0, dense_total_ms=1.2, fixed_ms=0.1, fingerprint=fingerprint())
    Profile(**{**fields, **changes}).save(path)
    return path


def test_verify_refuses_a_profile_from_another_machine_unless_forced(tmp_path, capsys):
    profile = _profile(tmp_path / "p.json")
    args = ["verify", "--model", SPEC, "--profile", str(profile), "--backend", "deepsparse",
            *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "another setting (device: 'Test CPU' !=" in err and "--force" in err
    out = tmp_path / "r.json"
    assert main(args + ["--force", "--out", str(out)]) == 0
    assert "measured speedup" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["measured_pruned_ms"] > 0 and result["measured_dense_ms"] > 0
    assert any(d.startswith("device") for d in result["forced_differences"])


def test_verify_refuses_a_truncated_profile_or_another_model(tmp_path, capsys):
    profile = _profile(tmp_path / "p.json")
    text = profile.read_text()
    profile.write_text(text[: len(text) // 2])
    args = ["verify", "--model", SPEC, "--profile", str(profile), "--backend", "deepsparse"]
    assert main(args) == 2 and "corrupted or truncated" in capsys.readouterr().err
    _profile(profile, model="minilm")
    assert main(args) == 2 and "pass --model minilm" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message without CUDA")
def test_verify_on_triton_without_a_gpu_says_it_needs_one(tmp_path, capsys):
    args = ["verify", "--model", SPEC, "--profile", str(_profile(tmp_path / "p.json")),
            "--backend", "triton"]
    assert main(args) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_options_and_grid_flags_together_are_refused(tmp_path, capsys):
    code = main(["timings", "--model", SPEC, "--backend", "deepsparse", *FAST, "--options",
                 "dense", "unstructured@0.5", "--levels", "3", "--block", "16",
                 "--out", str(tmp_path / "t.json")])
    assert code == 2 and "--options lists the options itself, so --levels, --block would be " \
        "ignored; drop one or the other" in capsys.readouterr().err


def test_a_plot_of_a_dense_only_grid_is_refused_before_measuring(tmp_path, capsys):
    code = main(["timings", "--model", SPEC, "--backend", "triton", "--estimate", "h100-sxm",
                 "--options", "dense", "--out", str(tmp_path / "t.json"),
                 "--plot", str(tmp_path / "t.png")])
    assert code == 2 and "the grid has no sparse option" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_a_second_timings_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    from spdy_gpu.locks import exclusive_file

    out = tmp_path / "t.json"
    args = ["timings", "--model", SPEC, "--backend", "triton", "--estimate", "h100-sxm",
            "--levels", "2", "--out", str(out)]
    with exclusive_file(out, "timing table"):          # as a first, running `timings` holds it
        assert main(args) == 2
    assert "the timing table" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0 and out.exists()
