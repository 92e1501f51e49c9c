"""The baseline every attack must beat: uniform random noise ``U(-eps, eps)`` added once, clipped to [0,1]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, register_attack
from advreid.ops import per_sample_rand


class UniformNoise(Attack):
    """``clip(x + U(-eps, eps))`` per sample (from the sample's own generator); ``steps=0`` returns ``x``."""

    name = "noise"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = 1, **kwargs: Any) -> None:
        super().__init__(model, eps, alpha, steps, **kwargs)

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        u = per_sample_rand(self.generators(index, "noise"), x0.shape[1:], dtype=x0.dtype, device=x0.device)
        return (x0 + (2 * u - 1) * self.eps).clamp_(0, 1)


register_attack("noise", UniformNoise)
