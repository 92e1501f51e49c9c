"""Per-query scores of every member, the per-query worst case, its metrics with intervals, and the masking flags.

The worst-case rule: for each query, of the adversarial versions the members produced, keep the one with the lowest
AP (ties: the worse, i.e. larger, first-match rank; then the member listed first). A query's AP depends only on its
own feature against the (clean) gallery, so choosing per query is consistent: the metrics of the assembled set are
means of the chosen per-query values, hence at most every member's (checked by the tests).

With a randomised defense evaluated over several draws (``rand``), a member's per-query AP, INP and rank-k hit are
their means over the draws (every draw sees the same adversarial image and its own defense draw); the worst case
picks on the draw-mean AP (ties: the larger draw-mean first-match rank), and the metrics are the means over queries
of the draw means, i.e. the mean over draws of each draw's metric. Their intervals are percentile bootstraps over
queries of those per-query draw means (the draws stay with their query), from the same resampling code as every
other advreid interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from advreid.evaluation import EvalProtocol, PerQueryScores, compute_distance_matrix, evaluate_rank, metric_intervals

__all__ = ["KS", "QueryScores", "masking_flags", "score_draws", "summarize", "worst_case"]

KS = (1, 5, 10)
MASKING_SHARE = 0.1  # a "notable share" of the valid queries
MASKING_MAP_MARGIN = 0.01  # the gradient-free member's mAP must be at least one point below every gradient member's


@dataclass(frozen=True, eq=False)
class QueryScores:
    """Per-query, per-draw scores: ``ap``, ``inp`` (float, NaN for a query without a true match) and
    ``first_match`` (int, -1 for such a query), each of shape (queries, draws)."""

    ap: np.ndarray
    inp: np.ndarray
    first_match: np.ndarray
    ap_mode: str = "standard"

    @property
    def num_queries(self) -> int:
        return int(self.ap.shape[0])

    @property
    def draws(self) -> int:
        return int(self.ap.shape[1])

    @property
    def valid(self) -> np.ndarray:
        return self.first_match[:, 0] >= 0

    def mean_ap(self) -> np.ndarray:
        return self.ap.mean(axis=1)

    def mean_first_match(self) -> np.ndarray:
        return self.first_match.mean(axis=1)

    def to_json(self) -> dict[str, Any]:
        def floats(a: np.ndarray) -> list:
            return [[None if np.isnan(v) else float(v) for v in row] for row in a.tolist()]

        return {"ap_mode": self.ap_mode, "AP": floats(self.ap), "INP": floats(self.inp),
                "first_match": self.first_match.astype(int).tolist()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> QueryScores:
        def arr(key: str) -> np.ndarray:
            return np.array([[np.nan if v is None else v for v in row] for row in doc[key]], dtype=np.float64)

        return cls(arr("AP"), arr("INP"), np.array(doc["first_match"], dtype=np.int64), doc.get("ap_mode", "standard"))


def _split(feats: torch.Tensor, draws: int, normalize: bool) -> list[torch.Tensor]:
    """The ``draws`` feature blocks of a (N, draws*D) stack, each re-normalised when the protocol normalises."""
    if feats.shape[1] % draws:
        raise ValueError(f"features of width {feats.shape[1]} do not split into {draws} draws")
    chunks = feats.chunk(draws, dim=1)
    return [F.normalize(c, dim=1) if normalize else c for c in chunks]


def score_draws(query: tuple, gallery: tuple, protocol: EvalProtocol, draws: int = 1) -> QueryScores:
    """Per-query AP, INP and first-match rank of query (features, pids, camids) vs gallery, per defense draw
    (features stacked draw by draw along dim 1); exactly the values :func:`advreid.evaluation.evaluate_rank` gives."""
    qf, qp, qc = query
    gf, gp, gc = gallery
    qs, gs = _split(qf, draws, protocol.normalize and draws > 1), _split(gf, draws, protocol.normalize and draws > 1)
    ap, inp, fm = [], [], []
    for q, g in zip(qs, gs, strict=True):
        res = evaluate_rank(compute_distance_matrix(q, g, metric=protocol.metric), qp, gp, qc, gc, ap=protocol.ap,
                            return_per_query=True)
        pq = PerQueryScores.from_result(res)
        ap.append(pq.ap)
        inp.append(pq.inp)
        fm.append(pq.first_match)
    return QueryScores(np.stack(ap, 1), np.stack(inp, 1), np.stack(fm, 1).astype(np.int64), protocol.ap)


def summarize(qs: QueryScores, *, min_resamples: int | None = None) -> dict[str, Any]:
    """rank-1/5/10, mAP, mINP with 95% bootstrap intervals (``_ci``), the CMC up to rank 10 and the number of valid
    queries; over draws, means of the per-query draw means (see the module docstring)."""
    kw: dict[str, Any] = {} if min_resamples is None else {"min_resamples": min_resamples,
                                                           "resamples": max(min_resamples, 100)}
    v = qs.valid
    if not v.any():
        raise ValueError("no query has a true match in the gallery; nothing to score")
    if qs.draws == 1:
        pq = PerQueryScores(qs.ap[:, 0], qs.inp[:, 0], qs.first_match[:, 0], qs.ap_mode)
        out: dict[str, Any] = {**pq.metrics(KS), **metric_intervals(pq, ks=KS, **kw)}
    else:
        ap, inp = qs.ap[v].mean(1), qs.inp[v].mean(1)
        hits = {k: (qs.first_match[v] < k).mean(1) for k in KS}
        zeros = np.zeros(int(v.sum()), dtype=np.int64)
        base = PerQueryScores(ap, inp, zeros, qs.ap_mode)
        out = {f"rank{k}": float(hits[k].mean()) for k in KS}
        out["mAP"], out["mINP"] = float(ap.mean()), float(inp.mean())
        iv = metric_intervals(base, ks=(1,), **kw)  # the AP/INP columns: percentile bootstrap of the means
        out["mAP_ci"], out["mINP_ci"] = iv["mAP_ci"], iv["mINP_ci"]
        for k in KS:  # a rank-k hit rate per query is a [0,1] value too: the same float bootstrap
            out[f"rank{k}_ci"] = metric_intervals(PerQueryScores(hits[k], hits[k], zeros, qs.ap_mode), ks=(1,),
                                                  **kw)["mAP_ci"]
    for k in [f"rank{k}" for k in KS] + ["mAP", "mINP"]:  # float32 resampling sums: ~1e-9 outside [0, 1]
        out[f"{k}_ci"] = [min(max(float(c), 0.0), 1.0) for c in out[f"{k}_ci"]]
    fm = qs.first_match[v]
    out["cmc"] = [round(float((fm < k).mean()), 6) for k in range(1, 11)]
    out["num_valid_queries"] = int(v.sum())
    out["draws"] = qs.draws
    return out


def worst_case(members: Mapping[str, QueryScores]) -> tuple[QueryScores, list[str | None]]:
    """Per-query worst case over ``members`` (in their order): lowest draw-mean AP, ties the larger draw-mean
    first-match rank, then the member listed first. Returns the assembled scores and each query's winner (None for a
    query without a true match)."""
    names = list(members)
    if not names:
        raise ValueError("worst_case needs at least one member")
    first = members[names[0]]
    for n in names[1:]:
        if members[n].ap.shape != first.ap.shape or not np.array_equal(members[n].valid, first.valid):
            raise ValueError(f"member {n!r} scored other queries than {names[0]!r}")
    aps = np.stack([members[n].mean_ap() for n in names])  # (M, Q)
    fms = np.stack([members[n].mean_first_match() for n in names])
    q = first.num_queries
    win = np.zeros(q, dtype=np.int64)
    for m in range(1, len(names)):
        better = (aps[m] < aps[win, np.arange(q)]) | ((aps[m] == aps[win, np.arange(q)]) &
                                                     (fms[m] > fms[win, np.arange(q)]))
        win = np.where(better, m, win)
    pick = lambda attr: np.stack([getattr(members[names[w]], attr)[i] for i, w in enumerate(win)])  # noqa: E731
    assembled = QueryScores(pick("ap"), pick("inp"), pick("first_match"), first.ap_mode)
    winners: list[str | None] = [names[w] if ok else None for w, ok in zip(win.tolist(), first.valid, strict=True)]
    return assembled, winners


def masking_flags(members: Mapping[str, QueryScores], gradient_free: Sequence[str],
                  loss_rise: Mapping[str, Mapping[int, bool]], *, share: float = MASKING_SHARE) -> dict[str, Any]:
    """Signs of gradient masking (Carlini et al.'s checklist: a black-box attack should not beat white-box ones).

    (a) the gradient-free member(s) beat every gradient member (strictly lower AP) on at least ``share`` of the
    valid queries *and* have an mAP at least ``MASKING_MAP_MARGIN`` (one point) below every gradient member's
    (per-query wins alone happen by chance where a feature-space objective is loosely tied to AP); (b) a gradient
    member's loss did not rise above its start point on at least ``share`` of the queries (``loss_rise``: member ->
    {query position: rose?}, from the APGD trace).
    """
    grad = [n for n in members if n not in gradient_free]
    free = [n for n in members if n in gradient_free]
    if not grad or not free:
        raise ValueError("masking_flags needs gradient members and a gradient-free one")
    v = next(iter(members.values())).valid
    nv = max(int(v.sum()), 1)
    best_grad = np.min(np.stack([members[n].mean_ap() for n in grad]), axis=0)
    best_free = np.min(np.stack([members[n].mean_ap() for n in free]), axis=0)
    beats = float(np.count_nonzero((best_free < best_grad - 1e-12) & v)) / nv
    map_of = {n: float(members[n].mean_ap()[v].mean()) for n in members}
    free_map, grad_map = min(map_of[n] for n in free), min(map_of[n] for n in grad)
    reasons = []
    if beats >= share and free_map < grad_map - MASKING_MAP_MARGIN:
        reasons.append(f"the gradient-free member ({', '.join(free)}) beats every gradient member on "
                       f"{100 * beats:.1f}% of the queries (threshold {100 * share:g}%) and has an mAP more than "
                       f"one point lower ({100 * free_map:.1f}% vs {100 * grad_map:.1f}%)")
    flat: dict[str, float] = {}
    for n, rises in loss_rise.items():
        if not rises:
            continue
        pos = [i for i in range(len(v)) if v[i] and i in rises]
        stalled = sum(1 for i in pos if not rises[i]) / max(len(pos), 1)
        flat[n] = stalled
        if stalled >= share:
            reasons.append(f"{n}'s loss did not rise above its start point on {100 * stalled:.1f}% of the queries "
                           f"(threshold {100 * share:g}%)")
    return {"flagged": bool(reasons), "reasons": reasons, "threshold": share, "gradient_free_beats_share": beats,
            "loss_not_rising_share": flat}
