"""BlockSparseLinear: an nn.Linear whose weight is stored block-sparse and run by the
Triton kernel, and `sparsify_`, which swaps a model's pruned Linears for it in place.

Forward: on CUDA the Triton kernel; on a CPU the same kernel under Triton's interpreter
when TRITON_INTERPRET=1 is set, otherwise an exact torch fallback (a dense matmul of the
masked weight), so a pruned model runs anywhere. Both have a backward (torch.autograd):
gradients of the input, the stored values and the bias; pruned weights stay zero.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from spdy_kernels.layout import (
    ACTIVATIONS,
    dense_linear,
    input_problem,
    interpret_requested,
    note_cpu_fallback,
)
from torch import nn
from torch.autograd import forward_ad

from .bsr import FLOAT_DTYPES, KERNEL_BLOCK_SIDES, BSRWeight, kernel_block
from .errors import SpdyError
from .layers import first_name_of, gpu_swappable, is_pointwise, require_real, tied_weights
from .masks import build_mask, gemm_view
from .options import SparsityOption
from .semi_structured import SEMI_STRUCTURED, SemiStructuredLinear, is_2_4
from .semi_structured import fits as semi_structured_fits

log = logging.getLogger(__name__)

_INDEX_BUFFERS = ("crow_indices", "col_indices", "row_order")


class BlockSparseLinear(nn.Module):
    """y = act(x @ W^T + bias) with W [out_features, in_features] block-sparse.

    State (all in `state_dict`): `values` [nnz, rows, cols] and `bias` [out] (parameters,
    frozen), `crow_indices`, `col_indices`, `row_order` (int32) and `shape` = (out, in).
    Loading a state dict with another sparsity pattern resizes the buffers to it.
    """

    def __init__(self, weight: BSRWeight, bias: torch.Tensor | None = None,
                 activation: str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise SpdyError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise SpdyError(f"bias of shape {tuple(bias.shape)} does not match "
                            f"{weight.shape[0]} outputs; pass a [{weight.shape[0]}] bias")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation = activation
        self.values = nn.Parameter(weight.values.detach().clone(), requires_grad=False)
        for name in _INDEX_BUFFERS:
            self.register_buffer(name, getattr(weight, name).clone())
        self._set_derived_indices(weight)
        self.register_buffer("shape", torch.tensor(weight.shape, dtype=torch.int64))
        self.bias = (None if bias is None else
                     nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False))
        self._packed_cache: tuple[tuple, BSRWeight] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                    option: SparsityOption | str | None = None,
                    block: int | tuple[int, int] | None = None,
                    activation: str | None = None,
                    dtype: torch.dtype | None = None) -> BlockSparseLinear:
        """Pack `linear` pruned by `mask` (bool, the weight's shape) or by `option` (the mask
        is built by magnitude / block norm, spdy_gpu.masks.build_mask).

        block: the kernel block; default kernel_block(option.block) for block options, else
        32 x 32. Any mask packs exactly at any block, but only block masks skip work.
        """
        if not isinstance(linear, nn.Linear):
            raise SpdyError(f"BlockSparseLinear replaces nn.Linear, not {type(linear).__name__}; "
                            "exclude this layer")
        if linear.weight.is_meta:
            raise SpdyError("the layer's weight is on the meta device, which holds no values "
                            "to pack; build the model on a real device (or load its weights)")
        if (mask is None) == (option is None):
            raise SpdyError("pass exactly one of mask= or option= to BlockSparseLinear.from_linear")
        if isinstance(option, str):
            option = SparsityOption.parse(option)
        if mask is None:
            mask = build_mask(linear.weight, option)
        if block is None:
            block = kernel_block(option.block if option is not None else None)
        packed = BSRWeight.from_dense(linear.weight, mask, block, dtype)
        return cls(packed, linear.bias, activation).to(linear.weight.device)

    @property
    def weight(self) -> BSRWeight:
        """The packed weight (tensors shared with this module), validated once per storage:
        PyTorch's fused paths read it on every forward (see BSRWeight.__torch_function__)."""
        key = tuple((t.data_ptr(), t.dtype, t.device, t.shape) for t in (
            self.values, self.crow_indices, self.col_indices, self.row_order))
        if self._packed_cache is None or self._packed_cache[0] != key:
            self._packed_cache = (key, BSRWeight(
                self.values.data, self.crow_indices, self.col_indices, self.row_order,
                (self.out_features, self.in_features)))
        return self._packed_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]. Traced (torch.compile / export), the
        # kernel is always the op: the graph holds what deploys.
        if torch.is_autocast_enabled(x.device.type):
            # under autocast the layer computes in its own dtype (that of its stored blocks;
            # cast the model for 16-bit kernels), as the kernel needs one dtype for both, and
            # the CPU fallback's F.linear must not be autocast where the kernel is not
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.to(self.values.dtype))
        if (x.is_cuda or interpret_requested() or torch.compiler.is_compiling()
                or torch.jit.is_tracing()):
            return self._kernel(x)
        note_cpu_fallback()
        self._check_input(x)
        return dense_linear(x, self.values, self.block_rows, self.col_indices,
                            self.out_features, self.in_features, self.bias, self.activation)

    def to_dense(self) -> nn.Linear:
        """The masked dense layer (nn.Linear in the value dtype); the activation is dropped."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def density(self) -> float:
        """Fraction of blocks stored (from shapes: readable on the meta device too)."""
        rows, cols = self.values.shape[1:]
        grid = -(-self.out_features // rows) * -(-self.in_features // cols)
        return self.values.shape[0] / grid

    def _apply(self, fn: Any, recurse: bool = True) -> BlockSparseLinear:
        # .double(), .to(torch.float64)...: refused here, naming the layer's choice, not at
        # the first forward or repr with a BSR validation message
        dtype = self.values.dtype
        super()._apply(fn, recurse)
        if self.values.dtype not in FLOAT_DTYPES:
            wrong = self.values.dtype
            super()._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse)
            raise SpdyError(f"a BlockSparseLinear holds float32, float16 or bfloat16 blocks, not "
                            f"{str(wrong).removeprefix('torch.')} (the kernel has no such "
                            "path); layers converted before it stay converted: convert the "
                            "model to one of them (e.g. model.float())")
        return self

    def extra_repr(self) -> str:
        rows, cols = self.values.shape[1:]
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={rows}x{cols}, density={self.density:.3f}, bias={self.bias is not None}, "
                f"activation={self.activation}")

    # ---- internals ----------------------------------------------------------------------

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel, called directly where `_runs_directly` (the custom op's dispatch costs
        ~15 us of host time a call, as much as the launch itself), else the torch op
        spdy_kernels::bsr_linear, which tracers see, which reads only this module's tensors
        and whose backward gives the input's, the stored blocks' and the bias's gradients.
        A call the kernel cannot run is a SpdyError naming the fix."""
        import spdy_kernels.ops  # noqa: F401  (registers the op)
        from spdy_kernels.bsr_matmul import bsr_linear
        from spdy_kernels.layout import KernelInputError, LayoutIndices

        if torch.compiler.is_compiling():
            self._check_input(x)        # the fake op's check would surface as a long trace
        else:
            _host_only(_refuse_unsupported_derivatives)(x, self.values, self.bias)
        try:
            if self._runs_directly(x):
                indices = LayoutIndices(self.row_order, self.block_rows, self.empty_rows)
                return bsr_linear(x, self.values, self.crow_indices, self.col_indices,
                                  (self.out_features, self.in_features), self.bias,
                                  self.activation, indices=indices)
            return torch.ops.spdy_kernels.bsr_linear(
                x, self.values, self.crow_indices, self.col_indices, self.row_order,
                self.block_rows, self.empty_rows, self.out_features, self.in_features,
                self.bias, self.activation)
        except KernelInputError as e:
            raise SpdyError(str(e)) from None

    def _runs_directly(self, x: torch.Tensor) -> bool:
        """Outside torch.compile / export and jit.trace (which must record the op), on a
        tensor the kernel can read, with no gradient to track (the op's backward does)."""
        return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and _host_only(_plain)(x) and not (torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (x, self.values, self.bias))))

    def _set_derived_indices(self, weight: BSRWeight) -> None:
        # Derived from crow_indices, so not saved; buffers so that .to(device) moves them.
        self.register_buffer("block_rows", weight.indices.block_rows.clone(), persistent=False)
        self.register_buffer("empty_rows", weight.indices.empty_rows.clone(), persistent=False)

    def _check_input(self, x: torch.Tensor) -> None:
        """The fallback refuses what the kernel refuses, in the same words (input_problem,
        which the kernel's checks call too)."""
        problem = input_problem(x, self.in_features, self.values)
        if problem is not None:
            raise SpdyError(f"bsr_linear: {problem}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # A checkpoint may hold another sparsity pattern: adopt its shapes before loading.
        shape = state_dict.get(prefix + "shape")
        if shape is not None and tuple(shape.tolist()) != (self.out_features, self.in_features):
            raise SpdyError(f"{prefix}shape {tuple(shape.tolist())} does not match this layer's "
                            f"({self.out_features}, {self.in_features}); load into the right model")
        incoming = {name: state_dict.get(prefix + name) for name in ("values", *_INDEX_BUFFERS)}
        if all(isinstance(t, torch.Tensor) for t in incoming.values()):
            try:                        # a bad layout is refused before anything changes
                BSRWeight(incoming["values"], incoming["crow_indices"],
                          incoming["col_indices"], incoming["row_order"],
                          (self.out_features, self.in_features))
            except SpdyError as e:
                raise SpdyError(f"layer {prefix.rstrip('.') or '(root)'}: {e}") from None
        for name, tensor in incoming.items():
            current = getattr(self, name)
            if tensor is not None and tensor.shape != current.shape:
                resized = current.new_empty(tensor.shape)
                if name == "values":        # the same Parameter: an optimizer holding it
                    current.data = resized  # trains the loaded blocks, not a stale copy
                else:
                    setattr(self, name, resized)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed_cache = None
        self._set_derived_indices(self.weight)     # validates what was loaded


class BlockSparseConv1x1(nn.Module):
    """A 1x1 Conv2d (groups 1; any stride and zero padding) run as a BlockSparseLinear over
    the channels of every pixel: x [..., C_in, H, W] -> [..., C_out, H', W'].

    State: `linear` (a BlockSparseLinear over [out_channels, in_channels]); stride and
    padding are fixed by the convolution it replaces."""

    def __init__(self, linear: BlockSparseLinear, stride: tuple[int, int],
                 padding: tuple[int, int]):
        super().__init__()
        self.linear = linear
        self.stride, self.padding = tuple(stride), tuple(padding)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None,
                  option: SparsityOption | str | None = None,
                  block: int | tuple[int, int] | None = None,
                  dtype: torch.dtype | None = None) -> BlockSparseConv1x1:
        """`conv` pruned by `mask` (bool, the weight's shape) or by `option`, as for
        BlockSparseLinear.from_linear."""
        if not is_pointwise(conv):
            raise SpdyError(f"only 1x1 Conv2d layers without groups run block-sparse, not "
                            f"{conv}; keep this layer dense (exclude it)")
        weight = conv.weight.detach()
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight[:, :, 0, 0])
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        if mask is not None:
            mask = mask.reshape(linear.weight.shape)
        padding = (0, 0) if isinstance(conv.padding, str) else conv.padding   # "same"/"valid"
        return cls(BlockSparseLinear.from_linear(linear, mask=mask, option=option, block=block,
                                                 dtype=dtype), conv.stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.linear.in_features
        if x.dim() not in (3, 4) or x.shape[-3] != channels:
            raise SpdyError(f"BlockSparseConv1x1 takes [batch, {channels}, H, W] or "
                            f"[{channels}, H, W] inputs, got {tuple(x.shape)}")
        if any(self.padding):
            x = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        if self.stride != (1, 1):
            x = x[..., ::self.stride[0], ::self.stride[1]]
        return self.linear(x.movedim(-3, -1)).movedim(-1, -3)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}"


