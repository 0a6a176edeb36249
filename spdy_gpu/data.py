"""Calibration data: the batches a model is captured, reconstructed and scored on.

Sources, in order of preference: a user's files (`torch.save`d tensors, tuples or dicts
whose first dimension is samples; a file or a directory of them), the model entry's own
data, or (with a warning) the model's example input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SpdyError
from .models import ModelEntry, ModelSetting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Input batches (the form the model takes) and a description for the records."""

    batches: list[Any]
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(batch_samples(batch) for batch in self.batches)

    def split(self, held_out: int) -> tuple[Calibration, Calibration]:
        """(the rest, the last whole batches holding at least `held_out` samples): data to
        fit on and data to score on, never the same samples."""
        counts = [batch_samples(batch) for batch in self.batches]
        cut = len(counts)
        while cut > 0 and sum(counts[cut:]) < held_out:
            cut -= 1
        if cut == 0:
            raise SpdyError(f"only {sum(counts)} calibration samples: too few to hold "
                            f"{held_out} out for scoring and fit on the rest; give more data "
                            "(--calib, --samples) or fewer --search-samples")
        fit, score = self.batches[:cut], self.batches[cut:]
        return (Calibration(fit, {**self.description, "samples": sum(counts[:cut])}),
                Calibration(score, {**self.description, "samples": sum(counts[cut:]),
                                    "held_out": True}))


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its (first) tensor."""
    first = _first(batch)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def _first(batch: Any) -> Any:
    """The first value of a batch given as a tensor, a tuple/list or a dict."""
    if isinstance(batch, dict):
        return next(iter(batch.values()))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration data comes from and how much of it: `calib` a file or directory
    (None: the model's own data), `samples` in all, `batch_size` per forward."""

    calib: str | Path | None = None
    samples: int = 1024
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1:
            raise SpdyError("--samples and --calib-batch-size must be >= 1")

    def load(self, entry: ModelEntry, setting: ModelSetting, example: Any) -> Calibration:
        """The batches, and a description for the records."""
        calib_setting = ModelSetting(self.batch_size, setting.seq_len, setting.image_size)
        if self.calib:
            batches = list(_file_batches(Path(self.calib), self.samples, self.batch_size))
            source = f"file:{self.calib}"
        elif entry.calibration is not None:
            batches = list(entry.calibration(calib_setting, self.samples))
            source = f"model:{entry.name}"
        else:
            log.warning("no calibration data for %s: using its example input; pass --calib "
                        "with real data for a much better database", entry.name)
            batches, source = [example], "example-input"
        calibration = Calibration(batches, {"source": source, "batch_size": self.batch_size,
                                            "seq_len": setting.seq_len,
                                            "image_size": setting.image_size})
        found = calibration.samples          # what was really loaded, not what was asked
        if found < self.samples and source != "example-input":
            log.warning("%s holds %d calibration samples, fewer than the %d asked for; using "
                        "%d", source, found, self.samples, found)
        return Calibration(batches, {**calibration.description, "samples": found,
                                     "requested": self.samples})


def _file_batches(path: Path, samples: int, batch_size: int) -> Iterator[Any]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        raise SpdyError(f"--calib {path}: no such file or directory")
    if not files:
        raise SpdyError(f"--calib {path}: the directory holds no files; add saved tensors")
    left = samples
    for file in files:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SpdyError(f"--calib {file}: cannot load it with torch.load ({e}); save "
                            "inputs with torch.save(tensor, path)") from None
        count = _count(data, file)
        for start in range(0, min(count, left), batch_size):
            yield _slice(data, start, min(start + batch_size, left))
        left -= min(count, left)
        if left <= 0:
            return


def _count(data: Any, file: Path) -> int:
    first = _first(data)
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise SpdyError(f"--calib {file}: expected a tensor (or tuple/dict of tensors) whose "
                        "first dimension is samples")
    return first.shape[0]


def _slice(data: Any, start: int, stop: int) -> Any:
    if isinstance(data, dict):
        return {k: v[start:stop] for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return tuple(v[start:stop] for v in data)
    return data[start:stop]
