"""Faithful layer-wise AdaPrune: Adam on the kept weights against the dense layer's output.

Loss per minibatch: ||X_b W^T - X_b W_dense^T||^2 / ||X_b W_dense^T + b||^2 (the bias cancels in
the difference, not in the normaliser), mask re-applied after every step. Reference defaults:
lr 1e-3, 10 passes of minibatches of 32 samples over 1024 samples, seeded shuffling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SpdyError


@dataclass(frozen=True)
class AdaPruneConfig:
    lr: float = 1e-3
    passes: int = 10
    batch_size: int = 32        # samples per step
    samples: int = 1024         # samples used (the first ones captured)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SpdyError(f"--lr {self.lr}: AdaPrune's learning rate must be a finite "
                            "number > 0, e.g. 1e-3")
        for flag, value in (("--passes", self.passes), ("--step-samples", self.batch_size),
                            ("--samples", self.samples)):
            if value < 1:
                raise SpdyError(f"{flag} {value} must be >= 1")


def adaprune(samples: list[torch.Tensor], dense_weight: torch.Tensor,
             bias: torch.Tensor | None, mask: torch.Tensor,
             start: torch.Tensor | None = None,
             config: AdaPruneConfig = AdaPruneConfig()) -> torch.Tensor:
    """Reconstructed weight of one layer (shape and dtype of `dense_weight`).

    samples: one [G, M_s, Kg] tensor of GEMM rows per calibration sample (capture_inputs);
    dense_weight, mask, start: the layer's weight shape [N, ...].
    """
    samples = samples[: config.samples]
    if not samples:
        raise SpdyError("AdaPrune needs at least one calibration sample; pass more data")
    g = samples[0].shape[0]
    shape = dense_weight.shape
    dense = dense_weight.detach().float().reshape(g, shape[0] // g, -1)     # [G, Ng, Kg]
    keep = mask.reshape(dense.shape).float()
    b = None if bias is None else bias.detach().float().reshape(g, 1, -1)  # [G, 1, Ng]
    init = dense if start is None else start.detach().float().reshape(dense.shape)
    weight = (init * keep).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.passes):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for first in range(0, len(order), config.batch_size):
            x = torch.cat([samples[i] for i in order[first:first + config.batch_size]], 1)
            with torch.no_grad():
                target = torch.bmm(x, dense.transpose(1, 2))              # [G, M, Ng]
                scale = (target if b is None else target + b).square().sum().clamp_min(1e-30)
            loss = (torch.bmm(x, weight.transpose(1, 2)) - target).square().sum() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weight.mul_(keep)
    return weight.detach().reshape(shape).to(dense_weight.dtype)
