import json
import re
import subprocess
import sys

import pytest

from spdy_gpu import Profile, SpdyError
from spdy_gpu.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "solve" in commands
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: spdy-gpu {name}" in capsys.readouterr().out


def test_solve_writes_a_profile(tmp_path, toy_table, capsys):
    toy_table.save(tmp_path / "t.json")
    code = main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.5",
                 "--out", str(tmp_path / "p.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "target 1.5x -> predicted" in out
    profile = Profile.load(tmp_path / "p.json")
    assert profile.predicted_ms <= 10.0 / 1.5
    assert profile.provenance["command"].startswith("spdy-gpu")


def _error_line(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_input_gives_one_line(tmp_path, toy_table, capsys):
    toy_table.save(tmp_path / "t.json")
    solve = ["solve", "--timings", str(tmp_path / "t.json"), "--out", str(tmp_path / "p.json")]
    assert "largest achievable speedup" in _error_line(capsys, solve + ["--speedup", "9"])
    assert "must be a finite number > 0" in _error_line(capsys, solve + ["--speedup", "-2"])
    (tmp_path / "bad.json").write_text('{"format": "spdy-gpu/timing-table", "vers')
    bad = ["solve", "--timings", str(tmp_path / "bad.json"), "--speedup", "1.2",
           "--out", str(tmp_path / "p.json")]
    assert "corrupted or truncated" in _error_line(capsys, bad)
    errors = tmp_path / "e.json"
    errors.write_text(json.dumps({"format": "spdy-gpu/errors", "version": 1,
                                  "options": ["dense"], "layers": {}}))
    assert "options differ" in _error_line(capsys, solve + ["--speedup", "1.2",
                                                            "--errors", str(errors)])
    assert not (tmp_path / "p.json").exists(), "nothing written on failure"


def test_import_loads_no_backend_runtime():
    code = ("import sys, spdy_gpu, spdy_gpu.cli; "
            "print(sorted(m for m in ('triton', 'deepsparse', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, magic", [("p.png", b"\x89PNG"), ("p.PDF", b"%PDF"),
                                         ("p.svg", b"<?xml")])
def test_solve_plots_the_frontier_and_profile(name, magic, tmp_path, toy_table, capsys):
    toy_table.save(tmp_path / "t.json")
    plot = tmp_path / "plots" / name
    assert main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.5",
                 "--out", str(tmp_path / "p.json"), "--plot", str(plot), "--quiet"]) == 0
    assert plot.read_bytes().startswith(magic) and f"plot written to {plot}" in \
        capsys.readouterr().out


