"""Performance ceilings of named GPUs, for analytic (ESTIMATED) timing tables.

Datasheet figures are the vendor's dense peaks (the "with sparsity" Tensor Core figures are
2x these and are not used). A ceiling measured on the machine itself (a large device copy, a
large matmul) is closer to what kernels reach; `GpuSpec.save` / `load_spec` carry such a
measured spec to a machine without a GPU (`--estimate FILE.json`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SpdyError
from .jsonio import is_number, load_json, located, require, save_json

SPEC_FORMAT, SPEC_VERSION = "spdy-gpu/gpu-spec", 1
DTYPES = ("bf16", "fp16", "tf32", "fp32")
TERA = 1e12

ASSUMED_KERNEL_FLOOR_MS = 0.003
"""An assumption, not a measurement: the shortest time a launched kernel takes end to end
(launch, one wave of thread blocks, completion) on recent NVIDIA data-centre GPUs, a few
microseconds. Datasheets do not state it; a measured spec replaces it with its own figure."""


@dataclass(frozen=True)
class GpuSpec:
    """Ceilings of one GPU. peak_flops: dtype -> FLOP/s of dense matmul (Tensor Cores for
    bf16/fp16/tf32, plain FMA for fp32); bandwidth: DRAM bytes/s; kernel_floor_ms: the
    shortest a kernel runs (see ASSUMED_KERNEL_FLOOR_MS)."""

    name: str
    arch: str                              # e.g. "sm_90"
    sm_count: int
    bandwidth: float
    peak_flops: dict[str, float] = field(default_factory=dict)
    source: str = ""
    kernel_floor_ms: float = ASSUMED_KERNEL_FLOOR_MS

    def __post_init__(self) -> None:
        # Plausible for any GPU: 1 GB/s .. 1 PB/s, 1 GFLOP/s .. 1 EFLOP/s, a floor <= 1 ms
        # (beyond them a hand-edited figure would overflow or zero every estimate).
        ranges = [("bandwidth", self.bandwidth, 1e9, 1e15),
                  *((f"peak_flops.{k}", v, 1e9, 1e18) for k, v in self.peak_flops.items()),
                  ("kernel_floor_ms", self.kernel_floor_ms, 0.0, 1.0)]
        wrong = next(((n, v, lo, hi) for n, v, lo, hi in ranges
                      if not (math.isfinite(v) and lo <= v <= hi)), None)
        if wrong is not None:
            name, value, low, high = wrong
            raise SpdyError(f"GPU spec {self.name!r}: {name} {value:g} is not a GPU's (expected "
                            f"{low:g} .. {high:g}); regenerate the spec")
        if not self.peak_flops:
            raise SpdyError(f"GPU spec {self.name!r}: no peak FLOP/s given; regenerate the "
                            "spec")
        if self.sm_count <= 0 or not re.fullmatch(r"sm_\d+", self.arch):
            raise SpdyError(f"GPU spec {self.name!r}: arch {self.arch!r} / sm_count "
                            f"{self.sm_count}: need an arch like sm_90 and a positive SM count")

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise SpdyError(f"no {dtype} peak known for {self.name}; use one of "
                            f"{sorted(self.peak_flops)}")
        return self.peak_flops[dtype]

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, SPEC_FORMAT, SPEC_VERSION, dataclasses.asdict(self))


def _datasheet(name: str, arch: str, sms: int, tb_per_s: float, bf16_tflops: float,
               tf32_tflops: float, fp32_tflops: float, source: str) -> GpuSpec:
    peaks = {"bf16": bf16_tflops, "fp16": bf16_tflops, "tf32": tf32_tflops, "fp32": fp32_tflops}
    return GpuSpec(name, arch, sms, tb_per_s * TERA,
                   {dtype: tflops * TERA for dtype, tflops in peaks.items()}, source)


# Dense peaks (half of NVIDIA's "with sparsity" Tensor Core figures) and DRAM bandwidth.
GPU_SPECS: dict[str, GpuSpec] = {
    "h100-sxm": _datasheet("NVIDIA H100 SXM5 80GB", "sm_90", 132, 3.35, 989.4, 494.7, 66.9,
                           "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "h100-pcie": _datasheet("NVIDIA H100 PCIe 80GB", "sm_90", 114, 2.0, 756.5, 378.0, 51.2,
                            "NVIDIA H100 PCIe product brief PB-11133-001 / H100 datasheet"),
    "h200-sxm": _datasheet("NVIDIA H200 SXM 141GB", "sm_90", 132, 4.8, 989.4, 494.7, 66.9,
                           "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    "a100-sxm": _datasheet("NVIDIA A100 SXM4 80GB", "sm_80", 108, 2.039, 312.0, 156.0, 19.5,
                           "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    "a100-pcie": _datasheet("NVIDIA A100 PCIe 80GB", "sm_80", 108, 1.935, 312.0, 156.0, 19.5,
                            "NVIDIA A100 Tensor Core GPU datasheet (80GB PCIe)"),
    "l40s": _datasheet("NVIDIA L40S", "sm_89", 142, 0.864, 362.05, 183.0, 91.6,
                       "NVIDIA L40S datasheet"),
    "l4": _datasheet("NVIDIA L4", "sm_89", 58, 0.300, 121.0, 60.0, 30.3,
                     "NVIDIA L4 Tensor Core GPU datasheet"),
    "a10": _datasheet("NVIDIA A10", "sm_86", 72, 0.600, 125.0, 62.5, 31.2,
                      "NVIDIA A10 Tensor Core GPU datasheet"),
}


# Words of a CUDA device name that pick its datasheet entry, most specific first.
_NAME_WORDS = (("h200-sxm", ("h200",)), ("h100-pcie", ("h100", "pcie")), ("h100-sxm", ("h100",)),
               ("a100-pcie", ("a100", "pcie")), ("a100-sxm", ("a100",)), ("l40s", ("l40s",)),
               ("l4", ("l4",)), ("a10", ("a10",)))


def datasheet_for(device_name: str) -> str | None:
    """The GPU_SPECS key of a CUDA device name (torch.cuda.get_device_name), or None."""
    name = device_name.lower()
    return next((key for key, words in _NAME_WORDS if all(w in name for w in words)), None)


def gpu_spec(name_or_path: str) -> GpuSpec:
    """A named datasheet spec (see GPU_SPECS) or a spec file saved by `GpuSpec.save`."""
    key = name_or_path.strip().lower()
    if key in GPU_SPECS:
        return GPU_SPECS[key]
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        return load_spec(name_or_path)
    raise SpdyError(f"unknown GPU {name_or_path!r} for --estimate; use one of "
                    f"{sorted(GPU_SPECS)} or a measured spec file (.json)")


def load_spec(path: str | os.PathLike) -> GpuSpec:
    doc = load_json(path, SPEC_FORMAT, SPEC_VERSION)
    peaks = require(doc, "peak_flops", dict, path)
    try:
        spec = GpuSpec(name=str(require(doc, "name", str, path)),
                       arch=str(require(doc, "arch", str, path)),
                       sm_count=int(require(doc, "sm_count", int, path)),
                       bandwidth=float(require(doc, "bandwidth", (int, float), path)),
                       peak_flops={str(k): _number(v, f"peak_flops.{k}")
                                   for k, v in peaks.items()},
                       source=str(doc.get("source", "")),
                       kernel_floor_ms=float(doc.get("kernel_floor_ms", ASSUMED_KERNEL_FLOOR_MS)))
    except SpdyError as e:
        raise located(path, e) from None
    except (TypeError, ValueError) as e:
        raise located(path, SpdyError(f"malformed GPU spec ({e}); regenerate it")) from None
    return spec


def _number(value: Any, name: str) -> float:
    """A figure read from a spec file: a JSON number (a string such as "1e15" is refused)."""
    if not is_number(value):
        raise SpdyError(f"{name} is {value!r}, not a number; regenerate the spec")
    return float(value)