@functools.cache
def _host_only(check: Any) -> Any:
    """`check` hidden from dynamo, which cannot trace the builtins host-side checks read (a
    traced call that fails is re-run eagerly, and dynamo would warn at them). Wrapped on
    first use: torch.compiler.disable imports dynamo, and with it Triton."""
    return torch.compiler.disable(check)


def _refuse_unsupported_derivatives(*tensors: torch.Tensor | None) -> None:
    """The op has a backward for torch.autograd only: forward-mode AD (jvp, dual tensors)
    would give no tangent and torch.func's grad transforms fail deep inside PyTorch, so
    both are refused here in one line, whichever of input, values or bias carries them."""
    given = [t for t in tensors if t is not None]
    if getattr(forward_ad, "_current_level", -1) >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in given):
        raise SpdyError("BlockSparseLinear has no forward-mode derivative (jvp, dual tensors); "
                        "differentiate its dense form, layer.to_dense(), instead")
    tracking = getattr(torch._C._functorch, "is_gradtrackingtensor", None)
    if tracking is not None and any(tracking(t) for t in given):
        raise SpdyError("BlockSparseLinear supports torch.autograd (loss.backward()), not "
                        "torch.func.grad / jacrev; use autograd or layer.to_dense()")


def _plain(x: torch.Tensor) -> bool:
    """A tensor with storage the raw kernel can read: no subclass (fake, functional) and no
    functorch wrapper (vmap, grad), which look like torch.Tensor from Python."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return type(x) is torch.Tensor and wrapped is not None and not wrapped(x)


def candidate_blocks() -> list[tuple[int, int]]:
    """Every block shape the kernel runs, largest area first."""
    pairs = [(r, c) for r in KERNEL_BLOCK_SIDES for c in KERNEL_BLOCK_SIDES]
    return sorted(pairs, key=lambda rc: (-rc[0] * rc[1], rc))


def detect_block(weight: torch.Tensor, covered: float = 0.99) -> tuple[int, int] | None:
    """The largest kernel block shape whose all-zero tiles hold at least `covered` of the
    weight's zeros (a weight pruned in blocks), or None for a weight without such tiles."""
    zero = gemm_view(weight.detach()) == 0                               # [N, K]
    n, k = zero.shape
    zeros = int(zero.sum())
    if zeros == 0:
        return None
    for rows, cols in candidate_blocks():
        if rows > n or cols > k:
            continue
        padded = F.pad(zero, (0, -k % cols, 0, -n % rows), value=True)
        tiles = padded.reshape(padded.shape[0] // rows, rows, -1, cols).all(3).all(1)
        if not tiles.any():
            continue
        in_tiles = tiles.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :k]
        if int((in_tiles & zero).sum()) >= covered * zeros:
            return rows, cols
    return None


