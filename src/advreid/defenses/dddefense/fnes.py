"""FNES metric adversarial training for DDDefense Phase II -- a named, documented reconstruction, not the paper's code.

DDDefense (Zhou et al., arXiv 2511.09933) trains the embedding adversarially with "farthest negative extension
softening" (FNES), so that robustness cannot be parked in a classifier that ReID throws away. The paper's formulas,
softening schedule and attack settings are not public (spec 3.11); this module is a reconstruction. Choices and reasons:

1. **Adversarial anchors** (:class:`FNESAdversary`): any ``advreid.attacks`` attack (default ``"fna"``, Bouniot's
   furthest-negative attack, which the name "farthest negative" points at), run on the training batch by the current
   model, in eval mode like every library attack. Guides come from the batch itself (:func:`batch_guides`), since a
   training step has no query set: push = the other same-identity batch members, pull = the anchor's farthest
   negative *sample* (``pull="sample"``, the same "farthest negative" the loss uses) or, as Bouniot's FNA on a query
   set, the farthest other-identity *centroid* of the batch (``pull="centroid"``). The farthest choice is made in the
   attack's feature space (L2-normalised when the attack normalises). Random draws use the attack's per-sample
   streams ``(seed, index[i])``; the guides necessarily depend on the batch (who the batch-mates are), so for
   guided attacks a sample's result depends on its batch, for self-guided ones (SMA, ODFA, LTA) it does not.
   Budget defaults 5/255, 1/255, 7 steps: GOAT's online-training setting (spec 3.9), DDDefense's are unknown.
2. **Loss on embeddings only** (:class:`FNESLoss`): no classifier term on adversarial examples (the paper's point).
   Anchors are the adversarial features; positives and negatives are the *clean* features of the batch when given
   (the query-attack threat model: adversarial query, clean gallery), else the adversarial batch itself (EST-style,
   spec 3.10). The anchor's own column is excluded, as in batch-hard mining.
3. **Softening**: the hard max over positives and hard min over negatives of the batch-hard triplet are replaced by
   temperature-``tau`` log-*mean*-exp: ``smax = tau * log(mean_p exp(d_ap / tau))`` and
   ``smin = -tau * log(mean_n exp(-d_an / tau))``. ``tau -> 0`` gives back max/min (``tau = 0`` is exactly hard),
   ``tau -> inf`` gives the mean over all positives/negatives (batch-all). The mean (not the sum) keeps the soft
   max within ``[max - tau log|P|, max]``: with a plain log-sum-exp the value would shift by ``tau log|P|``, i.e.
   depend on the number of images per identity, which DDDefense's resampling deliberately changes. The margin is
   soft (``softplus(smax - smin)``, Hermans' soft margin, also GOAT's triplet) unless ``margin`` is a number, then
   ``relu(smax - smin + margin)``, the same convention as :class:`advreid.losses.TripletLoss`.
4. **Extension** (needs clean features): FNA pulls an anchor towards its farthest negative; the defence *extends*
   that distance back: with weights ``w_in = softmax_n(d(c_i, c_n) / tau)`` over the clean anchor's negatives
   (``tau -> 0``: one-hot on the clean farthest negative ``n*``), ``D_c = sum_n w_in d(c_i, c_n)`` (target, detached)
   and ``D_a = sum_n w_in d(a_i, c_n)``, the term is ``softplus(D_c - D_a)`` (or ``relu(D_c - D_a + m)``): the
   adversarial anchor's distance to the clean anchor's farthest negative(s) is pushed beyond the clean anchor's own.
   The same ``tau`` softens the choice of the farthest negative. Without clean features the term is left out
   (reported as 0): it has no clean reference.
5. Distances are Euclidean (as :class:`~advreid.losses.TripletLoss`), computed in the features' dtype so float64
   checks are exact. ``tau`` is in distance units of the features given (raw embeddings by default); the default
   1.0 is a mild softening for raw ReID embeddings, whose pairwise distances are typically several units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advreid.attacks import Attack, Guides, build
from advreid.utils.misc import module_mode

__all__ = ["PULL_MODES", "FNESAdversary", "FNESLoss", "batch_guides", "pairwise_distance"]

PULL_MODES = ("sample", "centroid")


def _check_feats_pids(feats: torch.Tensor, pids: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
        desc = f"{tuple(feats.shape)} {feats.dtype}" if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{what}: features must be a float (B, D) tensor, got {desc}")
    if not isinstance(pids, torch.Tensor) or pids.shape != (feats.shape[0],) or pids.is_floating_point():
        desc = f"{tuple(pids.shape)} {pids.dtype}" if isinstance(pids, torch.Tensor) else type(pids).__name__
        raise ValueError(f"{what}: pids must be an integer tensor of shape ({feats.shape[0]},), got {desc}")
    return pids.to(feats.device).long()


def check_nonneg(what: str, v: Any, optional: bool = False, none_text: str = " or None (soft margin)") -> None:
    """Refuse ``v`` unless a finite number >= 0 (or None when ``optional``), naming ``what``."""
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= float(v) < float("inf"):
        raise ValueError(f"{what} must be a finite number >= 0{none_text if optional else ''}, got {v!r}")


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (len(x), len(y)) in the inputs' dtype: ``sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))``.

    The same formula as :func:`advreid.losses.euclidean_dist` without its float32 cast; the clamp keeps the
    gradient finite at zero distance (the excluded diagonal).
    """
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return sq.clamp(min=1e-12).sqrt()


