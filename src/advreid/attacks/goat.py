"""GOAT's inner attack (Bouniot et al., "Guide-sampling Online Adversarial Training"), spec 3.9.

L-inf PGD maximising, per sample, ``sum_k ||f(x') - g_k||^2 - sum_q ||f(x') - p_q||^2`` (MSE-sum, as the reference's
``MSELoss(reduction='sum')``) on the raw retrieval embedding ``model.features`` (no L2 normalisation). Pushing guides
``g_k``: explicit ``Guides(push=...)`` (the reference's dictionary draws, made by the training hook) or, without
them, the first ``push`` *other* same-identity members of the batch (:func:`goat_guides`); pulling guides ``p_q``:
the ``pull`` batch features furthest from the sample's own. ``push=0, pull=0`` is GOAT^{0,0} (the SMA guide: the
sample's own clean feature).

``model_mode="train"`` (the reference) attacks with the model in train mode: BatchNorm uses batch statistics, so the
samples of a batch are coupled and every attack forward also updates the running statistics, as in the reference.
``eps_space="normalized"`` reproduces the reference's budget, which lives in the normalised tensor space: per
channel ``eps * std_c`` in pixel space (about 1.1 px for 5/255).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.attacks.guides import Guides
from advreid.models import IMAGENET_STD
from advreid.ops import per_sample_rand

EPS_SPACES = ("pixel", "normalized")
MODEL_MODES = ("train", "eval")


@dataclass
class GoatGuides:
    """GOAT guides of a batch: pushing (B,P,D) and pulling (B,Q,D) features, masks, and batch rows (-1 = none)."""

    push: torch.Tensor
    push_mask: torch.Tensor
    push_index: torch.Tensor
    pull: torch.Tensor
    pull_mask: torch.Tensor
    pull_index: torch.Tensor


def goat_guides(feats: torch.Tensor, pids: torch.Tensor, push: int, pull: int) -> GoatGuides:
    """Guides of each sample of a batch, from the batch's own detached clean features (B,D) and pids (B,).

    Pushing: the first ``push`` *other* batch members with the same pid (batch order; the PK sampler's order is
    random); when ``push == 0`` or a sample has no same-pid partner, its own clean feature (SMA, GOAT^{0,0}).
    Pulling: the ``pull`` batch features furthest (L2) from the sample's own, only the sample itself excluded
    (the identity is not checked, as in Bouniot's code); ties go to the lowest batch index.
    """
    feats = feats.detach()
    b = feats.shape[0]
    dev = feats.device
    pids = torch.as_tensor(pids, device=dev).long().reshape(-1)
    if pids.shape[0] != b:
        raise ValueError(f"goat_guides: {b} features but {pids.shape[0]} pids")
    ar = torch.arange(b, device=dev)
    eye = ar[:, None] == ar[None, :]
    p = max(int(push), 1)
    if push > 0 and b > 1:
        same = (pids[:, None] == pids[None, :]) & ~eye
        key = torch.where(same, ar[None, :], ar[None, :] + b)  # partners first, in batch order
        order = key.sort(dim=1).values[:, :p]
        if order.shape[1] < p:
            order = torch.cat([order, order.new_full((b, p - order.shape[1]), 2 * b)], 1)
        mask = order < b
        idx = torch.where(mask, order, torch.full_like(order, -1))
    else:
        mask = torch.zeros(b, p, dtype=torch.bool, device=dev)
        idx = torch.full((b, p), -1, dtype=torch.long, device=dev)
    lonely = ~mask.any(1)  # SMA fallback: the sample's own clean feature
    idx[lonely, 0] = ar[lonely]
    mask[lonely, 0] = True
    push_f = feats[idx.clamp(min=0)]
    q = int(pull)
    if q > 0:
        d = torch.cdist(feats.float(), feats.float(), compute_mode="donot_use_mm_for_euclid_dist")
        d = d.masked_fill(eye, float("-inf"))
        if q == 1:
            pidx = d.argmax(1, keepdim=True)  # first maximum, as the reference's strict '>' scan
        else:
            pidx = d.topk(min(q, b), dim=1).indices
        pmask = torch.isfinite(d.gather(1, pidx))
        if pidx.shape[1] < q:
            pad = q - pidx.shape[1]
            pidx = torch.cat([pidx, pidx.new_zeros(b, pad)], 1)
            pmask = torch.cat([pmask, pmask.new_zeros(b, pad)], 1)
        pidx = torch.where(pmask, pidx, torch.full_like(pidx, -1))
        pull_f = feats[pidx.clamp(min=0)]
    else:
        pidx = torch.zeros(b, 0, dtype=torch.long, device=dev)
        pmask = torch.zeros(b, 0, dtype=torch.bool, device=dev)
        pull_f = feats.new_zeros(b, 0, feats.shape[1])
    return GoatGuides(push_f, mask, idx, pull_f, pmask, pidx)


def model_std(model: nn.Module) -> tuple[float, float, float]:
    """The per-channel std the model normalises with (ImageNet's when it does not say)."""
    std = getattr(model, "std", None)
    if isinstance(std, torch.Tensor) and std.numel() == 3:
        return tuple(float(v) for v in std.flatten().tolist())  # type: ignore[return-value]
    return IMAGENET_STD


class GOAT(Attack):
    """GOAT^{push,pull} batch attack; see the module docstring. Defaults: the reference's 5/255, 1/255, 7 steps,
    random start, train mode."""

    name = "goat"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = 7, *, random_start: bool = True, push: int = 4, pull: int = 1,
                 eps_space: str = "pixel", model_mode: str = "train", std: Sequence[float] | None = None,
                 amp: bool = False, **kwargs: Any) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module  # attack forwards must not go through DDP's gradient hooks
        kwargs.setdefault("normalize", False)
        kwargs.setdefault("distance", "sqeuclidean")
        super().__init__(model, eps, alpha, steps, random_start=random_start, **kwargs)
        for name, v in (("push", push), ("pull", pull)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be an int >= 0")
        if eps_space not in EPS_SPACES:
            raise ValueError(f"eps_space={eps_space!r}; expected one of {', '.join(EPS_SPACES)}")
        if model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode={model_mode!r}; expected one of {', '.join(MODEL_MODES)}")
        self.push, self.pull, self.eps_space, self.model_mode = int(push), int(pull), eps_space, model_mode
        self.std = tuple(float(s) for s in std) if std is not None else model_std(model)
        if len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"std={std!r}: expected 3 positive per-channel values")
        self.amp = bool(amp)

    def _extra_params(self) -> dict[str, Any]:
        return {"push": self.push, "pull": self.pull, "eps_space": self.eps_space, "model_mode": self.model_mode,
                "std": list(self.std), "amp": self.amp}

    def budget(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(eps, alpha) in pixel space: floats, or (1,C,1,1) tensors for ``eps_space="normalized"``."""
        if self.eps_space == "pixel":
            return self.eps, self.alpha
        s = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return self.eps * s, self.alpha * s

    def features(self, x: torch.Tensor, *, normalize: bool | None = None) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=self.amp and x.is_cuda):
            f = super().features(x, normalize=normalize)
        return f.float()

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        clean = self.features(x0)
        g = goat_guides(clean, inp.pids if inp.pids is not None else torch.arange(x0.shape[0]), self.push, self.pull)
        if isinstance(inp.guides, Guides) and inp.guides.push is not None:  # the hook's dictionary draws
            g = GoatGuides(inp.guides.push.to(clean), inp.guides.push_mask.to(clean.device),
                           torch.full(inp.guides.push_mask.shape, -1, device=clean.device), g.pull, g.pull_mask,
                           g.pull_index)
        return {"guides": g}

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return goat_objective(feats, state["guides"])

    def bounds(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, _ = self.budget(x0)
        return (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        if not self.random_start:
            return x0.clone()
        eps, _ = self.budget(x0)
        u = per_sample_rand(self.generators(index, stream), x0.shape[1:], dtype=torch.float32, device=x0.device)
        lo, hi = self.bounds(x0)
        return torch.minimum(torch.maximum(x0 + (2 * u.to(x0.dtype) - 1) * eps, lo), hi)

    def step(self, x: torch.Tensor, direction: torch.Tensor, x0: torch.Tensor,
             box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        _, alpha = self.budget(x0)
        return torch.minimum(torch.maximum(x + alpha * direction.sign(), box[0]), box[1])


def goat_objective(feats: torch.Tensor, guides: GoatGuides) -> torch.Tensor:
    """Per-sample objective (B,) to maximise: masked push distances minus masked pull distances (MSE-sum)."""
    push = ((feats[:, None, :] - guides.push.to(feats.dtype)).pow(2).sum(-1) * guides.push_mask).sum(1)
    if guides.pull.shape[1] == 0:
        return push
    pull = ((feats[:, None, :] - guides.pull.to(feats.dtype)).pow(2).sum(-1) * guides.pull_mask).sum(1)
    return push - pull


register_attack("goat", GOAT)
register_attack("goat_sma", GOAT, push=0, pull=0)
