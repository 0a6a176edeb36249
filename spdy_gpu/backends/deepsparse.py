"""DeepSparse (CPU) latency backend.

Per-layer times come from DeepSparse's analysis API (`model_debug_analysis`) at
optimization level 0, where every Linear/Conv is one engine layer whose structure does not
change with sparsity (at level 1, layers fuse into groups whose membership does). Engine
layers are named by the ONNX output tensors they compute; `spdy_gpu.onnx_export` maps those
back to torch module names. Sparsity is either imposed by the engine (`imposed_ks`, the
default: one export serves every level) or real magnitude-pruned weights written into a
copy of the ONNX file (`sparsity_source="weights"`); on MiniLM b1 the per-level sums of
layer times agree within -1.7..+6.0% (median layer difference 1.3-6.6%, 5 repeats;
bench/results/deepsparse-imposed-vs-weights-minilm-b1.md), so the default is imposed.

By default a table takes `repeats` (3) calls per option in interleaved passes and keeps
their median. `repeats=0` selects an adaptive protocol (two calls per level, more only
where they disagree or a level lies off the smooth trend of its neighbours): about 2.3x
faster, but on minilm b1 it misread runs of consecutive levels by 27-125% in each of three
runs (bench/results/deepsparse-table-speed-minilm-b1*.md), so it is not the default.

Whole-model time is measured at the default optimization level, as deployed, on freshly
compiled engines timed in interleaved rounds; an engine that settled in DeepSparse's slow
state is left out. Fixed time is the median, over the dense model and a few uniformly
magnitude-pruned copies, of end-to-end time minus the sum of the layer times: level-0
layer times leave out the elementwise work that level 1 fuses into the layers, so "dense
minus dense layers" alone overstates it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..errors import MissingDependencyError, SpdyError, check_types
from ..jsonio import atomic_write_bytes
from ..layers import LayerInfo, prunable_modules
from ..locks import scratch_directory
from ..onnx_export import (
    OnnxExport,
    example_arrays,
    export_onnx,
    input_names_of,
    map_layers,
    prune_onnx,
    require_onnx,
)
from ..options import SparsityOption
from ..timing import Fingerprint, LayerTiming, TimingTable
from . import CliOption, Latency, example_shape, measuring_inputs, register_backend

log = logging.getLogger(__name__)

TOTAL = "__total__"          # key of the analysis total in a sample
CALIBRATION_LEVELS = (0.5, 0.8, 0.95)   # uniform levels whose end-to-end times fix fixed_ms
FIXED_CALLS = 3              # adaptive protocol: calls for dense and options without a trend
LEVEL_CALLS = 2              # adaptive protocol: calls per level, one full pass apart
ADAPTIVE_PASSES = 3          # adaptive protocol: rounds of re-measuring


def _deepsparse():
    try:
        import os
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")     # no network here
        import deepsparse
    except ImportError:
        raise MissingDependencyError("deepsparse", "deepsparse") from None
    return deepsparse


def cpu_name() -> str:
    """The CPU model as the kernel reports it (falls back to DeepSparse's vendor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    arch = _deepsparse().cpu.cpu_architecture()
    return f"{arch.vendor} {arch.vendor_model}"


@register_backend("deepsparse")
class DeepSparseBackend:
    """Times models with Neural Magic's DeepSparse engine on this CPU.

    threads: cores the engine uses (None: all available). repeats: analysis calls per
    option, made in interleaved passes (the table keeps the median and the max - min
    spread), and end-to-end rounds per engine; 0: the adaptive protocol (see
    _adaptive_calls) and 3 rounds, faster but unreliable on this machine kind (README).
    iterations / warmup:
    timed and untimed runs inside each call. sparsity_source: "imposed" (engine imposes
    the kernel sparsity) or "weights" (magnitude-pruned weights in the ONNX file).
    tolerance: a call slower than the fastest of its option by more than this fraction
    was disturbed by other work on the machine and is measured again. engines: separately
    compiled engines an end-to-end latency is measured on.
    """

    name = "deepsparse"
    summary = "CPU, DeepSparse engine; default grid: 41 unstructured levels"
    default_pattern = "unstructured"
    estimated = False
    cli_options = (
        CliOption("--threads", "cores to use (default: all available)", int),
        CliOption("--repeats", "analysis calls per option in interleaved passes and "
                               "end-to-end rounds per engine; the table keeps median and "
                               "spread (default 3; 0: the adaptive protocol, 2 calls per "
                               "level, about 2.3x faster but it misread runs of levels by "
                               "27-125%% in 3 of 3 runs here)", int),
    )

    def __init__(self, threads: int | None = None, repeats: int = 3,
                 iterations: int = 20,
                 warmup: int = 5, sparsity_source: str = "imposed",
                 optimization_level: int = 0, tolerance: float = 0.15,
                 engines: int = 3) -> None:
        check_types({"--threads": (threads, (int, type(None))), "--repeats": (repeats, int),
                     "iterations": (iterations, int), "warmup": (warmup, int),
                     "engines": (engines, int), "tolerance": (tolerance, float)})
        self.ds = _deepsparse()
        require_onnx()
        available = int(self.ds.cpu.cpu_architecture().num_available_physical_cores)
        if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool)
                                        and 1 <= threads <= available):
            raise SpdyError(f"--threads {threads} is not possible here: this machine has "
                            f"{available} available cores; pass 1..{available}")
        if repeats < 0 or min(repeats or 1, iterations, engines) < 1 or warmup < 0:
            raise SpdyError(f"--repeats {repeats} is not possible: repeats must be >= 1 (or 0, "
                            "the adaptive protocol), iterations and engines >= 1, warmup >= 0")
        if sparsity_source not in ("imposed", "weights"):
            raise SpdyError(f"unknown sparsity source {sparsity_source!r}; "
                            "use 'imposed' or 'weights'")
        self.threads = threads or available
        self.repeats = repeats or None          # None: the adaptive protocol
        self.iterations, self.warmup = iterations, warmup
        self.sparsity_source = sparsity_source
        self.optimization_level = optimization_level
        self.tolerance = tolerance
        self.engines = engines
        self.rounds = repeats or 3      # end-to-end timing rounds per engine

    # --- the LatencyBackend protocol -------------------------------------------------------

    def fingerprint(self, example: Any) -> Fingerprint:
        import torch
        arch = self.ds.cpu.cpu_architecture()
        isa = str(arch.isa) + ("_vnni" if getattr(arch, "vnni", False) else "")
        batch_size, input_shape = example_shape(example)
        return Fingerprint(backend=self.name, backend_version=self.ds.__version__,
                           device=cpu_name(), isa=isa, threads=self.threads,
                           batch_size=batch_size, input_shape=input_shape, dtype="float32",
                           software={"deepsparse": self.ds.__version__,
                                     "onnx": require_onnx().__version__,
                                     "torch": torch.__version__.split("+")[0]})

    def export(self, model: nn.Module, example: Any, profile: Any, out_dir: Path) -> Path:
        """The pruned model as ONNX (opset 14), which DeepSparse runs at the measured speed."""
        from ..deploy import export_onnx_pruned
        return export_onnx_pruned(model, example, Path(out_dir) / "model.onnx")

    def supports(self, layer: LayerInfo, option: SparsityOption) -> bool:
        """Dense always; unstructured sparsity on Linear and ungrouped Conv2d (DeepSparse's
        sparse kernels need no structure; it has none for grouped/depthwise convs)."""
        if option.pattern == "dense":
            return True
        return option.pattern == "unstructured" and not layer.depthwise_or_grouped

    def measure_table(self, model: nn.Module, example: Any, layers: list[LayerInfo],
                      options: list[SparsityOption], *, model_name: str,
                      checkpoint: Path | None = None, progress: bool = True) -> TimingTable:
        """Per-layer median times for every option, dense end-to-end time and fixed time.

        Analysis calls per option follow `repeats` (see _repeated_calls) or, by default,
        the adaptive protocol (see _adaptive_calls); then one interleaved end-to-end run
        times the dense model and the calibration levels of the fixed time. With
        `checkpoint`, every finished analysis call is saved there and a rerun with the same
        setting resumes after it."""
        layers, options = measuring_inputs(model, layers, options)
        fingerprint = self.fingerprint(example)
        batch = fingerprint.batch_size
        names = [layer.name for layer in layers]
        store = _Checkpoint(checkpoint, self._checkpoint_key(fingerprint, options, layers,
                                                             model_name))
        started = time.perf_counter()
        with scratch_directory("spdy-deepsparse-") as tmp:
            export = self._export(model, example, layers, Path(tmp) / "model.onnx")
            inputs = export.inputs_numpy(example)
            self._check_compiles(export.path, inputs, batch)
            to_module = export.module_of_output()
            runnable = [o for o in options if any(self.supports(layer, o) for layer in layers)]
            with tqdm(total=store.done, initial=store.done, unit="call",
                      desc=f"deepsparse {model_name} b{batch}", disable=not progress) as bar:
                def measure(option: SparsityOption) -> dict[str, float]:
                    path = self._model_for(export, option, names, Path(tmp))
                    sample = self.analyse(path, inputs, batch, option, to_module)
                    bar.update()
                    return sample

                if self.repeats is None:
                    self._adaptive_calls(store, runnable, names, measure, bar)
                else:
                    self._repeated_calls(store, runnable, measure, bar)
            picks = calibration_levels(runnable)
            paths = {"dense": export.path} | {
                o.name: prune_onnx(export, dict.fromkeys(names, o), Path(tmp) / f"cal{i}.onnx")
                for i, o in enumerate(picks)}
            # Default: fixed time is a median over the levels, so one engine each suffices.
            engines = {n: self.engines if n == "dense" or self.repeats else 1 for n in paths}
            measured = self._interleaved(paths, inputs, batch, engines)
        try:
            table = self._table(store, layers, options, fingerprint, model_name,
                                measured["dense"])
            over_whole, slowest = _checked_layer_sum(table)
        except SpdyError:
            store.discard()             # a rerun measures afresh rather than resume this
            raise
        calibration = fixed_calibration(table, {n: m.median_ms for n, m in measured.items()})
        fixed = statistics.median(c["residual_ms"] for c in calibration)
        if fixed < 0 or over_whole > SUSPECT_LAYERS_OVER_WHOLE:
            log.warning("the prunable layers alone take %.2fx the measured model (median "
                        "residual %.3f ms; slowest layer %s dense)%s. A layer time is likely "
                        "an outlier, and predictions from this table will be off: measure "
                        "again with nothing else running, with more --repeats or without it "
                        "(the adaptive protocol re-measures outliers)", over_whole, fixed,
                        slowest, "; fixed time clamped to 0" if fixed < 0 else "")
        provenance = dict(table.provenance, fixed_calibration=calibration,
                          calibration_engines=engines,
                          collection_s=round(time.perf_counter() - started, 1)
                          + store.previous_seconds)
        # The checkpoint stays until the caller has saved the table (TimingTable.save).
        return dataclasses.replace(table, fixed_ms=max(fixed, 0.0), provenance=provenance)

    def _checkpoint_key(self, fingerprint: Fingerprint, options: list[SparsityOption],
                        layers: list[LayerInfo], model_name: str) -> dict[str, Any]:
        """Everything a stored analysis call depends on: a rerun resumes only when all of it
        is the same (a changed layer shape, grid or protocol starts afresh)."""
        return {"model": model_name, "fingerprint": dataclasses.asdict(fingerprint),
                "options": [o.name for o in options],
                "layers": [[x.name, list(x.weight_shape), x.groups, x.m] for x in layers],
                "protocol": {"repeats": self.repeats, "iterations": self.iterations,
                             "warmup": self.warmup, "sparsity_source": self.sparsity_source,
                             "optimization_level": self.optimization_level}}

    def _repeated_calls(self, store: _Checkpoint, options: list[SparsityOption],
                        measure: Callable[[SparsityOption], dict[str, float]],
                        bar: tqdm) -> None:
        """`repeats` calls per option, interleaved over options (slow drift of the machine
        hits every option alike). Other processes on a shared CPU only ever slow a call
        down, so a call whose total exceeds the fastest of its option by more than
        `tolerance` is re-measured (the worst one per option per pass, at most `repeats`
        passes)."""
        _run_calls(store, [(r, o) for r in range(self.repeats) for o in options], measure, bar)
        for _ in range(self.repeats):
            if not self._rerun_disturbed(store, options, measure, bar):
                break
        self._warn_noisy(store, options)

    def _adaptive_calls(self, store: _Checkpoint, options: list[SparsityOption],
                        names: list[str], measure: Callable[[SparsityOption], dict[str, float]],
                        bar: tqdm) -> None:
        """The default protocol: LEVEL_CALLS calls per sparsity level, made in passes over
        all options, so a level's calls lie a whole pass apart in time. DeepSparse sometimes
        runs 30-90% slower for a stretch of consecutive calls (measured on minilm b1: about
        20 levels in a row), which a single pass cannot tell from the trend; two passes see
        it as calls that disagree.

        Dense (the reference of every speedup) and options outside a chain of at least 3
        levels get FIXED_CALLS calls. Then, for at most ADAPTIVE_PASSES passes: an option
        whose calls disagree by more than `tolerance` has its slowest call re-measured, and
        a level still off the trend of its neighbours (see off_trend) gets one more call (its
        median is then robust to one disturbed call).

        Measured on minilm b1 (bench/results/deepsparse-table-speed-minilm-b1-*.md): even
        so, 8 consecutive levels ran 27-41% slow in both passes (a backwards second pass was
        worse), so this protocol is not the default."""
        chain = sorted((o for o in options if o.pattern == "unstructured"),
                       key=lambda o: o.sparsity)
        chain = chain if len(chain) >= 3 else []
        first = [(r, o) for r in range(FIXED_CALLS) for o in options
                 if r < LEVEL_CALLS or o not in chain]
        _run_calls(store, first, measure, bar)
        for _ in range(ADAPTIVE_PASSES):
            disturbed = self._rerun_disturbed(store, options, measure, bar)
            times = [np.array([statistics.median(store.values(o, n)) for n in names])
                     for o in chain]
            trend = off_trend([o.density for o in chain], times, self.tolerance) if chain else []
            suspects = [chain[i] for i in trend if store.calls(chain[i]) == LEVEL_CALLS]
            if suspects:
                log.info("%d levels off the trend of their neighbours: one more call each",
                         len(suspects))
            _run_calls(store, [(LEVEL_CALLS, o) for o in suspects], measure, bar)
            if not disturbed and not suspects:
                break
        self._warn_noisy(store, options)

    def _rerun_disturbed(self, store: _Checkpoint, options: list[SparsityOption],
                         measure: Callable[[SparsityOption], dict[str, float]],
                         bar: tqdm) -> bool:
        """Re-measure the slowest call of every option whose calls disagree by more than
        `tolerance`; whether there was any."""
        worst = [(o, slot) for o in options
                 if (slot := store.outlier(o, self.tolerance)) is not None]
        if worst:
            log.info("re-measuring %d disturbed calls", len(worst))
            bar.total += len(worst)
            bar.refresh()
        for option, slot in worst:
            store.put(slot, measure(option))
        return bool(worst)

    def _warn_noisy(self, store: _Checkpoint, options: list[SparsityOption]) -> None:
        noisy = [o.name for o in options if store.outlier(o, self.tolerance) is not None]
        if noisy:
            log.warning("%d options (%s...) still vary by more than %.0f%% after re-measuring: "
                        "the machine is busy or the model too small to time well; the "
                        "medians are kept", len(noisy), noisy[0], 100 * self.tolerance)

    def latency(self, models: Mapping[str, nn.Module], example: Any) -> dict[str, Latency]:
        """End-to-end latency of each model with its current weights (a pruned model: its
        zeros are exported and the engine picks sparse kernels), every model exported once
        and timed on `engines` fresh engines, all rounds interleaved (see _interleaved)."""
        if not models:
            raise SpdyError("no models to time; pass at least one")
        batch, _ = example_shape(example)
        inputs = example_arrays(example, input_names_of(example))
        with scratch_directory("spdy-deepsparse-") as tmp:
            paths = {}
            for i, (name, model) in enumerate(models.items()):
                paths[name] = Path(tmp) / f"model-{i}.onnx"
                _export_quiet(model, example, paths[name])
            return self._interleaved(paths, inputs, batch)

    # --- measurement ----------------------------------------------------------------------

    def analyse(self, path: Path, inputs: list[np.ndarray], batch_size: int,
                option: SparsityOption, to_module: dict[str, str]) -> dict[str, float]:
        """One analysis call: module name -> average ms, plus TOTAL (sum of all layers)."""
        imposed = (option.sparsity if option.pattern == "unstructured"
                   and self.sparsity_source == "imposed" else None)
        with _quiet_fd():
            result = self.ds.model_debug_analysis(
                str(path), inputs, batch_size=batch_size, num_cores=self.threads,
                num_iterations=self.iterations, num_warmup_iterations=self.warmup,
                optimization_level=self.optimization_level, imposed_ks=imposed,
                input_shapes=[list(a.shape) for a in inputs])
        return attribute_layers(result["layer_info"], to_module)

    def _interleaved(self, paths: Mapping[str, Path], inputs: list[np.ndarray], batch: int,
                     engines: Mapping[str, int] | None = None) -> dict[str, Latency]:
        """`engines` freshly compiled engines per ONNX file (per name where a mapping is
        given), timed in rounds that go round robin over every engine of every model, so
        slow drift of the machine hits all alike.

        One engine can settle 25-35% slower than another compiled from the same file
        (MiniLM b1 on this 2-core VM: 15.9 or 19.6 ms, each stable across rounds), so per
        model the fastest engine is its settled speed and slower ones are left out (see
        settled_latency). A round is the median of `iterations` runs after `warmup` untimed
        ones; a round slower than its engine's fastest by more than `tolerance` was
        disturbed by other work and is run again (the worst per engine, at most `rounds`
        passes)."""
        owners, compiled = [], []
        for name, path in paths.items():
            for _ in range(self.engines if engines is None else engines[name]):
                owners.append(name)
                compiled.append(self._compile(path, inputs, batch))
        for engine in compiled:
            for _ in range(max(self.warmup, 3)):
                engine.run(inputs)
        rounds: list[list[float]] = [[] for _ in compiled]
        for _ in range(self.rounds):
            for i, engine in enumerate(compiled):
                rounds[i].append(self._round(engine, inputs))
        for _ in range(self.rounds):
            disturbed = [i for i, r in enumerate(rounds) if max(r) > (1 + self.tolerance) * min(r)]
            if not disturbed:
                break
            for i in disturbed:
                slowest = max(range(len(rounds[i])), key=rounds[i].__getitem__)
                rounds[i][slowest] = self._round(compiled[i], inputs)
        results = {name: settled_latency([r for r, o in zip(rounds, owners) if o == name],
                                         self.tolerance) for name in paths}
        for name, result in results.items():
            log.debug("%s end to end: %s ms per engine, %d slow", name, result.engine_ms,
                      result.slow_engines)
        return results

    def _check_compiles(self, path: Path, inputs: list[np.ndarray], batch: int) -> None:
        """Compile `path` once in a forked child first: on some shapes (e.g. a 384 -> 4100
        Linear) DeepSparse fails an internal assertion and ends the whole process with
        status 1 and no Python exception, which would end spdy-gpu without a word."""
        if not hasattr(os, "fork"):
            return
        log_path = path.with_suffix(".compile.log")
        pid = os.fork()
        if pid == 0:                                     # the child: compile, report, exit
            code = 3
            try:
                out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
                self.ds.compile_model(str(path), batch_size=batch, num_cores=self.threads,
                                      input_shapes=[list(a.shape) for a in inputs])
                code = 0
            finally:
                os._exit(code)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if status != 0:
            said = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
                    if line.strip()]
            telling = [line for line in said if "assert" in line.lower() or "error" in line.lower()]
            why = (telling or said or ["no message"])[0][:200]
            raise SpdyError(f"DeepSparse crashed compiling this model (exit status {status}: "
                            f"{why}); --exclude the layers it cannot compile, change their "
                            "shapes, or use --backend triton")

    def _compile(self, path: Path, inputs: list[np.ndarray], batch: int) -> Any:
        with _quiet_fd():
            return self.ds.compile_model(str(path), batch_size=batch, num_cores=self.threads,
                                         input_shapes=[list(a.shape) for a in inputs])

    def _round(self, engine: Any, inputs: list[np.ndarray]) -> float:
        """Median of `iterations` timed runs, in ms."""
        times = []
        for _ in range(self.iterations):
            start = time.perf_counter()
            engine.run(inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def _export(self, model: nn.Module, example: Any, layers: list[LayerInfo],
                path: Path) -> OnnxExport:
        export = export_onnx(model, example, path, exclude=["*"], dynamic=True)
        wanted = {layer.name for layer in layers}
        modules = {n: m for n, m in prunable_modules(model).items() if n in wanted}
        missing = wanted - set(modules)
        if missing:
            raise SpdyError(f"layer {sorted(missing)[0]} is not a Linear/Conv2d of this model; "
                            "the layer list belongs to another model")
        mapped = map_layers(require_onnx().load(str(path)), modules)
        return OnnxExport(path=export.path, input_names=export.input_names, layers=mapped)

    def _model_for(self, export: OnnxExport, option: SparsityOption, names: list[str],
                   tmp: Path) -> Path:
        """The ONNX file to analyse for `option`: the dense export (imposed sparsity or
        dense), or a copy whose layers carry magnitude-pruned weights."""
        if self.sparsity_source == "imposed" or option.pattern == "dense":
            return export.path
        path = tmp / f"pruned-{option.name.replace('@', '_')}.onnx"
        if not path.exists():
            prune_onnx(export, dict.fromkeys(names, option), path)
        return path

    def _table(self, store: _Checkpoint, layers: list[LayerInfo],
               options: list[SparsityOption], fingerprint: Fingerprint, model_name: str,
               dense: Latency) -> TimingTable:
        rows = []
        for layer in layers:
            unattributed = not layer.depthwise_or_grouped and not any(   # 0 at every option
                value for option in options for value in store.values(option, layer.name))
            medians, spreads = [], []
            for option in options:
                values = (store.values(option, layer.name) if self.supports(layer, option)
                          and (option == options[0] or not unattributed) else [])
                medians.append(statistics.median(values) if values else None)
                spreads.append(max(values) - min(values) if values else None)
            note = UNATTRIBUTED_NOTE if unattributed else _speed_note(layer, options, medians)
            if unattributed:
                log.warning("%s: %s", layer.name, UNATTRIBUTED_NOTE)
            rows.append(LayerTiming(name=layer.name, kind=layer.kind,
                                    gemm=(layer.n, layer.k, layer.m or 0),
                                    median_ms=tuple(medians), spread_ms=tuple(spreads),
                                    note=note))
        layer_dense = sum(row.median_ms[0] for row in rows)
        analysis_dense = statistics.median(store.values(options[0], TOTAL))
        protocol = (f"{self.repeats} calls per option" if self.repeats else
                    f"adaptive: {LEVEL_CALLS} calls per level a pass apart ({FIXED_CALLS} for "
                    "dense), disturbed calls re-measured, 1 more for a level off its "
                    "neighbours' trend")
        return TimingTable(      # fixed_ms is set by measure_table after calibration
            fingerprint=fingerprint, options=tuple(options), layers=tuple(rows),
            dense_total_ms=dense.median_ms, fixed_ms=max(dense.median_ms - layer_dense, 0.0),
            model=model_name,
            provenance={"source": f"deepsparse.model_debug_analysis "
                                  f"optimization_level={self.optimization_level}, "
                                  f"sparsity={self.sparsity_source}",
                        "protocol": protocol, "repeats": self.repeats,
                        "calls_per_option": {o.name: store.calls(o) for o in options
                                             if store.calls(o)},
                        "layer_sums_per_call_ms": {
                            o.name: [math.fsum(s[x.name] for x in layers if self.supports(x, o))
                                     for s in store.samples_of(o)]
                            for o in options if store.calls(o)},
                        "iterations": self.iterations,
                        "warmup": self.warmup, "tolerance": self.tolerance,
                        "engines": self.engines, "rounds": self.rounds,
                        "dense_spread_ms": dense.spread_ms,
                        "dense_ms_per_engine": list(dense.engine_ms),
                        "dense_slow_engines": dense.slow_engines,
                        "analysis_dense_total_ms": analysis_dense,
                        "prunable_dense_ms": layer_dense})


UNATTRIBUTED_NOTE = ("DeepSparse runs it in no engine layer of its own (fused or in a subgraph "
                     "it hands elsewhere): stays dense, its time is in the fixed time")


def _speed_note(layer: LayerInfo, options: list[SparsityOption],
                medians: list[float | None]) -> str:
    """Says where pruning this layer does not pay on DeepSparse (the DP then keeps it dense
    or picks a faster level): no sparse kernel, or sparse slower than dense."""
    if layer.depthwise_or_grouped:
        return "grouped/depthwise conv: DeepSparse has no sparse kernel for it; stays dense"
    dense = medians[0]
    sparse = [(o, ms) for o, ms in zip(options[1:], medians[1:]) if ms is not None]
    slower = [o for o, ms in sparse if dense is not None and ms > dense]
    if not slower:
        return ""
    if len(slower) == len(sparse):
        return "sparse slower than dense at every level: the DP keeps it dense"
    worst = max(o.sparsity for o in slower)
    return (f"sparse slower than dense at {len(slower)} of {len(sparse)} levels "
            f"(up to {worst:.0%} sparsity)")


def calibration_levels(options: list[SparsityOption]) -> list[SparsityOption]:
    """The unstructured levels nearest CALIBRATION_LEVELS, by sparsity."""
    levels = [o for o in options if o.pattern == "unstructured"]
    if not levels:                 # a dense-only table: the fixed time comes from dense alone
        return []
    picks = {min(levels, key=lambda o: abs(o.sparsity - s)) for s in CALIBRATION_LEVELS}
    return sorted(picks, key=lambda o: o.sparsity)


def fixed_calibration(table: TimingTable, measured: dict[str, float]) -> list[dict[str, Any]]:
    """Per end-to-end measured model (option name -> ms: dense and uniformly pruned levels)
    the residual end to end minus the sum of its layer times. The per-layer times come from
    level-0 analysis while deployment runs level 1, which fuses the non-prunable ops into
    the layers, so 'dense end to end minus dense layers' alone misstates the fixed time; the
    median residual over dense and the levels is the table's fixed time."""
    times = table.times()
    index = {o.name: i for i, o in enumerate(table.options)}
    rows = []
    for name, ms in measured.items():
        column = times[:, index[name]]
        layers_ms = float(np.where(np.isfinite(column), column, times[:, 0]).sum())
        rows.append({"option": name, "measured_ms": ms, "layers_ms": layers_ms,
                     "residual_ms": ms - layers_ms})
    return rows


def off_trend(densities: list[float], times: list[np.ndarray], tolerance: float) -> list[int]:
    """Indices of the levels (sorted by sparsity) whose times lie above the smooth trend of
    their neighbours: the summed time by more than `tolerance`, or more than a quarter of
    the layers by more than twice that.

    Times fall smoothly along the grid, which is geometric in density, so the trend at a
    level is read in log time over log density from its 4 nearest levels: the median of the
    lines through each pair of them. Levels found off trend in a first look are left out
    of the others' neighbours in a second, so one disturbed level does not cast doubt on the
    levels next to it. Only slower counts: other work on the machine only ever slows a call
    down. A real step (e.g. where DeepSparse switches to sparse kernels) is flagged too;
    its extra calls then agree, so it is kept as measured."""
    x = np.log(np.asarray(densities))
    logs = np.log(np.maximum(np.stack(times), 1e-9))                      # [levels, layers]
    logs = np.column_stack([np.log(np.exp(logs).sum(axis=1)), logs])      # 0: the total
    return _above_trend(x, logs, tolerance, _above_trend(x, logs, tolerance, []))


def _above_trend(x: np.ndarray, logs: np.ndarray, tolerance: float,
                 skip: list[int]) -> list[int]:
    flagged = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i and j not in skip]
        if len(others) < 2:                 # too few left to draw a line: use them all
            others = [j for j in range(len(x)) if j != i]
        near = sorted(others, key=lambda j: (abs(j - i), j))[:4]
        trend = np.median([logs[a] + (x[i] - x[a]) / (x[b] - x[a]) * (logs[b] - logs[a])
                           for a, b in itertools.combinations(near, 2)], axis=0)
        excess = np.exp(logs[i] - trend) - 1
        if excess[0] > tolerance or np.mean(excess[1:] > 2 * tolerance) > 0.25:
            flagged.append(i)
    return flagged


