"""The ReID network: [0,1] images -> normalise (inside, out of place) -> backbone -> pooling -> head.

Training mode returns ``{"logits", "feat_before_bn", "feat_after_bn"}``; eval mode returns the retrieval
embedding only (not L2-normalised: evaluation decides normalisation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.models.backbones import BACKBONES, build_backbone, build_pooling
from advreid.models.pretrained import load_pretrained_backbone
from advreid.registry import Preset, Registry, RegistryError, did_you_mean

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
MODELS: Registry[Preset] = Registry("model")


# ------------------------------------------------------------------------------------------------ heads


class BNNeckHead(nn.Module):
    """BoT BNNeck: pooled feature -> BatchNorm1d (bias frozen at 0) -> bias-free Linear (std 0.001)."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.out_dim = in_channels
        self.bn = nn.BatchNorm1d(in_channels)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(in_channels, num_classes, bias=False) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def embed(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pooled, self.bn(pooled)

    def classify(self, after: torch.Tensor) -> torch.Tensor:
        return self.classifier(after)


class BottleneckHead(nn.Module):
    """layumi ClassBlock: Linear(C->embed_dim) -> BatchNorm1d -> Dropout -> Linear(embed_dim->classes)."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.out_dim = embed_dim
        self.fc = nn.Linear(in_channels, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_normal_(self.fc.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.bn.weight, 1.0, 0.02)
        nn.init.zeros_(self.bn.bias)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def embed(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before = self.fc(pooled)
        return before, self.bn(before)

    def classify(self, after: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(after))


class LinearHead(nn.Module):
    """No neck: the pooled feature is the embedding; a Linear classifier on top."""

    def __init__(self, in_channels: int, num_classes: int, embed_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.out_dim = in_channels
        self.classifier = nn.Linear(in_channels, num_classes) if num_classes > 0 else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)

    def embed(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pooled, pooled

    def classify(self, after: torch.Tensor) -> torch.Tensor:
        return self.classifier(after)


HEADS.register("bnneck", BNNeckHead)
HEADS.register("bottleneck", BottleneckHead)
HEADS.register("none", LinearHead)


# --------------------------------------------------------------------------------------------- the model


def _triple(name: str, v: Any) -> tuple[float, float, float]:
    t = tuple(float(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {v!r}")
    return t  # type: ignore[return-value]


class ReIDNet(nn.Module):
    """Backbone + pooling + head, with ImageNet normalisation inside; input images in [0,1], (B,3,H,W)."""

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = 751,
        *,
        last_stride: int = 1,
        pooling: str = "avg",
        head: str = "bnneck",
        embed_dim: int = 512,
        dropout: float = 0.5,
        neck_feat: str = "after",
        pretrained: bool | str | Path = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = feature-only model), got {num_classes!r}")
        if neck_feat not in ("after", "before"):
            raise ValueError(f"neck_feat must be 'after' or 'before', got {neck_feat!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        mean, std = _triple("mean", mean), _triple("std", std)
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self._arch = {
            "backbone": str(backbone).lower(), "num_classes": num_classes, "last_stride": int(last_stride),
            "pooling": str(pooling).lower(), "head": str(head).lower(), "embed_dim": int(embed_dim),
            "dropout": float(dropout), "neck_feat": neck_feat, "mean": list(mean), "std": list(std),
        }
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.backbone = build_backbone(backbone, last_stride=int(last_stride))
        self.pretrained_source = load_pretrained_backbone(self.backbone, str(backbone), pretrained)
        self.pool = build_pooling(pooling)
        self.head = HEADS(head, self.backbone.out_channels, num_classes, embed_dim=int(embed_dim),
                          dropout=float(dropout))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Dimension of the retrieval embedding."""
        return self.head.out_dim

    def arch_config(self) -> dict[str, Any]:
        """Constructor kwargs (without ``pretrained``) as a JSON-able dict, enough to rebuild the model."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._arch.items()}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Out-of-place ``(x - mean) / std`` after checking the input is a float (B,3,H,W) tensor."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ReIDNet expects images as a (B,3,H,W) tensor in [0,1], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"ReIDNet expects float images in [0,1], got dtype {x.dtype} "
                             "(convert uint8 with x.float() / 255)")
        return (x - self.mean) / self.std

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pool(self.backbone(self.normalize(x)))
        return self.head.embed(pooled)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding (``neck_feat``), without the classifier; BN follows the module's mode."""
        before, after = self._embed(x)
        return after if self.neck_feat == "after" else before

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor | None]:
        if not self.training:
            return self.features(x)
        before, after = self._embed(x)
        logits = self.head.classify(after) if self.num_classes > 0 else None
        return {"logits": logits, "feat_before_bn": before, "feat_after_bn": after}

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone (the trainer usually gives them a lower learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters outside the backbone: pooling (learnable GeM p) and head."""
        yield from self.pool.parameters()
        yield from self.head.parameters()

    def param_groups(self, backbone_lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (trainable parameters only): backbone at one lr, the rest at another."""
        return [
            {"params": [p for p in self.backbone_parameters() if p.requires_grad], "lr": backbone_lr,
             "name": "backbone"},
            {"params": [p for p in self.head_parameters() if p.requires_grad], "lr": head_lr, "name": "head"},
        ]

    def extra_repr(self) -> str:
        a = self._arch
        return (f"backbone={a['backbone']}, last_stride={a['last_stride']}, pooling={a['pooling']}, "
                f"head={a['head']}, num_classes={a['num_classes']}, neck_feat={a['neck_feat']}")


# ---------------------------------------------------------------------------------------------- presets

_MODEL = {"exclude": ("num_classes",), "pretrained": False}  # every preset: random init unless asked
MODELS.add_preset("bot_r50", ReIDNet, backbone="resnet50", last_stride=1, pooling="avg", head="bnneck",
                  neck_feat="after", **_MODEL)
MODELS.add_preset("bot_r50_ibn", ReIDNet, backbone="resnet50_ibn_a", last_stride=1, pooling="avg", head="bnneck",
                  neck_feat="after", **_MODEL)
MODELS.add_preset("layumi_r50", ReIDNet, backbone="resnet50", last_stride=2, pooling="avg", head="bottleneck",
                  embed_dim=512, dropout=0.5, neck_feat="after", **_MODEL)
MODELS.add_preset("layumi_densenet121", ReIDNet, backbone="densenet121", last_stride=2, pooling="avg",
                  head="bottleneck", embed_dim=512, dropout=0.5, neck_feat="after", **_MODEL)
MODELS.add_preset("resnet18", ReIDNet, backbone="resnet18", last_stride=1, pooling="avg", head="bnneck", **_MODEL)
MODELS.add_preset("cnn4", ReIDNet, backbone="cnn4", last_stride=2, pooling="avg", head="bnneck", **_MODEL)

_NATIVE_LAST_STRIDE = {"densenet121": 2}


def build_model(name: str, num_classes: int, **overrides: Any) -> ReIDNet:
    """Build a preset (``bot_r50``, ``layumi_r50``, ``cnn4``, ...) or any backbone name.

    ``pretrained`` is False unless overridden; an unknown name or override raises
    :class:`~advreid.registry.RegistryError` naming it.
    """
    if name in MODELS:
        preset = MODELS.get(name)
    elif name in BACKBONES:
        defaults = {"backbone": name.lower(), "pretrained": False}
        if name.lower() in _NATIVE_LAST_STRIDE:
            defaults["last_stride"] = _NATIVE_LAST_STRIDE[name.lower()]
        preset = Preset("model", name, ReIDNet, defaults, exclude=("num_classes",))
    else:
        raise RegistryError(f"unknown model {name!r}{did_you_mean(name, MODELS.names() + BACKBONES.names())}; "
                            f"expected a preset ({', '.join(MODELS.names())}) or a backbone "
                            f"({', '.join(BACKBONES.names())})")
    return ReIDNet(num_classes=num_classes, **preset.resolve(overrides))
