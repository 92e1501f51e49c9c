"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with sparse neighbour sets.

``re_ranking`` is a drop-in for torchreid's ``torchreid.utils.rerank.re_ranking`` (the H. Huang
distance-matrix version): same inputs, same contract, same result, including its quirks -- the input
distances are *squared* again, and row ``i`` of the working matrix is column ``i`` of the stacked
``[[q_q, q_g], [q_g^T, g_g]]`` divided by that column's maximum.

Nothing N x N is kept (N = Q + G): the stacked matrix is visited in row blocks, keeping only each row's
top-``max(k1 + 1, k2)`` neighbours (``torch.topk``) and its normaliser. The k-reciprocal sets and their
expansion are computed for all rows at once on these neighbour tables; the weights V, the local query
expansion over ``k2`` neighbours and the Jaccard distance (``sum_c min(V_qe[i, c], V_qe[j, c])`` through an
inverted index over columns) are sparse, and the Jaccard is only formed for the Q x G block that is returned.

``re_ranking_features`` starts from features and builds no dense N x N (nor Q x Q, G x G) matrix; each
distance is computed once (row blocks against the columns at or after the block, the transposed part merged
into the later rows' running top-k lists). It equals ``re_ranking(d(q, g), d(q, q), d(g, g))`` with
``d = compute_distance_matrix(., ., metric)`` up to float rounding. Its default ``metric="sqeuclidean"`` is
what torchreid's engine passes (its "euclidean" is the squared distance, which ``re_ranking`` squares again).

Ties: neighbour lists come from ``torch.topk``, the reference uses ``np.argsort``; neither orders tied
distances in a specified way, so results can differ only where two distances tie exactly at the border of a
neighbour list (e.g. duplicated features). Sums are accumulated in float64 (the reference uses float32),
which changes results by ~1e-7.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from advreid.evaluation.distance import METRICS, pair_distances, rows_into

# elements of one row block of the N x N working matrix (float32: 32 MiB)
_BLOCK_ELEMS = 1 << 23
# elements of one block of the features path (float32: 64 MiB)
_FEATURE_BLOCK_ELEMS = 1 << 24
# elements of one dense float64 block of Jaccard accumulators (16 MiB)
_JACCARD_ELEMS = 1 << 21


def _check_params(k1: object, k2: object, lambda_value: object) -> None:
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float, np.floating)) or not (
            0.0 <= float(lambda_value) <= 1.0):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")


def _check_chunk(chunk_size: object) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


# ---------------------------------------------------------------------------------------------------------
# sparse core shared by both entry points
# ---------------------------------------------------------------------------------------------------------

def _expanded_sets(K: np.ndarray, k1: int, n: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, sorted columns) of each row's k-reciprocal set expanded with its candidates' half sets."""
    a = min(k1 + 1, K.shape[1])
    h = min(int(np.around(k1 / 2.0)) + 1, K.shape[1])
    K = K.astype(np.int32)  # halves the memory traffic of the comparisons below
    K1, Kh = np.ascontiguousarray(K[:, :a]), np.ascontiguousarray(K[:, :h])
    ar = np.arange(n, dtype=np.int32)
    R = np.empty((n, a), dtype=bool)
    Rh = np.empty((n, h), dtype=bool)
    for r0 in range(0, n, chunk):
        rows = ar[r0:r0 + chunk, None, None]
        R[r0:r0 + chunk] = (K1[K1[r0:r0 + chunk]] == rows).any(2)
        Rh[r0:r0 + chunk] = (Kh[Kh[r0:r0 + chunk]] == rows).any(2)
    half_thr = 2.0 / 3 * Rh.sum(1)  # the reference's float test: |cand & R| > 2/3 * |cand|
    counts, cols = [], []
    for r0 in range(0, n, chunk):
        k1r, rr = K1[r0:r0 + chunk], R[r0:r0 + chunk]
        c = k1r.shape[0]
        hc, hm = Kh[k1r], Rh[k1r]  # (c, a, h): each candidate's half neighbours and their reciprocity
        in_r = ((hc[:, :, :, None] == k1r[:, None, None, :]) & rr[:, None, None, :]).any(3) & hm
        accept = rr & (in_r.sum(2) > half_thr[k1r])
        e = np.concatenate([np.where(rr, k1r, n), np.where(accept[:, :, None] & hm, hc, n).reshape(c, -1)], 1)
        e.sort(1)
        keep = e < n
        keep[:, 1:] &= e[:, 1:] != e[:, :-1]
        counts.append(keep.sum(1))
        cols.append(e[keep])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    return indptr, np.concatenate(cols).astype(np.int64)


def _row_ids(indptr: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
    r1 = len(indptr) - 1 if r1 is None else r1
    return np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))


def _gather_ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each (s, l)."""
    total = int(lens.sum())
    return np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)


