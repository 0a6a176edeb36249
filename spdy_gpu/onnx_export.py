"""ONNX export for inference engines, with every weighted layer mapped back to its torch module.

The legacy TorchScript exporter names initialisers of Linear weights anonymously
("onnx::MatMul_891", already transposed by constant folding), folds each eval-mode
BatchNorm into the Conv before it, and names nodes after scopes that a user's model may not
have. So the mapping here does not rely on names: it matches the *values* of each graph
initialiser against every prunable module's weight (as stored, transposed for MatMul, or
scaled per output channel where a BatchNorm was folded in), then follows the initialiser to
the MatMul / Gemm / Conv node that consumes it. Engines such as DeepSparse report layers by
their ONNX output tensor names, so the result maps output tensor -> module name.

Imports `onnx` lazily: `import spdy_gpu` must not load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import MissingDependencyError, SpdyError, user_code
from .layers import evaluating, hooks_attached, named_inputs, prunable_modules, with_tensors
from .options import SparsityOption

log = logging.getLogger(__name__)

OPSET = 14                    # 17 emits LayerNormalization, which DeepSparse cannot run
_WEIGHTED_OPS = {"MatMul", "Gemm", "Conv"}                   # weight is input 1
_PASS_THROUGH = {"Transpose", "Identity", "Cast"}             # unary ops between weight and GEMM


@dataclass(frozen=True)
class OnnxLayer:
    """One prunable module as it appears in the ONNX graph.

    initializer: name of the weight tensor; transposed: True when the initialiser holds
    W^T (MatMul of a Linear, [in, out]) rather than W as torch stores it; node/output: the
    consuming MatMul/Gemm/Conv node and its output tensor (what engines report);
    channel_scale: per-output-channel factors of a BatchNorm the exporter folded into the
    weight (None: stored as the module holds it); later_outputs: the outputs of further
    nodes reading the same initialiser (a module the forward calls more than once), whose
    time is the module's too.
    """

    module: str
    op_type: str
    initializer: str
    transposed: bool
    node: str
    output: str
    channel_scale: tuple[float, ...] | None = None
    later_outputs: tuple[str, ...] = ()

    def unfolded(self, stored: torch.Tensor) -> torch.Tensor:
        """The module's own weight (torch layout) behind the stored initialiser: pruning
        decisions are made on it, so a folded and an unfolded export get the same mask."""
        weight = stored.t() if self.transposed else stored
        if self.channel_scale is None:
            return weight
        scale = torch.tensor(self.channel_scale, dtype=weight.dtype)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return weight / scale.view(-1, *[1] * (weight.dim() - 1))


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    input_names: tuple[str, ...]
    layers: tuple[OnnxLayer, ...]               # in graph order

    def module_of_output(self) -> dict[str, str]:
        """ONNX tensor name -> torch module name, for every output of a mapped layer."""
        return {output: layer.module for layer in self.layers
                for output in (layer.output, *layer.later_outputs)}

    def inputs_numpy(self, example: Any) -> list[np.ndarray]:
        """The example input as the list of arrays an engine takes, in graph input order."""
        return example_arrays(example, self.input_names)


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("onnx", "deepsparse") from None
    return onnx


def input_names_of(example: Any) -> tuple[str, ...]:
    """The graph's inputs: one per tensor of the example, named as named_inputs names it
    (a dict's keys; positions as input_<i>; a nested entry's names joined by dots). Other
    entries, such as a flag True or a scale 2.0, are constants of the graph."""
    by_position = not isinstance(example, Mapping)
    return tuple(f"input_{name}" if by_position else name
                 for name, value in named_inputs(example) if isinstance(value, torch.Tensor))


def output_names(output: Any, prefix: str | None = None) -> list[str]:
    """Names for the ONNX outputs of a forward's `output`, in the exporter's order (tensor
    leaves; None and other values are not exported): "output" for a tensor, dict keys and
    positions joined by dots for nested ones, e.g. "logits", "hidden_states.0", "output.1"."""
    if isinstance(output, torch.Tensor):
        return [prefix or "output"]
    if isinstance(output, Mapping):
        return [name for key, value in output.items()
                for name in output_names(value, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(output, (tuple, list)):
        return [name for i, value in enumerate(output)
                for name in output_names(value, f"{prefix or 'output'}.{i}")]
    return []


def _constant_output(output: Any, prefix: str | None = None) -> str | None:
    """The first value of a forward's output that is neither a tensor nor None (a Python
    number or string), described with its place in output_names' terms; None: there is none."""
    if isinstance(output, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in output.items()]
    elif isinstance(output, (tuple, list)):
        items = [(f"{prefix or 'output'}.{i}", v) for i, v in enumerate(output)]
    elif output is None or isinstance(output, torch.Tensor):
        return None
    else:
        return f"{type(output).__name__} {output!r} as {prefix or 'output'}"
    return next((found for name, value in items
                 if (found := _constant_output(value, name)) is not None), None)


