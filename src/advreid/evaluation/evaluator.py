"""Model-level evaluation: extract query/gallery features, rank, score (optionally re-ranked)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from advreid.data import ImageDataset, Record, build_transforms
from advreid.evaluation.distance import compute_distance_matrix
from advreid.evaluation.features import extract_features
from advreid.evaluation.rank import evaluate_rank
from advreid.evaluation.rerank import re_ranking_features


def evaluate_features(
    qf: torch.Tensor,
    q_pids: torch.Tensor | np.ndarray,
    q_camids: torch.Tensor | np.ndarray,
    gf: torch.Tensor,
    g_pids: torch.Tensor | np.ndarray,
    g_camids: torch.Tensor | np.ndarray,
    *,
    metric: str = "cosine",
    rerank: bool = False,
    ap: str = "standard",
    max_rank: int = 50,
) -> dict:
    """rank-1/5/10, mAP, mINP of query features against gallery features (re-ranked when asked)."""
    if rerank:
        distmat = re_ranking_features(qf, gf)
    else:
        distmat = compute_distance_matrix(qf, gf, metric=metric)
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap=ap)
    out = res.to_dict()
    out["num_valid_queries"] = int(res.num_valid_queries)
    return out


def evaluate_model(
    model: nn.Module,
    query: Sequence[Record],
    gallery: Sequence[Record],
    *,
    metric: str = "cosine",
    normalize: bool = True,
    flip: bool = False,
    rerank: bool = False,
    ap: str = "standard",
    batch_size: int = 128,
    height: int = 256,
    width: int = 128,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` on query/gallery records under the Market-1501 protocol; returns a flat dict of metrics.

    With ``rerank=True`` both the plain and the re-ranked scores are returned (keys prefixed ``rr_``).
    """
    t0 = time.perf_counter()
    tf = build_transforms(height, width, is_train=False)
    kw = dict(batch_size=batch_size, flip=flip, normalize=normalize, device=device, num_workers=num_workers,
              progress=progress)
    qf, qp, qc = extract_features(model, ImageDataset(list(query), tf), desc="query", **kw)
    gf, gp, gc = extract_features(model, ImageDataset(list(gallery), tf), desc="gallery", **kw)
    t1 = time.perf_counter()
    out = evaluate_features(qf, qp, qc, gf, gp, gc, metric=metric, ap=ap)
    if rerank:
        rr = evaluate_features(qf, qp, qc, gf, gp, gc, metric=metric, rerank=True, ap=ap)
        out.update({f"rr_{k}": v for k, v in rr.items() if k != "num_valid_queries"})
    out["extract_s"] = round(t1 - t0, 3)
    out["score_s"] = round(time.perf_counter() - t1, 3)
    out["protocol"] = {"metric": metric, "normalize": normalize, "flip": flip, "ap": ap, "rerank": rerank,
                       "num_query": len(query), "num_gallery": len(gallery)}
    return out
