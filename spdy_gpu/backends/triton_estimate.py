"""The Triton backend's analytic estimate, for planning without a GPU.

Each prunable Linear's GEMM is timed at its roofline on a GpuSpec (a datasheet entry or
ceilings measured on the GPU), block options packed into the kernel's block; everything
else in the model (attention matmuls, softmax, norms, embeddings...) is recorded op by op
in one CPU forward and charged its own memory/compute floor as fixed time. Such tables are
marked estimated and every report built on them says ESTIMATED.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..bsr import kernel_block
from ..errors import SpdyError
from ..gpu_specs import GpuSpec, gpu_spec
from ..layers import LayerInfo, call_model, hooks_attached
from ..options import SparsityOption
from ..roofline import roofline_ms, semi_structured_ms
from ..timing import Fingerprint
from . import Latency
from .triton import DTYPES, TritonTables, package_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpCost:
    """One aten op outside the prunable layers: its FLOPs and the bytes it moves at the
    target dtype (every input read once, every output written once)."""

    op: str
    flops: float
    bytes: float
    region: int = 0         # how many prunable layers ran before it (its gap between GEMMs)


_GATHERS = {"embedding", "index_select", "index", "gather"}   # read only what they output


class _OpRecorder(TorchDispatchMode):
    """Records the cost of every non-view aten op run while no prunable module is active."""

    def __init__(self, dtype_bytes: int):
        super().__init__()
        self.dtype_bytes = dtype_bytes
        self.inside_prunable = 0
        self.region = 0
        self.costs: list[OpCost] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_prunable == 0 and not func.is_view:
            cost = self._cost(func, args, kwargs, out)
            if cost.bytes > 0:
                self.costs.append(cost)
        return out

    def _cost(self, func, args, kwargs, out) -> OpCost:
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in _GATHERS and inputs:
            inputs = inputs[1:] + outputs              # the table: only the gathered rows
        unique = {id(t): t for t in inputs}.values()
        moved = sum(self._bytes(t) for t in (*unique, *outputs))
        return OpCost(name, _flops(func, args, kwargs, out), moved, self.region)

    def _bytes(self, t: torch.Tensor) -> float:
        size = self.dtype_bytes if t.is_floating_point() else t.element_size()
        return float(t.numel() * size)


def _flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func.overloadpacket)
    return 0.0 if formula is None else float(formula(*args, **kwargs, out_val=out))


def non_gemm_costs(model: nn.Module, example: Any, prunable: list[str],
                   dtype_bytes: int) -> list[OpCost]:
    """Cost of every op of one forward that is not inside a prunable layer (attention
    matmuls, softmax, norms, activations, residual adds, embeddings...), run on the CPU."""
    recorder = _OpRecorder(dtype_bytes)

    def enter(*_: Any) -> None:
        recorder.inside_prunable += 1
        recorder.region += 1

    def leave(*_: Any) -> None:
        recorder.inside_prunable -= 1

    handles = []
    for name in prunable:
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    with hooks_attached(handles), torch.no_grad(), recorder:
        call_model(model, example)
    return recorder.costs


def op_time_ms(flops: float, moved: float, spec: GpuSpec, dtype: str) -> float:
    """Roofline time of one kernel, never under the spec's kernel floor."""
    ideal = 1e3 * max(flops / spec.peak(dtype), moved / spec.bandwidth)
    return max(ideal, spec.kernel_floor_ms)


def fixed_ms(costs: list[OpCost], spec: GpuSpec, dtype: str, fused: bool) -> float:
    """The non-GEMM ops' time: each op one kernel (eager), or, fused (torch.compile), the
    ops between two GEMMs one kernel whose floor is their summed traffic and FLOPs."""
    if not fused:
        return math.fsum(op_time_ms(c.flops, c.bytes, spec, dtype) for c in costs)
    regions: dict[int, list[OpCost]] = {}
    for cost in costs:
        regions.setdefault(cost.region, []).append(cost)
    return math.fsum(op_time_ms(math.fsum(c.flops for c in ops), math.fsum(c.bytes for c in ops),
                                spec, dtype) for ops in regions.values())