def example_arrays(example: Any, names: Iterable[str]) -> list[np.ndarray]:
    """The example's tensors as arrays, in the graph's input order `names` (input_names_of)."""
    tensors = dict(zip(input_names_of(example),
                       (v for _, v in named_inputs(example) if isinstance(v, torch.Tensor))))
    return [np.ascontiguousarray(tensors[name].detach().numpy()) for name in names]


def export_onnx(model: nn.Module, example: Any, path: str | os.PathLike,
                exclude: Iterable[str] = (), dynamic: bool = True) -> OnnxExport:
    """Export `model` (eval mode, fp32, CPU) to `path` and map its prunable layers.

    The example input may be a tensor, a tuple of tensors or a dict of keyword tensors; with
    `dynamic`, dim 0 (batch) of every input is a dynamic axis, the others are the
    example's. Raises SpdyError if a prunable module the forward calls cannot be located in
    the graph (one it never calls on the example is left out, as discover_layers does).
    """
    _check_exportable(model, example)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = input_names_of(example)
    if isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    else:
        args, kwargs = (tuple(example) if isinstance(example, (tuple, list)) else (example,)), None
    axes = _dynamic_axes(example, names) if dynamic else None
    modules = prunable_modules(model, exclude)
    called: set[str] = set()            # a module the forward never calls is not in the graph
    hooks = [m.register_forward_hook(lambda *_, name=name: called.add(name))
             for name, m in modules.items()]
    with torch.no_grad(), evaluating(model), _exporting(), user_code(
            "the ONNX export of the model (for DeepSparse)",
            f"make its forward return tensors (a tensor, or a tuple or dict of them) and use "
            f"ops ONNX opset {OPSET} has, or use --backend triton"):
        with hooks_attached(hooks):
            output = model(*args, **(kwargs or {}))
        outputs = output_names(output)
        if not outputs:
            raise SpdyError(f"the model's forward returned {type(output).__name__}, no tensor "
                            "to export; make it return a tensor (or a tuple or dict of them)")
        constant = _constant_output(output)
        if constant is not None:
            raise SpdyError(f"the model's forward returns {constant} beside its tensors, which "
                            "an ONNX graph cannot output; return it as a tensor, or leave it "
                            "out of the forward's output")
        with _constants_bound(model, example) as tensors:
            if tensors is not None:           # the graph's inputs are the tensors alone
                args, kwargs = tensors, None
            torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=list(names),
                              output_names=outputs, opset_version=OPSET, dynamo=False,
                              dynamic_axes=axes, do_constant_folding=True)
    onnx = require_onnx()
    layers = map_layers(onnx.load(str(path)),
                        {name: m for name, m in modules.items() if name in called})
    return OnnxExport(path=path, input_names=names, layers=layers)


def _check_exportable(model: nn.Module, example: Any) -> None:
    """DeepSparse runs float32 on the CPU: another dtype or device is refused up front (it
    would fail deep inside the export or the engine)."""
    tensors = [value for _, value in named_inputs(example)]
    floating = [t for t in (*model.parameters(), *model.buffers(), *tensors)
                if isinstance(t, torch.Tensor) and t.is_floating_point()]
    wrong = next((t for t in floating if t.dtype != torch.float32), None)
    if wrong is not None:
        raise SpdyError(f"DeepSparse runs float32 models, and this model or its example input "
                        f"has {str(wrong.dtype).removeprefix('torch.')} tensors; return "
                        "model.float() and float32 inputs from the model function")
    if any(t.device.type != "cpu" for t in floating):
        raise SpdyError("DeepSparse runs on the CPU, and this model or its example input is "
                        "on another device; return it on the CPU from the model function")


