"""Discovery of prunable layers: every Linear and Conv2d, with its GEMM view and GEMM rows."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import SpdyError, first_line, user_code

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class LayerInfo:
    """A prunable layer seen as the GEMM Y[M, N] = X[M, K] @ W[N, K]^T.

    n: output features; k: input features * kernel area / groups; m: GEMM rows per forward
    of the example input (tokens, or batch * output pixels), None if not captured;
    calls: the rows of each call, where the forward calls the layer more than once (m is
    their sum; a GPU runs one GEMM per call, not one of m rows); gpu_swappable: whether
    deployment can swap the module for a sparse GPU layer (`gpu_swappable`).
    """

    name: str
    kind: str                      # "linear" | "conv2d"
    weight_shape: tuple[int, ...]
    groups: int = 1
    m: int | None = None
    calls: tuple[int, ...] = ()
    gpu_swappable: bool = True

    def __post_init__(self) -> None:
        if self.calls and sum(self.calls) != self.m:
            raise ValueError(f"{self.name}: rows per call {self.calls} do not sum to m={self.m}")

    @property
    def rows_per_call(self) -> tuple[int, ...]:
        """GEMM rows of each call of one forward (one call of m rows unless `calls`)."""
        return self.calls or (() if self.m is None else (self.m,))

    @property
    def n(self) -> int:
        return self.weight_shape[0]

    @property
    def k(self) -> int:
        k = 1
        for size in self.weight_shape[1:]:
            k *= size
        return k

    @property
    def depthwise_or_grouped(self) -> bool:
        return self.groups > 1

    @property
    def flops(self) -> int | None:
        """Multiply-adds * 2 for one forward of the example input (all groups)."""
        return None if self.m is None else 2 * self.m * self.n * self.k


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run `model` in eval mode (evaluating) on an input given as a tensor, a tuple of
    tensors or a dict (passed as keywords). A model that fails on its input is a bad input
    (wrong shape, dtype or keys), reported in one line."""
    with user_code("the model failed on its input: its forward",
                   "check that the example or calibration input (--calib) has the shape, "
                   f"dtype and keys the model takes (got {_describe(inputs)})"), \
            evaluating(model):
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """`model` in eval mode for a with-block, as it is deployed (BatchNorm uses its running
    statistics and leaves them alone, dropout is off); the modules that were training are
    put back in training mode after. Anything but a Module (a compiled function) is run
    as it is."""
    training = [m for m in model.modules() if m.training] if isinstance(model, nn.Module) else []
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def on_gpu_else_cpu(work: Callable[[torch.device], T], what: str) -> T:
    """work(device) on the GPU where there is one; where it fails there (memory, an op
    without a CUDA kernel), again on the CPU, with a warning naming `what`."""
    if torch.cuda.is_available():
        try:
            return work(torch.device("cuda"))
        except Exception as e:  # noqa: BLE001 - whatever failed on the GPU: the CPU
            log.warning("%s failed on the GPU (%s); running it on the CPU", what,
                        first_line(e) or type(e).__name__)
            torch.cuda.empty_cache()
    return work(torch.device("cpu"))


