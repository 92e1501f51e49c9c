"""ODFA, the Opposite-Direction Feature Attack (Zheng et al., U-turn): descend towards ``-f(x)``.

On the unit sphere ``d(a, -b) = 2 + 2 cos(a, b)``, so this drives the cosine with the clean feature towards -1.
Bouniot's implementation *ascends* the same loss (a sign bug that pushes towards ``+f(x)``); ``direction="away"``
reproduces it for comparison.

The first step: with L2-normalised features ``d(f(x'), -f(x))`` is stationary at ``x' = x`` (the cosine is at its
maximum), so the reference's first gradient, taken at ``x`` itself, is rounding noise (~1e-10) whose signs depend on
the BLAS path, the dtype and the batch. ``start="sign"`` (the default) starts from ``clip(x + alpha * s)`` with
``s`` a +-1 pattern drawn from the sample's own random stream (seed, index), where the gradient is a real one;
``start="clean"`` is the reference (U-turn) behaviour, kept for comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.ops import per_sample_rand

STARTS = ("sign", "clean")


class ODFA(Attack):
    """Minimise ``d(f(x'), -f(x))``; default iterations round(min(1.25 eps_px, eps_px + 4)) (6 at eps = 5/255)."""

    name = "odfa"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = "kurakin_round", *, direction: str = "toward", start: str = "sign",
                 **kwargs: Any) -> None:
        super().__init__(model, eps, alpha, steps, **kwargs)
        if direction not in ("toward", "away"):
            raise ValueError(f"direction={direction!r} must be 'toward' (U-turn) or 'away' (Bouniot's sign bug)")
        if start not in STARTS:
            raise ValueError(f"start={start!r} must be 'sign' (seeded +-alpha start, default) or 'clean' (the "
                             "reference: first gradient at x itself, which is rounding noise)")
        self.direction = direction
        self.start = start

    def _extra_params(self) -> dict[str, Any]:
        return {"direction": self.direction, "start": self.start}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"target": -self.features(x0)}

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        """``start="sign"`` (without ``random_start``): ``x0 + alpha * (+-1)`` per pixel, from the sample's stream."""
        if self.random_start or self.start == "clean":
            return super().init_point(x0, index, stream)
        # drawn in float64 whatever the input dtype, so float32 and float64 runs start from the same pattern
        u = per_sample_rand(self.generators(index, "sign_start"), x0.shape[1:], dtype=torch.float64,
                            device=x0.device)
        lo, hi = self.bounds(x0)
        return torch.where(u < 0.5, x0 - self.alpha, x0 + self.alpha).clamp_(lo, hi)

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        d = self.dist(feats, state["target"])
        return -d if self.direction == "toward" else d


register_attack("odfa", ODFA)