def _weights(indptr: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """V row values: exp(-d), normalised to sum 1 per row (float32)."""
    w = np.exp(-dist.astype(np.float32))
    rows = _row_ids(indptr)
    sums = np.bincount(rows, weights=w, minlength=len(indptr) - 1)
    return (w / sums[rows]).astype(np.float32)


def _query_expansion(indptr, cols, vals, K, k2, n, chunk=4096):
    """CSR of V_qe[i] = mean of V over rows K[i, :k2] (i's k2 nearest, itself included)."""
    k2 = min(k2, K.shape[1])
    counts, out_cols, out_vals = [], [], []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        src = K[r0:r1, :k2].ravel()
        lens = indptr[src + 1] - indptr[src]
        pos = _gather_ranges(indptr[src], lens)
        key = np.repeat(np.repeat(np.arange(r1 - r0), k2), lens) * n + cols[pos]
        uniq, inv = np.unique(key, return_inverse=True)
        s = np.bincount(inv, weights=vals[pos], minlength=len(uniq)) / k2
        counts.append(np.bincount(uniq // n, minlength=r1 - r0))
        out_cols.append(uniq % n)
        out_vals.append(s.astype(np.float32))
    new_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=new_indptr[1:])
    return new_indptr, np.concatenate(out_cols), np.concatenate(out_vals)


def _jaccard_into(indptr, cols, vals, q, n, lambda_value, out, chunk=None):
    """out[i, g] <- (1 - lam) * jaccard(i, q + g) + lam * out[i, g] for the q query rows (in place)."""
    g = n - q
    g0 = indptr[q]
    gcols = cols[g0:]
    order = np.argsort(gcols, kind="stable")
    g_rows = (_row_ids(indptr, q) - q)[order]
    g_vals = vals[g0:][order]
    colptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(gcols, minlength=n), out=colptr[1:])
    chunk = chunk or max(1, _JACCARD_ELEMS // max(g, 1))
    for q0 in range(0, q, chunk):
        q1 = min(q, q0 + chunk)
        e0, e1 = indptr[q0], indptr[q1]
        c = cols[e0:e1]
        n_c = colptr[c + 1] - colptr[c]
        pos = _gather_ranges(colptr[c], n_c)
        mins = np.minimum(np.repeat(vals[e0:e1], n_c), g_vals[pos])
        key = np.repeat(_row_ids(indptr, q0, q1) - q0, n_c) * g + g_rows[pos]
        tm = np.bincount(key, weights=mins, minlength=(q1 - q0) * g).reshape(q1 - q0, g).astype(np.float32)
        jac = 1 - tm / (2 - tm)
        o = out[q0:q1]
        o *= lambda_value
        o += jac * (1 - lambda_value)
    return out


def _rerank_core(K: np.ndarray, lookup: Callable[[np.ndarray, np.ndarray], np.ndarray], q: int, n: int,
                 k1: int, k2: int, lambda_value: float, out: np.ndarray) -> np.ndarray:
    """From neighbour table ``K`` (rows sorted nearest first) and a lookup of working distances, finish."""
    indptr, cols = _expanded_sets(K, k1, n)
    vals = _weights(indptr, lookup(_row_ids(indptr), cols))
    if k2 != 1:
        indptr, cols, vals = _query_expansion(indptr, cols, vals, K, k2, n)
    return _jaccard_into(indptr, cols, vals, q, n, float(lambda_value), out)


def _square_transposed(dst: np.ndarray, src: np.ndarray, tile: int = 64) -> None:
    """``dst[:] = src.T ** 2`` in tiles of ``tile`` source rows (several times faster than one strided pass)."""
    for r in range(0, src.shape[0], tile):
        np.square(src[r:r + tile].T, out=dst[:, r:r + tile])


def _topk_block(sq: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row maxima, and the ``kk`` smallest values and their columns (nearest first), of a block of rows."""
    cm = sq.amax(1)
    if torch.isnan(cm).any():
        raise ValueError("distances contain NaN")
    vals, idx = torch.topk(sq, kk, dim=1, largest=False, sorted=True)
    return cm, vals, idx


# ---------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------

def _as_numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D distance matrix, got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return arr


def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Re-ranked ``(Q, G)`` float32 distances from dense q-g, q-q and g-g distances (torchreid's contract).

    Equals ``torchreid.utils.rerank.re_ranking`` up to float rounding (see the module notes on ties).
    ``chunk_size``: rows of the N x N working matrix per block (default: ~32 MiB blocks).
    """
    _check_params(k1, k2, lambda_value)
    _check_chunk(chunk_size)
    qg = _as_numpy(q_g_dist, "q_g_dist")
    qq = _as_numpy(q_q_dist, "q_q_dist")
    gg = _as_numpy(g_g_dist, "g_g_dist")
    q, g = qg.shape
    if q == 0 or g == 0:
        raise ValueError(f"q_g_dist must be non-empty, got shape {qg.shape}")
    if qq.shape != (q, q) or gg.shape != (g, g):
        raise ValueError(f"expected q_q_dist {(q, q)} and g_g_dist {(g, g)} for q_g_dist {(q, g)}, "
                         f"got {qq.shape} and {gg.shape}")
    dt = np.result_type(qg, qq, gg)
    n = q + g
    kk = min(max(k1 + 1, k2), n)
    chunk = int(chunk_size or max(1, _BLOCK_ELEMS // n))
    qg, qq, gg = (np.asarray(x, dtype=dt) for x in (qg, qq, gg))
    K = np.empty((n, kk), dtype=np.int64)
    colmax = np.empty(n, dtype=np.float32)
    out = np.empty((q, g), dtype=np.float32)
    buf = torch.from_numpy(np.empty((min(chunk, n), n), dtype=dt))
    buf32 = buf if buf.dtype == torch.float32 else torch.empty(buf.shape, dtype=torch.float32)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        blk = buf[: r1 - r0]
        # row i of the working matrix is column i of [[q_q, q_g], [q_g^T, g_g]], squared
        nb = blk.numpy()
        if r0 < q:
            a1 = min(r1, q)
            _square_transposed(nb[: a1 - r0, :q], qq[:, r0:a1])
            np.square(qg[r0:a1], out=nb[: a1 - r0, q:])
        if r1 > q:
            b0 = max(r0, q)
            _square_transposed(nb[b0 - r0:, :q], qg[:, b0 - q:r1 - q])
            _square_transposed(nb[b0 - r0:, q:], gg[:, b0 - q:r1 - q])
        sq = blk if blk.dtype == torch.float32 else buf32[: r1 - r0].copy_(blk)
        cm, _, idx = _topk_block(sq, kk)
        K[r0:r1] = idx.numpy()
        colmax[r0:r1] = cm.numpy()
        if r0 < q:
            a1 = min(r1, q)
            torch.div(sq[: a1 - r0, q:], cm[: a1 - r0, None], out=torch.from_numpy(out[r0:a1]))

    def lookup(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        # working[i, j] = stacked[j, i]^2 / colmax[i], squared in the input dtype as the reference does
        v = np.empty(len(i), dtype=dt)
        iq, jq = i < q, j < q
        parts = ((iq & jq, qq, j, i), (~iq & jq, qg, j, i - q), (iq & ~jq, qg, i, j - q),
                 (~iq & ~jq, gg, j - q, i - q))
        for m, src, rows, cols_ in parts:
            v[m] = src[rows[m], cols_[m]]
        return (v * v).astype(np.float32) / colmax[i]

    return _rerank_core(K, lookup, q, n, k1, k2, lambda_value, out)


def _merge_candidates(best_v: np.ndarray, best_i: np.ndarray, worst: np.ndarray, rows: np.ndarray,
                      cols: np.ndarray, vals: np.ndarray) -> None:
    """Merge candidates ``(rows[k], cols[k], vals[k])`` into the running top-k lists (sorted; in place)."""
    kk = best_v.shape[1]
    urows, grp = np.unique(rows, return_inverse=True)
    r = np.concatenate([np.repeat(np.arange(len(urows)), kk), grp])
    v = np.concatenate([best_v[urows].ravel(), vals])
    c = np.concatenate([best_i[urows].ravel(), cols])
    o = np.lexsort((v, r))  # by row, then by value
    counts = kk + np.bincount(grp, minlength=len(urows))
    keep = o[((np.cumsum(counts) - counts)[:, None] + np.arange(kk)[None, :])]
    best_v[urows] = v[keep]
    best_i[urows] = c[keep]
    worst[urows] = best_v[urows, kk - 1]


def _symmetric_neighbours(
    x: torch.Tensor, x_sq: torch.Tensor | None, metric: str, q: int, kk: int, chunk: int, out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``kk`` neighbour table (nearest first), its working values ``d^2 / rowmax``, and ``rowmax``.

    Each distance is computed once: row blocks ``[r0, r1)`` are visited from the last to the first and only
    columns ``>= r0`` are computed. The block's own rows take their top-k over those columns; the rows
    ``>= r1`` (already visited) receive the transposed part, filtered by their current k-th best value and by
    an upper bound of their final one, so that only a few candidates are merged. ``out`` receives the query
    rows' gallery part of ``d^2 / rowmax``.
    """
    n, dev = x.shape[0], x.device
    best_v = np.full((n, kk), np.inf, dtype=np.float32)
    best_i = np.full((n, kk), -1, dtype=np.int64)
    worst = np.full(n, np.inf, dtype=np.float32)
    rowmax = torch.full((n,), -float("inf"), device=dev)
    flat = torch.empty(min(chunk, n) * n, dtype=torch.float32, device=dev)
    # an upper bound of each row's k-th smallest d^2, from a fixed sample of columns (slack for rounding)
    ns = min(n, max(8 * kk, 256))
    sample = torch.as_tensor(np.unique(np.linspace(0, n - 1, ns).astype(np.int64)), device=dev)
    ns = len(sample)
    bound = np.empty(n, dtype=np.float32)
    xs, xs_sq = x[sample], None if x_sq is None else x_sq[sample]
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        d = rows_into(x[r0:r1], xs, xs_sq, metric, flat[: (r1 - r0) * ns].view(r1 - r0, ns)).square_()
        bound[r0:r1] = (torch.kthvalue(d, min(kk, ns), dim=1).values * (1 + 1e-4) + 1e-30).cpu().numpy()
    for r0 in reversed(range(0, n, chunk)):
        r1 = min(n, r0 + chunk)
        c, w = r1 - r0, n - r0
        blk = rows_into(x[r0:r1], x[r0:], None if x_sq is None else x_sq[r0:], metric,
                         flat[: c * w].view(c, w)).square_()
        rowmax[r0:r1] = blk.amax(1)
        k_own = min(kk, w)
        v, ix = torch.topk(blk, k_own, dim=1, largest=False, sorted=True)
        best_v[r0:r1, :k_own] = v.cpu().numpy()
        best_i[r0:r1, :k_own] = ix.cpu().numpy() + r0
        if k_own == kk:
            worst[r0:r1] = best_v[r0:r1, kk - 1]
        if r1 < n:
            rest = blk[:, c:]
            torch.maximum(rowmax[r1:], rest.amax(0), out=rowmax[r1:])
            # only values that can enter a row's final top-k: <= its current k-th best and <= its bound
            thr = torch.from_numpy(np.minimum(worst[r1:], bound[r1:])).to(dev)
            a, b = torch.nonzero(rest <= thr, as_tuple=True)
            if len(a):
                _merge_candidates(best_v, best_i, worst, (b + r1).cpu().numpy(), (a + r0).cpu().numpy(),
                                  rest[a, b].cpu().numpy())
        if r0 < q:
            a1 = min(r1, q)
            out[r0:a1] = blk[: a1 - r0, q - r0:].cpu().numpy()
    rm = rowmax.cpu().numpy()
    if np.isnan(rm).any():
        raise ValueError("distances contain NaN (check the features)")
    order = np.argsort(best_v, axis=1, kind="stable")  # lists are sorted already unless k_own < kk
    K = np.take_along_axis(best_i, order, 1)
    kvals = np.take_along_axis(best_v, order, 1) / rm[:, None]
    for q0 in range(0, q, 1024):
        out[q0:q0 + 1024] /= rm[:q][q0:q0 + 1024, None]
    return K, kvals, rm


def re_ranking_features(
    q_feats: torch.Tensor | np.ndarray,
    g_feats: torch.Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    metric: str = "sqeuclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Re-ranked ``(Q, G)`` float32 distances from features, without any dense N x N matrix.

    Equals ``re_ranking(d(q, g), d(q, q), d(g, g), k1, k2, lambda_value)`` with
    ``d = compute_distance_matrix(., ., metric)`` up to float rounding. ``metric="sqeuclidean"`` (default)
    matches torchreid's engine, which passes squared Euclidean distances. Distances and top-k run on
    ``device`` (default: the features' device) in blocks of ``chunk_size`` rows (default: 64 MiB blocks);
    the sparse steps on the CPU. Peak memory: the Q x G float32 output, two copies of the features and
    O(chunk_size x N) (MSMT17, 11,659 x 82,161 with 2048-d features: about 6 GB).
    """
    _check_params(k1, k2, lambda_value)
    _check_chunk(chunk_size)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    qf = torch.as_tensor(q_feats).detach()
    gf = torch.as_tensor(g_feats).detach()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        shapes = f"{tuple(qf.shape)} and {tuple(gf.shape)}"
        raise ValueError(f"q_feats and g_feats must be 2-D with the same feature dim, got {shapes}")
    if qf.shape[0] == 0 or gf.shape[0] == 0:
        raise ValueError(f"need at least one query and one gallery feature, got {len(qf)} and {len(gf)}")
    dev = torch.device(device) if device is not None else qf.device
    x = torch.cat([qf.to(dev, torch.float32), gf.to(dev, torch.float32)])
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    x_sq = None if metric == "cosine" else (x * x).sum(1)
    q, n = qf.shape[0], x.shape[0]
    g = n - q
    kk = min(max(k1 + 1, k2), n)
    chunk = int(chunk_size or max(1, _FEATURE_BLOCK_ELEMS // n))
    out = np.empty((q, g), dtype=np.float32)
    with torch.no_grad():
        K, kvals, rowmax = _symmetric_neighbours(x, x_sq, metric, q, kk, chunk, out)
    rowmax = torch.from_numpy(rowmax).to(dev)
    # sorted (row, neighbour) keys of the top-k table, to reuse its values
    kkeys = (np.arange(n)[:, None] * n + K).ravel()
    korder = np.argsort(kkeys)
    kkeys, kflat = kkeys[korder], kvals.ravel()[korder]

    def lookup(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        key = i * n + j
        pos = np.minimum(np.searchsorted(kkeys, key), len(kkeys) - 1)
        hit = kkeys[pos] == key
        res = np.where(hit, kflat[pos], np.float32(0))
        miss = np.flatnonzero(~hit)
        for s in range(0, len(miss), 4096):
            mm = miss[s:s + 4096]
            ti = torch.as_tensor(i[mm], device=dev)
            with torch.no_grad():
                d = pair_distances(x, x_sq, ti, torch.as_tensor(j[mm], device=dev), metric)
                res[mm] = (d.square_() / rowmax[ti]).cpu().numpy()
        return res

    return _rerank_core(K, lookup, q, n, k1, k2, lambda_value, out)