def estimate_layer_ms(layer: LayerInfo, option: SparsityOption, spec: GpuSpec,
                      dtype: str) -> float:
    """Roofline time of a layer's GEMMs under `option` (block options packed into the
    kernel's block; 2:4 on sparse tensor cores), one GEMM per call of the layer, each never
    under the kernel floor."""
    return math.fsum(_gemm_ms(layer, rows, option, spec, dtype) for rows in layer.rows_per_call)


def _gemm_ms(layer: LayerInfo, m: int, option: SparsityOption, spec: GpuSpec,
             dtype: str) -> float:
    ceilings = dict(peak_flops=spec.peak(dtype), bandwidth=spec.bandwidth)
    if option.pattern == "nm":
        ideal = semi_structured_ms(layer.n, layer.k, m, DTYPES[dtype].itemsize, **ceilings)
    else:
        block = kernel_block(option.block) if option.pattern == "block" else None
        ideal = roofline_ms(layer.n, layer.k, m, option.density if block else 1.0, block,
                            DTYPES[dtype].itemsize, **ceilings)
    return max(ideal, spec.kernel_floor_ms)


class TritonEstimateBackend(TritonTables):
    """Roofline-estimated Triton timing tables for the GPU described by `spec` (a GPU_SPECS
    name, a measured spec file or a GpuSpec); no GPU needed. dtype: "bf16", "fp16" or
    "fp32". `get_backend("triton", estimate=spec)` returns one."""

    estimated = True

    def __init__(self, spec: str | GpuSpec, dtype: str = "bf16", compile: bool = False):
        super().__init__(dtype)
        self.spec = spec if isinstance(spec, GpuSpec) else gpu_spec(spec)
        self.compile = compile

    def fingerprint(self, example: Any) -> Fingerprint:
        software = {"estimate": self.spec.source, "spdy-gpu": package_version()}
        if self.compile:
            software["execution"] = "torch.compile"
        return Fingerprint(backend_version=f"roofline-estimate/{package_version()}",
                           device=f"{self.spec.name} (ESTIMATED)", isa=self.spec.arch,
                           threads=self.spec.sm_count, software=software,
                           **self._fingerprint_fields(example))

    def latency(self, models: Mapping[str, nn.Module], example: Any) -> dict[str, Latency]:
        raise SpdyError("an --estimate backend cannot measure end-to-end latency, which needs "
                        "a GPU; run it without --estimate where the profile's timings were "
                        "measured")

    def _times(self, model: nn.Module, example: Any, layers: list[LayerInfo],
               options: list[SparsityOption], checkpoint: Any, progress: bool):
        spec = self.spec
        times = {(layer.name, option): (estimate_layer_ms(layer, option, spec, self.dtype), 0.0)
                 for layer in layers for option in options if self.supports(layer, option)}
        costs = non_gemm_costs(model, example, [layer.name for layer in layers],
                               self.torch_dtype.itemsize)
        fixed = fixed_ms(costs, spec, self.dtype, fused=self.compile)
        dense_total = fixed + math.fsum(times[(layer.name, options[0])][0] for layer in layers)
        log.warning("ESTIMATED timing table for %s: roofline of every GEMM and of %d other ops, "
                    "no measurement", spec.name, len(costs))
        provenance = {"method": "ESTIMATED: roofline max(FLOPs / peak, bytes / bandwidth), "
                                f"at least {spec.kernel_floor_ms} ms per kernel",
                      "spec": spec.name, "spec_source": spec.source,
                      "peak_flops": spec.peak(self.dtype),
                      "bandwidth": spec.bandwidth, "kernel_floor_ms": spec.kernel_floor_ms,
                      "fixed": (f"{len(costs)} non-GEMM ops, those between two GEMMs fused "
                                "into one kernel (torch.compile) at their summed floor"
                                if self.compile else
                                f"{len(costs)} non-GEMM ops, each at its memory/compute floor")}
        return times, dense_total, provenance
