"""The seam between the command line and the backends: the CLI names no backend; a backend
registered under a new name brings its own options and default option family."""

import argparse

import pytest
import torch
from torch import nn

from spdy_gpu import backends
from spdy_gpu.backends import (
    CliOption,
    Latency,
    LatencyBackend,
    backend_class,
    example_shape,
    get_backend,
)
from spdy_gpu.cli import main
from spdy_gpu.cli.common import add_backend_args, backend_config, backend_from_args
from spdy_gpu.errors import SpdyError
from spdy_gpu.timing import LayerTiming, TimingTable
from tests.conftest import fingerprint


class FakeBackend:
    """A third backend: every option takes 1 ms less per level than dense."""

    name = "fake"
    summary = "nowhere; default grid: N:M"
    default_pattern = "nm"
    estimated = False
    cli_options = (CliOption("--repeats", "ignored", int),
                   CliOption("--speed", "how fast", float))

    def __init__(self, repeats=1, speed=1.0):
        self.repeats, self.speed = repeats, speed

    def fingerprint(self, example):
        return fingerprint(backend=self.name)

    def supports(self, layer, option):
        return True

    def latency(self, models, example):
        return {name: Latency(1.0, 0.0) for name in models}

    def export(self, model, example, profile, out_dir):
        return out_dir

    def measure_table(self, model, example, layers, options, *, model_name, checkpoint=None,
                      progress=True):
        rows = tuple(LayerTiming(layer.name, layer.kind, (layer.n, layer.k, layer.m or 0),
                                 tuple(10.0 / self.speed - i for i in range(len(options))),
                                 (0.0,) * len(options)) for layer in layers)
        return TimingTable(self.fingerprint(example), tuple(options), rows,
                           dense_total_ms=30.0, fixed_ms=10.0, model=model_name,
                           provenance={"repeats": self.repeats, "speed": self.speed})


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "fake", __name__)
    monkeypatch.setitem(backends._REGISTRY, "fake", FakeBackend)


def toy_model():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval(), torch.randn(1, 8)


def parse(argv, required=True):
    parser = argparse.ArgumentParser()
    add_backend_args(parser, required=required)
    return parser.parse_args(argv)


def test_each_flag_once_with_every_backend_that_takes_it(fake):
    parser = argparse.ArgumentParser()
    add_backend_args(parser)
    help_text = " ".join(parser.format_help().split())
    assert help_text.count("--repeats REPEATS") == 2          # usage line + the option
    assert "deepsparse: analysis calls" in help_text and "fake: ignored" in help_text
    for flag in ("--threads", "--dtype", "--estimate", "--speed"):
        assert flag in help_text


def test_config_holds_the_chosen_backends_given_options_and_refuses_others(fake):
    assert backend_config(parse(["--backend", "fake", "--speed", "2"])) == {"speed": 2.0}
    with pytest.raises(SpdyError, match="--threads is an option of --backend deepsparse, not "
                                        "of fake"):
        backend_config(parse(["--backend", "fake", "--speed", "2", "--threads", "4"]))
    with pytest.raises(SpdyError, match="--dtype is an option of --backend triton"):
        backend_config(parse(["--backend", "deepsparse", "--dtype", "fp16"]))
    backend = backend_from_args(parse(["--backend", "fake", "--repeats", "5"]))
    assert isinstance(backend, FakeBackend) and backend.repeats == 5
    assert backend_class("fake") is FakeBackend and isinstance(get_backend("fake"), FakeBackend)
    assert isinstance(backend, LatencyBackend)
    assert backend.latency({"m": nn.Linear(2, 2)}, torch.randn(1, 2)) == {"m": Latency(1.0, 0.0)}


def test_no_backend_chosen_is_a_one_line_error(fake):
    with pytest.raises(SpdyError, match="pass --backend"):
        backend_from_args(parse([], required=False))
    with pytest.raises(SpdyError, match="unknown backend 'nope'"):
        backend_class("nope")


def test_timings_uses_the_backends_default_pattern_and_options(fake, tmp_path):
    out = tmp_path / "t.json"
    assert main(["timings", "--model", "tests.test_backend_seam:toy_model", "--backend", "fake",
                 "--speed", "2", "--levels", "2", "--out", str(out)]) == 0
    table = TimingTable.load(out)
    assert table.options[0].pattern == "dense" and {o.pattern for o in table.options[1:]} == {"nm"}
    assert table.provenance["speed"] == 2.0 and table.provenance["repeats"] == 1


def ignores_batch_model(batch_size: int = 1):
    return toy_model()


def test_timings_refuses_an_example_of_another_batch(fake, tmp_path, capsys):
    assert main(["timings", "--model", "tests.test_backend_seam:ignores_batch_model",
                 "--backend", "fake", "--batch-size", "4", "--out", str(tmp_path / "t.json")]) == 2
    assert "example input of batch 1, not --batch-size 4" in capsys.readouterr().err


def test_example_shape_names_every_tensor_in_a_stable_order():
    ids, mask = torch.zeros(2, 128, dtype=torch.long), torch.ones(2, 128, dtype=torch.long)
    assert example_shape({"input_ids": ids, "attention_mask": mask}) == (
        2, "attention_mask=2x128,input_ids=2x128")
    assert example_shape(torch.randn(1, 3, 32, 32)) == (1, "0=1x3x32x32")
    assert example_shape((torch.randn(4, 8), None, torch.randn(4))) == (4, "0=4x8,2=4")


@pytest.mark.parametrize("example, match", [
    ({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, "disagree on the batch"),
    ((torch.tensor(1.0),), "is a scalar"),
    ({"flag": True}, "holds no tensor"),
])
def test_example_shape_refuses_what_has_no_batch(example, match):
    with pytest.raises(SpdyError, match=match):
        example_shape(example)
