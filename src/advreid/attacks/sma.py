"""SMA, the Self Metric Attack (Bouniot): random start, then push the feature away from the clean feature."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack


class SMA(Attack):
    """Maximise ``d(f(x'), f(x))`` from ``x0 + U(-eps, eps)``, projected around the clean ``x``.

    Without ``random_start`` the gradient at ``x`` is zero, so the image comes back unchanged.
    """

    name = "sma"

    def __init__(self, model: nn.Module, *args: Any, random_start: bool = True, **kwargs: Any) -> None:
        super().__init__(model, *args, random_start=random_start, **kwargs)

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"ref": self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.dist(feats, state["ref"])


register_attack("sma", SMA)
