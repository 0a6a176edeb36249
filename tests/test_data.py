"""Calibration data: true sample counts in the records, and held-out splits."""

import logging

import pytest
import torch

from spdy_gpu import SpdyError
from spdy_gpu.data import Calibration, CalibrationSpec
from spdy_gpu.models import ModelEntry, ModelSetting


def entry(samples_available):
    def calibration(setting, samples):
        n = min(samples, samples_available)
        for start in range(0, n, setting.batch_size):
            yield torch.randn(min(setting.batch_size, n - start), 4)
    return ModelEntry("toy", "toy", build=None, calibration=calibration)


def test_records_what_was_loaded_not_what_was_asked(caplog):
    with caplog.at_level(logging.WARNING):
        calib = CalibrationSpec(samples=100, batch_size=16).load(entry(40), ModelSetting(), None)
    assert calib.samples == 40 and calib.description["samples"] == 40
    assert calib.description["requested"] == 100 and "fewer than the 100" in caplog.text


def test_file_with_fewer_samples_is_recorded_truthfully(tmp_path):
    torch.save(torch.randn(24, 4), tmp_path / "x.pt")
    calib = CalibrationSpec(tmp_path / "x.pt", samples=1024, batch_size=10).load(
        entry(0), ModelSetting(), None)
    assert [b.shape[0] for b in calib.batches] == [10, 10, 4]
    assert calib.description["samples"] == 24


def test_split_holds_out_whole_batches_from_the_end(caplog):
    calib = Calibration([torch.zeros(8, 2) + i for i in range(5)], {"source": "x"})
    fit, held = calib.split(12)
    assert [float(b[0, 0]) for b in held.batches] == [3.0, 4.0]
    assert fit.samples == 24 and held.samples == 16 and held.description["held_out"]
    assert "holding out 16 samples for the search, not 12" in caplog.text
    caplog.clear()
    calib.split(16)
    assert "holding out" not in caplog.text
    with pytest.raises(SpdyError, match="too few to hold 64 out"):
        calib.split(64)


def test_a_file_whose_inputs_hold_different_sample_counts_is_refused(tmp_path):
    torch.save({"inp": torch.randn(100, 5), "bias": torch.randn(97, 10)}, tmp_path / "x.pt")
    example = {"inp": torch.randn(1, 5), "bias": torch.randn(1, 10)}
    with pytest.raises(SpdyError, match=r"x.pt: its tensors hold different numbers of samples "
                                        r"\('inp': 100, 'bias': 97\); save every input"):
        CalibrationSpec(tmp_path / "x.pt", samples=100, batch_size=32).load(
            entry(0), ModelSetting(), example)


def test_an_empty_calibration_file_says_so_and_not_to_pass_one(tmp_path):
    torch.save(torch.randn(0, 4), tmp_path / "x.pt")
    with pytest.raises(SpdyError, match=r"gave no calibration batches \(no samples\); save "
                                        "samples along its first dimension"):
        CalibrationSpec(tmp_path / "x.pt", samples=10, batch_size=10).load(
            entry(0), ModelSetting(), torch.randn(1, 4))


@pytest.mark.parametrize("empty", [[], (), {}])
def test_an_empty_container_in_a_calibration_file_is_a_one_line_error(tmp_path, empty):
    torch.save(empty, tmp_path / "x.pt")
    with pytest.raises(SpdyError, match="expected a tensor .* whose first dimension is samples"):
        CalibrationSpec(tmp_path / "x.pt", samples=10, batch_size=10).load(
            entry(0), ModelSetting(), torch.randn(1, 4))


def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path, recwarn):
    import pickle

    (tmp_path / "x.pkl").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    with pytest.raises(SpdyError, match=r"--calib .*x.pkl: not a file of saved tensors "
                                        r"\(torch.load: UnpicklingError: "):
        CalibrationSpec(tmp_path / "x.pkl", samples=10, batch_size=10).load(
            entry(0), ModelSetting(), torch.randn(1, 4))
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_zero_sample_count_or_batch_size_is_named():
    with pytest.raises(SpdyError, match="^--samples 0 must be >= 1$"):
        CalibrationSpec(samples=0)
    with pytest.raises(SpdyError, match="^--calib-batch-size 0 must be >= 1$"):
        CalibrationSpec(batch_size=0)


def test_batches_must_have_the_example_inputs_names_and_count(tmp_path):
    example = {"x": torch.randn(1, 4), "scale": torch.ones(1, 1)}
    entry_ = ModelEntry("m", "m", build=lambda s: (None, example),
                        calibration=lambda s, n: iter([{"x": torch.randn(8, 4)}]))
    with pytest.raises(SpdyError, match="\\(batch 0\\): its inputs \\['x'\\] are not the "
                                        "example input's \\['scale', 'x'\\]"):
        CalibrationSpec(samples=8).load(entry_, ModelSetting(), example)
    pair = (torch.randn(1, 4), torch.randn(1, 4))
    short = ModelEntry("m", "m", build=lambda s: (None, pair),
                       calibration=lambda s, n: iter([(torch.randn(8, 4),)]))
    with pytest.raises(SpdyError, match="it holds 1 inputs, the example input 2"):
        CalibrationSpec(samples=8).load(short, ModelSetting(), pair)


def test_flags_beside_the_samples_are_passed_to_every_batch_uncut():
    """A file of (samples, True, 2.0) for a forward(x, flag, scale) ended in TypeError
    ('bool' object is not subscriptable)."""
    from spdy_gpu.data import batch_samples, sample_batches
    x = torch.randn(40, 16)
    batches = list(sample_batches((True, x, 2.0), (True, torch.randn(1, 16), 2.0), 16))
    assert [batch_samples(b) for b in batches] == [16, 16, 8]
    assert all(b[0] is True and b[2] == 2.0 for b in batches)
    assert torch.equal(torch.cat([b[1] for b in batches]), x)


def test_a_dict_inside_a_tuple_is_cut_into_batches_key_by_key():
    from spdy_gpu.data import batch_samples, sample_batches
    from spdy_gpu.layers import example_shape
    data = ({"x": torch.randn(10, 16), "y": torch.randn(10, 4)},)
    example = ({"x": torch.randn(1, 16), "y": torch.randn(1, 4)},)
    batches = list(sample_batches(data, example, 4))
    assert [batch_samples(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0]["y"] for b in batches]), data[0]["y"])
    assert example_shape(example) == (1, "0.x=1x16,0.y=1x4")


def test_data_without_the_flags_of_its_example_is_refused():
    """A file of bare samples for an example (x, False, 2.0) ran the forward with its
    default flags: a database of another model."""
    from spdy_gpu.data import sample_batches
    with pytest.raises(SpdyError, match=r"holds a Tensor, but the example input is a tuple "
                                        r"with 1=False, 2=2.0 beside its tensors"):
        list(sample_batches(torch.randn(8, 16), (torch.randn(1, 16), False, 2.0), 4))


def test_named_tuples_keep_their_type_through_batches():
    import collections

    from spdy_gpu.data import sample_batches
    from spdy_gpu.layers import inputs_to
    extra = collections.namedtuple("Extra", "m")
    example = (torch.randn(1, 8), extra(m=torch.ones(1, 1)))
    batch = next(sample_batches((torch.randn(6, 8), extra(m=torch.ones(6, 1))), example, 4))
    assert type(batch[1]) is extra and batch[1].m.shape == (4, 1)
    assert type(inputs_to(example, "cpu")[1]) is extra
