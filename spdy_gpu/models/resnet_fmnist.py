"""resnet-fmnist: a small ResNet (BasicBlocks with BatchNorm) trained by this project on
Fashion-MNIST; its checkpoint ships in spdy_gpu/models/weights/ and `make resnet-fmnist`
rebuilds it (`python -m spdy_gpu.models.resnet_fmnist train --out PATH`).

Inputs: float32 [B, 1, 28, 28], normalised in the data path (fashion_mnist.normalise:
(pixel / 255 - 0.2860) / 0.3530), not inside the model. Output: logits [B, 10].
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpdyError
from ..jsonio import replacing
from . import GENERIC_DEFAULTS, ModelEntry, ModelSetting, fashion_mnist, register_model

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).parent / "weights" / "resnet-fmnist.safetensors"
FORMAT = "spdy-gpu/resnet-fmnist/1"
IMAGE_SIZE = 28


@dataclass(frozen=True)
class Architecture:
    """Stem conv3x3 to widths[0], then one stage per width of `blocks` BasicBlocks (the
    first with the stage's stride), global average pool, Linear to `classes`."""

    widths: tuple[int, ...] = (32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2)
    blocks: int = 2
    classes: int = 10

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        fields = json.loads(text)
        return cls(widths=tuple(fields["widths"]), strides=tuple(fields["strides"]),
                   blocks=int(fields["blocks"]), classes=int(fields["classes"]))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is a 1x1 conv + BN
    when the shape changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3, 1)
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, arch: Architecture = Architecture()):
        super().__init__()
        self.arch = arch
        self.conv1, self.bn1 = _conv_bn(1, arch.widths[0], 3, 1)
        stages, cin = [], arch.widths[0]
        for width, stride in zip(arch.widths, arch.strides):
            blocks = [BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1)
                      for i in range(arch.blocks)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, arch.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x: [B, 1, 28, 28]
        x = self.stages(F.relu(self.bn1(self.conv1(x))))     # [B, C, 7, 7]
        return self.fc(x.mean(dim=(2, 3)))                   # [B, classes]


def save_checkpoint(model: ResNet, path: str | Path, info: dict[str, Any]) -> None:
    """Floating tensors stored as float16 (half the size; the accuracy recorded is that of
    the stored weights), the architecture and `info` in the metadata."""
    from safetensors.torch import save_file
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "architecture": model.arch.to_json(),
                **{k: str(v) for k, v in info.items()}}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(path: str | Path = WEIGHTS) -> ResNet:
    """The ResNet of the checkpoint's recorded architecture with its weights, in eval mode;
    a checkpoint whose tensors do not match that architecture is refused by key."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise SpdyError(f"resnet-fmnist checkpoint {path} not found; rebuild it with "
                        "`make resnet-fmnist`")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        arch = Architecture.from_json(metadata.get("architecture", "{}"))
    except (KeyError, ValueError, OSError, TypeError) as e:
        raise SpdyError(f"{path} is not a resnet-fmnist checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no architecture'}); "
                        "rebuild it with `make resnet-fmnist`") from None
    model = ResNet(arch)
    expected = model.state_dict()
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            problem = "is missing"
        elif key not in expected:
            problem = "is not in the architecture"
        elif tensors[key].shape != expected[key].shape:
            problem = (f"has shape {list(tensors[key].shape)}, the architecture "
                       f"{list(expected[key].shape)}")
        else:
            continue
        raise SpdyError(f"{path} does not match the resnet-fmnist architecture: tensor {key} "
                        f"{problem}; rebuild it with `make resnet-fmnist`")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return model.eval()


# --- the model entry ---------------------------------------------------------------------

def _check_setting(setting: ModelSetting) -> None:
    if setting.image_size not in (None, GENERIC_DEFAULTS["image_size"]):
        raise SpdyError(f"resnet-fmnist takes 28x28 images only; drop --image-size "
                        f"{setting.image_size}")


def build(setting: ModelSetting) -> tuple[nn.Module, torch.Tensor]:
    """The shipped model and the first batch_size (default 1) test images."""
    _check_setting(setting)
    images, _ = fashion_mnist.load("test")
    index = torch.arange(setting.batch_size or 1) % len(images)
    return load_checkpoint(), images[index]


def calibration(setting: ModelSetting, samples: int) -> Iterator[torch.Tensor]:
    """`samples` training images (at most 60,000) in a fixed seeded order, in batches of
    batch_size (default 1; the last may be smaller)."""
    _check_setting(setting)
    images, _ = fashion_mnist.load("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]
    step = setting.batch_size or 1
    for start in range(0, len(order), step):
        yield images[order[start:start + step]]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes [N] of images [N, 1, 28, 28]."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1)
                      for i in range(0, len(images), batch_size)])


def quality(pruned: nn.Module, dense: nn.Module) -> dict[str, float]:
    """On the 10,000 test images: top-1 accuracy of `pruned` (%), and agreement (%): the
    share of images where pruned and dense predict the same class."""
    images, labels = fashion_mnist.load("test")
    pruned_pred, dense_pred = predict(pruned, images), predict(dense, images)
    return {"accuracy": 100.0 * float((pruned_pred == labels).float().mean()),
            "agreement": 100.0 * float((pruned_pred == dense_pred).float().mean())}


@register_model("resnet-fmnist")
def entry() -> ModelEntry:
    return ModelEntry(
        name="resnet-fmnist",
        description="ResNet (BasicBlocks + BatchNorm, 15 Conv2d + 1 Linear) trained on "
                    "Fashion-MNIST, 28x28 grey images",
        build=build,
        calibration=calibration,
        loss="cross_entropy",
        quality=quality,
    )


# --- training ----------------------------------------------------------------------------

def _augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crops of the zero-padded (i.e. background-padded) images and random
    horizontal flips. images: [B, 1, 28, 28]."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), value=-fashion_mnist.MEAN / fashion_mnist.STD)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]                  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]                  # [B, 1, W]
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(epochs: int = 2, batch_size: int = 128, lr: float = 0.1, seed: int = 0,
          arch: Architecture = Architecture(), augment: bool = True) -> tuple[ResNet, dict]:
    """SGD (Nesterov momentum 0.9, weight decay 5e-4) with a OneCycle learning rate,
    label smoothing 0.1; returns the model in eval mode and what the run did."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    generator = torch.Generator().manual_seed(seed)
    images, labels = fashion_mnist.load("train")
    model = ResNet(arch).to(memory_format=torch.channels_last)
    steps = math.ceil(len(images) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr,
                                                   total_steps=epochs * steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            x = _augment(images[index], generator) if augment else images[index]
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)),
                                   labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                   "augment": augment, "threads": torch.get_num_threads(),
                   "train_seconds": round(seconds, 1)}


def test_accuracy(model: nn.Module) -> float:
    images, labels = fashion_mnist.load("test")
    return 100.0 * float((predict(model, images) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m spdy_gpu.models.resnet_fmnist",
                                     description="Train resnet-fmnist and write its checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on the 60,000 training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, info = train(args.epochs, args.batch_size, args.lr, args.seed, augment=args.augment)
    save_checkpoint(model, args.out, info)
    info["test_accuracy"] = round(test_accuracy(load_checkpoint(args.out)), 2)
    save_checkpoint(load_checkpoint(args.out), args.out, info)   # record the stored accuracy
    info["params"] = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
