"""A gradient-free, query-based member: Square-attack style random search (Andriushchenko et al., 2020) on the
feature objective ``d(f(x'), f(x))``.

It takes no gradient, so a defense that hides its gradient (a hard quantiser without BPDA, a shattered or random
pipeline) does not stop it: when it beats every gradient attack, the gradients were masked. L-inf: the start is
vertical stripes of +-eps (one sign per channel and column); each iteration proposes a square window of side
``round(sqrt(p H W))`` at a random position whose pixels take +-eps (one sign per channel), and keeps it when the
loss rises. ``p`` starts at ``p_init`` and halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a
10,000-query budget, rescaled to ``steps``. L2 (a simpler random search, documented as such): the proposal adds a
window of +-``p`` eps-scaled values and the perturbation is rescaled into the L2 ball. Every draw comes from the
sample's own stream; one forward pass per iteration (``eot_samples`` passes through a random defense, averaged).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.ops import parse_number

NORMS = ("linf", "l2")
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(step: int, steps: int, p_init: float) -> float:
    """The window's share of the image at ``step`` of ``steps`` (Square's schedule rescaled to the budget)."""
    i = int(step / max(steps, 1) * 10000)
    return p_init / 2 ** sum(i > h for h in _HALVINGS)


class SquareSearch(Attack):
    """Random search over square windows (L-inf: Square's update; L2: a rescaled random search); no gradients."""

    name = "square"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, alpha: float | str = 0.0,
                 steps: int | str = 100, *, norm: str = "linf", p_init: float = 0.05, **kwargs: Any) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not supported; expected one of {NORMS}")
        self.norm = norm
        super().__init__(model, eps, alpha, steps, **kwargs)
        if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
            raise ValueError(f"p_init={p_init!r} must be a float in (0, 1]")
        self.p_init = float(p_init)

    def _parse_budget(self, value: float | str, name: str) -> float:
        return parse_number(value, name) if self.norm == "l2" else super()._parse_budget(value, name)

    def _extra_params(self) -> dict[str, Any]:
        return {"norm": self.norm, "p_init": self.p_init}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {"ref": self.features(x0)}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.dist(feats, state["ref"])

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, state: dict[str, Any], step: int) -> torch.Tensor:
        """Per-sample loss, averaged over ``eot_samples`` draws (each sample's own defense streams)."""
        total = None
        for d in range(self.eot_samples):
            self._set_defense_streams(state["index"], f"defense/{step}/{d}")
            v = self.loss(self.features(x), state)
            total = v if total is None else total + v
        assert total is not None
        return total / self.eot_samples

    def _signs(self, gens: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in gens])
        return torch.where(u < 0.5, -1.0, 1.0).to(device=like.device, dtype=like.dtype)

    def _project(self, delta: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return (x0 + delta.clamp(-self.eps, self.eps)).clamp(0, 1) - x0
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
        return (x0 + delta * (self.eps / n).clamp(max=1.0)).clamp(0, 1) - x0

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x0.shape
        gens = self.generators(index, "square")
        scale = self.eps if self.norm == "linf" else self.eps / math.sqrt(c * h * w)
        delta = self._project(self._signs(gens, (c, 1, w), x0).expand(b, c, h, w) * scale, x0)
        best = self.eval_loss(x0 + delta, state, 0)
        for t in range(self.steps):
            p = square_p(t, self.steps, self.p_init)
            s = max(1, min(h, w, int(round(math.sqrt(p * h * w)))))
            pos = torch.stack([torch.rand(2, generator=g, dtype=torch.float64) for g in gens])
            rows = (pos[:, 0] * (h - s + 1)).long().clamp(max=h - s).tolist()
            cols = (pos[:, 1] * (w - s + 1)).long().clamp(max=w - s).tolist()
            signs = self._signs(gens, (c, 1, 1), x0)
            cand = delta.clone()
            for i in range(b):
                win = cand[i, :, rows[i]:rows[i] + s, cols[i]:cols[i] + s]
                if self.norm == "linf":
                    win.copy_((signs[i] * self.eps).expand_as(win))
                else:
                    win.add_(signs[i] * self.eps * math.sqrt(p) / s)
            cand = self._project(cand, x0)
            loss = self.eval_loss(x0 + cand, state, t + 1)
            better = loss > best
            delta = torch.where(better.view(-1, 1, 1, 1), cand, delta)
            best = torch.where(better, loss, best)
        return (x0 + delta).clamp_(0, 1)


register_attack("square", SquareSearch)