@contextlib.contextmanager
def _constants_bound(model: nn.Module, example: Any) -> Iterator[tuple[torch.Tensor, ...] | None]:
    """Where the example's entries are not all tensors (flags such as True or 2.0, or a
    dict or tuple of tensors), the model's forward for the with-block takes its tensors
    alone, in input_names_of order, with the rest bound (the exporter would make flags odd
    graph inputs, and a dict last in its args keywords); yields the tensors, or None where
    every entry is a tensor (nothing bound)."""
    entries = example.values() if isinstance(example, Mapping) else (
        example if isinstance(example, (tuple, list)) else [example])
    if all(isinstance(value, torch.Tensor) for value in entries):
        yield None
        return
    original, own = model.forward, model.__dict__.get("forward")

    def forward(*tensors: torch.Tensor) -> Any:
        rebuilt = with_tensors(example, iter(tensors))
        if isinstance(example, Mapping):
            return original(**rebuilt)
        return original(*rebuilt)

    model.forward = forward
    try:
        yield tuple(value for _, value in named_inputs(example)
                    if isinstance(value, torch.Tensor))
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _dynamic_axes(example: Any, names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Dim 0 (batch) of every input, the only dynamic axis: DeepSparse sets the batch when it
    compiles an engine (batch_size=), but runs a graph with any other dynamic axis (e.g. a
    sequence) without its optimised runtime unless every call names the shapes."""
    tensors = [value for _, value in named_inputs(example) if isinstance(value, torch.Tensor)]
    return {name: {0: "batch"} for name, tensor in zip(names, tensors) if tensor.dim() >= 1}


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """How the exporter must run: its deprecation and tracer warnings silenced (they are
    expected); PyTorch's fused attention fast paths off (in eval mode without gradients
    MultiheadAttention and TransformerEncoderLayer run one fused op that ONNX has no
    counterpart for); and the TorchScript exporter's dump of the whole IR graph to stdout
    on a failed export dropped (the failure is reported in one line)."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings(), _stdout_dropped_on_error():
        warnings.simplefilter("ignore")
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)


@contextlib.contextmanager
def _stdout_dropped_on_error() -> Iterator[None]:
    """Capture file descriptor 1 (C++ writes too) for the block: passed on if the block
    succeeds, dropped if it raises."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if not failed:
                captured.seek(0)
                os.write(1, captured.read())


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.blake2b(array.tobytes() + str(array.shape).encode(), digest_size=16).hexdigest()


def map_layers(model_proto: Any, modules: Mapping[str, nn.Module]) -> tuple[OnnxLayer, ...]:
    """Locate every module of `modules` (Linear / Conv2d) in an exported ONNX graph.

    For each MatMul/Gemm/Conv in graph order, follows its weight input back through
    pass-through ops (Transpose, Identity, Cast) to an initialiser and matches its values to
    the modules' weights (W for Gemm/Conv, W^T for MatMul). A weight the exporter folded a
    BatchNorm into is the module's weight scaled per output channel: it is matched by that
    relation and its scales are recorded. Modules with identical weights are told apart by
    the node's scope name when it has one, else taken in module order. A node left with no
    module whose initialiser is already mapped (a module called again) adds its output to
    that layer.
    Returns the layers in graph order; raises SpdyError naming every module it cannot
    locate and why.
    """
    from onnx import numpy_helper

    weights = {name: module.weight.detach().float().cpu().numpy()
               for name, module in modules.items()}
    by_digest: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    by_shape: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, weight in weights.items():
        by_digest[_digest(weight)].append((name, False))
        if weight.ndim == 2:
            by_digest[_digest(weight.T)].append((name, True))
        by_shape[weight.shape].append(name)

    initializers = {init.name: init for init in model_proto.graph.initializer}
    producers = {out: node for node in model_proto.graph.node for out in node.output}
    arrays: dict[str, tuple[np.ndarray, str]] = {}     # initialiser -> (values, digest)
    found: dict[str, OnnxLayer] = {}
    node_shapes: dict[tuple[int, ...], int] = defaultdict(int)   # for the error message
    for node in model_proto.graph.node:                 # graph order = execution order
        if node.op_type not in _WEIGHTED_OPS or len(node.input) < 2:
            continue
        source, flipped = _weight_source(node.input[1], producers, initializers)
        if source is None:
            continue
        if source not in arrays:
            values = numpy_helper.to_array(initializers[source])
            arrays[source] = values, _digest(values)
        values, digest = arrays[source]
        holds_wt = _wants_wt(node) != flipped           # the initialiser must hold W^T
        stored = values.T if holds_wt else values       # torch layout
        node_shapes[stored.shape] += 1
        exact = [name for name, t in by_digest.get(digest, []) if t == holds_wt]
        module, scale = _pick(exact, node, found), None
        if module is None:
            scales = {name: s for name in by_shape.get(stored.shape, []) if name not in found
                      and (s := folded_scale(stored, weights[name])) is not None}
            module = _pick(list(scales), node, found)
            scale = scales.get(module)
        again = next((layer for layer in found.values() if layer.initializer == source
                      and layer.transposed == holds_wt), None)
        if module is None and again is not None:        # no other module: this one again
            found[again.module] = dataclasses.replace(
                again, later_outputs=(*again.later_outputs, node.output[0]))
        elif module is not None:
            found[module] = OnnxLayer(module=module, op_type=node.op_type, initializer=source,
                                      transposed=holds_wt, node=node.name,
                                      output=node.output[0], channel_scale=scale)
    missing = [name for name in modules if name not in found]
    if missing:
        raise SpdyError(_unmapped_message(missing, modules, node_shapes))
    return tuple(found.values())


def folded_scale(stored: np.ndarray, weight: np.ndarray,
                 rtol: float = 1e-4) -> tuple[float, ...] | None:
    """Per-output-channel factors s with stored[i] = s[i] * weight[i] (a BatchNorm folded
    into the layer by the exporter), or None if `stored` is not such a scaling. An all-zero
    `stored` is no evidence of anything and matches nothing."""
    if stored.shape != weight.shape:
        return None
    folded = stored.reshape(len(stored), -1).astype(np.float64)
    original = weight.reshape(len(weight), -1).astype(np.float64)
    power = np.square(original).sum(1)
    scale = (folded * original).sum(1) / np.where(power > 0, power, 1.0)
    residual = np.linalg.norm(folded - scale[:, None] * original, axis=1)
    if not (scale != 0).any() or (residual > rtol * np.linalg.norm(folded, axis=1)).any():
        return None
    return tuple(scale.tolist())


def _unmapped_message(missing: list[str], modules: Mapping[str, nn.Module],
                      node_shapes: Mapping[tuple[int, ...], int]) -> str:
    """One line: how many modules are missing, and for each its op, shape and why."""
    reasons = []
    for name in missing:
        module = modules[name]
        shape = tuple(module.weight.shape)
        described = f"{type(module).__name__} {'x'.join(map(str, shape))}"
        count = node_shapes.get(shape, 0)
        why = (f"{count} MatMul/Gemm/Conv weight(s) of that shape, none equal to it up to a "
               "per-channel scale (quantised or rewritten)" if count else
               "no MatMul/Gemm/Conv has a weight of that shape (decomposed by the exporter, "
               "or never called by forward)")
        reasons.append(f"{name} ({described}: {why})")
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    return (f"cannot locate {len(missing)} of {len(modules)} prunable layer(s) in the ONNX "
            f"graph: {shown}; exclude them with --exclude")


def _weight_source(tensor: str, producers: Mapping[str, Any],
                   initializers: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The initialiser behind a weight input, looking through pass-through ops, and whether
    an odd number of Transposes lies on the way."""
    flipped = False
    for _ in range(5):
        if tensor in initializers:
            return tensor, flipped
        node = producers.get(tensor)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None, flipped
        flipped ^= node.op_type == "Transpose"
        tensor = node.input[0]
    return None, flipped


