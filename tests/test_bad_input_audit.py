"""Bad input found by an audit: each is refused up front in one line naming the option and
its value (library settings and CLI alike), and the CLI ends quietly on a closed pipe."""

import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import spdy_gpu
from spdy_gpu import SpdyError
from spdy_gpu.cli import main
from spdy_gpu.data import Calibration, CalibrationSpec
from spdy_gpu.evolution import EvolutionConfig, evolve
from spdy_gpu.jsonio import atomic_write_bytes, load_json
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.pipeline import GapSettings, RunSettings
from spdy_gpu.reconstruct import AdaPruneConfig, FastConfig
from spdy_gpu.search import SearchConfig, search
from spdy_gpu.solve import Planner

from .conftest import make_table

SPEC = "tests.test_bad_input_audit:mlp"


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model.eval(), torch.randn(2, 6, 8)


def ids_model():
    """A model whose input is a dict of integer token ids, like a transformer's."""
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(10, 8), nn.Linear(8, 8)

        def forward(self, input_ids):
            return self.proj(self.embed(input_ids))

    return Embed().eval(), {"input_ids": torch.randint(0, 10, (1, 6))}


def unbuildable():
    raise AssertionError("the model must not be built before the options are checked")


def error_line(capsys, argv):
    """The one error line of a command that must fail with exit status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def run_args(tmp_path, *more):
    return ["run", "--model", SPEC, "--backend", "triton", "--estimate", "h100-sxm",
            "--options", "dense", "unstructured@0.5", "--speedup", "1.2",
            "--out", str(tmp_path / "run"), "--quiet", *more]


def database_args(tmp_path, *more, model=SPEC):
    return ["database", "--model", model, "--options", "dense", "unstructured@0.5",
            "--samples", "4", "--out", str(tmp_path / "db"), "--quiet", *more]


# ---- 1. learning rates, epochs, patience -----------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"lr": -1.0}, "gAP learning rate -1.0 .*--gap-lr"),
    ({"lr": math.nan}, "gAP learning rate nan"),
    ({"lr": math.inf}, "gAP learning rate inf"),
    ({"lr": 1e38}, r"gAP learning rate 1e\+38 .* must be in \(0, 1\]"),
    ({"epochs": 0}, "gAP epochs 0 .*--gap-epochs"),
    ({"patience": -1}, "--patience -1"),
])
def test_gap_settings_are_checked(changes, match):
    with pytest.raises(SpdyError, match=match):
        GapSettings(**changes)


def test_gap_refuses_a_bad_lr_before_opening_anything(tmp_path, capsys):
    gap = ["gap", "--model", SPEC, "--database", str(tmp_path / "none"), "--profile",
           str(tmp_path / "none.json"), "--out", str(tmp_path / "w.safetensors")]
    assert "learning rate -1.0" in error_line(capsys, gap + ["--lr", "-1"])
    assert "learning rate nan" in error_line(capsys, gap + ["--lr", "nan"])
    assert "epochs -1" in error_line(capsys, gap + ["--epochs", "-1"])
    assert "--patience 0" in error_line(capsys, gap + ["--patience", "0"])


def test_run_refuses_bad_gap_settings_before_any_work(tmp_path, capsys):
    line = error_line(capsys, run_args(tmp_path, "--gap", "--gap-lr", "-1"))
    assert "--gap-lr" in line and "-1" in line
    assert "epochs -1" in error_line(capsys, run_args(tmp_path, "--gap", "--gap-epochs", "-1"))
    assert "--gap-epochs tunes gAP, which does not run without --gap" in error_line(
        capsys, run_args(tmp_path, "--gap-epochs", "3"))             # it would be ignored
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("changes, match", [
    ({"lr": -1.0}, "--lr -1.0"), ({"lr": math.nan}, "--lr nan"),
    ({"passes": 0}, "--passes 0"), ({"batch_size": 0}, "--step-samples 0"),
])
def test_adaprune_config_is_checked(changes, match):
    with pytest.raises(SpdyError, match=match):
        AdaPruneConfig(**changes)


# ---- 2. seeds ----------------------------------------------------------------------------------

def test_negative_seeds_are_refused(tmp_path, capsys):
    with pytest.raises(SpdyError, match="--seed -1"):
        SearchConfig(seed=-1)
    with pytest.raises(SpdyError, match="--seed -2"):
        EvolutionConfig(seed=-2)
    assert "--seed -1 must be >= 0" in error_line(capsys, run_args(tmp_path, "--seed", "-1"))


# ---- 3, 4. database solver settings, checked before the model is built --------------------------

@pytest.mark.parametrize("more, match", [
    (["--method", "adaprune", "--lr", "-1"], "--lr -1.0"),
    (["--method", "adaprune", "--step-samples", "0"], "--step-samples 0"),
    (["--method", "adaprune", "--passes", "0"], "--passes 0"),
    (["--tol", "nan"], "--tol nan"),
    (["--tol", "-1"], "--tol -1.0"),
    (["--damp", "nan"], "--damp nan"),
    (["--damp", "-0.5"], "--damp -0.5"),
])
def test_database_refuses_bad_solver_settings_up_front(tmp_path, capsys, more, match):
    line = error_line(capsys, database_args(tmp_path, *more,
                                            model="tests.test_bad_input_audit:unbuildable"))
    assert match in line
    assert not (tmp_path / "db" / "manifest.json").exists()


def test_fast_config_takes_the_edges_of_its_ranges():
    FastConfig(damp=0.0, tol=0.0)        # no damping; CG runs until a step gains nothing
    with pytest.raises(SpdyError, match="--damp inf"):
        FastConfig(damp=math.inf)
    with pytest.raises(SpdyError, match="--solver 'lu'"):
        FastConfig(solver="lu")


# ---- 5, 6. JSON inputs that are directories, missing --timings -----------------------------------

def test_a_directory_given_as_a_json_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SpdyError, match="is a directory"):
        load_json(tmp_path, "spdy-gpu/timing-table", 1)
    line = error_line(capsys, ["solve", "--timings", str(tmp_path), "--speedup", "1.5",
                               "--out", str(tmp_path / "p.json")])
    assert f"{tmp_path} is a directory" in line


def test_run_refuses_a_missing_timing_table(tmp_path, capsys):
    missing = tmp_path / "nofile.json"
    line = error_line(capsys, run_args(tmp_path, "--timings", str(missing)))
    assert f"--timings {missing} does not exist" in line
    line = error_line(capsys, run_args(tmp_path, "--timings", str(tmp_path)))
    assert "is a directory" in line
    assert not (tmp_path / "run" / "run.json").exists()


# ---- 7. calibration files ----------------------------------------------------------------------

def calibrate(calib, model=SPEC, samples=64):
    entry = load_model(model)
    _, example = entry.build(ModelSetting())
    return CalibrationSpec(calib, samples, 4).load(entry, ModelSetting(), example)


def test_a_file_that_is_not_tensors_is_one_line(tmp_path, capsys):
    torch.save(torch.randn(8, 6, 8), tmp_path / "a.pt")
    (tmp_path / "README.txt").write_text("calibration inputs for the mlp\n")
    with pytest.raises(SpdyError) as info:
        calibrate(tmp_path)
    message = str(info.value)
    assert "\n" not in message and "README.txt" in message
    assert "keep other files out of the directory" in message
    line = error_line(capsys, database_args(tmp_path, "--calib", str(tmp_path)))
    assert "README.txt" in line


def test_calibration_samples_must_have_the_example_shape(tmp_path):
    torch.save(torch.randn(6, 8), tmp_path / "flat.pt")          # example is [2, 6, 8]
    with pytest.raises(SpdyError, match=r"shape \[6, 8\] holds samples of shape \[8\].*"
                                        r"\[2, 6, 8\] has samples of shape \[6, 8\]"):
        calibrate(tmp_path / "flat.pt")
    torch.save(torch.randn(5, 3, 8), tmp_path / "shorter.pt")    # same rank: the model's call
    assert calibrate(tmp_path / "shorter.pt").samples == 5


def test_calibration_dtype_must_be_the_examples_kind(tmp_path):
    model = "tests.test_bad_input_audit:ids_model"
    torch.save({"input_ids": torch.rand(8, 6)}, tmp_path / "float.pt")
    with pytest.raises(SpdyError, match="input 'input_ids' is float32.*is int64"):
        calibrate(tmp_path / "float.pt", model)
    torch.save({"input_ids": torch.randint(0, 10, (8, 6))}, tmp_path / "ids.pt")
    assert calibrate(tmp_path / "ids.pt", model).samples == 8


# ---- 8. the held-out split ---------------------------------------------------------------------

def test_split_blames_the_batch_size_when_that_is_the_cause():
    one_batch = Calibration([torch.zeros(16, 2)], {"source": "x"})
    with pytest.raises(SpdyError, match="1 batch of up to 16 .*--calib-batch-size 12 or "
                                        "less") as info:
        one_batch.split(4)
    assert "too few" not in str(info.value)
    with pytest.raises(SpdyError, match="too few to hold 16 out"):
        one_batch.split(16)


# ---- 9. a closed stdout --------------------------------------------------------------------------

def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    times = [[4.0, 3.0, 2.0, 1.0], [2.0, 1.5, 1.0, 0.5]] * 200      # many lines to print
    make_table(times, dense_total=1300.0, fixed=100.0).save(tmp_path / "t.json")
    code = "import sys; from spdy_gpu.cli import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "solve", "--timings", str(tmp_path / "t.json"),
         "--speedup", "1.5", "--out", str(tmp_path / "p.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd())
    process.stdout.close()                  # the reader is gone before anything is printed
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141, err
    assert "error" not in err and "Exception" not in err, err


def test_another_broken_pipe_is_still_an_internal_error(monkeypatch, capsys):
    from spdy_gpu.cli import solve

    def broken(args):
        raise BrokenPipeError("a worker's pipe")
    monkeypatch.setattr(solve, "run", broken)
    assert main(["solve", "--timings", "t.json", "--speedup", "2", "--out", "p.json"]) == 1
    assert "internal error: BrokenPipeError" in capsys.readouterr().err


# ---- 10. output file modes -----------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    from spdy_gpu.deploy import save_pruned

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "out.json", b"{}")
        save_pruned(torch.nn.Linear(4, 4), tmp_path / "w.safetensors")  # safetensors: 0600
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == mode


# ---- 11. --exclude matching nothing ------------------------------------------------------------

def test_an_exclude_pattern_matching_nothing_is_warned(tmp_path, capsys, caplog):
    table = make_table([[4.0, 3.0, 2.0, 1.0], [2.0, 1.5, 1.0, 0.5]], dense_total=8.0,
                       fixed=2.0)
    table.save(tmp_path / "t.json")
    solve = ["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.2", "--out",
             str(tmp_path / "p.json"), "--quiet"]
    with caplog.at_level(logging.WARNING):
        assert main(solve + ["--exclude", "layr0", "--exclude", "layer1"]) == 0
    assert "--exclude 'layr0' matches no prunable layer" in caplog.text
    assert "'layer1'" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(database_args(tmp_path, "--exclude", "*classifer*")) == 0
    assert "--exclude '*classifer*' matches no prunable layer (they are named like 0, 2)" \
        in caplog.text


# ---- 12, 13. messages --------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"search_samples": 0}, "^--search-samples 0 must be >= 1$"),
    ({"max_rounds": 0}, "^--max-rounds 0 must be >= 1$"),
    ({"tolerance": 1.5}, r"^--tolerance 1.5 must be in \[0, 1\)"),
    ({"tolerance": math.nan}, "^--tolerance nan"),
])
def test_run_settings_name_the_wrong_option(changes, match):
    with pytest.raises(SpdyError, match=match):
        RunSettings(speedup=2.0, **changes)


def test_search_settings_name_the_wrong_option(tmp_path, capsys):
    with pytest.raises(SpdyError, match="--random-candidates 0"):
        SearchConfig(random_candidates=0)
    with pytest.raises(SpdyError, match="^--patience -3"):
        SearchConfig(patience=-3)
    line = error_line(capsys, run_args(tmp_path, "--max-evaluations", "-1"))
    assert "--max-evaluations -1 must be >= 1, or 0 to search until it converges" in line


@pytest.fixture
def planner():
    times = [[4.0, 3.0, 2.0, 1.0], [2.0, 1.5, 1.0, 0.5], [3.0, 2.0, 1.5, 1.0]]
    return Planner(make_table(times, dense_total=10.0, fixed=1.0))


def score(choices):
    return sum(o.sparsity ** 2 for o in choices.values())


def test_the_search_log_says_why_it_stopped(planner, caplog):
    config = SearchConfig(random_candidates=2, patience=2, max_evaluations=2)
    with caplog.at_level(logging.INFO, logger="spdy_gpu"):
        search(planner, 1.3, score, config=config, progress=False)
    assert "search reached --max-evaluations after" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spdy_gpu"):
        evolve(planner, 1.3, score, planner.choose(1.3), progress=False,
               config=EvolutionConfig(max_evaluations=2))
    assert "evolution reached its evaluation budget after" in caplog.text


def test_an_option_of_another_backend_is_refused(tmp_path, capsys):
    from spdy_gpu.cli import main
    code = main(["timings", "--model", "tests.test_triton_backend:toy_mlp", "--backend",
                 "triton", "--estimate", "h100-sxm", "--threads", "2", "--levels", "3",
                 "--out", str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "--threads is an option of --backend deepsparse, not of triton" in err


def test_a_target_below_one_is_refused():
    from spdy_gpu.pipeline import RunSettings
    with pytest.raises(SpdyError, match="below 1x: the dense model already meets it"):
        RunSettings(speedup=0.5)


def test_solve_refuses_a_target_below_one_as_run_does(tmp_path, capsys):
    from spdy_gpu.cli import main
    code = main(["solve", "--timings", "examples/minilm-deepsparse-b1.timings.json",
                 "--speedup", "0.5", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2 and "target speedup 0.5x is below 1x: the dense model already meets it" \
        in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("call, match", [
    (lambda m: spdy_gpu.Planner(5), "a Planner plans on a TimingTable \\(or its file\\), not int"),
    (lambda m: spdy_gpu.prune_(m, {"0": 0.5}), "the choice of layer 0 is 0.5, not an option"),
    (lambda m: spdy_gpu.prune_("model", {"0": "unstructured@0.5"}),
     "pruning needs the model \\(an nn.Module, or a function returning one\\), got str"),
    (lambda m: spdy_gpu.prune_(m.to("meta"), {"0": "unstructured@0.5"}),
     "the model has tensors on the meta device, which pruning cannot use"),
    (lambda m: spdy_gpu.discover_layers(m.to("meta")),
     "which finding its prunable layers cannot use"),
    (lambda m: spdy_gpu.build_database(m.to("meta"), ["0"], ["dense"], [], "unused"),
     "which reconstruction cannot use"),
    (lambda m: spdy_gpu.prune_(m, ["0"]), "a profile must be a Profile, its file or a"),
])
def test_notebook_calls_with_the_wrong_kind_of_argument_are_one_line(call, match):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with pytest.raises(SpdyError, match=match):
        call(model)


def test_build_database_takes_option_names_and_one_layer_name(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    database = spdy_gpu.build_database(model, "0", ["dense", "unstructured@0.5"],
                                       [torch.randn(16, 32)], tmp_path / "db", progress=False)
    assert database.layers == ("0",)


def test_run_settings_take_a_notebooks_values_and_refuse_wrong_kinds():
    import numpy as np
    settings = RunSettings(speedup=np.float32(2), options="block32x32@0.5", max_rounds=np.int64(3))
    assert settings.speedup == 2.0 and type(settings.speedup) is float
    assert [o.name for o in settings.options] == ["block32x32@0.5"] and settings.max_rounds == 3
    for changes, match in [({"timings": [5]}, "timings\\[0\\] must be str or PathLike, not int"),
                           ({"overwrite": "no"}, "overwrite must be bool, not str"),
                           ({"database": 5}, "database must be str or PathLike or None")]:
        with pytest.raises(SpdyError, match=match):
            RunSettings(speedup=2, **changes)


@pytest.mark.parametrize("call, match", [
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, out_dir=5), "out_dir must be a path"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, calibration=5),
     "calibration must be a list of batches, a tensor .* not int"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, timings=5),
     "timings must be a timing table's path or a list of them, not int 5"),
    (lambda m, x: spdy_gpu.save_pruned(m, 5), "the output path must be a path .* not int 5"),
    (lambda m, x: spdy_gpu.load_pruned(m, 5), "the weights file must be a path"),
    (lambda m, x: spdy_gpu.prune_(m, {"0": "unstructured@0.5"}, 5),
     "the database directory must be a path"),
    (lambda m, x: spdy_gpu.build_database(m, ["0"], [spdy_gpu.SparsityOption.dense()], [x], 5),
     "the database directory must be a path"),
    (lambda m, x: spdy_gpu.Profile.load(5), "the spdy-gpu/profile file must be a path"),
    (lambda m, x: spdy_gpu.option_grid("unstructured", 2.5), "count must be an integer"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, options=[]), "options is empty"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, options=5),
     "options must be a list of options .* not 5"),
    (lambda m, x: spdy_gpu.SparsityOption.parse(None), "name is a string .* not NoneType"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, calibration_samples=8),
     "calibration_samples and calibration_batch_size apply to calibration data"),
    (lambda m, x: spdy_gpu.prune(m, x, speedup=1.5, name=5), "name must be str, not int"),
    (lambda m, x: spdy_gpu.get_backend("triton", estimate="h100-sxm", dtype="fp16")
     and spdy_gpu.get_backend("deepsparse", threads="2"), "--threads must be an integer"),
    (lambda m, x: __import__("spdy_gpu.scoring").scoring.held_out_scorer(m, []),
     "no held-out batches to score on"),
])
def test_notebook_calls_with_wrong_kinds_of_argument_are_one_line_errors(call, match):
    """Each ended in a TypeError or IndexError from deep inside pathlib or the scorer."""
    with pytest.raises(SpdyError, match=match):
        call(*mlp())


def test_search_and_measuring_refuse_wrong_kinds_of_argument(tmp_path):
    table = make_table([[1.0, 0.5, 0.3], [2.0, 1.0, 0.5]], dense_total=4.0, fixed=0.5)
    table.save(tmp_path / "t.json")
    planner, config = Planner(table), SearchConfig(max_evaluations=2)
    with pytest.raises(SpdyError, match="config must be SearchConfig, not dict"):
        search(planner, 1.3, lambda choices: 0.0, config={"seed": 0})
    with pytest.raises(SpdyError, match="the score function returned str 'bad', not a number"):
        search(planner, 1.3, lambda choices: "bad", config=config, progress=False)
    with pytest.raises(SpdyError, match="checkpoint .* is a directory"):
        search(planner, 1.3, lambda choices: 0.0, checkpoint=tmp_path, progress=False)
    found = search(tmp_path / "t.json", 1.3, lambda choices: torch.tensor(0.5), config=config,
                   progress=False)                          # a table's path, a tensor score
    assert found.choices
    from spdy_gpu.layers import discover_layers
    backend = spdy_gpu.get_backend("triton", estimate="h100-sxm")
    model, x = mlp()
    layers = discover_layers(model, x)
    with pytest.raises(SpdyError, match="layers must be LayerInfos .* not str"):
        backend.measure_table(model, x, [layer.name for layer in layers], ["dense"],
                              model_name="m")
    other = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(SpdyError, match="layer 0 of weight shape \\[16, 8\\] is not in this "
                                        "model"):
        backend.measure_table(other, x, layers, ["dense"], model_name="m")
    from spdy_gpu.backends import measuring_inputs
    _, options = measuring_inputs(model, layers, ["dense", "nm2:4"])       # names parsed
    assert options == [spdy_gpu.SparsityOption.dense(), spdy_gpu.SparsityOption.n_of_m(2, 4)]
