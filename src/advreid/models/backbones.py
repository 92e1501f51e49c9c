"""Backbones (torchvision ResNets, DenseNet-121, ResNet-50-IBN-a, a tiny CNN) and pooling layers.

Every backbone maps a normalised image batch (B,3,H,W) to a feature map (B,C,h,w) and exposes
``out_channels``. ImageNet weights are loaded by :mod:`advreid.models.pretrained`, never here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck

from advreid.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
POOLINGS: Registry[Callable[..., nn.Module]] = Registry("pooling")


def _check_last_stride(name: str, last_stride: int, allowed: tuple[int, ...] = (1, 2)) -> None:
    if last_stride not in allowed:
        raise ValueError(f"backbone {name!r}: last_stride must be one of {allowed}, got {last_stride!r}")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``; parameter names match torchvision's state dict."""

    def __init__(self, resnet: tvm.ResNet, last_stride: int = 2) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        block = self.layer4[0]
        if last_stride == 1:
            # torchvision (v1.5) puts the stride in conv2 of a Bottleneck and conv1 of a BasicBlock.
            strided = block.conv2 if isinstance(block, Bottleneck) else block.conv1
            strided.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        last = self.layer4[-1]
        self.out_channels: int = (last.bn3 if isinstance(last, Bottleneck) else last.bn2).num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet(name: str, ctor: Callable[..., tvm.ResNet]) -> Callable[..., nn.Module]:
    def build(last_stride: int = 2) -> nn.Module:
        _check_last_stride(name, last_stride)
        return ResNetBackbone(ctor(weights=None), last_stride=last_stride)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"torchvision {name} trunk with configurable last stride (1 or 2)."
    return build


for _name, _ctor in (("resnet18", tvm.resnet18), ("resnet34", tvm.resnet34),
                     ("resnet50", tvm.resnet50), ("resnet101", tvm.resnet101)):
    BACKBONES.register(_name, _resnet(_name, _ctor))


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm (affine) on the first half of the channels, BatchNorm on the rest."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)  # names match the IBN-Net / fast-reid weights
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


@BACKBONES.register("resnet50_ibn_a")
def build_resnet50_ibn_a(last_stride: int = 2) -> nn.Module:
    """ResNet-50-IBN-a: torchvision ResNet-50 whose layer1-3 bottlenecks use IBN in place of ``bn1``."""
    _check_last_stride("resnet50_ibn_a", last_stride)
    net = ResNetBackbone(tvm.resnet50(weights=None), last_stride=last_stride)
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            ibn = IBN(block.bn1.num_features)
            nn.init.ones_(ibn.IN.weight)
            nn.init.zeros_(ibn.IN.bias)
            block.bn1 = ibn
    return net


class DenseNetBackbone(nn.Module):
    """torchvision DenseNet ``features`` followed by the ReLU torchvision applies before its classifier."""

    def __init__(self, densenet: tvm.DenseNet) -> None:
        super().__init__()
        self.features = densenet.features
        self.out_channels: int = densenet.classifier.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


@BACKBONES.register("densenet121")
def build_densenet121(last_stride: int = 2) -> nn.Module:
    """torchvision DenseNet-121 features (1024 channels); only its native last stride 2 is supported."""
    if last_stride != 2:
        raise ValueError(
            "backbone 'densenet121' only supports its native last_stride=2, "
            f"got last_stride={last_stride!r}; "
            "pass last_stride=2"
        )
    return DenseNetBackbone(tvm.densenet121(weights=None))


class CNN4(nn.Module):
    """Tiny 4-layer CNN (conv-bn-relu x4, total stride 16 or 8) for tests and CPU demos."""

    def __init__(self, last_stride: int = 2, widths: tuple[int, int, int, int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate(widths):
            stride = last_stride if i == len(widths) - 1 else 2
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels: int = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@BACKBONES.register("cnn4")
def build_cnn4(last_stride: int = 2) -> nn.Module:
    """Tiny CNN backbone (128 output channels)."""
    _check_last_stride("cnn4", last_stride)
    return CNN4(last_stride=last_stride)


def build_backbone(name: str, *, last_stride: int = 2) -> nn.Module:
    """Build a registered backbone (randomly initialised) by name."""
    return BACKBONES(name, last_stride=last_stride)


# ---------------------------------------------------------------------------------------------- pooling


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.): (mean(clamp(x, eps)^p))^(1/p); p learnable optionally."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM: p must be > 0, got {p!r}")
        p_t = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_t)
        else:
            self.register_buffer("p", p_t)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        pooled = F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1)
        return pooled.pow(1.0 / p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"


class _AdaptivePool(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, 1).flatten(1)


POOLINGS.register("avg", lambda: _AdaptivePool(F.adaptive_avg_pool2d))
POOLINGS.register("max", lambda: _AdaptivePool(F.adaptive_max_pool2d))
POOLINGS.register("gem", lambda: GeM(3.0, learnable=False))
POOLINGS.register("gem_learnable", lambda: GeM(3.0, learnable=True))


def build_pooling(name: str) -> nn.Module:
    """Pooling layer mapping (B,C,h,w) -> (B,C): ``avg``, ``max``, ``gem`` (p=3) or ``gem_learnable``."""
    return POOLINGS(name)