def _wants_wt(node: Any) -> bool:
    """Whether the op takes the weight as W^T [in, out]: MatMul computes X @ B, and so does
    Gemm with transB=0; Gemm with transB=1 and Conv take W as torch stores it."""
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Gemm":
        return not next((a.i for a in node.attribute if a.name == "transB"), 0)
    return False


def _pick(candidates: list[str], node: Any, taken: Mapping[str, OnnxLayer]) -> str | None:
    """The module among equal-valued candidates that this node belongs to."""
    free = [name for name in candidates if name not in taken]
    if len(free) <= 1:
        return free[0] if free else None
    scope = "." + node.name.replace("/", ".").strip(".") + "."    # /a/b.0/MatMul -> .a.b.0.MatMul.
    scoped = [name for name in free if f".{name}." in scope]
    if len(scoped) == 1:
        return scoped[0]
    log.warning("layers %s have identical weights; mapped %s to the first", free, node.name)
    return free[0]


def prune_onnx(export: OnnxExport, choices: Mapping[str, SparsityOption],
               path: str | os.PathLike) -> Path:
    """Write a copy of the exported model whose chosen layers carry magnitude-pruned weights
    (masks from spdy_gpu.masks.build_mask on the module's own weight, unfolded)."""
    onnx = require_onnx()
    from onnx import numpy_helper

    from .masks import build_mask

    proto = onnx.load(str(export.path))
    initializers = {init.name: init for init in proto.graph.initializer}
    for layer in export.layers:
        option = choices.get(layer.module)
        if option is None or option.pattern == "dense":
            continue
        init = initializers[layer.initializer]
        stored = torch.from_numpy(numpy_helper.to_array(init).copy())
        mask = build_mask(layer.unfolded(stored), option)
        pruned = stored * (mask.t() if layer.transposed else mask)
        init.CopyFrom(numpy_helper.from_array(pruned.contiguous().numpy(), init.name))
    path = Path(path)
    onnx.save(proto, str(path))
    return path