def sparsify_(model: nn.Module,
              choices: Mapping[str, torch.Tensor | SparsityOption | str] | None = None, *,
              block: int | tuple[int, int] | None = None,
              dtype: torch.dtype | None = None) -> list[str]:
    """Swap Linears of `model` for BlockSparseLinear (block-sparse kernel) or, for 2:4,
    SemiStructuredLinear (sparse tensor cores), and 1x1 Conv2d layers for
    BlockSparseConv1x1, in place; returns the names swapped.

    choices: layer name -> bool mask of its weight (packed block-sparse), or a SparsityOption
    (or its name, e.g. "block32x32@0.7", "nm2:4") to prune it to; dense entries are left
    alone. None: every nn.Linear or 1x1 Conv2d whose weight was already pruned in blocks
    (see detect_block) keeps its zeros and runs block-sparse, and every one pruned 2:4 with a
    shape that suits it runs 2:4, as a model stitched from a profile is deployed.
    block: packing block for every layer (default: the option's, the detected one, or 32).
    """
    require_real(model, "sparsify_")
    if choices is None:
        targets = _found_pruned(model, block)
    else:
        targets = _chosen(model, choices, block)
    # one layer packed at a time (the memory of one more, not all); a choice that fails
    # leaves the model as it was
    with swaps_undone_on_error(model) as swap:
        for name, kwargs in targets.items():
            swap(name, _sparse_layer(model.get_submodule(name), kwargs, dtype))
    log.info("sparsify_: %d layers now sparse (block-sparse or 2:4)", len(targets))
    return list(targets)