def inputs_to(inputs: Any, device: torch.device | str,
              dtype: torch.dtype | None = None) -> Any:
    """A model input (tensor, tuple/list or dict of them, other values kept) on `device`,
    its floating tensors cast to `dtype` when one is given."""
    if isinstance(inputs, torch.Tensor):
        cast = dtype if dtype is not None and inputs.is_floating_point() else inputs.dtype
        return inputs.to(device=device, dtype=cast)
    if isinstance(inputs, dict):
        return {key: inputs_to(value, device, dtype) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return rebuilt(inputs, [inputs_to(value, device, dtype) for value in inputs])
    return inputs


def rebuilt(sequence: tuple | list, values: list[Any]) -> tuple | list:
    """A tuple or list of `sequence`'s own type (a named tuple too) holding `values`."""
    if hasattr(sequence, "_fields"):              # a named tuple takes its fields as arguments
        return type(sequence)(*values)
    return type(sequence)(values)


def _describe(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"{tuple(inputs.shape)} {str(inputs.dtype).removeprefix('torch.')}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in inputs) + ")"
    return type(inputs).__name__


def first_name_of(model: nn.Module) -> dict[str, str]:
    """Every name a module is registered under (aliases too) -> its first name, the one
    model.named_modules() gives and profiles use."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(module), name)
            for name, module in model.named_modules(remove_duplicate=False)}


def named_inputs(inputs: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A model input given as a dict, a tuple/list or one value, as (name, value) pairs in
    its own order: the dict's keys, the positions, or "0"; a dict or tuple inside it is
    flattened the same way, its names joined by dots (`({"ids": t},)` gives "0.ids")."""
    if isinstance(inputs, Mapping):
        items = [(str(k), v) for k, v in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(inputs)]
    else:
        return [(prefix or "0", inputs)]
    named = []
    for name, value in items:
        name = f"{prefix}.{name}" if prefix else name
        nested = isinstance(value, (Mapping, tuple, list))
        named += named_inputs(value, name) if nested else [(name, value)]
    return named


def with_tensors(inputs: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """`inputs` with its tensors (in named_inputs order) replaced by the next of `tensors`."""
    if isinstance(inputs, torch.Tensor):
        return next(tensors)
    if isinstance(inputs, Mapping):
        return {key: with_tensors(value, tensors) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return rebuilt(inputs, [with_tensors(value, tensors) for value in inputs])
    return inputs


def example_shape(example: Any) -> tuple[int, str]:
    """(batch size, input shape) of an example input for a fingerprint: the batch is the
    leading dimension of its tensors, the shape a stable string of their names and shapes,
    e.g. "attention_mask=1x128,input_ids=1x128" for a dict (sorted by name), "0=1x3x32x32"
    for a tensor or the first of a tuple. Non-tensor entries are left out."""
    named = named_inputs(example)
    if isinstance(example, Mapping):
        named.sort(key=lambda item: item[0])
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor)]
    if not tensors:
        raise SpdyError("the example input holds no tensor; the model function must return "
                        "(model, tensor | tuple of tensors | dict of tensors)")
    scalars = [name for name, t in tensors if t.dim() == 0]
    if scalars:
        raise SpdyError(f"example input {scalars[0]!r} is a scalar; every input tensor needs "
                        "a leading batch dimension")
    batches = {name: int(t.shape[0]) for name, t in tensors}
    if len(set(batches.values())) > 1:
        raise SpdyError(f"the example's tensors disagree on the batch (leading) dimension "
                        f"{batches}; give every input the same batch size")
    shape = ",".join(f"{name}={'x'.join(map(str, t.shape))}" for name, t in tensors)
    return int(tensors[0][1].shape[0]), shape


def exclude_patterns(exclude: str | Iterable[str] | None) -> tuple[str, ...]:
    """Exclude patterns (shell-style, e.g. 'conv1' or '*.classifier') as a tuple; one
    string is one pattern, not a sequence of one-character patterns; None is none."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    patterns = tuple(exclude) if isinstance(exclude, Iterable) and \
        not isinstance(exclude, (bytes, Mapping)) else (exclude,)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise SpdyError(f"exclude patterns must be strings such as 'classifier' or '*.fc2', "
                        f"got a {type(bad[0]).__name__}")
    return patterns


def prunable_modules(model: nn.Module, exclude: str | Iterable[str] = ()
                     ) -> dict[str, nn.Module]:
    """Name -> module for every Linear and Conv2d whose name matches no `exclude` pattern
    (shell-style patterns such as 'conv1' or '*.classifier')."""
    patterns = exclude_patterns(exclude)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
            and not any(fnmatch.fnmatchcase(name, p) for p in patterns)}


def require_real(model: Any, task: str) -> None:
    """Refuse what `task` (e.g. "pruning") cannot work on: not a module, or a module with
    tensors on the meta device (no values to read or write)."""
    if not isinstance(model, nn.Module):
        raise SpdyError(f"{task} needs the model (an nn.Module, or a function returning one), "
                        f"got {type(model).__name__}")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise SpdyError(f"the model has tensors on the meta device, which {task} cannot use; "
                        "build it on a real device (e.g. the CPU) first")


def require_prunable(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse layer names (of a profile, a database, choices) that are not a Linear or
    Conv2d of `model`: they belong to another model (or name, say, a BatchNorm)."""
    modules = dict(model.named_modules())
    wrong = next((name for name in names
                  if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d))), None)
    if wrong is not None:
        found = modules.get(wrong)
        what = "absent" if found is None else f"a {type(found).__name__}"
        raise SpdyError(f"layer {wrong} is not a Linear or Conv2d of this model ({what}): the "
                        "profile, choices or database belong to another model; pass the one "
                        "made for this model")


