"""Feature PGD (embedding shift, RobRank's ES; DDDefense's "PGD" once its settings are known), L-inf or L2.

Four small classes, one per (objective, norm): :class:`FeaturePGD` maximises ``d(f(x'), f(x))`` (ES/SMA) in the
L-inf ball, :class:`GuidedPGD` pushes from same-identity guides like metric I-FGSM, and their L2 versions
(:class:`FeaturePGDL2`, :class:`GuidedPGDL2`) where ``eps`` is an L2 radius over the whole image in [0,1] units
(values above 1 are allowed) and ``alpha`` the L2 length of each step. ``restarts > 1`` reruns from fresh random
starts and keeps, per sample, the run with the larger final loss (one extra no-grad forward per restart). The
registered ``pgd`` / ``es`` presets pick the class from ``objective`` and ``norm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import ATTACKS, Attack, AttackInputs
from advreid.attacks.metric_fgsm import MetricIFGSM
from advreid.ops import parse_number, per_sample_rand
from advreid.registry import param_names

OBJECTIVES = ("self_shift", "guided")
NORMS = ("linf", "l2")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


class _Restarts:
    """Random restarts keeping each sample's best run (for the PGD classes; needs ``random_start``)."""

    restarts: int = 1

    def __init__(self, model: nn.Module, *args: Any, restarts: int = 1, random_start: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(model, *args, random_start=random_start, **kwargs)  # type: ignore[call-arg]
        self._set_restarts(restarts)

    def _set_restarts(self, restarts: int) -> None:
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts={restarts!r} must be an int >= 1")
        if restarts > 1 and not self.random_start:  # type: ignore[attr-defined]
            raise ValueError(f"restarts={restarts} needs random_start=True (restarts from x itself are identical)")
        self.restarts = int(restarts)

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        box = self.bounds(x0)  # type: ignore[attr-defined]
        best = self.iterate(self.init_point(x0, index), x0, state, box)  # type: ignore[attr-defined]
        if self.restarts == 1:
            return best
        with torch.no_grad():
            best_loss = self.loss(self.features(best), state)  # type: ignore[attr-defined]
        for r in range(1, self.restarts):
            x = self.iterate(self.init_point(x0, index, f"start/{r}"), x0, state, box)  # type: ignore[attr-defined]
            with torch.no_grad():
                lr = self.loss(self.features(x), state)  # type: ignore[attr-defined]
            better = lr > best_loss
            best = torch.where(better.view(-1, *([1] * (x0.dim() - 1))), x, best)
            best_loss = torch.where(better, lr, best_loss)
        return best


class _L2:
    """L2 geometry: budgets without the [0,1] bound, a random start in the L2 ball, normalised steps, projection."""

    norm = "l2"

    def _parse_budget(self, value: float | str, name: str) -> float:
        return parse_number(value, name)

    def bounds(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, x0  # unused by the L2 step

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        if not self.random_start:  # type: ignore[attr-defined]
            return x0.clone()
        gens = self.generators(index, stream)  # type: ignore[attr-defined]
        d = per_sample_rand(gens, x0.shape[1:], dtype=x0.dtype, device=x0.device, normal=True)
        r = per_sample_rand(gens, (), dtype=x0.dtype, device=x0.device).view(-1, *([1] * (x0.dim() - 1)))
        d = d / _flat_norm(d).clamp_min(1e-12) * r * self.eps  # type: ignore[attr-defined]
        return (x0 + d).clamp_(0, 1)

    def step(self, x: torch.Tensor, direction: torch.Tensor, x0: torch.Tensor,
             box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x.add_(direction / _flat_norm(direction).clamp_min(1e-12), alpha=self.alpha)  # type: ignore[attr-defined]
        delta = x - x0
        delta = delta * (self.eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)  # type: ignore[attr-defined]
        return (x0 + delta).clamp_(0, 1)


class FeaturePGD(_Restarts, Attack):
    """L-inf PGD on the embedding shift ``d(f(x'), f(x))``, random start on by default, with restarts."""

    name = "pgd"
    norm = "linf"

    def _extra_params(self) -> dict[str, Any]:
        return {"objective": "self_shift", "norm": self.norm, "restarts": self.restarts}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"ref": self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.dist(feats, state["ref"])


class GuidedPGD(_Restarts, MetricIFGSM):
    """L-inf PGD pushing from same-identity guides (metric I-FGSM with a random start and restarts)."""

    name = "pgd"
    norm = "linf"

    def _extra_params(self) -> dict[str, Any]:
        return {**super()._extra_params(), "objective": "guided", "norm": self.norm, "restarts": self.restarts}


class FeaturePGDL2(_L2, FeaturePGD):
    """:class:`FeaturePGD` in the L2 ball."""


class GuidedPGDL2(_L2, GuidedPGD):
    """:class:`GuidedPGD` in the L2 ball."""


_CLASSES = {("self_shift", "linf"): FeaturePGD, ("guided", "linf"): GuidedPGD,
            ("self_shift", "l2"): FeaturePGDL2, ("guided", "l2"): GuidedPGDL2}


def build_pgd(model: nn.Module, *args: Any, objective: str = "self_shift", norm: str = "linf",
              **kwargs: Any) -> Attack:
    """The PGD class of (``objective``, ``norm``): self_shift/guided x linf/l2."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; expected one of {OBJECTIVES}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not supported; expected one of {NORMS}")
    return _CLASSES[(objective, norm)](model, *args, **kwargs)


_ALLOWED = set().union(*(param_names(c, skip=1) for c in _CLASSES.values())) | {"objective", "norm"}
ATTACKS.add_preset("pgd", build_pgd, allowed=_ALLOWED)
ATTACKS.add_preset("es", build_pgd, allowed=_ALLOWED, eps=8 / 255, alpha=3 / 255, steps=32)