def _sparse_layer(module: nn.Module, kwargs: dict[str, Any],
                  dtype: torch.dtype | None) -> nn.Module:
    if kwargs.get("option") == SEMI_STRUCTURED:
        return SemiStructuredLinear.from_linear(module, kwargs.get("mask"), dtype=dtype)
    if isinstance(module, nn.Conv2d):
        return BlockSparseConv1x1.from_conv(module, dtype=dtype, **kwargs)
    return BlockSparseLinear.from_linear(module, dtype=dtype, **kwargs)


ROOT_REFUSED = ("the model itself cannot be swapped for a sparse layer; wrap it (e.g. "
                "nn.Sequential(layer)) and name the layer inside")


def swap_module(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Put `layer` in place of the module at `name` (under every name that module is
    registered as), in its mode. An nn.TransformerEncoderLayer holding it has its fused
    inference path turned off: that path reads linear1/linear2.weight as dense tensors,
    and tracers (torch.compile, torch.export) cannot follow it into a sparse layer."""
    if not name:
        raise SpdyError(ROOT_REFUSED)
    old = model.get_submodule(name)
    layer.train(old.training)
    for module in model.modules():
        for child, current in list(module._modules.items()):    # every name, aliases too
            if current is old:
                setattr(module, child, layer)
    for module, switch, _ in fused_path_switches(model):
        if any(m is layer for m in module.modules()):
            setattr(module, switch, FUSED_PATH_OFF[switch])


@contextlib.contextmanager
def swaps_undone_on_error(model: nn.Module) -> Iterator[Callable[[str, nn.Module], None]]:
    """`swap(name, layer)` (swap_module) for the with-block; if the block raises, every layer
    it swapped goes back, and so do the fused encoder paths the swaps turned off."""
    originals: dict[str, nn.Module] = {}
    switches = fused_path_switches(model)

    def swap(name: str, layer: nn.Module) -> None:
        originals.setdefault(name, model.get_submodule(name))
        swap_module(model, name, layer)

    try:
        yield swap
    except BaseException:
        for name, module in reversed(originals.items()):
            swap_module(model, name, module)
        for module, switch, value in switches:
            setattr(module, switch, value)
        raise


FUSED_PATH_OFF = {"activation_relu_or_gelu": 0, "use_nested_tensor": False}


def fused_path_switches(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """(module, attribute, value) of the off switches of PyTorch's fused encoder paths in
    `model`; setting the attribute back to the value undoes swap_module's switching off."""
    switches = []
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            switches.append((module, "activation_relu_or_gelu", module.activation_relu_or_gelu))
        elif isinstance(module, nn.TransformerEncoder):   # (it checks its first layer only)
            switches.append((module, "use_nested_tensor", module.use_nested_tensor))
    return switches


def _found_pruned(model: nn.Module,
                  block: int | tuple[int, int] | None) -> dict[str, dict[str, Any]]:
    """from_linear arguments per layer pruned in blocks or 2:4 (sparsify_ without choices).
    A layer whose weight is tied to another module's stays dense, as a choice would be
    refused: a sparse copy would leave the other module dense."""
    swappable = {name: module for name, module in model.named_modules()
                 if gpu_swappable(module)}
    tied = tied_weights(model, swappable)
    targets = {}
    for name, module in swappable.items():
        if name in tied:
            log.info("sparsify_: %s shares its weight with %s (tied): kept dense", name,
                     tied[name])
        elif found := detect_block(module.weight):
            targets[name] = {"mask": module.weight != 0, "block": block or found}
        # 16-bit constraints: the layer may be cast to half after the swap
        elif (type(module) is nn.Linear
              and semi_structured_fits(*module.weight.shape, torch.float16)
              and is_2_4(module.weight)):
            targets[name] = {"option": SEMI_STRUCTURED, "mask": module.weight != 0}
    return targets


def _chosen(model: nn.Module, choices: Mapping[str, torch.Tensor | SparsityOption | str],
            block: int | tuple[int, int] | None) -> dict[str, dict[str, Any]]:
    """from_linear arguments per named layer to swap (dense choices dropped)."""
    if not isinstance(choices, Mapping):
        raise SpdyError(f"choices must map layer names to masks or options, not "
                        f"{type(choices).__name__}; e.g. {{'fc1': 'block32x32@0.5'}}")
    modules = dict(model.named_modules())
    first_names = first_name_of(model)
    missing = [name for name in choices if name not in first_names]
    if missing:
        raise SpdyError(f"model has no layer named {missing[0]!r}; use names from "
                        "model.named_modules() (e.g. from a SPDY profile of this model)")
    choices = _by_first_name(choices, first_names)
    tied = tied_weights(model, {name: modules[name] for name in choices
                                if hasattr(modules[name], "weight")})
    targets = {}
    for name, spec in choices.items():
        option = SparsityOption.parse(spec) if isinstance(spec, str) else spec
        if not isinstance(option, (SparsityOption, torch.Tensor)):
            raise SpdyError(f"layer {name}: choice {spec!r} is neither a mask (a bool tensor of "
                            "the weight's shape) nor an option (e.g. 'block32x32@0.5')")
        dense = isinstance(option, SparsityOption) and option.pattern == "dense"
        problem = _unswappable(name, modules[name], tied.get(name))
        if problem is not None and not dense:
            raise SpdyError(problem)
        if isinstance(option, SparsityOption):
            if option.pattern not in ("dense", "block") and option != SEMI_STRUCTURED:
                raise SpdyError(f"layer {name}: {option.name} has no sparse GPU kernel (its "
                                "blocks would all be kept: a dense layer, slower); choose a "
                                "block option such as 'block32x32@0.7' or 'nm2:4', or deploy "
                                "unstructured profiles on DeepSparse")
            if option.pattern != "dense":
                targets[name] = {"option": option, "block": block}
        else:
            targets[name] = {"mask": option, "block": block}
    return targets


def _by_first_name(choices: Mapping[str, Any], first_names: dict[str, str]) -> dict[str, Any]:
    """`choices` keyed by first names; a module named twice with two different choices is
    refused (which would win?)."""
    chosen: dict[str, Any] = {}
    for name, spec in choices.items():
        first = first_names[name]
        if first in chosen and _same_choice(chosen[first], spec):
            continue
        if first in chosen:
            raise SpdyError(f"choices name one layer twice ({first!r} is also registered as "
                            f"{name!r}); give one choice under one of its names")
        chosen[first] = spec
    return chosen


def _same_choice(a: Any, b: Any) -> bool:
    """Whether two choices (masks, options or option names) are the same."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a, b)))
    as_option = [SparsityOption.parse(c) if isinstance(c, str) else c for c in (a, b)]
    return as_option[0] == as_option[1]


def _unswappable(name: str, module: nn.Module, tied_to: str | None) -> str | None:
    """Why `module` at `name` cannot run sparse (None: it can)."""
    if not name:
        return ROOT_REFUSED
    if tied_to is not None:
        return (f"layer {name} shares its weight with {tied_to} (tied): a sparse copy would "
                "leave the other dense; keep it dense")
    if isinstance(module, (nn.Linear, nn.Conv2d)) and not gpu_swappable(module):
        return (f"layer {name} ({type(module).__name__}) cannot run sparse: a Linear subclass "
                "may be read as a tensor by its owner (as attention reads out_proj), and only "
                "1x1 convs without groups and with zeros as padding run block-sparse; keep "
                "it dense")
    return None
