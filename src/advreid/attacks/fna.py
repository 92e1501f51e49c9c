"""FNA, the Furthest-Negative Attack (Bouniot): push from same-identity guides, pull towards the furthest centroid.

Loss per sample (maximised): ``sum_{p in P} d(f(x'), p) - d(f(x'), c*)`` where ``P`` are the same-identity guides
(padded with the clean feature up to the bank's largest identity, as Bouniot) and ``c*`` is the centroid (mean raw
feature) of the other identity furthest from ``f(x)``. Centroids and the furthest choice live in the attack's feature
space: with ``normalize`` both the feature and the centroids are L2-normalised before comparing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advreid.attacks.base import AttackInputs, register_attack
from advreid.attacks.guides import GuideBank, Guides
from advreid.attacks.metric_fgsm import MetricIFGSM


class FNA(MetricIFGSM):
    """Push + pull metric attack. ``push=False`` is FNA_pull; ``pull="random"`` picks a random other centroid."""

    name = "fna"
    guide_source_default = "query"

    def __init__(self, model: nn.Module, *args: Any, push: bool = True, pull: str = "furthest",
                 pad_self: bool = True, pull_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model, *args, pad_self=pad_self, **kwargs)
        if pull not in ("furthest", "random", "none"):
            raise ValueError(f"pull={pull!r} must be 'furthest', 'random' or 'none'")
        if not push and pull == "none":
            raise ValueError("FNA with push=False and pull='none' has no objective")
        self.push = bool(push)
        self.pull = pull
        self.pull_weight = float(pull_weight)

    def _extra_params(self) -> dict[str, Any]:
        return {**super()._extra_params(), "push": self.push, "pull": self.pull, "pull_weight": self.pull_weight}

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        state: dict[str, Any] = {}
        g = inp.guides
        if self.push:
            self.push_guides(x0, inp, state)
        if self.pull == "none":
            return state
        if isinstance(g, Guides):
            if g.pull is None:
                raise ValueError(f"attack {self.name!r} needs a pulling guide: Guides(pull=...) is None")
            state["pull"], state["pull_mask"] = self.prep(g.pull, x0), g.pull_mask.to(x0.device, x0.dtype)
            return state
        if not isinstance(g, GuideBank):
            raise TypeError(f"guides must be a GuideBank or Guides, got {type(g).__name__}")
        if self.pull == "furthest":
            f0 = state.get("clean_raw")
            if f0 is None:
                f0 = self.features(x0, normalize=False)
            cent, _ = g.furthest_centroid(f0, inp.pids, normalize=self.normalize)
        else:
            cent, _ = g.random_centroid(inp.pids, self.generators(inp.index, "pull"))
        state["pull"] = self.prep(cent, x0).unsqueeze(1)
        state["pull_mask"] = torch.ones(cent.shape[0], 1, dtype=x0.dtype, device=x0.device)
        return state

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        loss = self.push_loss(feats, state) if self.push else feats.new_zeros(feats.shape[0])
        if "pull" in state:
            loss = loss - self.pull_weight * (self.dist(feats, state["pull"]) * state["pull_mask"]).sum(1)
        return loss


_BOUNIOT = {"normalize": False, "distance": "sqeuclidean"}
register_attack("fna", FNA)
register_attack("fna_pull", FNA, push=False)
register_attack("fna_rand", FNA, pull="random")
register_attack("fna_bouniot", FNA, **_BOUNIOT)
