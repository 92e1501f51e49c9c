"""CMC, mAP and mINP under the Market-1501 protocol, without sorting the distance matrix.

Protocol (torchreid ``eval_market1501``, fast-reid, layumi): for each query, gallery items with the same pid
*and* the same camera are junk and removed, and so are gallery items with pid ``-1`` (always treated as junk
here; torchreid only drops them at load time). Queries left with no true match are skipped and count in no
average. Ranking is by ascending distance.

Ties (pessimistic, deterministic): a true match at exactly the same distance as non-matching items is
ranked *after* them. The references use an unstable ``np.argsort``, so their order of tied items is
arbitrary; without exact ties the results are identical. This rule never rewards degenerate outputs: a
constant distance matrix (e.g. collapsed features under attack) scores as badly as possible, not by gallery
order.

How it is fast: only the ranks of the true matches are needed. The position of match ``p`` is the number of
gallery items with distance <= d_p, minus the junk items among them and minus the matches tied with ``p`` that
are not before it (by index). On the CPU the count is done by vectorised comparisons of each row against its
few same-pid distances, packed into bits and popcounted, in blocks of rows on threads (memory O(block x G)).
A CUDA tensor is processed the same way with torch on its GPU.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

AP_MODES = ("standard", "official")
_HAS_POPCOUNT = hasattr(np, "bitwise_count")


@dataclass
class RankResult:
    """Scores of one evaluation; ``cmc``, ``mAP`` and ``mINP`` are fractions in [0, 1].

    ``cmc[k]`` is the fraction of valid queries with a true match within the top ``k + 1``. The per-query
    arrays (filled when ``return_per_query=True``) have one entry per query, NaN (or -1 for ``first_match``)
    for skipped queries; ``first_match`` is the 0-based rank of the first true match after junk removal.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int = 0
    ap_mode: str = "standard"
    all_AP: np.ndarray | None = field(default=None, repr=False)
    all_INP: np.ndarray | None = field(default=None, repr=False)
    first_match: np.ndarray | None = field(default=None, repr=False)

    def rank(self, k: int) -> float:
        """Rank-k accuracy (1-based ``k``), a fraction."""
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank k must be an int in [1, {len(self.cmc)}] (the CMC length), got {k!r}")
        return float(self.cmc[k - 1])

    def to_dict(self) -> dict[str, float]:
        """``rank1/rank5/rank10`` (those within the CMC length), ``mAP`` and ``mINP`` as floats."""
        out = {f"rank{k}": float(self.cmc[k - 1]) for k in (1, 5, 10) if k <= len(self.cmc)}
        out["mAP"] = float(self.mAP)
        out["mINP"] = float(self.mINP)
        return out


def _labels(x: object, name: str, n: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n} to match distmat, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        isfloat = np.issubdtype(arr.dtype, np.floating)
        if isfloat and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _match_tables(q_pids, q_camids, g_pids, g_camids):
    """Padded per-query tables of true matches and of same-camera junk: (gallery index, valid mask, count)."""
    order = np.argsort(g_pids, kind="stable")
    sp = g_pids[order]
    start = np.searchsorted(sp, q_pids, "left")
    cnt = np.searchsorted(sp, q_pids, "right") - start
    m = int(cnt.max()) if len(cnt) else 0
    ar = np.arange(max(m, 1))
    inside = ar[None, :] < cnt[:, None]
    same = order[np.where(inside, start[:, None] + ar[None, :], 0)]
    junk = inside & (g_camids[same] == q_camids[:, None])
    good = inside & ~junk

    def pack(mask):
        n = mask.sum(1)
        w = max(int(n.max()), 1)
        perm = np.argsort(~mask, axis=1, kind="stable")[:, :w]
        idx = np.take_along_axis(same, perm, axis=1)
        valid = np.arange(w)[None, :] < n[:, None]
        return np.where(valid, idx, 0), valid, n

    return pack(good), pack(junk)


