"""Calibration statistics: one pass of the dense model with forward hooks.

Every prunable layer is the GEMM Y[M, N] = X[M, K] @ W[N, K]^T (convs on unfolded inputs,
one GEMM per group). Reconstruction only needs, per layer and group,

    gram  = X^T X   [G, Kg, Kg]    (float64 sum of float32 per-batch products)
    x_sum = 1^T X   [G, Kg]        (for the bias term of ||Y||^2)
    rows  = M

so memory stays flat however many samples are used. Padding tokens are not data: when a
batch is a dict with an `attention_mask` [B, S] and a layer's input is [B, S, K], only the
rows of real tokens enter the statistics (and the stored inputs of faithful AdaPrune).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpdyError
from ..layers import call_model, hooks_attached, inputs_to, model_device

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Second-order input statistics of one layer (see module docstring for shapes)."""

    name: str
    gram: torch.Tensor        # [G, Kg, Kg] float64
    x_sum: torch.Tensor       # [G, Kg] float64
    rows: int

    @property
    def groups(self) -> int:
        return self.gram.shape[0]

    def sq_error(self, weight: torch.Tensor, reference: torch.Tensor) -> float:
        """||X (W - W_ref)^T||^2 summed over groups; weights in any shape with [N, ...]. The
        Gram form can round a zero error of rank-deficient data to -1e-10: clamped at 0."""
        delta = _grouped((weight - reference).detach().double(), self.groups)  # [G, Ng, Kg]
        return max(0.0, float(torch.einsum("gnk,gkl,gnl->", delta, self.gram, delta)))

    def sq_output(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """||X W^T + 1 b^T||^2: the squared norm of the dense layer's output."""
        w = _grouped(weight.detach().double(), self.groups)                   # [G, Ng, Kg]
        total = torch.einsum("gnk,gkl,gnl->", w, self.gram, w)
        if bias is not None:
            b = bias.detach().double().reshape(self.groups, -1)              # [G, Ng]
            total = total + 2 * torch.einsum("gn,gnk,gk->", b, w, self.x_sum)
            total = total + self.rows * b.square().sum()
        return float(total)

    def relative_error(self, weight: torch.Tensor, dense_weight: torch.Tensor,
                       bias: torch.Tensor | None) -> float:
        """||X (W - W_dense)^T||^2 / ||Y_dense||^2 on the calibration rows."""
        return self.sq_error(weight, dense_weight) / max(self.sq_output(dense_weight, bias),
                                                         1e-300)


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, ...] -> [G, N/G, Kg]."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def gemm_rows(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A layer's input as GEMM rows: [M, K] (Linear) or [G, M, Kg] (Conv2d, unfolded).
    A Linear's rows are returned as [1, M, K] too, so callers see one form."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    if not isinstance(module, nn.Conv2d):
        raise SpdyError(f"cannot capture {type(module).__name__}; only Linear and Conv2d "
                        "layers are prunable")
    x = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        x = _explicit_padding(module, x)
        padding = 0
    cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [B, C*kk, L]
    groups = module.groups
    kg = cols.shape[1] // groups
    cols = cols.reshape(cols.shape[0], groups, kg, -1)                               # [B, G, Kg, L]
    return cols.permute(1, 0, 3, 2).reshape(groups, -1, kg)                           # [G, M, Kg]


def _explicit_padding(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Pad as the conv does (padding modes other than zeros, or 'same'), so unfold needs none."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)


def token_mask(batch: Any) -> torch.Tensor | None:
    """[B, S] bool of real tokens when the batch carries an attention mask, else None."""
    if isinstance(batch, dict) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].bool()
    return None


