"""Which queries a report shows and what their rank lists are, from stored arrays only (numpy; no model).

Shared with the benchmark, which saves the adversarial images of exactly the queries chosen here:
:func:`default_queries` (the first valid ones, :func:`valid_query_mask`) and :func:`worst_queries` (largest AP drop
under attack).
:func:`ranked_gallery` is a query's top-k under the Market-1501 protocol of :mod:`advreid.evaluation.rank`: gallery
items with the query's pid *and* camera are junk and removed, and so are items with pid -1; the rest is ranked by
ascending distance, and at equal distance a true match comes after non-matches (the evaluation's pessimistic tie
rule), then gallery order. So the first match it shows is at the rank ``first_match`` the evaluation stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["default_queries", "ranked_gallery", "valid_query_mask", "worst_queries"]


def _ints(x: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


def ranked_gallery(distances: Sequence[float] | np.ndarray, query_pid: int, query_camid: int,
                   gallery_pids: Sequence[int] | np.ndarray, gallery_camids: Sequence[int] | np.ndarray,
                   *, topk: int = 10) -> list[dict]:
    """Top-``topk`` of one query: ``[{"position": gallery row, "rank": 1-based, "match": same pid, "distance"}]``
    after junk removal (same pid and camera, pid -1); ties as in the evaluation (matches after non-matches)."""
    d = np.asarray(distances, dtype=np.float64)
    g_pids, g_cams = _ints(gallery_pids, "gallery_pids"), _ints(gallery_camids, "gallery_camids")
    if d.ndim != 1 or d.shape != g_pids.shape or g_cams.shape != g_pids.shape:
        raise ValueError(f"distances ({d.shape}), gallery_pids ({g_pids.shape}) and gallery_camids "
                         f"({g_cams.shape}) must be 1-D with one entry per gallery item")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    keep = np.flatnonzero(~(((g_pids == query_pid) & (g_cams == query_camid)) | (g_pids < 0)))
    match = g_pids[keep] == query_pid
    order = keep[np.lexsort((keep, match, d[keep]))][:topk]
    return [{"position": int(j), "rank": r + 1, "match": bool(g_pids[j] == query_pid), "distance": float(d[j])}
            for r, j in enumerate(order)]


def valid_query_mask(query_pids: Sequence[int] | np.ndarray, query_camids: Sequence[int] | np.ndarray,
                     gallery_pids: Sequence[int] | np.ndarray,
                     gallery_camids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Queries that count in the metrics: those with a true match left after junk removal (a gallery item of the
    same pid, >= 0, seen by another camera). Depends on the labels only, not on a model."""
    qp, qc = _ints(query_pids, "query_pids"), _ints(query_camids, "query_camids")
    gp, gc = _ints(gallery_pids, "gallery_pids"), _ints(gallery_camids, "gallery_camids")
    if qp.shape != qc.shape or gp.shape != gc.shape:
        raise ValueError("query_pids/query_camids and gallery_pids/gallery_camids must pair up one to one")
    cams: dict[int, set[int]] = {}
    for p, c in zip(gp.tolist(), gc.tolist(), strict=True):
        if p >= 0:
            cams.setdefault(p, set()).add(c)
    return np.array([p >= 0 and bool(cams.get(p, set()) - {c}) for p, c in zip(qp.tolist(), qc.tolist(), strict=True)],
                    dtype=bool)


def default_queries(valid: Sequence[bool] | np.ndarray, index: Sequence[int] | np.ndarray, n: int = 3) -> list[int]:
    """The first ``n`` dataset query indices (in dataset order) among ``index`` whose ``valid`` flag is set
    (``valid[i]`` belongs to the query ``index[i]``; see :func:`valid_query_mask`)."""
    ok, idx = np.asarray(valid, dtype=bool), _ints(index, "index")
    if ok.shape != idx.shape:
        raise ValueError(f"valid ({ok.shape[0]}) and index ({idx.shape[0]}) must have one entry per query")
    return sorted(int(i) for i in idx[ok])[:max(0, int(n))]


def worst_queries(ap_clean: Sequence[float] | np.ndarray, ap_attacked: Sequence[float] | np.ndarray,
                  index: Sequence[int] | np.ndarray, n: int = 3, *, exclude: Iterable[int] = ()) -> list[int]:
    """The ``n`` dataset query indices with the largest AP drop ``ap_clean - ap_attacked`` (queries valid in both,
    i.e. finite AP; ties by dataset index), leaving out ``exclude``; entry ``i`` belongs to the query ``index[i]``."""
    a = np.asarray([np.nan if v is None else v for v in ap_clean], dtype=np.float64)
    b = np.asarray([np.nan if v is None else v for v in ap_attacked], dtype=np.float64)
    idx = _ints(index, "index")
    if not a.shape == b.shape == idx.shape:
        raise ValueError(f"ap_clean ({a.shape[0]}), ap_attacked ({b.shape[0]}) and index ({idx.shape[0]}) must have "
                         "one entry per query")
    skip = {int(i) for i in exclude}
    ok = np.isfinite(a) & np.isfinite(b) & ~np.isin(idx, list(skip))
    drop, cand = (a - b)[ok], idx[ok]
    order = np.lexsort((cand, -drop))
    return [int(cand[j]) for j in order[:max(0, int(n))]]
