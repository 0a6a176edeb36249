"""Deploying a profile: prune the model to it for good and write what an engine runs.

Artifacts (each written atomically: a temporary file next to the target, then a rename):

- pruned weights (`save_pruned` / `load_pruned`): the safetensors state dict of the dense
  architecture, pruned weights being exact zeros. Metadata (all strings): "format"
  "spdy-gpu/pruned-weights", "version" "1" and, from the profile, "profile" (its path),
  "model" and "choices" (JSON {layer: option}).
- ONNX (`export_onnx_pruned`): the pruned model at opset 14, which DeepSparse runs; every
  prunable layer is located in the graph by its exact values, so its zeros survived export.
- block-sparse (`save_block_sparse` / `load_block_sparse`, the Triton deployment): ONE
  safetensors file (one rename makes it appear whole, and it moves as one) holding the
  state dict of the model whose block-pruned nn.Linear layers are BlockSparseLinear and
  whose 2:4 ones are SemiStructuredLinear (an nn.Linear state: the masked weight).
  Metadata: "format" "spdy-gpu/block-sparse", "version" "1", "layers" (JSON {layer:
  {"option", "block": [rows, cols] (block options only), "shape": [out, in]}}: the layers
  to swap before loading the state dict) and the profile fields above. Unstructured and
  other N:M choices, sparse choices on anything but a plain nn.Linear, and dense layers
  stay dense (masked) modules.

`apply_profile` and `export_profile` are what `spdy-gpu apply` and `spdy-gpu export` run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SpdyError, as_path, first_line, user_code
from .jsonio import check_output_file, replacing
from .layers import first_name_of, gpu_swappable, require_prunable, require_real
from .locks import exclusive_file
from .options import SparsityOption
from .profile import Profile, check_for_model
from .reconstruct import Database, stitch_
from .semi_structured import SEMI_STRUCTURED, SemiStructuredLinear

log = logging.getLogger(__name__)

PRUNED_FORMAT = "spdy-gpu/pruned-weights"
BLOCK_FORMAT = "spdy-gpu/block-sparse"
ARTIFACT_VERSION = "1"
FORMATS = ("onnx", "triton")

PathLike = str | os.PathLike
ProfileLike = Profile | Mapping[str, SparsityOption | str] | PathLike


@dataclass(frozen=True)
class Plan:
    """The choices to deploy and where they came from (recorded in every artifact)."""

    choices: dict[str, SparsityOption]
    profile: Profile | None = None
    source: str | None = None             # the profile file's path, when read from one

    @property
    def pruned(self) -> dict[str, SparsityOption]:
        return {name: o for name, o in self.choices.items() if o.pattern != "dense"}

    def metadata(self) -> dict[str, str]:
        meta = {"choices": json.dumps({name: o.name for name, o in self.choices.items()})}
        if self.profile is not None:
            meta["model"] = self.profile.model
        if self.source is not None:
            meta["profile"] = self.source
        return meta


@dataclass(frozen=True)
class DeployResult:
    """What a deploy step wrote: the pruned layers, their overall sparsity (zeros / weights
    over those layers) and, for the Triton artifact, the layers stored block-sparse (run by
    the Triton kernel) and 2:4 (sparse tensor cores); the other pruned layers stay dense
    tensors with zeros there."""

    path: Path
    pruned: int
    sparsity: float
    block_sparse: int = 0
    semi_structured: int = 0


def load_plan(profile_or_choices: ProfileLike | Plan, exclude: Iterable[str] = ()) -> Plan:
    """A profile (object or file) or a {layer: option} mapping as a Plan; layers matching
    `exclude` stay dense. Whether it belongs to a model is check_for_model's to say."""
    if isinstance(profile_or_choices, Plan):
        plan = profile_or_choices
    elif isinstance(profile_or_choices, Profile):
        plan = Plan(dict(profile_or_choices.choices), profile_or_choices)
    elif isinstance(profile_or_choices, (str, os.PathLike)):
        profile = Profile.load(profile_or_choices)
        plan = Plan(dict(profile.choices), profile, str(Path(profile_or_choices).resolve()))
    elif isinstance(profile_or_choices, Mapping):
        plan = Plan({str(name): _option(name, o) for name, o in profile_or_choices.items()})
    else:
        raise SpdyError(f"a profile must be a Profile, its file or a {{layer: option}} mapping, "
                        f"not {type(profile_or_choices).__name__}")
    patterns = list(exclude)
    kept = {name: o for name, o in plan.choices.items()
            if not any(fnmatchcase(name, p) for p in patterns)}
    if not kept:
        raise SpdyError("nothing to prune: the profile chooses no layer (or --exclude matches "
                        "them all); pass a profile made by spdy-gpu solve for this model")
    return Plan(kept, plan.profile, plan.source)


