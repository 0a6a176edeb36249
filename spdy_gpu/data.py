"""Calibration data: the batches a model is captured, reconstructed and scored on.

Sources, in order of preference: a user's files (`torch.save`d tensors, tuples or dicts
whose first dimension is samples; a file or a directory of them), the model entry's own
data, or (with a warning) the model's example input.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SpdyError, first_line, function_name, user_code
from .layers import named_inputs, rebuilt
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
        if cut == 0 and sum(counts) > held_out:
            # enough samples, but whole batches are held out: the batches are too big
            batches = f"{len(counts)} batch{'es' if len(counts) > 1 else ''}"
            raise SpdyError(f"the {sum(counts)} calibration samples come in {batches} of up "
                            f"to {max(counts)} (--calib-batch-size), and the {held_out} held "
                            "out for the search take whole batches, leaving none to fit on; "
                            f"pass --calib-batch-size {sum(counts) - held_out} or less")
        if cut == 0:
            raise SpdyError(f"only {sum(counts)} calibration samples: too few to hold "
                            f"{held_out} out for scoring and fit on the rest; give more data "
                            "(--calib, --samples) or fewer --search-samples")
        fit, score = self.batches[:cut], self.batches[cut:]
        if sum(counts[cut:]) != held_out:
            log.warning("holding out %d samples for the search, not %d: calibration batches "
                        "(of up to %d, --calib-batch-size) are kept whole", sum(counts[cut:]),
                        held_out, max(counts))
        return (Calibration(fit, {**self.description, "samples": sum(counts[:cut])}),
                Calibration(score, {**self.description, "samples": sum(counts[cut:]),
                                    "held_out": True}))


def tensors_digest(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 over (name, tensor) pairs: names, dtypes, shapes and values (other values by
    their repr), e.g. a model's state_dict().items() or a batch's named_inputs."""
    digest = hashlib.sha256()
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            digest.update(f"{name} {value!r};".encode())
            continue
        data = value.detach().cpu().contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batches_digest(batches: Iterable[Any]) -> str:
    """tensors_digest of every input of every batch, in order: what calibration data is,
    whatever file or function it came from."""
    return tensors_digest((f"{i}.{name}", value) for i, batch in enumerate(batches)
                          for name, value in named_inputs(batch))


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first batched tensor (1: none)."""
    first = next(iter(_tensors(batch).values()), None)
    return 1 if first is None else int(first.shape[0])


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration data comes from and how much of it: `calib` a file or directory
    (None: the model's own data), `samples` in all, `batch_size` per forward."""

    calib: str | Path | None = None
    samples: int = 1024
    batch_size: int = 32

    def __post_init__(self) -> None:
        for flag, value in (("--samples", self.samples), ("--calib-batch-size", self.batch_size)):
            if value < 1:
                raise SpdyError(f"{flag} {value} must be >= 1")

    def load(self, entry: ModelEntry, setting: ModelSetting, example: Any) -> Calibration:
        """The batches, and a description of what was really loaded for the records."""
        batches, source = self._batches(entry, setting, example)
        if not batches:
            fix = ("save samples along its first dimension" if self.calib
                   else "pass --calib FILE")
            raise SpdyError(f"{source} gave no calibration batches (no samples); {fix}")
        for i, batch in enumerate(batches):     # a batch unlike the example counts wrongly
            _check_like_example(batch, example, f"{source} (batch {i})")
        counts = [batch_samples(batch) for batch in batches]
        found = sum(counts)                   # what was really loaded, not what was asked
        if found < self.samples and source != "example-input":
            log.warning("%s holds %d calibration samples, fewer than the %d asked for; using "
                        "%d", source, found, self.samples, found)
        return Calibration(batches, {"source": source, "samples": found,
                                     "requested": self.samples, "batch_size": max(counts),
                                     "seq_len": setting.seq_len,
                                     "image_size": setting.image_size})

    def _batches(self, entry: ModelEntry, setting: ModelSetting,
                 example: Any) -> tuple[list[Any], str]:
        """(batches, source): the user's files, the model's own data, or its example input."""
        if self.calib:
            batches = _file_batches(Path(self.calib), self.samples, self.batch_size, example)
            return list(batches), f"file:{self.calib}"
        if entry.calibration is not None:
            calib_setting = ModelSetting(self.batch_size, setting.seq_len, setting.image_size)
            return _model_batches(entry, calib_setting, self.samples), f"model:{entry.name}"
        log.warning("no calibration data for %s: using its example input (--samples %d not "
                    "used); pass --calib with real data for a much better database",
                    entry.name, self.samples)
        return [example], "example-input"


def _model_batches(entry: ModelEntry, setting: ModelSetting, samples: int) -> list[Any]:
    """The model entry's own calibration batches. Its function is the user's code: a failure
    is one line naming it (the traceback is kept as the cause, printed with --debug)."""
    with user_code(f"the calibration function {function_name(entry.calibration)} of model "
                   f"{entry.name}", "fix it, or pass --calib FILE instead"):
        return list(entry.calibration(setting, samples))


