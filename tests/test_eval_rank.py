"""evaluate_rank against hand-computed answers and a plain per-query loop of the Market-1501 protocol."""

import numpy as np
import pytest
import torch

from advreid.evaluation.rank import RankResult, evaluate_rank


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid ``eval_market1501`` written as a plain loop, plus pid -1 junk, mINP and the trapezoid AP.

    Ties: ``np.lexsort`` orders by distance, then non-matches before matches (the pessimistic rule).
    """
    cmcs, aps, offs, inps = [], [], [], []
    for i in range(distmat.shape[0]):
        match = g_pids == q_pids[i]
        order = np.lexsort((match, distmat[i]))
        junk = (match & (g_camids == q_camids[i])) | (g_pids == -1)
        keep = ~junk[order]
        raw = match[order][keep].astype(np.int64)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        cmcs.append(cmc[:max_rank])
        pos = np.flatnonzero(raw)
        n = len(pos)
        ap = 0.0
        for k in range(len(raw)):
            if raw[k]:
                ap += raw[: k + 1].sum() / (k + 1.0)
        aps.append(ap / n)
        off = 0.0
        for k, r in enumerate(pos):
            old = 1.0 if r == 0 else k / r
            off += (old + (k + 1) / (r + 1)) / 2 / n
        offs.append(off)
        inps.append(n / (pos[-1] + 1.0))
    return np.mean(cmcs, 0), np.mean(aps), np.mean(offs), np.mean(inps), len(aps)


def random_case(seed, q, g, ids, cams, with_junk_ids=False, ties=False):
    rng = np.random.default_rng(seed)
    qp = rng.integers(0, ids, q)
    gp = rng.integers(0, ids, g)
    if with_junk_ids:
        gp[rng.random(g) < 0.15] = -1
    qc = rng.integers(0, cams, q)
    gc = rng.integers(0, cams, g)
    if ties:
        d = rng.integers(0, 4, (q, g)).astype(np.float32)
    else:
        d = rng.random((q, g)).astype(np.float32)
    return d, qp, gp, qc, gc


# hand-built: 4 queries, 7 gallery items
G_PIDS = np.array([1, 1, 2, -1, 1, 3, 2])
G_CAMS = np.array([0, 1, 1, 1, 2, 0, 0])
Q_PIDS = np.array([1, 2, 3, 7])
Q_CAMS = np.array([0, 0, 0, 0])
DIST = np.array([
    # q0: order 3(-1 junk) 0(junk) 2 5 1(match) 6 4(match) -> matches at 2 and 4 after junk removal
    [0.1, 0.5, 0.2, 0.05, 0.9, 0.3, 0.6],
    # q1: order 6(junk) 2(match) 3(-1) ... -> match at 0
    [0.4, 0.3, 0.1, 0.2, 0.8, 0.9, 0.05],
    # q2: its only same-pid item (5) is in its own camera -> skipped
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
    # q3: pid absent from the gallery -> skipped
    [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
])


def test_hand_built_standard_and_official():
    r = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5, return_per_query=True)
    assert isinstance(r, RankResult)
    assert r.num_valid_queries == 2 and r.num_queries == 4
    np.testing.assert_allclose(r.cmc, [0.5, 0.5, 1.0, 1.0, 1.0])
    ap0 = (1 / 3 + 2 / 5) / 2
    assert r.mAP == pytest.approx((ap0 + 1.0) / 2, abs=1e-12)
    assert r.mINP == pytest.approx((2 / 5 + 1.0) / 2, abs=1e-12)
    np.testing.assert_allclose(r.all_AP[:2], [ap0, 1.0])
    assert np.isnan(r.all_AP[2]) and np.isnan(r.all_AP[3])
    np.testing.assert_array_equal(r.first_match, [2, 0, -1, -1])
    assert r.rank(1) == 0.5 and r.rank(3) == 1.0
    assert r.to_dict() == pytest.approx({"rank1": 0.5, "rank5": 1.0, "mAP": (ap0 + 1) / 2, "mINP": 0.7})

    o = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5, ap="official")
    # q0: i=0 at r=2 -> (0/2 + 1/3)/2 ; i=1 at r=4 -> (1/4 + 2/5)/2 ; each times 1/2.  q1: (1 + 1)/2 = 1.
    off0 = ((0 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2
    assert o.mAP == pytest.approx((off0 + 1.0) / 2, abs=1e-12)
    assert o.mAP < r.mAP
    np.testing.assert_allclose(o.cmc, r.cmc)


def test_ties_are_pessimistic():
    # one query (pid 1, cam 0); gallery: match, negative, negative, match, junk -- all at distance 0
    gp, gc = np.array([1, 2, 3, 1, 1]), np.array([1, 1, 1, 2, 0])
    d = np.zeros((1, 5), dtype=np.float32)
    r = evaluate_rank(d, np.array([1]), gp, np.array([0]), gc, max_rank=4)
    # after junk removal the two matches come after both negatives: positions 2 and 3
    np.testing.assert_allclose(r.cmc, [0, 0, 1, 1])
    assert r.mAP == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert r.mINP == pytest.approx(2 / 4)
    # a strictly closer negative and a tie between a match and a negative
    d2 = np.array([[0.5, 0.5, 0.1, 0.9, 0.0]], dtype=np.float32)
    r2 = evaluate_rank(d2, np.array([1]), gp, np.array([0]), gc, max_rank=4)
    # order: junk(0.0) removed, neg 2 (0.1), neg 1 (0.5) before the tied match 0 (0.5), match 3 (0.9)
    assert r2.mAP == pytest.approx((1 / 3 + 2 / 4) / 2)
    # infinite distances rank last, a match at +inf after a negative at +inf
    d3 = np.array([[np.inf, 0.2, np.inf, 0.1, 0.0]], dtype=np.float32)
    r3 = evaluate_rank(d3, np.array([1]), gp, np.array([0]), gc, max_rank=4)
    # order: match 3 (0.1), neg 1 (0.2), neg 2 (inf), match 0 (inf)
    assert r3.mAP == pytest.approx((1 / 1 + 2 / 4) / 2)
    assert r3.mAP == evaluate_rank(d3, np.array([1]), gp, np.array([0]), gc, max_rank=4, backend="torch").mAP


@pytest.mark.parametrize("seed,q,g,ids,cams,junk", [
    (0, 40, 300, 20, 3, False),
    (1, 64, 500, 60, 6, True),
    (2, 17, 90, 8, 2, True),
    (3, 100, 1000, 200, 6, False),
])
def test_random_against_loop(seed, q, g, ids, cams, junk):
    d, qp, gp, qc, gc = random_case(seed, q, g, ids, cams, with_junk_ids=junk)
    cmc, ap, off, inp, nv = loop_reference(d, qp, gp, qc, gc, 50)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=50)
    assert r.num_valid_queries == nv
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(ap, abs=1e-12)
    assert r.mINP == pytest.approx(inp, abs=1e-12)
    o = evaluate_rank(d, qp, gp, qc, gc, max_rank=50, ap="official")
    assert o.mAP == pytest.approx(off, abs=1e-12)


@pytest.mark.parametrize("seed", [5, 6])
def test_random_with_ties_against_loop(seed):
    d, qp, gp, qc, gc = random_case(seed, 50, 200, 15, 4, with_junk_ids=True, ties=True)
    cmc, ap, off, inp, nv = loop_reference(d, qp, gp, qc, gc, 20)
    r = evaluate_rank(d, qp, gp, qc, gc, max_rank=20)
    np.testing.assert_allclose(r.cmc, cmc, atol=1e-12)
    assert r.mAP == pytest.approx(ap, abs=1e-12)
    assert r.mINP == pytest.approx(inp, abs=1e-12)
    o = evaluate_rank(d, qp, gp, qc, gc, max_rank=20, ap="official")
    assert o.mAP == pytest.approx(off, abs=1e-12)


def test_chunk_workers_and_input_types_agree():
    d, qp, gp, qc, gc = random_case(7, 70, 400, 30, 5, with_junk_ids=True)
    base = evaluate_rank(d, qp, gp, qc, gc, return_per_query=True)
    for cs, nw in [(1, 1), (3, 2), (7, 1), (128, 2)]:
        r = evaluate_rank(d, qp, gp, qc, gc, chunk_size=cs, num_workers=nw, return_per_query=True)
        np.testing.assert_array_equal(r.cmc, base.cmc)
        np.testing.assert_array_equal(r.all_AP, base.all_AP)
        assert r.mINP == base.mINP
    t = evaluate_rank(torch.from_numpy(d), *(torch.from_numpy(x) for x in (qp, gp, qc, gc)))
    np.testing.assert_array_equal(t.cmc, base.cmc)
    assert t.mAP == base.mAP
    f64 = evaluate_rank(d.astype(np.float64), qp, gp, qc, gc)
    assert f64.mAP == base.mAP
    # a non-contiguous view (a transposed copy transposed back) gives the same answer
    dt = np.ascontiguousarray(d.T).T
    assert evaluate_rank(dt, qp, gp, qc, gc).mAP == base.mAP


def test_torch_backend_matches_numpy():
    for seed, ties in [(10, False), (11, True)]:
        d, qp, gp, qc, gc = random_case(seed, 60, 300, 25, 4, with_junk_ids=True, ties=ties)
        for ap in ("standard", "official"):
            cpu = evaluate_rank(d, qp, gp, qc, gc, ap=ap, return_per_query=True)
            tor = evaluate_rank(torch.from_numpy(d), qp, gp, qc, gc, ap=ap, return_per_query=True,
                                backend="torch", chunk_size=7)
            np.testing.assert_array_equal(tor.cmc, cpu.cmc)
            np.testing.assert_array_equal(tor.all_AP, cpu.all_AP)
            np.testing.assert_array_equal(tor.all_INP, cpu.all_INP)
    with pytest.raises(ValueError, match="NaN"):
        bad = DIST.copy()
        bad[0, 3] = np.nan
        evaluate_rank(bad, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5, backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    d, qp, gp, qc, gc = random_case(8, 200, 3000, 100, 6, with_junk_ids=True, ties=False)
    cpu = evaluate_rank(d, qp, gp, qc, gc, return_per_query=True)
    gpu = evaluate_rank(torch.from_numpy(d).cuda(), qp, gp, qc, gc, return_per_query=True, chunk_size=37)
    np.testing.assert_array_equal(gpu.cmc, cpu.cmc)
    np.testing.assert_allclose(gpu.all_AP, cpu.all_AP, rtol=0, atol=1e-15)
    d2, *_ = random_case(9, 200, 3000, 100, 6, ties=True)
    assert evaluate_rank(torch.from_numpy(d2).cuda(), qp, gp, qc, gc).mAP == pytest.approx(
        evaluate_rank(d2, qp, gp, qc, gc).mAP, abs=1e-15)


def test_max_rank_larger_than_gallery_warns():
    with pytest.warns(UserWarning, match="max_rank=50 exceeds the 7 gallery items"):
        r = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS)
    assert len(r.cmc) == 7 and r.cmc[-1] == 1.0


def test_bad_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        bad = DIST.copy()
        bad[1, 3] = np.nan
        evaluate_rank(bad, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5)
    with pytest.raises(ValueError, match="g_pids must be 1-D of length 7"):
        evaluate_rank(DIST, Q_PIDS, G_PIDS[:5], Q_CAMS, G_CAMS, max_rank=5)
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(DIST, np.array([9, 9, 9, 9]), G_PIDS, Q_CAMS, G_CAMS, max_rank=5)
    with pytest.raises(ValueError, match="ap must be one of"):
        evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, ap="interp")
    with pytest.raises(ValueError, match="non-empty 2-D"):
        evaluate_rank(np.zeros((0, 7)), Q_PIDS[:0], G_PIDS, Q_CAMS[:0], G_CAMS)
    with pytest.raises(ValueError, match="max_rank must be a positive int"):
        evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=0)
    with pytest.raises(ValueError, match="rank k must be an int in"):
        evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=5).rank(6)
