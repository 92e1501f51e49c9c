"""A gallery-guided rank attack: push the query's feature away from its true matches, pull it toward the gallery
items that already rank highest among the non-matches.

Loss per sample (maximised): ``mean_{p in P} d(f(x'), p) - mean_{n in N} d(f(x'), n)`` where ``P`` are the
same-identity guides of the bank seen under the evaluation protocol (other camera, pid not -1: the true matches the
ranking counts) and ``N`` the ``top_k`` non-matches nearest the clean query feature (pid differs and is not -1;
same-identity same-camera items are junk to the ranking and never pulled). Both sets are fixed once per batch from
the clean features. Random start, sign steps of ``alpha`` (L-inf), momentum as the base class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import AttackInputs, register_attack
from advreid.attacks.guides import GuideBank
from advreid.attacks.metric_fgsm import MetricIFGSM


class RankAttack(MetricIFGSM):
    """Push from the true matches (other camera), pull toward the ``top_k`` nearest non-matches of the bank."""

    name = "rank"
    guide_source_default = "gallery"

    def __init__(self, model: nn.Module, eps: float | str = 8 / 255, alpha: float | str = 2 / 255,
                 steps: int | str = 50, *, top_k: int = 5, pull_weight: float = 1.0, random_start: bool = True,
                 exclude_same_camera: bool = True, **kwargs: Any) -> None:
        super().__init__(model, eps, alpha, steps, random_start=random_start,
                         exclude_same_camera=exclude_same_camera, **kwargs)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be an int >= 1 (non-matches pulled)")
        self.top_k = top_k
        self.pull_weight = float(pull_weight)

    def _extra_params(self) -> dict[str, Any]:
        return {**super()._extra_params(), "top_k": self.top_k, "pull_weight": self.pull_weight}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        g = inp.guides
        if not isinstance(g, GuideBank):
            raise TypeError(f"attack {self.name!r} needs guides=GuideBank(...) of the gallery, got {type(g).__name__}")
        state: dict[str, Any] = {}
        self.push_guides(x0, inp, state)
        m = state["push_mask"]
        state["push_mask"] = m / m.sum(1, keepdim=True).clamp_min(1)  # the mean over the true matches
        f0 = self.features(x0)  # in the attack's space (normalised when set)
        bank = self.prep(g.features, f0)
        d = torch.cdist(f0, bank, compute_mode="donot_use_mm_for_euclid_dist")  # exact, row-independent
        pids = torch.as_tensor(inp.pids, device=g.pids.device).long()
        other = (g.pids[None, :] != pids[:, None]) & (g.pids[None, :] != -1)
        d = torch.where(other.to(d.device), d, torch.full_like(d, float("inf")))
        k = min(self.top_k, d.shape[1])
        dk, j = d.topk(k, dim=1, largest=False)
        state["pull"] = bank[j]  # (B,k,D)
        valid = torch.isfinite(dk).to(x0.dtype)
        state["pull_mask"] = valid / valid.sum(1, keepdim=True).clamp_min(1)
        return state

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        push = (self.dist(feats, state["push"]) * state["push_mask"]).sum(1)
        pull = (self.dist(feats, state["pull"]) * state["pull_mask"]).sum(1)
        return push - self.pull_weight * pull


register_attack("rank", RankAttack)
