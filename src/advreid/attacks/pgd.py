"""Feature PGD (embedding shift, RobRank's ES; DDDefense's "PGD" once its settings are known), L-inf or L2.

``objective="self_shift"`` maximises ``d(f(x'), f(x))`` (ES/SMA); ``"guided"`` pushes from same-identity guides like
metric I-FGSM. ``restarts > 1`` reruns from fresh random starts and keeps, per sample, the run with the larger final
loss (one extra no-grad forward per restart). With ``norm="l2"`` ``eps`` is an L2 radius over the whole image in
[0,1] units (values above 1 are allowed) and ``alpha`` the L2 length of each step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import AttackInputs, register_attack
from advreid.attacks.metric_fgsm import MetricIFGSM
from advreid.ops import parse_eps, parse_number, per_sample_rand

OBJECTIVES = ("self_shift", "guided")
NORMS = ("linf", "l2")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class FeaturePGD(MetricIFGSM):
    """Projected gradient ascent on a feature distance, with random start (default on) and restarts."""

    name = "pgd"
    needs_guides = False
    guide_source_default = None

    def __init__(self, model: nn.Module, *args: Any, objective: str = "self_shift", norm: str = "linf",
                 restarts: int = 1, random_start: bool = True, **kwargs: Any) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; expected one of {NORMS}")
        self.norm = norm
        super().__init__(model, *args, random_start=random_start, **kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not supported; expected one of {OBJECTIVES}")
        self.objective = objective
        self.needs_guides = objective == "guided"
        if objective == "self_shift":
            self.guide_source_default = None
        elif "guide_source" not in kwargs:
            self.guide_source_default = "gallery"
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts={restarts!r} must be an int >= 1")
        if restarts > 1 and not self.random_start:
            raise ValueError(f"restarts={restarts} needs random_start=True (restarts from x itself are identical)")
        self.restarts = int(restarts)

    def _parse_budget(self, value: float | str, name: str) -> float:
        return parse_number(value, name) if self.norm == "l2" else parse_eps(value, name)

    def _extra_params(self) -> dict[str, Any]:
        extra = {"objective": self.objective, "norm": self.norm, "restarts": self.restarts}
        if self.objective == "guided":
            extra.update(super()._extra_params())
        return extra

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        if self.objective == "guided":
            return super().setup(x0, inp)
        return {"ref": self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.push_loss(feats, state) if self.objective == "guided" else self.dist(feats, state["ref"])

    # ------------------------------------------------------------------------------------ L2 geometry

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        if self.norm == "linf" or not self.random_start:
            return super().init_point(x0, index, stream)
        gens = self.generators(index, stream)
        d = per_sample_rand(gens, x0.shape[1:], dtype=x0.dtype, device=x0.device, normal=True)
        r = per_sample_rand(gens, (), dtype=x0.dtype, device=x0.device).view(-1, *([1] * (x0.dim() - 1)))
        d = d / _flat_norm(d).clamp_min(1e-12) * r * self.eps
        return (x0 + d).clamp_(0, 1)

    def step(self, x: torch.Tensor, direction: torch.Tensor, x0: torch.Tensor,
             box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.norm == "linf":
            return super().step(x, direction, x0, box)
        x = x.add_(direction / _flat_norm(direction).clamp_min(1e-12), alpha=self.alpha)
        delta = x - x0
        delta = delta * (self.eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x0 + delta).clamp_(0, 1)

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        box = self.bounds(x0) if self.norm == "linf" else (x0, x0)
        best = self.iterate(self.init_point(x0, index), x0, state, box)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            best_loss = self.loss(self.features(best), state)
        for r in range(1, self.restarts):
            x = self.iterate(self.init_point(x0, index, f"start/{r}"), x0, state, box)
            with torch.no_grad():
                lr = self.loss(self.features(x), state)
            better = lr > best_loss
            best = torch.where(better.view(-1, *([1] * (x0.dim() - 1))), x, best)
            best_loss = torch.where(better, lr, best_loss)
        return best


register_attack("pgd", FeaturePGD)
register_attack("es", FeaturePGD, eps=8 / 255, alpha=3 / 255, steps=32)