# --------------------------------------------------------------------------------------------------- guides


def batch_guides(feats: torch.Tensor, pids: torch.Tensor, *, normalize: bool = False,
                 pull: str = "sample") -> Guides:
    """In-batch guides for a metric attack on a training batch, from the batch's raw features (B,D) and pids (B,).

    Push: the other same-pid batch members in batch order, padded to the largest count (mask False = padding).
    Pull: each sample's farthest negative (``"sample"``) or farthest other-identity batch centroid (``"centroid"``),
    chosen in L2-normalised space when ``normalize``; ties go to the lowest index; no negative -> pull mask False.
    """
    if pull not in PULL_MODES:
        raise ValueError(f"pull={pull!r} is not supported; expected one of {PULL_MODES}")
    feats = feats.detach()
    pids = _check_feats_pids(feats, pids, "batch_guides")
    b, dev = feats.shape[0], feats.device
    ar = torch.arange(b, device=dev)
    same = pids[:, None] == pids[None, :]
    partner = same & (ar[:, None] != ar[None, :])
    k = max(int(partner.sum(1).max()) if b else 0, 1)
    order = torch.where(partner, ar[None, :], ar[None, :] + b).sort(dim=1).values[:, :k]  # partners first
    push_mask = order < b
    push = feats[torch.where(push_mask, order, torch.zeros_like(order))]
    space = F.normalize(feats, dim=1) if normalize else feats
    if pull == "sample":
        cand, cand_pids = feats, pids
    else:
        ids, inv = torch.unique(pids, return_inverse=True)
        counts = torch.bincount(inv, minlength=ids.shape[0]).to(feats.dtype)
        cand = torch.zeros(ids.shape[0], feats.shape[1], dtype=feats.dtype, device=dev).index_add_(0, inv, feats)
        cand, cand_pids = cand / counts[:, None], ids
    cand_space = F.normalize(cand, dim=1) if normalize else cand
    d = torch.cdist(space, cand_space, compute_mode="donot_use_mm_for_euclid_dist")  # exact, row-independent
    other = cand_pids[None, :] != pids[:, None]
    j = d.masked_fill(~other, -1.0).argmax(1)
    return Guides(push=push, push_mask=push_mask, pull=cand[j].unsqueeze(1), pull_mask=other.any(1, keepdim=True))