def _option(layer: str, option: Any) -> SparsityOption:
    if isinstance(option, SparsityOption):
        return option
    if isinstance(option, str):
        return SparsityOption.parse(option)
    raise SpdyError(f"the choice of layer {layer} is {option!r}, not an option such as "
                    "'unstructured@0.5' or 'block32x32@0.7'")


# ---- pruning --------------------------------------------------------------------------------

def prune_(model: nn.Module, profile_or_choices: ProfileLike | Plan,
           database: Any = None) -> dict[str, SparsityOption]:
    """Give every chosen layer its option's weights for good, in place: the reconstructed
    weights of `database` (a Database or its directory) when given, else magnitude masks of
    the current (dense) weights. Returns the choices applied. On error nothing changes.
    A profile of another model (its layers, or its recorded dense weights) or a database of
    other weights is refused (check_for_model)."""
    require_real(model, "pruning")
    plan = load_plan(profile_or_choices)
    database = Database.of(database)
    check_for_model(model, None, plan.profile, database)
    return _pruned_to(model, plan, database)


def _pruned_to(model: nn.Module, plan: Plan, database: Any) -> dict[str, SparsityOption]:
    """prune_ once the caller has checked the model against the profile and database."""
    if database is not None:
        database.check_options(list(plan.choices.values()))
    stitch_(model, plan.choices, database)   # the backup it returns holds the dense weights
    return plan.choices


def _layer_weights(model: nn.Module, layers: Iterable[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight for name in layers}


def _sparsity_of(model: nn.Module, layers: Iterable[str]) -> float:
    """Zeros over weights of the named layers together (0 for no layer)."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight.detach() for name in layers]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def _check_made_for(plan: Plan, weights: PathLike) -> None:
    """Refuse weights whose file records another profile's choices: sparser weights pass
    the pattern check (_check_pruned) but are not what the profile was timed for."""
    recorded = _recorded_choices(_read_safetensors(weights)[1], weights)
    if not recorded:                    # plain weights: only the pattern check applies
        return
    left_out = "dense (left out, e.g. by --exclude)"
    differs = next((name for name, option in plan.choices.items()
                    if recorded.get(name, "dense") != option.name), None)
    if differs is not None:
        raise SpdyError(f"{weights} was pruned to another profile (layer {differs}: "
                        f"{recorded.get(differs, left_out)} there, "
                        f"{plan.choices[differs].name} here); pass the weights made for this "
                        "profile, or the same --exclude")


def _recorded_choices(meta: Mapping[str, str], path: PathLike) -> dict[str, Any]:
    """The {layer: option name} a weights file records ({} where it records none)."""
    try:
        recorded = json.loads(meta.get("choices", "{}"))
        if isinstance(recorded, dict):
            return recorded
    except ValueError:
        pass
    raise SpdyError(f"{path}: its metadata 'choices' is not a JSON object; pass weights "
                    "written by spdy-gpu apply, gap or run")


def _check_pruned(weights: Mapping[str, torch.Tensor], plan: Plan, source: PathLike) -> None:
    """Refuse weights (layer name -> weight, read from `source`) that are not pruned to the
    plan: a chosen layer with a nonzero outside its option's mask (a mask built on already
    pruned weights keeps every nonzero when there are at least as many zeros as the option
    removes). Layers missing from `weights` are not checked."""
    from .masks import build_mask

    for name, option in plan.pruned.items():
        if name not in weights:
            continue
        weight = weights[name].detach()
        outside = int((weight[~build_mask(weight, option)] != 0).sum())
        if outside:
            raise SpdyError(f"layer {name}: {source} has {outside} nonzero weights outside the "
                            f"{option} pattern; pass the weights pruned to this profile "
                            "(prune_)")


# ---- pruned weights (safetensors) -----------------------------------------------------------

def save_pruned(model: nn.Module, path: PathLike, *, profile: ProfileLike | Plan | None = None,
                metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the model's state dict (tied tensors stored once) to `path`, atomically.
    The profile's path, model and choices go into the file's metadata, with `metadata`;
    the model must be pruned to it (prune_) and hold no block-sparse layer (sparsify_-ed:
    that is save_block_sparse's artifact)."""
    from safetensors.torch import save_model

    from .sparse_linear import BlockSparseConv1x1, BlockSparseLinear

    require_real(model, "save_pruned")
    # (a 2:4 SemiStructuredLinear keeps an nn.Linear's state: the masked weight)
    converted = next((name for name, m in model.named_modules()
                      if isinstance(m, (BlockSparseLinear, BlockSparseConv1x1))), None)
    if converted is not None:
        raise SpdyError(f"layer {converted} was converted by sparsify_, and save_pruned writes "
                        "dense tensors with zeros; save before sparsify_, or write the "
                        "deployment artifact with save_block_sparse")
    reserved = sorted({"format", "version", "choices", "model"} & set(metadata or {}))
    if reserved:
        raise SpdyError(f"metadata {', '.join(map(repr, reserved))} is save_pruned's own "
                        "(the file's format and the profile's model and choices); pass "
                        "other keys")
    path = check_output_file(path, "the output path")
    meta = {"format": PRUNED_FORMAT, "version": ARTIFACT_VERSION}
    if profile is not None:
        plan = load_plan(profile)
        require_prunable(model, plan.choices)
        _check_pruned(_layer_weights(model, plan.pruned), plan, "the model")
        meta |= plan.metadata()
    meta |= {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in
             (metadata or {}).items()}
    with replacing(path) as tmp:
        save_model(model, str(tmp), metadata=meta, force_contiguous=True)
    return path


