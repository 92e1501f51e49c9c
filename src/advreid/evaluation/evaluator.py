"""Model-level evaluation: extract query/gallery features, rank, score (optionally re-ranked)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from advreid.data import ImageDataset, Record, build_transforms
from advreid.evaluation.bootstrap import metric_intervals, per_query_to_json
from advreid.evaluation.distance import compute_distance_matrix
from advreid.evaluation.protocol import EvalProtocol
from advreid.evaluation.rank import evaluate_rank
from advreid.evaluation.rerank import re_ranking_features
from advreid.evaluation.sharding import extract_sharded, is_main


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
    intervals: bool = True,
) -> dict:
    """rank-1/5/10, mAP, mINP of query features against gallery features (re-ranked when asked).

    With ``intervals`` (default) also: ``<metric>_ci`` = [lo, hi], the 95% percentile-bootstrap interval over
    queries (1,000 resamples, seed 0: :func:`advreid.evaluation.metric_intervals`), ``cmc`` (the curve up to
    ``max_rank``) and ``per_query`` (first-match rank, AP and INP of every query, JSON form of
    :func:`advreid.evaluation.per_query_to_json`; writers move it to a side file).
    """
    if rerank:  # k-reciprocal re-ranking on the protocol's own distance (its lambda mixes that distance in)
        distmat = re_ranking_features(qf, gf, metric=metric)
    else:
        distmat = compute_distance_matrix(qf, gf, metric=metric)
    res = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap=ap,
                        return_per_query=intervals)
    out = res.to_dict()
    out["num_valid_queries"] = int(res.num_valid_queries)
    if intervals and res.num_valid_queries > 0:
        out.update(metric_intervals(res))
        out["cmc"] = [round(float(v), 6) for v in res.cmc]
        out["per_query"] = per_query_to_json(res)
    return out


def evaluate_model(
    model: nn.Module,
    query: Sequence[Record],
    gallery: Sequence[Record],
    protocol: EvalProtocol | None = None,
    *,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
    **protocol_fields: object,
) -> dict:
    """Evaluate ``model`` on query/gallery records under the Market-1501 protocol; returns a flat dict of metrics
    with their bootstrap intervals. ``protocol`` (or its fields as keywords: ``metric``, ``flip``, ``rerank``,
    ``height``...) says how; with ``rerank`` both the plain and the re-ranked scores are returned (``rr_`` keys).
    Under ``torchrun`` the extraction is split over the ranks by whole batches and rank 0 scores; the other ranks
    return an empty dict."""
    protocol = (protocol or EvalProtocol()).replace(**protocol_fields)
    t0 = time.perf_counter()
    tf = build_transforms(protocol.height, protocol.width, is_train=False)
    kw = dict(batch_size=protocol.batch_size, flip=protocol.flip, normalize=protocol.normalize, device=device,
              num_workers=num_workers, progress=progress and is_main())
    # under torchrun each rank extracts its batches and rank 0 alone ranks (docs/sharding.md)
    q = extract_sharded(model, ImageDataset(list(query), tf), desc="query", to_all=False, **kw)
    g = extract_sharded(model, ImageDataset(list(gallery), tf), desc="gallery", to_all=False, **kw)
    if q is None or g is None:
        return {}
    (qf, qp, qc), (gf, gp, gc) = q, g
    t1 = time.perf_counter()
    out = score((qf, qp, qc), (gf, gp, gc), protocol)
    out["extract_s"] = round(t1 - t0, 3)
    out["score_s"] = round(time.perf_counter() - t1, 3)
    out["protocol"] = {"metric": protocol.metric, "normalize": protocol.normalize, "flip": protocol.flip,
                       "ap": protocol.ap, "rerank": protocol.rerank, "num_query": len(query),
                       "num_gallery": len(gallery)}
    return out


def score(query: tuple, gallery: tuple, protocol: EvalProtocol) -> dict:
    """Plain metrics of (features, pids, camids) query vs gallery, plus the re-ranked ones under ``rr_`` keys."""
    out = evaluate_features(*query, *gallery, metric=protocol.metric, ap=protocol.ap)
    if protocol.rerank:
        rr = evaluate_features(*query, *gallery, metric=protocol.metric, ap=protocol.ap, rerank=True)
        out.update({f"rr_{k}": v for k, v in rr.items() if k != "num_valid_queries"})
    return out