def _run_calls(store: _Checkpoint, jobs: list[tuple[int, SparsityOption]],
               measure: Callable[[SparsityOption], dict[str, float]], bar: tqdm) -> None:
    """Analysis call `repeat` of each option, in the order given; those done are skipped."""
    jobs = [(r, o) for r, o in jobs if not store.has(r, o)]
    bar.total += len(jobs)
    bar.refresh()
    for repeat, option in jobs:
        store.add(repeat, option, measure(option))


def attribute_layers(layer_info: list[dict[str, Any]],
                     to_module: dict[str, str]) -> dict[str, float]:
    """Per-module time from DeepSparse's layer_info, plus TOTAL over all engine layers.

    An engine layer's canonical_name lists (comma-joined) the ONNX tensors it computes; a
    layer holding one mapped tensor is that module's time. A module computed in no engine
    layer of its own (fused into a neighbour, or in a subgraph DeepSparse hands elsewhere,
    e.g. a grouped or dilated conv) gets 0: its time is in the other layers', so in the fixed
    time (see UNATTRIBUTED_NOTE). Raises SpdyError when an engine layer fuses two modules
    (use optimization level 0) or no module ran in an engine layer of its own.
    """
    sample: dict[str, float] = {TOTAL: 0.0}
    for info in layer_info:
        ms = float(info["average_run_time_in_ms"])
        sample[TOTAL] += ms
        modules = {to_module[t] for t in str(info.get("canonical_name", "")).split(",")
                   if t in to_module}
        if len(modules) > 1:
            raise SpdyError(f"DeepSparse fused layers {sorted(modules)} into one engine layer; "
                            "per-layer times need optimization level 0")
        if modules:
            (module,) = modules
            sample[module] = sample.get(module, 0.0) + ms
    modules = set(to_module.values())
    if not modules & set(sample):
        raise SpdyError(f"DeepSparse ran no engine layer for any prunable layer (e.g. "
                        f"{min(modules)}): the export is likely in an unsupported subgraph; "
                        "export with opset 14 and eager attention, or use another backend")
    return sample | {module: 0.0 for module in modules - set(sample)}