def load_pruned(model: nn.Module, path: PathLike) -> nn.Module:
    """Load weights written by save_pruned (or spdy-gpu gap) into a freshly built model of
    the same architecture, in place; another model's file is refused before any change."""
    state, meta = _read_safetensors(path)
    if meta.get("format") == BLOCK_FORMAT:
        raise SpdyError(f"{path} is a block-sparse (Triton) artifact; load it with "
                        "spdy_gpu.deploy.load_block_sparse")
    if meta.get("format", PRUNED_FORMAT) != PRUNED_FORMAT:     # (plain safetensors: none)
        raise SpdyError(f"{path} is a {meta['format']!r} file, not pruned weights; pass "
                        "weights written by spdy-gpu apply, gap or run")
    recorded = _recorded_choices(meta, path)
    require_real(model, f"loading {path}")
    _check_state(model, state, path)
    if recorded:    # pruned as the file says (an edited file would deploy dense layers under
        plan = load_plan(recorded)      # a sparse profile)
        _check_pruned(_stored_weights(model, state, plan.pruned), plan, path)
    model.load_state_dict(state, strict=False)     # tied names are filled through their twin
    return model


def _stored_weights(model: nn.Module, state: Mapping[str, torch.Tensor],
                    layers: Iterable[str]) -> dict[str, torch.Tensor]:
    """Each layer's weight as `state` stores it, under any of the names its module is
    registered as (a file keeps a shared tensor once, under one of them); a layer stored
    only as a tied twin's tensor is left out."""
    aliases: dict[str, list[str]] = {}
    for name, first in first_name_of(model).items():
        aliases.setdefault(first, []).append(name)
    stored = {}
    for layer in layers:
        key = next((f"{alias}.weight" for alias in aliases.get(layer, [layer])
                    if f"{alias}.weight" in state), None)
        if key is not None:
            stored[layer] = state[key]
    return stored