def _file_batches(path: Path, samples: int, batch_size: int, example: Any) -> Iterator[Any]:
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
            with warnings.catch_warnings():     # a plain pickle: the error below says why
                warnings.simplefilter("ignore")
                data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
            # torch's message runs over many lines of advice (weights_only=False...) that
            # does not apply: its first sentence says why
            why = first_line(e).split(". ")[0]
            other = " and keep other files out of the directory" if path.is_dir() else ""
            raise SpdyError(f"--calib {file}: not a file of saved tensors (torch.load: "
                            f"{type(e).__name__}: {why}); save inputs with "
                            f"torch.save(tensor, path){other}") from None
        batches = list(sample_batches(data, example, batch_size, left, f"--calib {file}"))
        yield from batches
        left -= sum(batch_samples(batch) for batch in batches)
        if left <= 0:
            return


def sample_batches(data: Any, example: Any, batch_size: int, samples: int | None = None,
                   where: str = "calibration") -> Iterator[Any]:
    """Batches of `batch_size` from `data`, a tensor (or tuple/dict of tensors) whose first
    dimension is samples shaped like the example input's (at most `samples` of them);
    `where` names the data in errors."""
    count = _count(data, where)
    _check_like_example(data, example, where)
    stop = count if samples is None else min(count, samples)
    for start in range(0, stop, batch_size):
        yield _slice(data, start, min(start + batch_size, stop))


def _count(data: Any, where: str) -> int:
    """The number of samples in `data`: the first dimension, the same for every tensor."""
    counts = {name: t.shape[0] for name, t in _tensors(data).items()}
    if not counts:
        raise SpdyError(f"{where}: expected a tensor (or tuple/dict of tensors) whose "
                        "first dimension is samples")
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name!r}: {count}" for name, count in counts.items())
        raise SpdyError(f"{where}: its tensors hold different numbers of samples ({shown}); "
                        "save every input with the same first dimension")
    return next(iter(counts.values()))


def _check_like_example(data: Any, example: Any, where: str) -> None:
    """Refuse a file whose samples cannot be the example input's: a tensor with another
    number of dimensions per sample (a [128, 384] file for a [1, 128, 384] example would
    pass silently as 128 samples of [384]) or of another kind (floating or integer), and a
    dict of other keys or a tuple of another length than the example's. (A model's own
    calibration may give a richer form, e.g. keywords for a tensor example.) An example
    holding flags beside its tensors needs data of its own form, or they would be lost."""
    flags = [f"{name}={value!r}" for name, value in named_inputs(example)
             if not isinstance(value, torch.Tensor)]
    if flags and _form(data) != _form(example):
        raise SpdyError(f"{where}: it holds a {type(data).__name__}, but the example input is "
                        f"a {type(example).__name__} with {', '.join(flags)} beside its "
                        "tensors, which the model would not get; save the whole input, those "
                        "entries included")
    if isinstance(data, Mapping) and isinstance(example, Mapping):
        if set(data) != set(example):
            raise SpdyError(f"{where}: its inputs {sorted(data)} are not the example input's "
                            f"{sorted(example)}; give every input the model takes, by the same "
                            "names")
    elif isinstance(data, (tuple, list)) and isinstance(example, (tuple, list)):
        if len(data) != len(example):
            raise SpdyError(f"{where}: it holds {len(data)} inputs, the example input "
                            f"{len(example)}; give every input the model takes, in order")
    given, expected = _tensors(data), _tensors(example)
    for key in given.keys() & expected.keys():
        got, want = given[key], expected[key]
        subject = (f"input {key!r}" if isinstance(data, dict) else
                   f"tensor {key}" if isinstance(data, (tuple, list)) else "the tensor")
        if got.dim() != want.dim():
            wanted = ", ".join(["samples", *map(str, want.shape[1:])])
            raise SpdyError(f"{where}: {subject} of shape {list(got.shape)} holds "
                            f"samples of shape {list(got.shape[1:])}, but the model's example "
                            f"input {list(want.shape)} has samples of shape "
                            f"{list(want.shape[1:])}; save it as [{wanted}]")
        if got.is_floating_point() != want.is_floating_point():
            dtype = str(want.dtype).removeprefix("torch.")
            raise SpdyError(f"{where}: {subject} is "
                            f"{str(got.dtype).removeprefix('torch.')}, but the model's example "
                            f"input is {dtype}; save it as {dtype}")


def _form(value: Any) -> str:
    return ("dict" if isinstance(value, Mapping) else
            "sequence" if isinstance(value, (tuple, list)) else "one value")


def _tensors(value: Any) -> dict[str, torch.Tensor]:
    """The tensors of an input with a batch dimension, by name (see named_inputs)."""
    return {k: v for k, v in named_inputs(value) if isinstance(v, torch.Tensor) and v.dim() > 0}


def _slice(data: Any, start: int, stop: int) -> Any:
    """Samples start:stop of every batched tensor (in nested inputs too); other entries (a
    flag) as they are."""
    if isinstance(data, Mapping):
        return {k: _slice(v, start, stop) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return rebuilt(data, [_slice(v, start, stop) for v in data])
    batched = isinstance(data, torch.Tensor) and data.dim() > 0
    return data[start:stop] if batched else data