def settled_latency(engine_rounds: list[list[float]], tolerance: float) -> Latency:
    """One model's latency from the rounds of its engines: the engine with the lowest median
    is the model's settled speed; engines slower than it by more than `tolerance` settled in
    DeepSparse's slow state and are left out (counted in slow_engines); the median and spread
    are over the rounds of the engines kept."""
    medians = [statistics.median(r) for r in engine_rounds]
    fastest = min(medians)
    kept = [x for r, m in zip(engine_rounds, medians) if m <= (1 + tolerance) * fastest
            for x in r]
    slow = sum(m > (1 + tolerance) * fastest for m in medians)
    return Latency(median_ms=statistics.median(kept), spread_ms=max(kept) - min(kept),
                   engine_ms=tuple(medians), slow_engines=slow)


def _export_quiet(model: nn.Module, example: Any, path: Path) -> None:
    """Export without mapping (end-to-end latency needs no layer names)."""
    export_onnx(model, example, path, exclude=["*"], dynamic=True)


@contextmanager
def _quiet_fd() -> Iterator[None]:
    """DeepSparse prints its banner and warnings from C++ to fd 1/2; keep them out of the
    progress bar (they go to the debug log)."""
    import os
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("deepsparse: %s", text)


# The dense layers' analysis times add up to 0.88-1.07x the end-to-end time on measured
# tables; past this the layer times hold outliers (a busy machine) and plan nothing real.
MAX_LAYERS_OVER_WHOLE = 10.0
SUSPECT_LAYERS_OVER_WHOLE = 1.5       # warned about