def _read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file."""
    from safetensors import safe_open

    if not as_path(path, "the weights file").is_file():
        raise SpdyError(f"{path}: no such file; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:   # safetensors raises its own error types for bad files
        raise SpdyError(f"{path}: not a readable safetensors file ({e}); pass weights "
                        "written by spdy-gpu apply") from None


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: PathLike,
                resized: Iterable[str] = ()) -> None:
    """Refuse a state dict that does not fit the model, naming the first key that differs.
    Keys under the `resized` module prefixes may change shape (BlockSparseLinear patterns)."""
    expected = model.state_dict(keep_vars=True)     # tensors as held: shared ones are one
    saved_tensors = [expected[k] for k in state if k in expected]
    prefixes = tuple(f"{name}." for name in resized)
    problem = None
    for key, tensor in expected.items():
        if key not in state and not any(_same_tensor(tensor, t) for t in saved_tensors):
            problem = f"it has no {key}"
        elif key in state and state[key].shape != tensor.shape and not key.startswith(prefixes):
            problem = (f"{key} has shape {tuple(state[key].shape)} there, "
                       f"{tuple(tensor.shape)} in the model")
        if problem:
            break
    unexpected = next((k for k in state if k not in expected), None)
    if problem is None and unexpected is not None:
        problem = f"its {unexpected} is not in the model"
    if problem:
        raise SpdyError(f"{path} does not fit this model: {problem}; pass the --model (and "
                        "options) the file was written for")
    # No parameter may hold NaN or inf, no buffer NaN (a buffer may hold -inf: a mask).
    parameters = {name for name, _ in model.named_parameters()}
    broken = next((k for k, t in state.items() if t.is_floating_point() and (
        t.isnan().any() or k in parameters and not torch.isfinite(t).all())), None)
    if broken is not None:
        raise SpdyError(f"{path}: {broken} holds NaN or inf, damaged weights (a diverged gAP, "
                        "an edited file); regenerate them")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor under two names (tied weights, a module registered twice), which
    save_model stores once."""
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() != 0
                      and a.shape == b.shape and a.stride() == b.stride())


# ---- ONNX -----------------------------------------------------------------------------------

def export_onnx_pruned(model: nn.Module, example: Any, path: PathLike, *,
                       exclude: Iterable[str] = ()) -> Path:
    """Write the (pruned) model as ONNX for DeepSparse, atomically. Every prunable layer not
    matching `exclude` must be found in the graph by its exact values: its zeros survived."""
    from .onnx_export import export_onnx

    path = check_output_file(path, "the output path")
    with replacing(path) as tmp:
        try:
            export_onnx(model, example, tmp, exclude=exclude)
        except SpdyError:
            raise
        except (RuntimeError, TypeError, ValueError) as e:     # the exporter's own failures
            first = first_line(e) or type(e).__name__
            raise SpdyError(f"torch.onnx.export failed ({first}); exclude or rewrite the "
                            "layer it names") from None
    return path


# ---- block-sparse artifact (Triton) ---------------------------------------------------------

def _block_layers(model: nn.Module, choices: Mapping[str, SparsityOption]) -> dict[str, str]:
    """The chosen layers that become BlockSparseLinear (block options) or SemiStructuredLinear
    (2:4) on plain nn.Linear (subclasses such as attention projections are read as tensors by
    their owners), and BlockSparseConv1x1 (block options) on 1x1 convs without groups."""
    modules = dict(model.named_modules())
    swappable = {name for name, m in modules.items() if gpu_swappable(m)}
    return {name: o.name for name, o in choices.items()
            if name in swappable and (o.pattern == "block" or (
                o == SEMI_STRUCTURED and isinstance(modules[name], nn.Linear)))}


def save_block_sparse(model: nn.Module, profile_or_choices: ProfileLike | Plan,
                      path: PathLike) -> dict[str, dict[str, Any]]:
    """Write the Triton deployment artifact of `model` (dense, or already pruned to these
    choices, e.g. by prune_ with a database: magnitude masks keep pruned weights as they
    are). The model itself is not changed. Returns the layout {layer: {"option", "block",
    "shape"}} of the layers stored block-sparse."""
    from safetensors.torch import save_model

    from .sparse_linear import BlockSparseConv1x1, BlockSparseLinear, sparsify_

    require_real(model, "save_block_sparse")
    plan = load_plan(profile_or_choices)
    path = check_output_file(path, "the output path")
    deployed = copy.deepcopy(model)
    _pruned_to(deployed, plan, None)     # magnitude masks keep pruned weights as they are
    swap = _block_layers(deployed, plan.choices)
    if swap:
        sparsify_(deployed, swap)
    layout = {}
    for name, option in swap.items():
        layer = deployed.get_submodule(name)
        layout[name] = {"option": option,
                        "shape": list(model.get_submodule(name).weight.shape)}
        packed = layer.linear if isinstance(layer, BlockSparseConv1x1) else layer
        if isinstance(packed, BlockSparseLinear):
            layout[name]["block"] = list(packed.values.shape[1:])
    meta = {"format": BLOCK_FORMAT, "version": ARTIFACT_VERSION, **plan.metadata(),
            "layers": json.dumps(layout)}
    with replacing(path) as tmp:
        save_model(deployed, str(tmp), metadata=meta, force_contiguous=True)
    return layout


