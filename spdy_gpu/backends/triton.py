"""The Triton (GPU) latency backend.

On a CUDA device every prunable Linear is timed as the GEMM it runs in the model,
Y[M, N] = X[M, K] @ W[N, K]^T: dense through cuBLAS (`F.linear`), each block option through
this project's BSR kernel on the layer's own weights pruned by block norm (realistic
structure, not uniform random blocks). A layer is timed the way the model runs: the dense
model is timed first, eagerly and as a CUDA-graph replay, and where the replay is faster
(small batches, where launch overhead dominates) every layer is timed as a replay too, so
host overhead the deployed model never pays is not counted. Each timing is a
`triton.testing.do_bench` median over a run of calls on distinct copies of the weights (L2
flushed before each run, so every weight read comes from memory, as in a model whose weights
exceed the cache), divided by the calls; times are cached per (GPU, versions, dtype, GEMM
shape, option, mode) so a second model with the same shapes costs nothing. Conv2d layers
have no kernel and stay dense (fixed time).

Without a CUDA device, `get_backend("triton", estimate="h100-sxm")` (or a measured spec file)
builds the same table from the roofline of each GEMM and of every non-GEMM op's memory
traffic (triton_estimate.py); such tables are marked estimated and every report says
ESTIMATED. Both share TritonTables: the options the kernel runs and the table's assembly.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..bsr import kernel_block, packs_exactly
from ..deploy import capture_cuda_graph
from ..errors import MissingDependencyError, SpdyError, check_types
from ..gpu_specs import GPU_SPECS, GpuSpec
from ..jsonio import load_json, save_json
from ..layers import LayerInfo, call_model, hooks_attached, inputs_to
from ..masks import block_mask, unfit_reason
from ..options import SparsityOption
from ..semi_structured import SEMI_STRUCTURED, SemiStructuredLinear
from ..semi_structured import fits as semi_structured_fits
from ..sparse_linear import BlockSparseConv1x1, BlockSparseLinear, sparsify_
from ..timing import Fingerprint, LayerTiming, TimingTable
from . import (
    CliOption,
    Latency,
    NoDeviceError,
    example_shape,
    measuring_inputs,
    register_backend,
)

log = logging.getLogger(__name__)

# fp32 follows torch.backends.cuda.matmul.allow_tf32 in cuBLAS and in the kernel alike; the
# estimate uses the plain fp32 peak (TF32 is off by default).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BENCH_WARMUP_MS, BENCH_REP_MS = 25, 100                         # do_bench's own defaults
# A timed run calls a layer on up to MAX_COPIES copies of its weights, at most COPIES_BYTES of
# them in all: a graph replay's launch cost is shared by the calls, and no call finds its
# weights in L2 (do_bench flushes it before each run).
MAX_COPIES, COPIES_BYTES = 8, 256 << 20
GRAPHED = "cuda-graph"          # the mode name of a CUDA-graph replay (a suffix in _modes)
CACHE_FORMAT, CACHE_VERSION = "spdy-gpu/triton-timing-cache", 1
CONV_NOTE = "Conv2d wider than 1x1 or grouped: no BSR path, kept dense (fixed time)"
UNSWAPPABLE_NOTE = ("a Linear subclass or a conv padded other than with zeros: deployment "
                    "cannot swap it for a sparse layer, kept dense")
NO_DEVICE = ("no CUDA device for the triton backend; run on a GPU, plan from a table measured "
             "on a GPU earlier (spdy-gpu solve --timings FILE), or pass --estimate GPU_NAME "
             f"({', '.join(sorted(GPU_SPECS))}, or a measured spec .json) for an analytic "
             "ESTIMATED table")
NO_DEVICE_LATENCY = ("end-to-end latency on the triton backend needs a GPU and this machine has "
                     "no CUDA device; run it where the profile's timings were measured")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spdy-gpu"


# ---- timing cache ---------------------------------------------------------------------------

class TimingCache:
    """(median, spread) in ms per key, in one JSON file rewritten atomically after every new
    entry, so an interrupted run resumes where it stopped. Entries another process wrote in
    the meantime are merged, not lost. A missing or unreadable file is an empty cache."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, tuple[float, float]] = self._read()

    def get(self, key: str) -> tuple[float, float] | None:
        return self.entries.get(key)

    def put(self, key: str, median_ms: float, spread_ms: float) -> None:
        self.entries = {**self._read(), **self.entries, key: (median_ms, spread_ms)}
        if self.path is not None:
            save_json(self.path, CACHE_FORMAT, CACHE_VERSION,
                      {"entries": {k: list(v) for k, v in sorted(self.entries.items())}})

    def _read(self) -> dict[str, tuple[float, float]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            entries = load_json(self.path, CACHE_FORMAT, CACHE_VERSION).get("entries", {})
            return {str(k): _timing_pair(v) for k, v in entries.items()}
        except (SpdyError, AttributeError, TypeError, ValueError) as e:
            log.warning("ignoring unreadable timing cache %s (%s); it will be rewritten",
                        self.path, e)
            return {}


def _timing_pair(value: Any) -> tuple[float, float]:
    median, spread = (float(v) for v in value)
    if not (math.isfinite(median) and math.isfinite(spread) and median >= 0 and spread >= 0):
        raise ValueError(f"bad cached time {value!r}")
    return median, spread


def cache_key(device: str, software: dict[str, str], dtype: str, gemm: tuple[int, int, int],
              option: SparsityOption, repeats: int, geometry: str = "",
              mode: str = "eager") -> str:
    """One string naming everything a kernel time depends on. gemm: (N, K, M); repeats:
    do_bench calls it is the median of (a table records it); geometry: whatever else shapes
    the work (a bias, a conv's input shape, stride, padding); mode: "eager" or "cuda-graph";
    the key also names the timing protocol (the weight copies a run rotates over)."""
    versions = ",".join(f"{name}={version}" for name, version in sorted(software.items()))
    n, k, m = gemm
    protocol = f"{mode},copies<={MAX_COPIES}/{COPIES_BYTES >> 20}MiB"   # how it was timed
    return (f"{device}|{versions}|{dtype}|{n}x{k}x{m}{geometry}|{option.name}|x{repeats}"
            f"|{protocol}")


# ---- the backend ----------------------------------------------------------------------------

class TritonTables:
    """What the measured and the estimated Triton tables share: the dtype, the options the
    kernel runs, and the table's assembly. Subclasses provide `fingerprint`, `latency` and
    `_times` (per (layer, option) (median, spread), dense end-to-end time, provenance)."""

    name = "triton"
    default_pattern = "block+nm"
    summary = ("NVIDIA GPU, Triton BSR kernel (block sides multiples of 16) and 2:4 sparse "
               "tensor cores; default grid: 41 levels of 32x32 blocks plus nm2:4")
    cli_options = (
        CliOption("--repeats", "do_bench calls per kernel (default 3)", int),
        CliOption("--dtype", "weight/activation dtype (default bf16)", str,
                  tuple(DTYPES)),
        CliOption("--compile", "time the whole model (dense time, fixed time, end-to-end "
                               "latency) under torch.compile, as it is deployed", None),
        CliOption("--estimate", "without a GPU: analytic roofline estimate for a named GPU "
                                f"({', '.join(sorted(GPU_SPECS))}) or a measured spec .json "
                                "(the table is marked ESTIMATED)", metavar="GPU"),
    )
    estimated = False

    def export(self, model: nn.Module, example: Any, profile: Any, out_dir: Path) -> Path:
        """The pruned model with its block-pruned Linears as BlockSparseLinear (one
        safetensors file; spdy_gpu.deploy.load_block_sparse loads it back)."""
        from ..deploy import save_block_sparse
        path = Path(out_dir) / "model.triton.safetensors"
        save_block_sparse(model, profile, path)
        return path

    def __init__(self, dtype: str = "bf16"):
        if dtype not in DTYPES:
            raise SpdyError(f"unknown dtype {dtype!r} for the triton backend; use one of "
                            f"{sorted(DTYPES)}")
        self.dtype = dtype
        self.torch_dtype = DTYPES[dtype]

    def supports(self, layer: LayerInfo, option: SparsityOption) -> bool:
        """Dense always. On Linear layers and 1x1 convs without groups: block options whose
        block fits in the layer and has sides that are multiples of 16 (the kernel's 16..128
        tiles pack them with the option's density; an 8x8 mask in 16x16 tiles would store
        zero blocks the table does not count). On Linear layers: 2:4 (sparse tensor cores)
        where the weight's shape suits semi-structured storage. No wider or grouped conv,
        unstructured or other N:M. Nothing sparse on a layer deployment cannot swap (a
        Linear subclass, a conv with other than zero padding: `gpu_swappable`)."""
        if option.pattern == "dense":
            return True
        if not layer.gpu_swappable:
            return False
        if option.pattern == "block" and (layer.kind == "linear" or _pointwise(layer)):
            return (packs_exactly(option.block)
                    and unfit_reason((layer.n, layer.k), option) is None)
        if layer.kind != "linear":
            return False
        return option == SEMI_STRUCTURED and semi_structured_fits(layer.n, layer.k,
                                                                 self.torch_dtype)

    def measure_table(self, model: nn.Module, example: Any, layers: list[LayerInfo],
                      options: list[SparsityOption], *, model_name: str,
                      checkpoint: Path | None = None, progress: bool = True) -> TimingTable:
        """Per-layer times for every option, dense end-to-end time, fixed time. With
        `checkpoint`, every new time is also saved there (and in the cache) so an interrupted
        run resumes; it stays until the table is saved (TimingTable.save removes it)."""
        layers, options = measuring_inputs(model, layers, options)
        missing = [layer.name for layer in layers if layer.m is None]
        if missing:
            raise SpdyError(f"layers {missing[:3]} have no GEMM rows; discover them with the "
                            "example input (discover_layers(model, example))")
        if len(options) > 1 and not any(self.supports(layer, option) for layer in layers
                                        for option in options[1:]):
            raise SpdyError(f"no layer of {model_name} can run any of the sparse options on the "
                            "triton backend (block options on Linear layers only, blocks no "
                            "larger than the layer); use --backend deepsparse or smaller blocks")
        started = time.perf_counter()
        times, dense_total, provenance = self._times(model, example, layers, options,
                                                     checkpoint, progress)
        dense_sum = math.fsum(times[(layer.name, options[0])][0] for layer in layers)
        if dense_sum > dense_total:
            log.warning("dense layer times sum to %.4f ms, more than the whole model (%.4f ms): "
                        "isolated layers ran slower than in the model; fixed time set to 0",
                        dense_sum, dense_total)
        provenance |= {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "collection_s": round(time.perf_counter() - started, 2)}
        return TimingTable(
            fingerprint=self.fingerprint(example), options=tuple(options),
            layers=tuple(self._row(layer, options, times) for layer in layers),
            dense_total_ms=dense_total, fixed_ms=max(0.0, dense_total - dense_sum),
            model=model_name, estimated=self.estimated, provenance=provenance)

    def _fingerprint_fields(self, example: Any) -> dict[str, Any]:
        batch_size, input_shape = example_shape(example)
        return dict(backend=self.name, batch_size=batch_size, input_shape=input_shape,
                    dtype=str(self.torch_dtype).removeprefix("torch."))

    def _row(self, layer: LayerInfo, options: list[SparsityOption],
             times: dict[tuple[str, SparsityOption], tuple[float, float]]) -> LayerTiming:
        pairs = [times.get((layer.name, option), (None, None)) for option in options]
        note = (CONV_NOTE if layer.kind == "conv2d" and not _pointwise(layer)
                else UNSWAPPABLE_NOTE if not layer.gpu_swappable else "")
        unsupported = [o.name for o, p in zip(options, pairs) if p[0] is None]
        if not note and unsupported:
            note = f"unsupported here: {', '.join(unsupported[:3])}" + (
                f" (+{len(unsupported) - 3})" if len(unsupported) > 3 else "")
        if self.estimated:
            note = "ESTIMATED" + (f"; {note}" if note else "")
        return LayerTiming(name=layer.name, kind=layer.kind, gemm=(layer.n, layer.k, layer.m),
                           median_ms=tuple(p[0] for p in pairs),
                           spread_ms=tuple(p[1] for p in pairs), note=note)


@register_backend("triton")
class TritonBackend(TritonTables):
    """Latency of GEMMs measured on this machine's CUDA GPU (cuBLAS dense, Triton BSR sparse).

    dtype: "bf16", "fp16" or "fp32" (weights and activations); repeats: do_bench calls per
    kernel (median and spread over them); cache_dir: where triton-timings.json lives
    (default ~/.cache/spdy-gpu). Without a GPU, `get_backend("triton", estimate=GPU)` gives
    the roofline estimate instead (TritonEstimateBackend).
    """

    def __init__(self, dtype: str = "bf16", repeats: int = 3, cache_dir: Path | None = None,
                 compile: bool = False):
        super().__init__(dtype)
        check_types({"--repeats": (repeats, int)})
        if repeats < 1:
            raise SpdyError(f"--repeats must be >= 1, got {repeats}")
        self.repeats = repeats
        self.compile = compile
        self.cache_path = Path(cache_dir or default_cache_dir()) / "triton-timings.json"
        self.device = torch.device("cuda")
        if not self._has_device():
            raise NoDeviceError(NO_DEVICE, latency=NO_DEVICE_LATENCY)
        _check_triton()

    @classmethod
    def create(cls, estimate: str | GpuSpec | None = None, dtype: str = "bf16",
               **measuring: Any) -> TritonTables:
        """The measuring backend, or with `estimate` the roofline estimate for that GPU
        (which has nothing to repeat or cache: such settings are refused, not ignored;
        `compile` fuses the non-GEMM ops between two GEMMs into one kernel)."""
        if estimate is None:
            return cls(dtype=dtype, **measuring)
        from .triton_estimate import TritonEstimateBackend

        compile = bool(measuring.pop("compile", False))
        if measuring:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in sorted(measuring))
            raise SpdyError(f"--estimate times nothing, so {flags} would be ignored; drop it")
        return TritonEstimateBackend(estimate, dtype=dtype, compile=compile)

    def fingerprint(self, example: Any) -> Fingerprint:
        props = torch.cuda.get_device_properties(self.device)
        software = self._software()
        return Fingerprint(backend_version=software["triton"], device=self._device_name(),
                           isa=f"sm_{props.major}{props.minor}",
                           threads=props.multi_processor_count, software=software,
                           **self._fingerprint_fields(example))

    def latency(self, models: Mapping[str, nn.Module], example: Any) -> dict[str, Latency]:
        """End-to-end latency of each model on the GPU in this backend's dtype, do_bench
        calls alternating between the models. Linears pruned in blocks (all-zero tiles) run
        as BlockSparseLinear; BlockSparseLinear modules already in a model are kept. Each
        model is timed eagerly and as a CUDA-graph replay; the faster mode counts."""
        if not self._has_device():
            raise SpdyError(NO_DEVICE_LATENCY)
        if not models:
            raise SpdyError("no models to time; pass at least one")
        gpu_models = {}
        for name, model in models.items():
            gpu_models[name] = self._to_device(model)
            log.info("%s: %d Linear layers run block-sparse", name,
                     len(sparsify_(gpu_models[name])))
        return self._interleaved(gpu_models, self._inputs_to_device(example))[0]

    # -- measurement (CUDA) --

    def _times(self, model: nn.Module, example: Any, layers: list[LayerInfo],
               options: list[SparsityOption], checkpoint: Path | None, progress: bool):
        gpu_model = self._to_device(model)
        inputs = self._inputs_to_device(example)
        latencies, modes = self._interleaved({"model": gpu_model}, inputs)
        mode = GRAPHED if modes["model"].endswith(GRAPHED) else "eager"
        conv_shapes = _capture_input_shapes(
            gpu_model, inputs, [layer.name for layer in layers if layer.kind == "conv2d"])
        cache = TimingCache(self.cache_path)
        partial = TimingCache(None if checkpoint is None else Path(checkpoint))
        device, software = self._device_name(), self._software()
        jobs = [(layer, option) for layer in layers for option in options
                if self.supports(layer, option)]
        times, hits = {}, 0
        for layer, option in tqdm(jobs, desc="triton timings", unit="kernel",
                                    disable=not progress):
            module = gpu_model.get_submodule(layer.name)
            bias = "" if getattr(module, "bias", None) is None else "+bias"
            median = spread = 0.0
            # A layer the forward calls more than once runs one GEMM per call: each timed.
            for call, rows in enumerate(layer.rows_per_call):
                input_shape = conv_shapes[layer.name][call] if layer.kind == "conv2d" else None
                geometry = bias if input_shape is None else bias + _conv_geometry(module,
                                                                                  input_shape)
                key = cache_key(device, software, self.dtype, (layer.n, layer.k, rows), option,
                                self.repeats, geometry, mode)
                timing = cache.get(key) or partial.get(key)
                hits += timing is not None
                if timing is None:
                    calls = self._layer_calls(module, layer, option, rows, input_shape)
                    timing = self._per_call_ms(calls, graphed=mode == GRAPHED)
                    cache.put(key, *timing)
                    partial.put(key, *timing)
                median, spread = median + timing[0], spread + timing[1]
            times[(layer.name, option)] = (median, spread)
        provenance = {"method": f"triton.testing.do_bench median over a run of up to "
                                f"{MAX_COPIES} calls on distinct weight copies, L2 flushed "
                                f"before each run, per call; x{self.repeats}",
                      "mode": f"{mode} (the dense model ran fastest as {modes['model']})",
                      "masks": "block_mask on each layer's weights; same-shape layers share "
                               "cached times",
                      "cache": str(self.cache_path), "cache_hits": hits,
                      "measured": len(jobs) - hits}
        return times, latencies["model"].median_ms, provenance

    def _layer_calls(self, module: nn.Module, layer: LayerInfo, option: SparsityOption,
                     rows: int, input_shape: tuple[int, ...] | None
                     ) -> list[Callable[[], torch.Tensor]]:
        """The layer's call as deployed on each of `_copies` copies of its weights, all on
        one random input of the call's real shape (`rows` x K, or a conv's `input_shape`;
        never zeros)."""
        copies = range(self._copies(module.weight))
        if layer.kind == "conv2d":
            x = torch.randn(input_shape, device=self.device, dtype=self.torch_dtype)
            if option.pattern == "dense":
                convs = [copy.deepcopy(module) for _ in copies]
            else:                           # as deployed: channels as a BSR GEMM
                mask = block_mask(module.weight.detach(), option.block, option.sparsity)
                convs = [BlockSparseConv1x1.from_conv(module, mask=mask,
                                                      block=kernel_block(option.block))
                         for _ in copies]
            return [functools.partial(conv, x) for conv in convs]
        x = torch.randn(rows, layer.k, device=self.device, dtype=self.torch_dtype)    # [M, K]
        weight = module.weight.detach()                                               # [N, K]
        bias = None if module.bias is None else module.bias.detach()
        if option.pattern == "dense":
            return [functools.partial(F.linear, x, weight.clone(), bias) for _ in copies]
        if option == SEMI_STRUCTURED:       # as deployed: PyTorch's semi-structured tensor
            linears = [SemiStructuredLinear.from_linear(module) for _ in copies]
        else:                               # as deployed: the torch op, autotuned kernel
            mask = block_mask(weight, option.block, option.sparsity)
            linears = [BlockSparseLinear.from_linear(module, mask=mask,
                                                     block=kernel_block(option.block))
                       for _ in copies]
        return [functools.partial(linear, x) for linear in linears]

    def _copies(self, weight: torch.Tensor) -> int:
        """How many weight copies a timed run rotates over (one off the GPU)."""
        if self.device.type != "cuda":
            return 1
        size = weight.numel() * weight.element_size()
        return max(1, min(MAX_COPIES, COPIES_BYTES // max(size, 1)))

    def _per_call_ms(self, calls: list[Callable[[], torch.Tensor]],
                     graphed: bool) -> tuple[float, float]:
        """(median, spread) per call of running `calls` in turn, replayed from a CUDA graph
        when `graphed` and the calls can be captured."""
        def run() -> torch.Tensor:
            for call in calls:
                out = call()
            return out

        with torch.inference_mode():
            fn = (graphed and capture_cuda_graph(run)) or run
            if graphed and fn is run:
                log.warning("a layer option could not be captured in a CUDA graph and is "
                            "timed eagerly, host overhead included; a model using it runs "
                            "eagerly too (see the log line above for why)")
            median, spread = self._bench_ms(fn)
        return median / len(calls), spread / len(calls)

    def _bench_ms(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(median, max - min) over `repeats` do_bench medians (each flushes L2 per run)."""
        with torch.inference_mode():
            samples = [self._bench_once(fn) for _ in range(self.repeats)]
        return statistics.median(samples), max(samples) - min(samples)

    def _bench_once(self, fn: Callable[[], Any]) -> float:
        from triton.testing import do_bench

        return do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median")

    def _interleaved(self, models: Mapping[str, nn.Module],
                     inputs: Any) -> tuple[dict[str, Latency], dict[str, str]]:
        """`repeats` rounds, each one do_bench per (model, mode), in turn: each model's
        latency in its fastest mode, and that mode's name."""
        with torch.inference_mode():
            runs = {name: self._modes(model, inputs) for name, model in models.items()}
            samples: dict[tuple[str, str], list[float]] = {
                (name, mode): [] for name, modes in runs.items() for mode in modes}
            for _ in range(self.repeats):
                for name, modes in runs.items():
                    for mode, fn in modes.items():
                        samples[(name, mode)].append(self._bench_once(fn))
        results, fastest = {}, {}
        for name, modes in runs.items():
            by_mode = {mode: samples[(name, mode)] for mode in modes}
            medians = {mode: statistics.median(times) for mode, times in by_mode.items()}
            best = fastest[name] = min(medians, key=medians.__getitem__)
            log.info("%s end to end: %s", name,
                     ", ".join(f"{m} {t:.4f} ms" for m, t in medians.items()))
            results[name] = Latency(median_ms=medians[best],
                                    spread_ms=max(by_mode[best]) - min(by_mode[best]),
                                    engine_ms=tuple(medians.values()))
        return results, fastest

    def _modes(self, model: nn.Module, inputs: Any) -> dict[str, Callable[[], Any]]:
        """The ways to run `model`: eagerly (compiled with --compile: torch.compile fuses the
        non-GEMM ops; the kernel stays one op), and replaying a CUDA graph of that where
        capture works."""
        runnable = model

        def eager() -> Any:
            return call_model(runnable, inputs)

        eager()             # uncompiled first: autotuning and lazy state (2:4 copies)
        if self.compile:
            runnable = torch.compile(model, dynamic=False)
        with _room_to_recompile():
            for _ in range(2):  # compilation and the rest of the warm-up
                eager()
        name = "compiled" if self.compile else "eager"
        modes = {name: eager}
        if self.device.type == "cuda" and (replay := capture_cuda_graph(eager)) is not None:
            modes[f"{name}+{GRAPHED}"] = replay
        return modes

    def _to_device(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).to(device=self.device, dtype=self.torch_dtype).eval()

    def _inputs_to_device(self, example: Any) -> Any:
        return inputs_to(example, self.device, self.torch_dtype)

    def _has_device(self) -> bool:
        return torch.cuda.is_available()

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def _software(self) -> dict[str, str]:
        import triton

        software = {"torch": torch.__version__, "triton": triton.__version__,
                    "cuda": str(torch.version.cuda), "spdy-gpu": package_version()}
        if self.compile:        # a compiled model's fixed time differs: never mix the tables
            software["execution"] = "torch.compile"
        return software


def _room_to_recompile() -> Any:
    """torch.compile runs a forward eagerly, with only a warning, once it has compiled it
    `recompile_limit` (8) times; one process times a model per profile (guarantee rounds,
    `compare`), each a new compilation of the same forward, so the limit is lifted while a
    model compiles (its first calls)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: 1024})


def _pointwise(layer: LayerInfo) -> bool:
    """A 1x1 conv without groups (BlockSparseConv1x1 runs it)."""
    return layer.kind == "conv2d" and layer.weight_shape[2:] == (1, 1) and layer.groups == 1


def _check_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise MissingDependencyError("triton", "gpu") from None


def _capture_input_shapes(model: nn.Module, inputs: Any,
                          names: list[str]) -> dict[str, list[tuple[int, ...]]]:
    """Input shape of each call of each named module in one forward, in call order (convs
    need more than N, K, M)."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    if not names:
        return shapes

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            shapes.setdefault(name, []).append(tuple(args[0].shape))
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    with hooks_attached(handles), torch.inference_mode():
        call_model(model, inputs)
    return shapes


def _conv_geometry(module: nn.Conv2d, input_shape: tuple[int, ...]) -> str:
    def dims(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))

    return (f"|conv in={dims(input_shape)} w={dims(tuple(module.weight.shape))} "
            f"s={module.stride} p={module.padding} d={module.dilation} g={module.groups}")


def package_version() -> str:
    from .. import __version__

    return __version__