def _checked_layer_sum(table: TimingTable) -> tuple[float, str]:
    """(the dense layers' times added up over the measured model's, the slowest layer as
    'NAME at T ms'); past MAX_LAYERS_OVER_WHOLE the table is refused."""
    dense = table.dense_times()
    ratio = float(dense.sum()) / table.dense_total_ms
    slowest = f"{table.layer_names[int(dense.argmax())]} at {dense.max():.4g} ms"
    if ratio > MAX_LAYERS_OVER_WHOLE:
        raise SpdyError(f"the prunable layers' dense times add up to {ratio:.0f}x the measured "
                        f"model ({dense.sum():.4g} of {table.dense_total_ms:.4g} ms; slowest "
                        f"{slowest}): outliers, the machine was likely busy; measure again "
                        "with nothing else running (without --repeats the adaptive protocol "
                        "re-measures outliers)")
    return ratio, slowest


class _Checkpoint:
    """Analysis samples of an interrupted `measure_table`, in a JSON file next to the output.

    Resumes only a run of the same key (see DeepSparseBackend._checkpoint_key); anything
    else in the file is discarded with a warning naming what changed."""

    def __init__(self, path: Path | None, key: dict[str, Any]) -> None:
        self.path = path
        self.key = json.loads(json.dumps(key))          # as it reads back from the file
        self.samples: dict[str, dict[str, float]] = {}
        self.previous_seconds = 0.0
        self.started = time.perf_counter()
        if path is not None and path.exists():
            self._resume(path)

    def _resume(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
            stored = document["key"]
            changed = [name for name in self.key if stored.get(name) != self.key[name]]
            samples = {k: {n: float(v) for n, v in s.items()}
                       for k, s in document["samples"].items()}
            seconds = float(document.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is unreadable; starting the measurement afresh", path)
            return
        if changed:
            log.warning("%s was measured with other %s; starting afresh", path,
                        ", ".join(changed))
            return
        self.samples, self.previous_seconds = samples, seconds
        log.info("resuming from %s: %d analysis calls already done", path, len(self.samples))

    @property
    def done(self) -> int:
        return len(self.samples)

    @staticmethod
    def _slot(repeat: int, option: SparsityOption) -> str:
        return f"{repeat}:{option.name}"

    def has(self, repeat: int, option: SparsityOption) -> bool:
        return self._slot(repeat, option) in self.samples

    def add(self, repeat: int, option: SparsityOption, sample: dict[str, float]) -> None:
        self.put(self._slot(repeat, option), sample)

    def outlier(self, option: SparsityOption, tolerance: float) -> str | None:
        """The slot of the slowest call of `option` if it exceeds the fastest by more than
        `tolerance` (relative, on the analysis total), else None."""
        slots = {slot: sample[TOTAL] for slot, sample in self.samples.items()
                 if slot.split(":", 1)[1] == option.name}
        if len(slots) < 2:
            return None
        slowest = max(slots, key=slots.__getitem__)
        return slowest if slots[slowest] > (1 + tolerance) * min(slots.values()) else None

    def discard(self) -> None:
        """Forget the stored calls (a measurement the table refuses)."""
        self.samples = {}
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def put(self, slot: str, sample: dict[str, float]) -> None:
        self.samples[slot] = sample
        if self.path is not None:
            seconds = self.previous_seconds + time.perf_counter() - self.started
            atomic_write_bytes(self.path, json.dumps(
                {"key": self.key, "seconds": seconds, "samples": self.samples}).encode())

    def values(self, option: SparsityOption, name: str) -> list[float]:
        return [sample[name] for slot, sample in self.samples.items()
                if slot.split(":", 1)[1] == option.name and name in sample]

    def calls(self, option: SparsityOption) -> int:
        return len(self.samples_of(option))

    def samples_of(self, option: SparsityOption) -> list[dict[str, float]]:
        return [sample for slot, sample in sorted(self.samples.items())
                if slot.split(":", 1)[1] == option.name]
