"""resnet-fmnist: the IDX reader, the model entry on synthetic data, the checkpoint checks,
the cross_entropy loss, and (with dataset-fashion-mnist installed) the shipped accuracy."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spdy_gpu.errors import SpdyError
from spdy_gpu.losses import LOSSES, cross_entropy, kl
from spdy_gpu.models import ModelSetting, load_model
from spdy_gpu.models import fashion_mnist as fm
from spdy_gpu.models import resnet_fmnist as rf

REAL_DATA = all((Path(fm.DEFAULT_DIR) / name).is_file()
                for pair in fm.FILES.values() for name in pair)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic(directory: Path, train: int = 50, test: int = 12) -> dict[str, tuple]:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", train), ("test", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / fm.FILES[split][0], images)
        write_idx(directory / fm.FILES[split][1], labels)
        data[split] = (images, labels)
    return data


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path))
    return synthetic(tmp_path)


def test_read_idx_shapes_dtype_and_values(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "y.gz", np.array([9, 0, 3]))
    got = fm.read_idx(tmp_path / "x.gz")
    assert got.shape == (3, 28, 28) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "y.gz"), [9, 0, 3])


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(SpdyError, match="not an IDX file"):
        fm.read_idx(tmp_path / "bad.gz")
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10)
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + b"\x00" * 4))
    with pytest.raises(SpdyError, match="truncated"):
        fm.read_idx(tmp_path / "short.gz")


def test_load_normalises_in_the_data_path(fake_fmnist):
    images, labels = fm.load("train")
    assert images.shape == (50, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == fake_fmnist["train"][1].tolist()
    raw = torch.from_numpy(fake_fmnist["train"][0]).float()
    torch.testing.assert_close(images[:, 0] * fm.STD + fm.MEAN, raw / 255)


def test_missing_dataset_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(SpdyError, match="apt-get install dataset-fashion-mnist") as e:
        fm.load("test")
    assert "\n" not in str(e.value)


def _small_checkpoint(path: Path, edit) -> None:
    arch = rf.Architecture(widths=(4, 8), strides=(1, 2), blocks=1)
    tensors = dict(rf.ResNet(arch).state_dict())
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": rf.FORMAT,
                                            "architecture": arch.to_json()})


def test_checkpoint_round_trip_and_mismatch_refused_by_key(tmp_path):
    model = rf.ResNet(rf.Architecture(widths=(4, 8), strides=(1, 2), blocks=1))
    rf.save_checkpoint(model, tmp_path / "ok.safetensors", {"epochs": 0})
    loaded = rf.load_checkpoint(tmp_path / "ok.safetensors")
    assert loaded.arch == model.arch and not loaded.training
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight.half().float())

    _small_checkpoint(tmp_path / "missing.safetensors", lambda t: t.pop("fc.bias"))
    with pytest.raises(SpdyError, match=r"missing\.safetensors .* tensor fc\.bias is missing"):
        rf.load_checkpoint(tmp_path / "missing.safetensors")

    def reshape(t):
        t["stages.0.0.conv1.weight"] = torch.zeros(5, 4, 3, 3)
    _small_checkpoint(tmp_path / "shape.safetensors", reshape)
    with pytest.raises(SpdyError, match=r"stages\.0\.0\.conv1\.weight has shape \[5, 4, 3, 3\]"):
        rf.load_checkpoint(tmp_path / "shape.safetensors")

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SpdyError, match="not a resnet-fmnist checkpoint"):
        rf.load_checkpoint(tmp_path / "other.safetensors")


def test_entry_build_honours_batch_size_and_refuses_image_size(fake_fmnist):
    entry = load_model("resnet-fmnist")
    assert entry.loss == "cross_entropy" and entry.exclude == ()
    model, example = entry.build(ModelSetting(batch_size=3))
    assert not model.training and example.shape == (3, 1, 28, 28)
    torch.testing.assert_close(example, fm.load("test")[0][:3])
    with torch.no_grad():
        assert model(example).shape == (3, 10)
    with pytest.raises(SpdyError, match="28x28 images only"):
        entry.build(ModelSetting(image_size=64))


def test_calibration_yields_the_requested_samples_deterministically(fake_fmnist):
    batches = list(rf.calibration(ModelSetting(batch_size=5), 23))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    again = list(rf.calibration(ModelSetting(batch_size=5), 23))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert sum(len(b) for b in rf.calibration(ModelSetting(batch_size=16), 1000)) == 50


def test_quality_accuracy_and_agreement(fake_fmnist):
    model = rf.ResNet(rf.Architecture(widths=(4,), strides=(1,), blocks=1)).eval()
    scores = rf.quality(model, model)
    assert scores["agreement"] == 100.0
    labels = torch.from_numpy(fake_fmnist["test"][1].astype(np.int64))
    predicted = rf.predict(model, fm.load("test")[0])
    assert scores["accuracy"] == pytest.approx(100 * (predicted == labels).float().mean().item())


def test_cross_entropy_loss():
    assert LOSSES["cross_entropy"] is cross_entropy
    dense = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert cross_entropy(torch.zeros(2, 4), dense).item() == pytest.approx(math.log(4))
    pruned = dense.clone().requires_grad_()
    cross_entropy(pruned, dense).backward()
    assert pruned.grad.abs().max().item() < 1e-12             # minimal at equality
    other = torch.randn(2, 4)
    entropy = cross_entropy(dense, dense)
    assert cross_entropy(other, dense).item() == pytest.approx((kl(other, dense)
                                                                + entropy).item())


@pytest.mark.skipif(not REAL_DATA, reason="dataset-fashion-mnist is not installed")
def test_shipped_checkpoint_accuracy(monkeypatch):
    monkeypatch.delenv(fm.ENV_DIR, raising=False)
    images, labels = fm.load("test")
    predicted = rf.predict(rf.load_checkpoint(), images[:2000])
    assert (predicted == labels[:2000]).float().mean().item() >= 0.88