def load_block_sparse(model_factory_or_model: nn.Module | Callable[[], nn.Module],
                      path: PathLike) -> nn.Module:
    """The model of a save_block_sparse artifact: its recorded Linears swapped for
    BlockSparseLinear, then the state dict loaded. Pass the dense model (freshly built, same
    architecture) or a function building it; a given model is converted in place and keeps
    its mode, one built here comes back in eval mode, ready to run."""
    from .sparse_linear import BlockSparseConv1x1, BlockSparseLinear, swaps_undone_on_error

    state, meta = _read_safetensors(path)
    layout = _read_layout(meta, path)
    model = model_factory_or_model
    if not isinstance(model, nn.Module) and callable(model):
        with user_code("the model function given to load_block_sparse", "fix it"):
            model = model()
        if isinstance(model, nn.Module):
            model.eval()
    require_real(model, f"loading {path}")
    modules = dict(model.named_modules())
    for name, entry in layout.items():
        module = modules.get(name)
        if isinstance(module, (BlockSparseLinear, BlockSparseConv1x1, SemiStructuredLinear)):
            raise SpdyError(f"layer {name} is already a {type(module).__name__}: this model "
                            "was deployed before; pass a freshly built dense model")
        if not gpu_swappable(module) or list(module.weight.shape) != entry["shape"]:
            raise SpdyError(f"{path} does not fit this model: its layer {name} is not an "
                            f"nn.Linear or 1x1 Conv2d of weight shape {entry['shape']} here; "
                            "pass the model the artifact was written for")
    with swaps_undone_on_error(model) as swap:   # a refused file leaves the model as it was
        for name, entry in layout.items():
            module = modules[name]
            if "block" not in entry:        # 2:4: the file brings the masked weight
                swap(name, SemiStructuredLinear.from_linear(module))
                continue
            empty = torch.zeros_like(module.weight, dtype=torch.bool)  # the file brings blocks
            convert = (BlockSparseConv1x1.from_conv if isinstance(module, nn.Conv2d)
                       else BlockSparseLinear.from_linear)
            swap(name, convert(module, mask=empty, block=tuple(entry["block"])))
        swapped = [model.get_submodule(name) for name in layout]
        resized = [name for name, module in model.named_modules(remove_duplicate=False)
                   if any(module is layer for layer in swapped)]     # aliases too
        _check_state(model, state, path, resized=resized)
        model.load_state_dict(state, strict=False)
    return model


def _read_layout(meta: Mapping[str, str], path: PathLike) -> dict[str, dict[str, Any]]:
    if meta.get("format") != BLOCK_FORMAT:
        raise SpdyError(f"{path} is not a block-sparse artifact (format "
                        f"{meta.get('format')!r}); write one with spdy-gpu export --format triton")
    if meta.get("version") != ARTIFACT_VERSION:
        raise SpdyError(f"{path}: block-sparse artifact version {meta.get('version')!r} is not "
                        f"supported (this spdy-gpu reads {ARTIFACT_VERSION}); export it again")
    try:
        layout = json.loads(meta["layers"])
        for entry in layout.values():
            entry["shape"] = list(entry["shape"])
            if "block" in entry or SparsityOption.parse(entry["option"]) != SEMI_STRUCTURED:
                entry["block"] = [int(v) for v in entry["block"]]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SpdyError(f"{path}: malformed layer layout in its metadata ({e}); export it "
                        "again") from None
    return layout


# ---- CUDA graphs (small batches) -------------------------------------------------------------