class FNESAdversary:
    """Adversarial anchors for FNES: an ``advreid`` attack run on a training batch with in-batch guides.

    The attack holds the model being trained, so each call attacks the current weights. Guided attacks (FNA, the
    metric I-FGSM family) get :func:`batch_guides`; self-guided ones (SMA, ODFA, LTA, ...) get none.
    """

    def __init__(self, attack: Attack, *, pull: str = "sample") -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"FNESAdversary needs an advreid Attack (advreid.attacks.build(...)), "
                            f"got {type(attack).__name__}")
        if pull not in PULL_MODES:
            raise ValueError(f"pull={pull!r} is not supported; expected one of {PULL_MODES}")
        self.attack = attack
        self.pull = pull

    @classmethod
    def build(cls, model: nn.Module, name: str = "fna", *, eps: float | str = "5px", alpha: float | str = "1px",
              steps: int | None = 7, seed: int = 0, pull: str = "sample", **params: Any) -> FNESAdversary:
        """Build the attack ``name`` on ``model`` (``steps=None``: the attack's own default) and wrap it."""
        kw: dict[str, Any] = {"eps": eps, "alpha": alpha, "seed": seed, **params}
        if steps is not None:
            kw["steps"] = steps
        return cls(build(name, model, **kw), pull=pull)

    def __repr__(self) -> str:
        return f"FNESAdversary({self.attack!r}, pull={self.pull!r})"

    def guides(self, images: torch.Tensor, pids: torch.Tensor) -> Guides:
        """In-batch guides from the clean images' raw features (eval mode, no grad; the model's modes restored)."""
        with module_mode(self.attack.model, False), torch.no_grad():
            feats = self.attack.features(images, normalize=False)
        return batch_guides(feats, pids.to(feats.device), normalize=self.attack.normalize, pull=self.pull)

    def __call__(self, images: torch.Tensor, pids: torch.Tensor, *, index: torch.Tensor | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """Adversarial copy of ``images`` (B,3,H,W) in [0,1]; ``index`` names the samples' random streams,
        ``seed`` (e.g. per training step) replaces the attack's seed for this call only."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        guides = self.guides(images, pids) if self.attack.needs_guides else None
        old = self.attack.seed
        self.attack.seed = old if seed is None else int(seed)
        try:
            return self.attack(images, pids, guides=guides, index=index)
        finally:
            self.attack.seed = old


# ----------------------------------------------------------------------------------------------------- loss


def _soft_extreme(d: torch.Tensor, mask: torch.Tensor, tau: float, *, largest: bool) -> torch.Tensor:
    """Row-wise log-mean-exp soft max (``largest``) or soft min of ``d`` over ``mask``; ``tau = 0``: hard."""
    sign = 1.0 if largest else -1.0
    has = mask.any(1, keepdim=True)
    if tau == 0:
        z = (sign * d).masked_fill(~mask, float("-inf"))
        return sign * torch.where(has, z, torch.zeros_like(z)).amax(1)
    z = (sign * d / tau).masked_fill(~mask, float("-inf"))
    z = torch.where(has, z, torch.zeros_like(z))  # empty rows stay finite (they are dropped later): no NaN grads
    count = mask.sum(1).clamp(min=1).to(d.dtype)
    return sign * tau * (torch.logsumexp(z, dim=1) - count.log())


def _soft_argmax_weights(d: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Row weights over ``mask``: softmax(d / tau), or one-hot on the first maximum when ``tau = 0``."""
    z = d.masked_fill(~mask, float("-inf"))
    z = torch.where(mask.any(1, keepdim=True), z, torch.zeros_like(z))
    if tau == 0:
        return F.one_hot(z.argmax(1), d.shape[1]).to(d.dtype) * mask
    return torch.softmax(z / tau, dim=1) * mask


class FNESLoss(nn.Module):
    """FNES: softened batch-hard triplet on adversarial anchors plus the farthest-negative extension term.

    ``total = triplet_weight * mean_i m(smax_i - smin_i) + extension_weight * mean_i m'(D_c,i - D_a,i)`` with
    ``m = softplus`` (``margin=None``) or ``relu(. + margin)``; see the module docstring for every term and why.
    """

    def __init__(self, tau: float = 1.0, margin: float | None = None, extension_margin: float | None = None,
                 triplet_weight: float = 1.0, extension_weight: float = 1.0) -> None:
        super().__init__()
        for name, v, optional in (("tau", tau, False), ("margin", margin, True),
                                  ("extension_margin", extension_margin, True),
                                  ("triplet_weight", triplet_weight, False),
                                  ("extension_weight", extension_weight, False)):
            check_nonneg(f"FNESLoss: {name}", v, optional)
        if triplet_weight == 0 and extension_weight == 0:
            raise ValueError("FNESLoss: triplet_weight and extension_weight are both 0; nothing to train")
        self.tau = float(tau)
        self.margin = None if margin is None else float(margin)
        self.extension_margin = None if extension_margin is None else float(extension_margin)
        self.triplet_weight = float(triplet_weight)
        self.extension_weight = float(extension_weight)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, margin={self.margin}, extension_margin={self.extension_margin}, "
                f"triplet_weight={self.triplet_weight}, extension_weight={self.extension_weight}")

    @staticmethod
    def _hinge(x: torch.Tensor, margin: float | None) -> torch.Tensor:
        return F.softplus(x) if margin is None else F.relu(x + margin)

    def forward(self, adv_feats: torch.Tensor, pids: torch.Tensor,
                clean_feats: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, parts)`` from adversarial features (B,D), pids (B,) and optional clean features (B,D) of the
        same images; parts: ``triplet``, ``extension``, ``acc`` (hard d_an > d_ap among valid anchors), ``total``."""
        pids = _check_feats_pids(adv_feats, pids, "FNESLoss")
        if clean_feats is not None and clean_feats.shape != adv_feats.shape:
            raise ValueError(f"FNESLoss: clean_feats must match adv_feats {tuple(adv_feats.shape)}, "
                             f"got {tuple(clean_feats.shape)}")
        b = adv_feats.shape[0]
        gallery = adv_feats if clean_feats is None else clean_feats.to(adv_feats.dtype)
        dist = pairwise_distance(adv_feats, gallery)
        same = pids[:, None] == pids[None, :]
        eye = torch.eye(b, dtype=torch.bool, device=adv_feats.device)
        pos, neg = same & ~eye, ~same
        valid = pos.any(1) & neg.any(1)
        zero = adv_feats.sum() * 0.0  # connected to the graph when no anchor is valid
        tri, acc = zero, adv_feats.new_zeros(())
        if bool(valid.any()):
            d_ap = _soft_extreme(dist, pos, self.tau, largest=True)[valid]
            d_an = _soft_extreme(dist, neg, self.tau, largest=False)[valid]
            tri = self._hinge(d_ap - d_an, self.margin).mean()
            with torch.no_grad():
                hard_ap = _soft_extreme(dist, pos, 0.0, largest=True)[valid]
                hard_an = _soft_extreme(dist, neg, 0.0, largest=False)[valid]
                acc = (hard_an > hard_ap).to(adv_feats.dtype).mean()
        ext = zero
        has_neg = neg.any(1)
        if clean_feats is not None and self.extension_weight > 0 and bool(has_neg.any()):
            with torch.no_grad():
                d_clean = pairwise_distance(gallery, gallery)
                w = _soft_argmax_weights(d_clean, neg, self.tau)
                target = (w * d_clean).sum(1)
            reach = (w * dist).sum(1)
            ext = self._hinge((target - reach)[has_neg], self.extension_margin).mean()
        total = self.triplet_weight * tri + self.extension_weight * ext
        parts = {"triplet": float(tri.detach()), "extension": float(ext.detach()), "acc": float(acc),
                 "total": float(total.detach())}
        return total, parts
