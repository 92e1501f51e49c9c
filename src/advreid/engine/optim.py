"""Optimisers (SGD/Adam/AdamW, separate backbone and head learning rates) and epoch-wise schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """``cfg`` is the ``optim`` section. ``backbone_lr`` (if set) applies to the backbone, ``lr`` to the rest."""
    lr = float(cfg["lr"])
    backbone_lr = float(cfg["backbone_lr"]) if cfg.get("backbone_lr") is not None else lr
    if hasattr(model, "backbone_parameters") and hasattr(model, "head_parameters"):
        groups = [
            {"params": [p for p in model.backbone_parameters() if p.requires_grad], "lr": backbone_lr},
            {"params": [p for p in model.head_parameters() if p.requires_grad], "lr": lr},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    wd = float(cfg["weight_decay"])
    name = cfg["name"]
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=float(cfg["momentum"]), weight_decay=wd, nesterov=bool(cfg["nesterov"])
        )
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    raise ValueError(f"optim.name={name!r}; expected sgd, adam or adamw")


def lr_factor(epoch: int, cfg: dict, total_epochs: int) -> float:
    """LR multiplier for a 0-based ``epoch``: linear warm-up from ``warmup_factor``, then the decay rule."""
    warm = int(cfg.get("warmup_epochs") or 0)
    if epoch < warm:
        f0 = float(cfg["warmup_factor"])
        return f0 + (1.0 - f0) * epoch / warm
    name = cfg["name"]
    gamma = float(cfg["gamma"])
    if name == "multistep":
        return gamma ** sum(epoch >= m for m in cfg["milestones"])
    if name == "step":
        return gamma ** (epoch // int(cfg["step_size"]))
    if name == "cosine":
        span = max(1, total_epochs - warm)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / span))
    if name == "constant":
        return 1.0
    raise ValueError(f"sched.name={name!r}; expected multistep, step, cosine or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, total_epochs: int):
    """An epoch-stepped ``LambdaLR`` (BoT steps its warm-up per epoch too)."""
    lr_factor(0, cfg, total_epochs)  # validate early
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, total_epochs))
