"""Standard CNN topologies written out (torchvision has no wheel for the pinned CPU torch):
ResNet-18/50 (BasicBlock / Bottleneck, BatchNorm after every conv, 1x1 downsample
shortcuts) and MobileNetV2 (inverted residuals with depthwise 3x3 convs, ReLU6). `width`
scales the channel counts so CI can export them quickly; depth and structure are the
papers'. BatchNorm statistics are randomised so that folding really rescales weights."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, planes, 3, stride),
                                  conv_bn(planes, planes, 3, act=None))
        self.shortcut = (conv_bn(cin, planes, 1, stride, act=None)
                         if stride != 1 or cin != planes else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(conv_bn(cin, planes, 1), conv_bn(planes, planes, 3, stride),
                                  conv_bn(planes, out, 1, act=None))
        self.shortcut = (conv_bn(cin, out, 1, stride, act=None)
                         if stride != 1 or cin != out else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type, depths: list[int], width: int = 64, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, depth in enumerate(depths):
            planes = width * 2 ** i
            for j in range(depth):
                stages.append(block(cin, planes, 2 if j == 0 and i > 0 else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) as in the paper
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, width: float = 1.0, classes: int = 10):
        super().__init__()
        scaled = lambda c: max(8, int(c * width))          # noqa: E731
        cin = scaled(32)
        blocks = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for expand, channels, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, scaled(channels), stride if i == 0 else 1,
                                               expand))
                cin = scaled(channels)
        blocks.append(conv_bn(cin, scaled(1280), 1, act=nn.ReLU6))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(scaled(1280), classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.empty(n).uniform_(-1.5, 1.5, generator=generator)
            module.bias.data = torch.randn(n, generator=generator)
            module.running_mean = torch.randn(n, generator=generator)
            module.running_var = torch.empty(n).uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def resnet18(width: int = 64) -> nn.Module:
    return randomise_batchnorm(ResNet(BasicBlock, [2, 2, 2, 2], width))


def resnet50(width: int = 64) -> nn.Module:
    return randomise_batchnorm(ResNet(Bottleneck, [3, 4, 6, 3], width))


def mobilenet_v2(width: float = 1.0) -> nn.Module:
    return randomise_batchnorm(MobileNetV2(width))


# `package.module:function` entries for CLI tests: small images, batch from the keyword.
def small_resnet18(batch_size: int = 1):
    torch.manual_seed(0)
    return resnet18(width=8), torch.randn(batch_size, 3, 32, 32)


def small_mobilenet_v2():
    torch.manual_seed(0)
    return mobilenet_v2(width=0.25), torch.randn(2, 3, 32, 32)