def _ranks_cpu_block(d, P, Pv, J, Jv, buf, cnt8, sum_dtype, out):
    """0-based ranks after junk removal of the true matches of the rows of ``d``, written into ``out``.

    ``d`` is ``(b, gp)``, the columns past the gallery padded with NaN; ``buf``, ``cnt8``: flat scratch.
    """
    b, gp = d.shape
    pb = int(Pv.sum(1).max())
    if pb == 0:
        return
    P, Pv = P[:, :pb], Pv[:, :pb]
    rows = np.arange(b)[:, None]
    thr = np.where(Pv, d[rows, P], -np.inf).astype(d.dtype, copy=False)
    le = buf[: b * pb * gp].reshape(b, pb, gp)
    np.less_equal(d[:, None, :], thr[:, :, None], out=le)
    if _HAS_POPCOUNT:
        c8 = cnt8[: b * pb * gp // 8].reshape(b, pb, gp // 8)
        np.bitwise_count(le.view(np.uint64), out=c8)
        rank = np.add.reduce(c8, axis=2, dtype=sum_dtype).astype(np.int64)
    else:  # numpy < 2.0
        rank = np.add.reduce(le.view(np.uint8), axis=2, dtype=np.int64)
    # matches tied with match p and not before it in index order (p itself included) come at or after p
    tie = (thr[:, None, :] == thr[:, :, None]) & (P[:, None, :] >= P[:, :, None]) & Pv[:, None, :]
    rank -= tie.sum(2)
    if Jv.shape[1] and Jv.any():
        jd = np.where(Jv, d[rows, J], np.inf)
        rank -= ((jd[:, None, :] <= thr[:, :, None]) & Jv[:, None, :]).sum(2)
    out[:, :pb] = np.where(Pv, rank, out[:, :pb])


def _ranks_cpu(dist, keep_cols, tables, block, workers, ranks):
    (P, Pv, _), (J, Jv, _) = tables
    q = dist.shape[0]
    g = dist.shape[1] if keep_cols is None else len(keep_cols)
    gp = (g + 63) // 64 * 64
    pmax = P.shape[1]
    sum_dtype = np.uint16 if gp < 1 << 16 else np.uint32
    bad = []

    def run(lo, hi):
        buf = np.empty(block * pmax * gp, dtype=bool)
        cnt8 = np.empty(block * pmax * gp // 8, dtype=np.uint8)
        dbuf = np.full((block, gp), np.nan, dtype=dist.dtype)  # NaN padding never compares true
        for r0 in range(lo, hi, block):
            r1 = min(hi, r0 + block)
            d = dbuf[: r1 - r0]
            if keep_cols is not None:
                np.take(dist[r0:r1], keep_cols, axis=1, out=d[:, :g])
            else:
                d[:, :g] = dist[r0:r1]
            raw = dist[r0:r1]
            if np.isnan(raw.max()):
                bad.append(r0 + int(np.nonzero(np.isnan(raw).any(1))[0][0]))
                return
            _ranks_cpu_block(d, P[r0:r1], Pv[r0:r1], J[r0:r1], Jv[r0:r1], buf, cnt8, sum_dtype, ranks[r0:r1])

    nw = max(1, min(workers, (q + block - 1) // block))
    bounds = [round(i * q / nw / block) * block for i in range(nw)] + [q]
    spans = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    if len(spans) == 1:
        run(*spans[0])
    else:
        with ThreadPoolExecutor(len(spans)) as ex:
            list(ex.map(lambda s: run(*s), spans))
    if bad:
        raise ValueError(f"distmat contains NaN (first in query row {min(bad)})")


def _ranks_torch(dist, keep_cols, tables, chunk, ranks):
    """The rule of ``_ranks_cpu_block`` with torch on ``dist``'s device, ``chunk`` rows at a time."""
    (P, Pv, _), (J, Jv, _) = tables
    dev = dist.device
    kc = None if keep_cols is None else torch.as_tensor(keep_cols, device=dev)
    Pt, Pvt = torch.as_tensor(P, device=dev), torch.as_tensor(Pv, device=dev)
    Jt, Jvt = torch.as_tensor(J, device=dev), torch.as_tensor(Jv, device=dev)
    for r0 in range(0, dist.shape[0], chunk):
        d = dist[r0:r0 + chunk]
        if torch.isnan(d).any():
            row = r0 + int(torch.nonzero(torch.isnan(d).any(1))[0, 0])
            raise ValueError(f"distmat contains NaN (first in query row {row})")
        if kc is not None:
            d = d.index_select(1, kc)
        p, pv = Pt[r0:r0 + chunk], Pvt[r0:r0 + chunk]
        j, jv = Jt[r0:r0 + chunk], Jvt[r0:r0 + chunk]
        thr = torch.where(pv, d.gather(1, p), torch.full_like(d[:, :1], -float("inf")))
        rank = (d[:, None, :] <= thr[:, :, None]).sum(2)
        tie = (thr[:, None, :] == thr[:, :, None]) & (p[:, None, :] >= p[:, :, None]) & pv[:, None, :]
        rank -= tie.sum(2)
        jd = d.gather(1, j)
        rank -= ((jd[:, None, :] <= thr[:, :, None]) & jv[:, None, :]).sum(2)
        rank = torch.where(pv, rank, torch.full_like(rank, d.shape[1]))
        ranks[r0:r0 + rank.shape[0]] = rank.cpu().numpy()


def _prepare_distmat(distmat: object, use_torch: bool) -> torch.Tensor | np.ndarray:
    """A float32/float64 numpy matrix, or a float tensor on its own device for the torch path."""
    if use_torch:
        t = distmat if isinstance(distmat, torch.Tensor) else torch.from_numpy(np.asarray(distmat))
        t = t.detach()
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"distmat must be a real numeric matrix, got dtype {t.dtype}")
        if t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t if t.is_floating_point() else t.double()
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    arr = np.asarray(distmat)
    if arr.dtype in (np.float32, np.float64):
        return arr
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"distmat must be a real numeric matrix, got dtype {arr.dtype}")
    return arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)


def _check_pos_int(value: object, name: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def evaluate_rank(
    distmat: torch.Tensor | np.ndarray,
    q_pids: torch.Tensor | np.ndarray,
    g_pids: torch.Tensor | np.ndarray,
    q_camids: torch.Tensor | np.ndarray,
    g_camids: torch.Tensor | np.ndarray,
    max_rank: int = 50,
    ap: str = "standard",
    *,
    chunk_size: int | None = None,
    return_per_query: bool = False,
    num_workers: int | None = None,
    backend: str = "auto",
) -> RankResult:
    """CMC (``max_rank`` long), mAP and mINP of a ``(num_query, num_gallery)`` distance matrix.

    ``ap="standard"``: non-interpolated AP (torchreid, fast-reid, BoT). ``ap="official"``: the trapezoid AP
    of the Market-1501 MATLAB code / layumi ``compute_mAP``: the i-th match (0-based) at 0-based position
    r_i adds ``(i / r_i + (i + 1) / (r_i + 1)) / (2 n_good)``, with ``i / r_i := 1`` when ``r_i = 0``.
    Averages are over valid queries (layumi divides by all queries: the same when every query has a match).
    mINP: mean of ``n_good / (1-based rank of the last match)`` (fast-reid).

    ``distmat``: numpy or torch. ``backend``: ``"numpy"`` (CPU, threaded), ``"torch"`` (chunks on the
    tensor's device) or ``"auto"`` (torch for CUDA tensors, else numpy). ``chunk_size``: rows per block
    (numpy default 8; torch: ~256M comparison elements per chunk). ``num_workers``: numpy threads (default
    ``torch.get_num_threads()``). The results do not depend on these three.
    """
    if ap not in AP_MODES:
        raise ValueError(f"ap must be one of {AP_MODES}, got {ap!r}")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    _check_pos_int(max_rank, "max_rank", allow_none=False)
    _check_pos_int(chunk_size, "chunk_size")
    _check_pos_int(num_workers, "num_workers")
    use_torch = backend == "torch" or (
        backend == "auto" and isinstance(distmat, torch.Tensor) and distmat.device.type != "cpu")
    distmat = _prepare_distmat(distmat, use_torch)
    if distmat.ndim != 2 or distmat.shape[0] == 0 or distmat.shape[1] == 0:
        shape = tuple(distmat.shape)
        raise ValueError(f"distmat must be a non-empty 2-D (num_query, num_gallery) matrix, got {shape}")
    q, g = distmat.shape
    q_pids = _labels(q_pids, "q_pids", q)
    q_camids = _labels(q_camids, "q_camids", q)
    g_pids = _labels(g_pids, "g_pids", g)
    g_camids = _labels(g_camids, "g_camids", g)
    if max_rank > g:
        warnings.warn(f"max_rank={max_rank} exceeds the {g} gallery items; using max_rank={g}", stacklevel=2)
        max_rank = g

    keep = g_pids != -1
    keep_cols = None if keep.all() else np.flatnonzero(keep)
    if keep_cols is not None:
        g_pids, g_camids = g_pids[keep_cols], g_camids[keep_cols]
    gk = len(g_pids)
    if gk == 0:
        raise ValueError("every gallery item has pid -1 (junk); no query can have a true match")
    tables = _match_tables(q_pids, q_camids, g_pids, g_camids)
    n_good = tables[0][2]
    valid = n_good > 0
    nv = int(valid.sum())
    if nv == 0:
        raise ValueError("no query has a true match in the gallery (same pid, other camera, pid != -1); "
                         "check q_pids/g_pids and q_camids/g_camids")

    ranks = np.full(tables[0][0].shape, gk, dtype=np.int64)
    if use_torch:
        chunk = chunk_size or max(1, (1 << 28) // (gk * tables[0][0].shape[1]))
        _ranks_torch(distmat, keep_cols, tables, int(chunk), ranks)
    else:
        workers = min(num_workers or torch.get_num_threads(), os.cpu_count() or 1)
        _ranks_cpu(distmat, keep_cols, tables, int(chunk_size or 8), max(1, int(workers)), ranks)

    ranks.sort(axis=1)
    r = ranks[valid].astype(np.float64)
    n = n_good[valid].astype(np.float64)
    i = np.arange(r.shape[1], dtype=np.float64)[None, :]
    m = i < n[:, None]
    prec = np.where(m, (i + 1) / (r + 1), 0.0)
    if ap == "standard":
        ap_q = prec.sum(1) / n
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            old = np.where(r == 0, 1.0, i / r)
        ap_q = np.where(m, (old + prec) / 2, 0.0).sum(1) / n
    last = np.take_along_axis(r, (n_good[valid] - 1)[:, None], axis=1)[:, 0]
    inp_q = n / (last + 1)
    first = ranks[valid, 0]
    cmc = np.cumsum(np.bincount(first, minlength=max(gk, max_rank))[:max_rank]) / nv

    res = RankResult(cmc=cmc.astype(np.float64), mAP=float(ap_q.mean()), mINP=float(inp_q.mean()),
                     num_valid_queries=nv, num_queries=q, ap_mode=ap)
    if return_per_query:
        res.all_AP = np.full(q, np.nan)
        res.all_AP[valid] = ap_q
        res.all_INP = np.full(q, np.nan)
        res.all_INP[valid] = inp_q
        res.first_match = np.full(q, -1, dtype=np.int64)
        res.first_match[valid] = first
    return res