def _real_rows(module: nn.Module, inputs: torch.Tensor,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """[G, M, Kg] rows of a layer input (padding rows dropped for token inputs), and how many
    of those rows each sample of the batch contributed."""
    inputs = inputs.detach()
    if (mask is not None and isinstance(module, nn.Linear) and inputs.dim() >= 3
            and tuple(inputs.shape[:2]) == tuple(mask.shape)):
        return gemm_rows(module, inputs[mask]), mask.sum(1).tolist()
    rows = gemm_rows(module, inputs)
    batched = inputs.dim() >= (4 if isinstance(module, nn.Conv2d) else 2)
    samples = inputs.shape[0] if batched else 1
    return rows, [rows.shape[1] // samples] * samples


def _run_hooked(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any],
                consume: Callable[[str, torch.Tensor, list[int]], None],
                progress: Callable[[int], None] | None = None,
                device: torch.device | None = None) -> int:
    """Run every batch through `model` with hooks calling consume(name, rows, sample_rows);
    returns the number of batches. With `device`, model and batches run there."""
    state: dict[str, Any] = {"mask": None, "index": 0}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            consume(name, *_real_rows(module, args[0], state["mask"]))
        return record

    with hooks_attached([m.register_forward_hook(hook(name)) for name, m in modules.items()]),\
            torch.no_grad(), _moved(model, device):
        for batch in batches:
            batch = batch if device is None else inputs_to(batch, device)
            state["mask"] = token_mask(batch)
            call_model(model, batch)
            state["index"] += 1
            if progress is not None:
                progress(1)
    if state["index"] == 0:
        raise SpdyError("the calibration data is empty; pass at least one batch (--calib or "
                        "--samples)")
    return state["index"]


def capture_statistics(model: nn.Module, modules: Mapping[str, nn.Module],
                       batches: Iterable[Any], progress: Callable[[int], None] | None = None,
                       device: torch.device | str | None = None) -> dict[str, LayerStats]:
    """Gram matrices of every layer in `modules` over all `batches` (one forward each), on
    the CPU. `device`: where the forwards and products run (default: where the model is);
    the model is moved there for the pass and back after it."""
    stats: dict[str, LayerStats] = {}

    def consume(name: str, rows: torch.Tensor, sample_rows: list[int]) -> None:
        # One batch's product in float32 (GEMM speed), the running sum in float64.
        rows = rows.float()                                            # [G, M, Kg]
        if name not in stats:
            g, _, kg = rows.shape
            zeros = functools.partial(torch.zeros, dtype=torch.float64, device=rows.device)
            stats[name] = LayerStats(name, zeros(g, kg, kg), zeros(g, kg), 0)
        entry = stats[name]
        entry.gram += torch.bmm(rows.transpose(1, 2), rows)
        entry.x_sum += rows.double().sum(1)
        entry.rows += rows.shape[1]

    _run_hooked(model, modules, batches, consume, progress,
                None if device is None else torch.device(device))
    for entry in stats.values():
        entry.gram, entry.x_sum = entry.gram.cpu(), entry.x_sum.cpu()
    for name in modules:
        check_statistics(name, stats.get(name))
    return stats


@contextlib.contextmanager
def _moved(model: nn.Module, device: torch.device | None) -> Iterator[None]:
    """`model` on `device` inside the block, back where it was after (also on an error)."""
    home = model_device(model)
    if device is None or device == home:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def check_statistics(name: str, stats: LayerStats | None) -> None:
    """Refuse a layer the data never reached, or whose inputs are all zero or not finite."""
    if stats is None or stats.rows == 0:
        raise SpdyError(f"layer {name}: no calibration input reached it; check that the "
                        "calibration batches exercise the whole model")
    if not torch.isfinite(stats.gram).all():
        raise SpdyError(f"layer {name}: its calibration inputs contain NaN or inf; fix the "
                        "calibration data or the dense model's numerics")
    if float(stats.gram.diagonal(dim1=1, dim2=2).sum()) == 0.0:
        raise SpdyError(f"layer {name}: its calibration inputs are all zero, so no "
                        "reconstruction is possible; use real calibration data")


def capture_inputs(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any],
                   progress: Callable[[int], None] | None = None
                   ) -> dict[str, list[torch.Tensor]]:
    """The inputs themselves: per layer, one [G, M_s, Kg] float32 tensor per calibration
    sample (faithful AdaPrune needs samples; prefer capture_statistics where it does not)."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def consume(name: str, rows: torch.Tensor, sample_rows: list[int]) -> None:
        if not torch.isfinite(rows).all():
            raise SpdyError(f"layer {name}: its calibration inputs contain NaN or inf; fix the "
                            "calibration data or the dense model's numerics")
        chunks = rows.float().split(sample_rows, dim=1)
        inputs[name].extend(chunk.clone() for chunk in chunks if chunk.shape[1])

    _run_hooked(model, modules, batches, consume, progress)
    for name, chunks in inputs.items():
        if not chunks or all(float(c.abs().max()) == 0.0 for c in chunks if c.numel()):
            raise SpdyError(f"layer {name}: its calibration inputs are all zero or missing; "
                            "use real calibration data")
    return inputs
