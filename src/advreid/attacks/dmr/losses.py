"""DMR losses: the mis-ranking triplet, the least-likely-class cross-entropy, LSGAN and the generator total.

Reconstructed from ``advloss.py`` / ``GD.py`` / ``train.py`` of the reference. Both ReID terms are *minimised* and, as
in the reference, are the log of a batch mean; ``log_eps`` keeps the log finite when the mean reaches 0 (there the
gradient is 0: every anchor is already mis-ranked by the margin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossWeights", "generator_total", "least_likely_ce", "lsgan_loss", "misranking_loss", "pairwise_euclidean"]


def pairwise_euclidean(features: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """(B,B) Euclidean distances ``sqrt(max(||fi - fj||^2, floor))`` (the reference's numerically safe form)."""
    diff = features.unsqueeze(1) - features.unsqueeze(0)
    return diff.pow(2).sum(-1).clamp_min(floor).sqrt()


def misranking_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3, *, self_positive: bool = False,
                    log_eps: float = 1e-8) -> torch.Tensor:
    """``log(mean_i max(0, max_neg d(i,n) - min_pos d(i,p) + margin))`` on raw features: pull the farthest negative
    in, push the nearest positive out.

    ``self_positive=True`` reproduces the reference, whose same-ID mask includes the anchor itself, so the nearest
    "positive" is the anchor at distance ~0 (``sqrt(1e-12)``) and only negatives are pulled. By default the anchor is
    excluded; anchors without another same-ID sample, or without a different-ID sample, are left out of the mean
    (all left out: the loss is ``log(log_eps)``).
    """
    if features.dim() != 2 or pids.dim() != 1 or features.shape[0] != pids.shape[0]:
        raise ValueError(f"misranking_loss: features (B,D) and pids (B,) expected, got {tuple(features.shape)} and "
                         f"{tuple(pids.shape)}")
    dist = pairwise_euclidean(features)
    same = pids.view(-1, 1) == pids.view(1, -1)
    pos = same if self_positive else same & ~torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return torch.log(features.new_tensor(log_eps)) + 0.0 * features.sum()
    inf = torch.finfo(dist.dtype).max
    d_pos = dist.masked_fill(~pos, inf).amin(1)  # nearest positive ("d_an'" in the reference)
    d_neg = dist.masked_fill(~neg, -inf).amax(1)  # farthest negative ("d_ap'")
    hinge = F.relu(d_neg - d_pos + margin)[valid].mean()
    return torch.log(hinge.clamp_min(log_eps))


def least_likely_ce(logits: torch.Tensor, pids: torch.Tensor, smoothing: float = 0.1, *,
                    log_eps: float = 1e-8) -> torch.Tensor:
    """``log(mean_i CE(q_i, softmax(logits_i)))`` towards each sample's least-likely class (argmin logit).

    ``q_i = (1 - smoothing) * onehot(argmin) + smoothing * s`` with ``s_c = 1/(C-1)`` for every class ``c`` that is not
    one of the batch's true IDs ``pids`` and 0 for those (the reference's smoothing, whose mass is therefore
    ``smoothing * (C - #batch IDs)/(C-1)``, not exactly ``smoothing``).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"least_likely_ce: logits must be (B,C) with C >= 2, got {tuple(logits.shape)}")
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= logits.shape[1]):
        raise ValueError(f"least_likely_ce: pids must be class indices in 0..{logits.shape[1] - 1}")
    c = logits.shape[1]
    target = F.one_hot(logits.detach().argmin(1), c).to(logits.dtype)
    smooth = torch.full((c,), 1.0 / (c - 1), dtype=logits.dtype, device=logits.device)
    smooth[pids.long()] = 0.0
    q = (1 - smoothing) * target + smoothing * smooth
    ce = -(q * F.log_softmax(logits, dim=1)).sum(1).mean()
    return torch.log(ce.clamp_min(log_eps))


def lsgan_loss(preds: list[torch.Tensor], target: float) -> torch.Tensor:
    """Least-squares GAN loss summed over the discriminator's scales: ``sum_s mean((D_s - target)^2)``."""
    return sum(F.mse_loss(p, torch.full_like(p, float(target))) for p in preds)


@dataclass(frozen=True)
class LossWeights:
    """``L_G = gan * L_GAN + reid * (xent * L_xent + tri * L_tri) + ssim * (1 - MS-SSIM)`` (reference defaults)."""

    gan: float = 1.0
    reid: float = 10.0
    xent: float = 1.0
    tri: float = 1.0
    ssim: float = 0.1


def generator_total(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Weighted generator loss from ``terms`` ("gan", "xent", "tri", "ssim" = 1 - MS-SSIM); missing terms count 0."""
    zero = next(iter(terms.values())).new_zeros(())
    get = lambda k: terms.get(k, zero)  # noqa: E731
    reid = weights.xent * get("xent") + weights.tri * get("tri")
    return weights.gan * get("gan") + weights.reid * reid + weights.ssim * get("ssim")