def warn_unmatched_excludes(patterns: str | Iterable[str], layers: Iterable[str]) -> None:
    """Warn about each exclude pattern that matches none of `layers` (the model's prunable
    layer names): most likely a typo, which would leave the layer it meant prunable."""
    names = list(layers)
    for pattern in exclude_patterns(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            log.warning("--exclude %r matches no prunable layer (they are named like %s); "
                        "check the pattern", pattern, shown)


def discover_layers(model: nn.Module, example_inputs: Any = None,
                    exclude: str | Iterable[str] = ()) -> list[LayerInfo]:
    """Every prunable layer of `model` in execution order where `example_inputs` is given
    (module order otherwise), with the GEMM rows each sees for that input. Left out, with a
    log line: layers whose weight is tied to another module's (pruning one would prune
    both) and, given an input, layers its forward never calls."""
    require_real(model, "finding its prunable layers")
    modules = prunable_modules(model, exclude)
    other_kinds = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                   if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d)]
    if other_kinds:
        log.info("only Linear and Conv2d layers are pruned, not: %s", ", ".join(other_kinds))
    broken = next((name for name, m in modules.items()
                   if not torch.isfinite(m.weight.detach()).all()), None)
    if broken is not None:
        raise SpdyError(f"layer {broken}: its weight holds NaN or inf, a damaged model; fix "
                        "the model (or its checkpoint)")
    for name, other in tied_weights(model, modules).items():
        log.warning("%s shares its weight with %s (tied): kept dense, its time counts as "
                    "fixed", name, other)
        del modules[name]
    if not modules:
        raise SpdyError("the model has no Linear or Conv2d layer left to prune; "
                        "check the model and the --exclude patterns")
    if example_inputs is None:
        return [_layer_info(name, module, None) for name, module in modules.items()]
    rows = _capture_gemm_rows(model, modules, example_inputs)
    unused = [name for name in modules if name not in rows]
    if unused:
        log.info("never called on the example input, so not pruned: %s", ", ".join(unused))
    if not rows:
        raise SpdyError("the model's forward calls none of its Linear or Conv2d layers on the "
                        "example input; check the model and its example input")
    return [_layer_info(name, modules[name], rows[name]) for name in rows]


def other_weights_hint(model: nn.Module, layers: Iterable[str]) -> str:
    """Why `model`'s weights at `layers` may differ from the ones a profile or database was
    made from, when it shows: the weights were cast, or already pruned ("" when neither)."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers if hasattr(modules.get(name), "weight")]
    dtypes = sorted({str(w.dtype).removeprefix("torch.") for w in weights})
    if dtypes and dtypes != ["float32"]:
        return (f" (its weights are {'/'.join(dtypes)} here: prune the model in the dtype it "
                "was built in, then cast it)")
    zeros = sum(int((w == 0).sum()) for w in weights)
    if zeros > 0.25 * sum(w.numel() for w in weights):
        return " (it looks pruned already: a quarter of its weights are zeros)"
    return ""


def tied_weights(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """Layer name -> the other module's parameter its weight is (one tensor in two modules,
    e.g. an LM head tied to the embedding; one module registered twice is not tied)."""
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    tied = {}
    for name, module in modules.items():
        others = [o for o in owners.get(id(module.weight), [])
                  if model.get_submodule(o.rpartition(".")[0]) is not module]
        if others:
            tied[name] = others[0]
    return tied


def _layer_info(name: str, module: nn.Module, rows: list[int] | None) -> LayerInfo:
    kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
    groups = module.groups if kind == "conv2d" else 1
    m = None if rows is None else sum(rows)
    calls = tuple(rows) if rows and len(rows) > 1 else ()
    return LayerInfo(name, kind, tuple(module.weight.shape), groups, m, calls,
                     gpu_swappable(module))


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1 Conv2d without groups whose padding, if any, is zeros: a GEMM over channels at
    every pixel (BlockSparseConv1x1 runs it). Without padding the padding mode is moot ("same"
    and "valid" are no padding at kernel size 1)."""
    if type(module) is not nn.Conv2d or module.kernel_size != (1, 1) or module.groups != 1:
        return False
    unpadded = isinstance(module.padding, str) or not any(module.padding)
    return unpadded or module.padding_mode == "zeros"


def gpu_swappable(module: nn.Module) -> bool:
    """Whether deployment can swap `module` for a sparse GPU layer: exactly an nn.Linear (a
    subclass may be read as a tensor by its owner, as attention reads its out_proj's
    weight, so a swapped module would not run) or a pointwise conv (`is_pointwise`)."""
    return type(module) is nn.Linear or is_pointwise(module)


def _capture_gemm_rows(model: nn.Module, modules: dict[str, nn.Module],
                       example_inputs: Any) -> dict[str, list[int]]:
    """GEMM rows of each call of each module in one forward, in call order."""
    rows: dict[str, list[int]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out_features = module.weight.shape[0]
            rows.setdefault(name, []).append(output.numel() // out_features)
        return record

    with hooks_attached([m.register_forward_hook(hook(name)) for name, m in modules.items()]),\
            torch.no_grad():
        call_model(model, example_inputs)
    return rows


@contextmanager
def hooks_attached(handles: Iterable[Any]) -> Iterator[None]:
    """Keep the given forward hooks on their modules for a with-block; they are removed
    however the block ends (a failed forward must not leave hooks behind)."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
