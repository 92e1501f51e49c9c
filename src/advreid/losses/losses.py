"""ReID losses: label-smoothed cross-entropy, batch-hard / soft-margin triplet, and their weighted sum."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from advreid.registry import Registry

LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss")


def _check_pids(pids: torch.Tensor, n: int, what: str) -> None:
    if not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.shape[0] != n:
        shape = tuple(pids.shape) if isinstance(pids, torch.Tensor) else type(pids).__name__
        raise ValueError(f"{what}: pids must be a 1-D tensor of length {n} (one per sample), got {shape}")
    if pids.is_floating_point():
        raise ValueError(f"{what}: pids must be integer labels, got dtype {pids.dtype}")


@LOSSES.register("ce_ls")
class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against (1-eps)*onehot + eps/K (BoT / torchreid); eps=0 is plain cross-entropy."""

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CrossEntropyLabelSmooth: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1), got {epsilon}")
        self.num_classes = num_classes
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"CrossEntropyLabelSmooth: logits must be (B, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        _check_pids(pids, logits.shape[0], "CrossEntropyLabelSmooth")
        lo, hi = int(pids.min()), int(pids.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"CrossEntropyLabelSmooth: labels must be in [0, {self.num_classes - 1}], "
                             f"got range [{lo}, {hi}] (relabel training pids to 0..K-1)")
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, pids.long().unsqueeze(1)).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        return ((1.0 - self.epsilon) * nll + self.epsilon * uniform).mean()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distance sqrt(clamp(||x||^2 + ||y||^2 - 2 x.y, 1e-12)), shape (len(x), len(y))."""
    x, y = x.float(), y.float()
    sq = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())
    return sq.clamp(min=1e-12).sqrt()


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al.) on Euclidean distances; margin None/0 -> soft margin.

    For each anchor: hardest positive (farthest same-id sample, itself excluded) and hardest negative (closest
    other-id sample). Anchors without a positive or a negative are left out of the mean; if none is valid the
    loss is 0 (still connected to the graph).
    """

    def __init__(self, margin: float | None = 0.3) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"TripletLoss: margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = None if not margin else float(margin)

    def forward(
        self, features: torch.Tensor, pids: torch.Tensor, return_accuracy: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Loss; with ``return_accuracy`` also the fraction of valid anchors whose d_an > d_ap."""
        if features.dim() != 2:
            raise ValueError(f"TripletLoss: features must be (B, D), got {tuple(features.shape)}")
        n = features.shape[0]
        _check_pids(pids, n, "TripletLoss")
        dist = euclidean_dist(features, features)
        same = pids.unsqueeze(0) == pids.unsqueeze(1)
        eye = torch.eye(n, dtype=torch.bool, device=features.device)
        pos_mask, neg_mask = same & ~eye, ~same
        valid = pos_mask.any(1) & neg_mask.any(1)
        d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(1)[valid]
        d_an = dist.masked_fill(~neg_mask, float("inf")).amin(1)[valid]
        if d_ap.numel() == 0:
            loss = features.sum() * 0.0
            acc = features.new_zeros(())
        else:
            diff = d_ap - d_an
            per = F.softplus(diff) if self.margin is None else F.relu(diff + self.margin)
            loss = per.mean()
            acc = (d_an > d_ap).float().mean()
        return (loss, acc.detach()) if return_accuracy else loss


@LOSSES.register("reid")
class ReIDLoss(nn.Module):
    """``ce_weight * CE_ls(logits) + triplet_weight * triplet(outputs[triplet_on])`` on a training dict."""

    def __init__(
        self,
        num_classes: int,
        *,
        ce_weight: float = 1.0,
        triplet_weight: float = 1.0,
        label_smooth: float = 0.1,
        margin: float | None = 0.3,
        triplet_on: str = "feat_before_bn",
    ) -> None:
        super().__init__()
        if triplet_on not in ("feat_before_bn", "feat_after_bn"):
            raise ValueError("ReIDLoss: triplet_on must be 'feat_before_bn' or 'feat_after_bn', "
                             f"got {triplet_on!r}")
        if ce_weight < 0 or triplet_weight < 0 or ce_weight + triplet_weight == 0:
            raise ValueError(f"ReIDLoss: weights must be >= 0 and not both 0, got ce_weight={ce_weight}, "
                             f"triplet_weight={triplet_weight}")
        self.ce_weight = float(ce_weight)
        self.triplet_weight = float(triplet_weight)
        self.triplet_on = triplet_on
        self.ce = CrossEntropyLabelSmooth(num_classes, label_smooth) if ce_weight > 0 else None
        self.triplet = TripletLoss(margin) if triplet_weight > 0 else None

    def forward(
        self, outputs: Mapping[str, torch.Tensor | None], pids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(total, parts)``: ``ce``, ``acc`` (top-1), ``triplet``, ``triplet_acc``, ``total``."""
        if not isinstance(outputs, Mapping):
            raise TypeError("ReIDLoss expects the model's training-mode dict output "
                            f"(call model.train() first), got {type(outputs).__name__}")
        total: torch.Tensor | None = None
        parts: dict[str, float] = {}
        if self.ce is not None:
            logits = outputs.get("logits")
            if logits is None:
                raise ValueError("ReIDLoss: ce_weight > 0 but the model output has no logits "
                                 "(num_classes=0?); set ce_weight=0")
            ce = self.ce(logits, pids)
            total = self.ce_weight * ce
            parts["ce"] = float(ce.detach())
            parts["acc"] = float((logits.detach().argmax(1) == pids).float().mean())
        if self.triplet is not None:
            feats = outputs.get(self.triplet_on)
            if feats is None:
                raise ValueError(f"ReIDLoss: model output has no {self.triplet_on!r}")
            tri, tri_acc = self.triplet(feats, pids, return_accuracy=True)
            total = self.triplet_weight * tri if total is None else total + self.triplet_weight * tri
            parts["triplet"] = float(tri.detach())
            parts["triplet_acc"] = float(tri_acc)
        assert total is not None
        parts["total"] = float(total.detach())
        return total, parts
