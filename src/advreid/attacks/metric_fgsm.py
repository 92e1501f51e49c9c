"""Metric FGSM / I-FGSM / MI-FGSM (Bai et al.): push an image's feature away from same-identity guide features.

Loss per sample: ``sum_g d(f(x'), g)`` over its guides (maximised). Presets: ``fgsm`` (one step of eps), ``ifgsm``,
``mifgsm`` (momentum 1, mean-abs gradient normalisation), ``ifgsm_seed`` (the seed's query attack: the single "last"
same-identity gallery guide, same camera included), ``ifgsm_bai`` (gallery attack with all same-identity query
guides, T = int(min(eps_px + 4, 1.25 eps_px))), ``ifgsm_bouniot_sg`` / ``ifgsm_bouniot_multi`` (query guides).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.attacks.guides import GUIDE_SELECT, GuideBank, Guides


class MetricIFGSM(Attack):
    """Metric I-FGSM against same-identity guides from a ``GuideBank`` (or explicit ``Guides``).

    ``guide_select``: "all", "random1" or "last" (bank order); ``exclude_same_camera`` drops same-camera guides;
    ``exclude_self`` drops the sample's own bank entry (``bank_index``, default ``index``); ``pad_self`` pads the
    guides with the sample's clean feature up to the bank's largest identity size (Bouniot's multi-guide).
    ``guide_source`` records which set the guides should come from ("gallery", "query", "train", "explicit").
    """

    name = "ifgsm"
    needs_guides = True
    guide_source_default = "gallery"

    def __init__(self, model: nn.Module, *args: Any, guide_select: str = "all", guide_source: str | None = None,
                 exclude_same_camera: bool = False, exclude_self: bool = False, pad_self: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        if guide_select not in GUIDE_SELECT:
            raise ValueError(f"guide_select={guide_select!r} is not supported; expected one of {GUIDE_SELECT}")
        self.guide_select = guide_select
        if guide_source is not None:
            if guide_source not in ("gallery", "query", "train", "explicit"):
                raise ValueError(f"guide_source={guide_source!r}; expected 'gallery', 'query', 'train' or 'explicit'")
            self.guide_source_default = guide_source
        self.exclude_same_camera = bool(exclude_same_camera)
        self.exclude_self = bool(exclude_self)
        self.pad_self = bool(pad_self)

    def _extra_params(self) -> dict[str, Any]:
        return {"guide_select": self.guide_select, "guide_source": self.guide_source_default,
                "exclude_same_camera": self.exclude_same_camera, "exclude_self": self.exclude_self,
                "pad_self": self.pad_self}

    def push_guides(self, x0: torch.Tensor, inp: AttackInputs, state: dict[str, Any]) -> None:
        """Fill ``state`` with push guides (B,K,D), mask (B,K) and the self-padding weight (B,) if any."""
        g = inp.guides
        b = x0.shape[0]
        if isinstance(g, Guides):
            if g.push is None:
                raise ValueError(f"attack {self.name!r} needs pushing guides: Guides(push=...) is None")
            if g.batch_size() != b:
                raise ValueError(f"Guides hold {g.batch_size()} samples, the batch has {b}")
            feats, mask, max_count = g.push, g.push_mask, g.push.shape[1]
        elif isinstance(g, GuideBank):
            exclude = None
            if self.exclude_self:
                if inp.bank_index is None:
                    raise ValueError(f"attack {self.name!r} has exclude_self=True: pass bank_index=... (or index=...)"
                                     " giving each sample's position in the guide bank")
                exclude = inp.bank_index
            gens = self.generators(inp.index, "guides") if self.guide_select == "random1" else None
            feats, mask, _ = g.same_identity(inp.pids, inp.camids, select=self.guide_select,
                                             exclude_same_camera=self.exclude_same_camera, exclude=exclude,
                                             generators=gens)
            max_count = g.max_count
        else:
            raise TypeError(f"guides must be a GuideBank or Guides, got {type(g).__name__}")
        state["push"] = self.prep(feats, x0)
        state["push_mask"] = mask.to(device=x0.device, dtype=x0.dtype)
        if self.pad_self:
            raw = self.features(x0, normalize=False)
            state["clean_raw"] = raw  # reused by subclasses (FNA's furthest-centroid search): one clean forward
            state["self_ref"] = (F.normalize(raw, dim=1) if self.normalize else raw).to(x0.dtype)
            state["self_w"] = (max_count - state["push_mask"].sum(1)).clamp(min=0)

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        state: dict[str, Any] = {}
        self.push_guides(x0, inp, state)
        return state

    def push_loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        loss = (self.dist(feats, state["push"]) * state["push_mask"]).sum(1)
        if "self_ref" in state:
            loss = loss + state["self_w"] * self.dist(feats, state["self_ref"])
        return loss

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.push_loss(feats, state)


class MetricFGSM(MetricIFGSM):
    """Metric FGSM: one sign step of size eps (``alpha`` defaults to ``eps``, ``steps`` to 1)."""

    name = "fgsm"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str | None = None,
                 steps: int | str = 1, **kwargs: Any) -> None:
        super().__init__(model, eps, eps if alpha is None else alpha, steps, **kwargs)


register_attack("fgsm", MetricFGSM)
register_attack("ifgsm", MetricIFGSM)
register_attack("mifgsm", MetricIFGSM, momentum=1.0, grad_norm="mean_abs")
register_attack("ifgsm_seed", MetricIFGSM, guide_select="last", guide_source="gallery", steps=15, momentum=0.0,
                grad_norm="mean_abs", distance="mse")
register_attack("ifgsm_bai", MetricIFGSM, side="gallery", guide_source="query", guide_select="all",
                steps="kurakin", grad_norm="mean_abs")
register_attack("ifgsm_bouniot_sg", MetricIFGSM, guide_source="query", guide_select="random1", exclude_self=True,
                normalize=False, distance="sqeuclidean")
register_attack("ifgsm_bouniot_multi", MetricIFGSM, guide_source="query", guide_select="all", pad_self=True,
                normalize=False, distance="sqeuclidean")