@pytest.mark.parametrize("name", ["p.txt", "p"])
def test_a_plot_name_without_a_figure_suffix_is_refused_before_any_work(name, tmp_path,
                                                                         toy_table, capsys):
    toy_table.save(tmp_path / "t.json")
    assert main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.5",
                 "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / name)]) == 2
    assert "unknown figure format" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_solve_lists_an_excluded_layer_once_and_its_rows_add_up(tmp_path, toy_table, capsys):
    toy_table.save(tmp_path / "t.json")
    assert main(["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.2",
                 "--exclude", "layer0", "--out", str(tmp_path / "p.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("layer0 ")).split() == \
        ["layer0", "excluded:", "in", "fixed"]
    profile = Profile.load(tmp_path / "p.json")
    numbers = [[float(x) for x in line.split()[-2:]] for line in lines
               if line.startswith(("layer", "fixed")) and not line.startswith(("layer ", "layer0"))]
    total = next(line for line in lines if line.startswith("total")).split()
    assert sum(n[1] for n in numbers) == pytest.approx(profile.predicted_ms, abs=1e-3)
    assert float(total[1]) == pytest.approx(toy_table.dense_total_ms, abs=1e-3)
    assert float(total[2]) == pytest.approx(profile.predicted_ms, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["solve", "--timings", "t.json", "--speedup", "2", "--out", "p.json", "--bogus"],
     "spdy-gpu solve: error: unrecognized arguments: --bogus; see spdy-gpu solve --help"),
    (["timings", "--pattern", "foo"], "spdy-gpu timings: error: argument --pattern: invalid "
                                      "choice: 'foo'"),
    (["nocommand"], "spdy-gpu: error: argument COMMAND: invalid choice: 'nocommand'"),
    (["solve", "--timings", "a.json", "--speedup", "2", "--timings", "b.json", "--out", "p"],
     "spdy-gpu solve: error: --timings given twice; give it once"),
    (["timings", "--model", "toy", "--levels", "3", "--levels", "5"],
     "spdy-gpu timings: error: --levels given twice; give it once"),
])
def test_usage_errors_are_one_line_naming_the_command(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("command, says", [("solve", "its output was not written; run it again "
                                                    "to start over"),
                                           ("timings", "run the same command again to resume")])
def test_an_interrupt_says_whether_a_rerun_resumes(command, says, tmp_path, toy_table, capsys,
                                                   monkeypatch):
    import spdy_gpu.cli.solve
    import spdy_gpu.cli.timings

    def interrupt(args):
        raise KeyboardInterrupt
    monkeypatch.setattr({"solve": spdy_gpu.cli.solve,
                         "timings": spdy_gpu.cli.timings}[command], "run", interrupt)
    toy_table.save(tmp_path / "t.json")
    argv = {"solve": ["solve", "--timings", str(tmp_path / "t.json"), "--speedup", "1.2",
                      "--out", str(tmp_path / "p.json")],
            "timings": ["timings", "--model", "minilm", "--backend", "deepsparse",
                        "--out", str(tmp_path / "t2.json")]}[command]
    assert main(argv) == 130
    assert capsys.readouterr().err == f"spdy-gpu {command}: interrupted; {says}\n"


def test_an_output_that_is_an_input_or_another_output_is_refused(tmp_path, toy_table, capsys):
    """solve --out T.json replaced the timing table it read, --out P.png --plot P.png lost
    the profile, run --database DIR (= --out) locked itself out after the search."""
    table = tmp_path / "t.json"
    toy_table.save(table)
    before = table.read_bytes()
    cases = [
        (["solve", "--timings", str(table), "--speedup", "1.5", "--out", str(table)],
         "--out .* is also the --timings input, which it would overwrite"),
        (["solve", "--timings", str(table), "--speedup", "1.5", "--out",
          str(tmp_path / "p.png"), "--plot", str(tmp_path / "p.png")],
         "--plot .* is also the --out output"),
        (["run", "--model", "x:y", "--backend", "deepsparse", "--speedup", "2", "--out",
          str(tmp_path / "r"), "--database", str(tmp_path / "r")],
         "--database .* is or lies inside the --out directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert re.search(message, capsys.readouterr().err)
    assert table.read_bytes() == before and not (tmp_path / "p.png").exists()


def test_every_timing_table_passed_to_run_is_read_up_front(tmp_path, toy_table, capsys):
    """A second --timings that is a profile (or truncated) was never read when the first
    matched the run."""
    from spdy_gpu.pipeline import require_files
    table, profile = tmp_path / "t.json", tmp_path / "p.json"
    toy_table.save(table)
    assert main(["solve", "--timings", str(table), "--speedup", "1.2", "--out",
                 str(profile), "--quiet"]) == 0
    require_files([table], "--timings")
    with pytest.raises(SpdyError, match="expected a 'spdy-gpu/timing-table' file, found "
                                        "'spdy-gpu/profile'"):
        require_files([table, profile], "--timings")


def test_an_output_inside_the_database_read_or_on_an_input_as_progress_file_is_refused(
        tmp_path):
    """apply --out DB/manifest.json replaced the database it read; gap's checkpoint beside
    --out, named as the --calib input, overwrote and then deleted it."""
    import argparse

    from spdy_gpu.cli.common import refuse_clobbering
    database, calib = tmp_path / "db", tmp_path / "w.safetensors.gap-checkpoint.pt"
    database.mkdir()
    (database / "manifest.json").write_text("{}")           # a database's directory
    calib.write_bytes(b"x")
    with pytest.raises(SpdyError, match="--out .* lies inside the --database .* it reads"):
        refuse_clobbering(argparse.Namespace(command="apply", database=str(database),
                                             out=str(database / "manifest.json")))
    with pytest.raises(SpdyError, match="--out's progress file .* is also the --calib input"):
        refuse_clobbering(argparse.Namespace(command="gap", database=str(database),
                                             out=str(tmp_path / "w.safetensors"),
                                             calib=str(calib)))
    refuse_clobbering(argparse.Namespace(command="apply", database=str(database),
                                         out=str(tmp_path / "w.safetensors")))
