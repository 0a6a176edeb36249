"""Fashion-MNIST from the Debian package dataset-fashion-mnist: gzipped IDX files read with
numpy, images normalised here (the data path), never inside the model.

The directory is /usr/share/datasets/fashion-mnist, or $SPDY_FASHION_MNIST_DIR when set.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import SpdyError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "SPDY_FASHION_MNIST_DIR"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Mean and standard deviation of the training pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as a numpy array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SpdyError(f"{path} is not an IDX file (bad magic number); reinstall "
                        "dataset-fashion-mnist")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != dtype.itemsize * int(np.prod(shape)):
        raise SpdyError(f"{path} is truncated: the header says {shape} but the data has "
                        f"{len(raw) - offset} bytes; reinstall dataset-fashion-mnist")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def data_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


@functools.lru_cache(maxsize=4)
def _load(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [directory / name for name in FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SpdyError(f"Fashion-MNIST not found ({missing[0]} is missing); install it with "
                        f"`apt-get install dataset-fashion-mnist` or set {ENV_DIR} to its "
                        "directory")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise SpdyError(f"{paths[0]} holds {images.shape} images but {paths[1]} holds "
                        f"{labels.shape} labels; reinstall dataset-fashion-mnist")
    return images, labels


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28] normalised with MEAN/STD, labels int64 [N]) of
    "train" (60,000) or "test" (10,000)."""
    if split not in FILES:
        raise SpdyError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    images, labels = _load(data_dir(), split)
    return normalise(torch.from_numpy(images.copy())), torch.from_numpy(labels.astype(np.int64))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], (pixel / 255 - MEAN) / STD."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
