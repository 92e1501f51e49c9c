"""APGD (Croce & Hein, 2020) on the feature objective: PGD whose step size halves when progress stalls.

The objective is the embedding shift ``d(f(x'), f(x))`` of :class:`~advreid.attacks.FeaturePGD` (maximised). The
schedule is AutoAttack's: the step size starts at ``2 eps``; checkpoints come after ``0.22 T`` iterations, then at
intervals shrinking by ``0.03 T`` down to ``0.06 T``; at a checkpoint a sample's step size halves (and it restarts
from its best point so far) when fewer than ``rho = 0.75`` of the steps since the last checkpoint raised its loss, or
when its step size was not reduced at the last checkpoint and its best loss has not improved since. Updates use
momentum 0.75 (``x <- P(x + 0.75 (z - x) + 0.25 (x - x_prev))`` with ``z = P(x + eta sign(g))``; the first step is
plain). Each sample keeps the point of its highest loss; ``restarts > 1`` reruns from fresh random starts (each
sample's own stream) and keeps the best. ``norm="l2"``: ``eps`` is an L2 radius over the whole image, the step is
``eta g / ||g||`` and the projection rescales the perturbation.

``progress`` records, per attacked batch, each sample's loss at the start point and its best loss after all steps
(``advreid.robust`` reads it to flag a loss that does not rise, a sign of gradient masking).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.ops import parse_number, per_sample_rand

NORMS = ("linf", "l2")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def checkpoints(steps: int) -> list[int]:
    """AutoAttack's checkpoint iterations for ``steps`` iterations: first after ``max(int(0.22 T), 1)``, then
    intervals decreasing by ``max(int(0.03 T), 1)`` down to ``max(int(0.06 T), 1)``."""
    k = max(int(0.22 * steps), 1)
    decr, kmin = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], k
    while at <= steps:
        out.append(at)
        k = max(k - decr, kmin)
        at += k
    return out


class APGD(Attack):
    """APGD on ``d(f(x'), f(x))`` (L-inf or L2), random start, ``restarts`` runs, ``rho`` the progress threshold."""

    name = "apgd"
    momentum_apgd = 0.75

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, alpha: float | str | None = None,
                 steps: int | str = 50, *, norm: str = "linf", restarts: int = 1, rho: float = 0.75,
                 random_start: bool = True, **kwargs: Any) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; expected one of {NORMS}")
        self.norm = norm
        super().__init__(model, eps, 0.0 if alpha is None else alpha, steps, random_start=random_start, **kwargs)
        if alpha is None:
            self.alpha = 2 * self.eps  # Croce & Hein's initial step size
        if not self.random_start:
            raise ValueError("apgd needs random_start=True: the feature shift has a zero gradient at x itself")
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"restarts={restarts!r} must be an int >= 1")
        self.restarts = int(restarts)
        if not (isinstance(rho, (int, float)) and 0 < rho <= 1):
            raise ValueError(f"rho={rho!r} must be a float in (0, 1]")
        self.rho = float(rho)
        self.progress: list[dict[str, torch.Tensor]] = []

    def _parse_budget(self, value: float | str, name: str) -> float:
        return parse_number(value, name) if self.norm == "l2" else super()._parse_budget(value, name)

    def _extra_params(self) -> dict[str, Any]:
        return {"norm": self.norm, "restarts": self.restarts, "rho": self.rho}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"ref": self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.dist(feats, state["ref"])

    # ------------------------------------------------------------------------------------------ geometry

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        if self.norm == "linf":
            return super().init_point(x0, index, stream)
        d = per_sample_rand(self.generators(index, stream), x0.shape[1:], dtype=x0.dtype, device=x0.device,
                            normal=True)
        return (x0 + d / _flat_norm(d).clamp_min(1e-12) * self.eps).clamp_(0, 1)

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Back into the budget ball around ``x0`` and the [0,1] box."""
        if self.norm == "linf":
            return torch.minimum(torch.maximum(x, x0 - self.eps), x0 + self.eps).clamp_(0, 1)
        delta = x - x0
        delta = delta * (self.eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x0 + delta).clamp_(0, 1)

    def ascent(self, x: torch.Tensor, g: torch.Tensor, eta: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``P(x + eta * direction(g))``: the sign (L-inf) or the unit-L2 gradient (L2); ``eta`` per sample."""
        shape = (-1, *([1] * (x.dim() - 1)))
        d = g.sign() if self.norm == "linf" else g / _flat_norm(g).clamp_min(1e-12)
        return self.project(x + eta.view(shape) * d, x0)

    def loss_and_grad(self, x: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss and input gradient, both averaged over ``eot_samples`` draws of a random defense."""
        loss_sum, g = None, None
        for d in range(self.eot_samples):
            if "index" in state:
                self._set_defense_streams(state["index"], f"defense/{state.get('step', 0)}/{d}")
            xr = x.detach().requires_grad_(True)
            loss = self.loss(self.features(xr), state)
            gd = torch.autograd.grad(loss.sum(), xr, allow_unused=True)[0] if loss.requires_grad else None
            gd = torch.zeros_like(x) if gd is None else gd
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            g = gd if g is None else g.add_(gd)
        assert loss_sum is not None and g is not None
        return loss_sum / self.eot_samples, g / self.eot_samples

    # ------------------------------------------------------------------------------------------- the run

    def run_once(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor,
                 stream: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run: (best point, its loss, the loss at the start point), per sample."""
        b = x0.shape[0]
        shape = (-1, *([1] * (x0.dim() - 1)))
        checks = set(checkpoints(self.steps))
        x = self.init_point(x0, index, stream)
        state["step"] = 0
        loss, g = self.loss_and_grad(x, state)
        loss0 = loss.clone()
        best_x, best_l, best_g = x.clone(), loss.clone(), g.clone()
        eta = torch.full((b,), float(self.alpha), dtype=x0.dtype, device=x0.device)
        x_prev = x.clone()
        rises = torch.zeros(b, dtype=torch.long, device=x0.device)
        reduced_last = torch.zeros(b, dtype=torch.bool, device=x0.device)
        best_at_check = best_l.clone()
        last_check = 0
        for k in range(self.steps):
            z = self.ascent(x, g, eta, x0)
            if k == 0:
                x_new = z
            else:
                a = self.momentum_apgd
                x_new = self.project(x + a * (z - x) + (1 - a) * (x - x_prev), x0)
            x_prev, x = x, x_new
            state["step"] = k + 1
            loss_new, g = self.loss_and_grad(x, state)
            rises += (loss_new > loss).long()
            loss = loss_new
            better = loss > best_l
            best_x = torch.where(better.view(shape), x, best_x)
            best_g = torch.where(better.view(shape), g, best_g)
            best_l = torch.where(better, loss, best_l)
            if k + 1 in checks:
                h = k + 1 - last_check
                stalled = rises.double() <= self.rho * h
                no_gain = ~reduced_last & (best_at_check >= best_l)
                red = stalled | no_gain
                reduced_last, best_at_check, last_check = red, best_l.clone(), k + 1
                eta = torch.where(red, eta / 2, eta)
                x = torch.where(red.view(shape), best_x, x)
                g = torch.where(red.view(shape), best_g, g)
                loss = torch.where(red, best_l, loss)
                rises.zero_()
        return best_x, best_l, loss0

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x0.dim() - 1)))
        best, best_l, loss0 = self.run_once(x0, state, index, "start")
        for r in range(1, self.restarts):
            x, lr, _ = self.run_once(x0, state, index, f"start/{r}")
            better = lr > best_l
            best = torch.where(better.view(shape), x, best)
            best_l = torch.where(better, lr, best_l)
        self.progress.append({"index": index.clone(), "loss_start": loss0.detach().double().cpu(),
                              "loss_best": best_l.detach().double().cpu()})
        return best


def loss_rises(progress: list[dict[str, torch.Tensor]], rel_tol: float = 1e-4) -> dict[int, bool]:
    """Per sample index: did the best loss rise above the start point's loss by more than ``rel_tol`` (relative)?"""
    out: dict[int, bool] = {}
    for rec in progress:
        l0, lb = rec["loss_start"], rec["loss_best"]
        rose = (lb - l0) > rel_tol * l0.abs().clamp_min(1e-12)
        for i, r in zip(rec["index"].tolist(), rose.tolist(), strict=True):
            out[int(i)] = bool(r)
    return out


register_attack("apgd", APGD)
