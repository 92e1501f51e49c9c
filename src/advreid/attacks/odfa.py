"""ODFA, the Opposite-Direction Feature Attack (Zheng et al., U-turn): descend towards ``-f(x)``.

On the unit sphere ``d(a, -b) = 2 + 2 cos(a, b)``, so this drives the cosine with the clean feature towards -1.
Bouniot's implementation *ascends* the same loss (a sign bug that pushes towards ``+f(x)``); ``direction="away"``
reproduces it for comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack


class ODFA(Attack):
    """Minimise ``d(f(x'), -f(x))``; default iterations round(min(1.25 eps_px, eps_px + 4)) (6 at eps = 5/255)."""

    name = "odfa"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = "kurakin_round", *, direction: str = "toward", **kwargs: Any) -> None:
        super().__init__(model, eps, alpha, steps, **kwargs)
        if direction not in ("toward", "away"):
            raise ValueError(f"direction={direction!r} must be 'toward' (U-turn) or 'away' (Bouniot's sign bug)")
        self.direction = direction

    def _extra_params(self) -> dict[str, Any]:
        return {"direction": self.direction}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"target": -self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        d = self.dist(feats, state["target"])
        return -d if self.direction == "toward" else d


register_attack("odfa", ODFA)