def cuda_graph_of(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph; raises where capture fails (host synchronisation,
    data-dependent shapes). `fn` runs twice first on the stream the capture then uses, so
    autotuning, compilation and per-stream state (the kernel's stream-K workspace) happen
    before the capture, not inside it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph


def capture_cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any] | None:
    """The replay of `fn`'s CUDA graph (cuda_graph_of), or None where capture fails: then
    the caller runs `fn` eagerly."""
    try:
        graph = cuda_graph_of(fn)
    except Exception as e:  # noqa: BLE001 - any capture failure means "run it eagerly"
        log.info("CUDA-graph capture failed (%s); running eagerly",
                 first_line(e) or type(e).__name__)
        torch.cuda.synchronize()
        return None
    return graph.replay


def cuda_graphed(model: nn.Module, example: Any) -> Callable[..., Any]:
    """`model` replayed from a CUDA graph for inputs shaped like `example` (tensor, tuple or
    dict on the GPU), as small-batch (decode) deployments run: launch overhead dominates
    there. A call copies its inputs into the captured ones, replays, and returns the captured
    output, which the next call overwrites (clone it to keep it). Inputs of another shape,
    or a model that cannot be captured, run eagerly."""
    from torch.utils._pytree import tree_flatten

    from .layers import call_model

    static, _ = tree_flatten(example)
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in static):
        raise SpdyError("cuda_graphed needs the model and its example input on a CUDA device; "
                        "move them with .cuda() first")
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in static]
    output: list[Any] = []
    with torch.inference_mode():
        replay = capture_cuda_graph(lambda: output.append(call_model(model, example)))

    def run(inputs: Any) -> Any:
        flat, _ = tree_flatten(inputs)
        same = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in flat] == shapes
        if replay is None or not same:
            return call_model(model, inputs)
        for target, value in zip(static, flat):
            if isinstance(target, torch.Tensor):
                target.copy_(value)
        replay()
        return output[-1]
    return run


# ---- the CLI's steps ------------------------------------------------------------------------

def apply_profile(model: nn.Module, profile: ProfileLike, out: PathLike, *,
                  database: Any = None, model_name: str | None = None,
                  exclude: Iterable[str] = ()) -> DeployResult:
    """`spdy-gpu apply`: prune `model` to the profile (database weights or magnitude masks)
    and save its weights to `out`."""
    check_output_file(out)                      # fail before any work on an unwritable target
    plan = load_plan(profile, exclude)
    database = Database.of(database)
    check_for_model(model, model_name, plan.profile, database)
    _pruned_to(model, plan, database)
    with exclusive_file(out, "weights file"):
        path = save_pruned(model, out, profile=plan)
    return DeployResult(path, len(plan.pruned), _sparsity_of(model, plan.pruned))


def export_profile(model: nn.Module, example: Any, profile: ProfileLike, out: PathLike, *,
                   format: str, database: Any = None, weights: PathLike | None = None,
                   model_name: str | None = None, exclude: Iterable[str] = ()) -> DeployResult:
    """`spdy-gpu export`: prune `model` to the profile (from `database`, or load `weights`
    already pruned to it, else magnitude masks), then write the ONNX file (format "onnx") or
    the block-sparse artifact (format "triton") to `out`."""
    if format not in FORMATS:
        raise SpdyError(f"unknown export format {format!r}; use one of {FORMATS}")
    if database is not None and weights is not None:
        raise SpdyError("pass either a database or a weights file, not both")
    check_output_file(out)
    plan = load_plan(profile, exclude)
    if format == "triton" and plan.pruned and not _block_layers(model, plan.pruned):
        kinds = sorted({o.pattern for o in plan.pruned.values()})
        raise SpdyError(f"none of the profile's {len(plan.pruned)} pruned layers runs sparse on "
                        f"a GPU (they are {', '.join(kinds)}; the triton format runs block and "
                        "2:4 choices on Linear and 1x1 conv layers): plan the profile with "
                        "--backend triton, or export it with --format onnx")
    database = Database.of(database)
    check_for_model(model, model_name, plan.profile, database)
    if weights is not None:
        load_pruned(model, weights)
        _check_made_for(plan, weights)
        _check_pruned(_layer_weights(model, plan.pruned), plan, weights)
    else:
        _pruned_to(model, plan, database)
    sparsity = _sparsity_of(model, plan.pruned)
    with exclusive_file(out, "export"):
        if format == "onnx":
            path = export_onnx_pruned(model, example, out, exclude=exclude)
            return DeployResult(path, len(plan.pruned), sparsity)
        layout = save_block_sparse(model, plan, out)
    two_four = sum(SparsityOption.parse(x["option"]).pattern == "nm" for x in layout.values())
    dense_stored = [name for name in plan.pruned if name not in layout]
    if dense_stored:
        log.warning("%d of the %d pruned layers run dense on a GPU (stored with their zeros; "
                    "the Triton artifact runs block and 2:4 choices on Linear and 1x1 conv "
                    "layers): %s", len(dense_stored), len(plan.pruned),
                    ", ".join(dense_stored[:5]) + (", ..." if len(dense_stored) > 5 else ""))
    return DeployResult(Path(out), len(plan.pruned), sparsity, len(layout) - two_four, two_four)
