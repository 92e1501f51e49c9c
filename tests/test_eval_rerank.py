"""k-reciprocal re-ranking against a plain transcription of the published algorithm (Zhong et al. 2017)."""

import numpy as np
import pytest
import torch

from advreid.evaluation.distance import compute_distance_matrix
from advreid.evaluation.rerank import re_ranking, re_ranking_features


def reference_rerank(q_g, q_q, g_g, k1, k2, lam):
    """Straight loops over the dense N x N matrix, in the distance-matrix form torchreid uses (float32)."""
    q = q_g.shape[0]
    full = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0)
    orig = np.power(full, 2).astype(np.float32)
    orig = (orig / orig.max(axis=0)).T  # row i = column i of the stacked matrix over its maximum
    n = orig.shape[0]
    rank = np.argsort(orig, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        return [j for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    V = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        recip = reciprocal(i, k1)
        expansion = set(recip)
        for c in recip:
            c_recip = reciprocal(c, half)
            if len(set(c_recip) & set(recip)) > 2.0 / 3 * len(c_recip):
                expansion |= set(c_recip)
        idx = sorted(expansion)
        w = np.exp(-orig[i, idx].astype(np.float64))
        V[i, idx] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    out = np.empty((q, n - q))
    for i in range(q):
        m = np.minimum(V[i][None, :], V[q:]).sum(1)
        out[i] = (1 - lam) * (1 - m / (2 - m)) + lam * orig[i, q:]
    return out


def feats(seed, q, g, d=16):
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.standard_normal((q, d)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((g, d)).astype(np.float32)))


def dense(qf, gf, metric="sqeuclidean"):
    return tuple(compute_distance_matrix(a, b, metric).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 2, 0.5), (7, 1, 0.3)])
def test_re_ranking_matches_reference(k1, k2, lam):
    qf, gf = feats(0, 30, 120)
    qg, qq, gg = dense(qf, gf)
    ref = reference_rerank(qg, qq, gg, k1, k2, lam)
    out = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam)
    assert out.shape == (30, 120) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # the Jaccard part really matters: it moves distances far from the lambda * original term alone
    assert np.abs(out - lam * ref_original(qg, qq)).max() > 0.1


def ref_original(qg, qq):
    sq = np.concatenate([qq, qg], 1) ** 2
    return (qg**2) / sq.max(1, keepdims=True)


def test_lambda_one_is_the_normalised_squared_distance():
    qf, gf = feats(1, 12, 40)
    qg, qq, gg = dense(qf, gf, "euclidean")
    out = re_ranking(qg, qq, gg, lambda_value=1.0)
    # column i of [[q_q, q_g], [q_g^T, g_g]] for a query i is (q_q[:, i], q_g[i, :]): its max normalises q_g[i]^2
    np.testing.assert_allclose(out, ref_original(qg, qq.T), rtol=1e-6)


def test_re_ranking_drop_in_on_asymmetric_and_float64_inputs():
    rng = np.random.default_rng(2)
    q, g = 15, 50
    qg, qq, gg = rng.random((q, g)) * 3, rng.random((q, q)) * 3, rng.random((g, g)) * 3  # not symmetric
    ref = reference_rerank(qg, qq, gg, 6, 3, 0.3)
    np.testing.assert_allclose(re_ranking(qg, qq, gg, k1=6, k2=3), ref, atol=1e-5)
    np.testing.assert_allclose(re_ranking(torch.from_numpy(qg), qq.astype(np.float32), gg, k1=6, k2=3), ref,
                               atol=1e-5)
    # fewer items than k1 + 1 and k2: every list is the whole set
    small = (qg[:3, :4], qq[:3, :3], gg[:4, :4])
    np.testing.assert_allclose(re_ranking(*small), reference_rerank(*small, 20, 6, 0.3), atol=1e-5)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "cosine"])
def test_features_path_equals_dense_path(metric):
    qf, gf = feats(3, 25, 110, d=12)
    qg, qq, gg = dense(qf, gf, metric)
    ref = re_ranking(qg, qq, gg)
    np.testing.assert_allclose(ref, reference_rerank(qg, qq, gg, 20, 6, 0.3), atol=1e-5)
    for cs in (1, 7, 40, None):
        out = re_ranking_features(qf, gf, metric=metric, chunk_size=cs)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    out = re_ranking_features(qf.numpy(), gf.numpy(), k1=5, k2=2, lambda_value=0.5, metric=metric, chunk_size=9)
    np.testing.assert_allclose(out, re_ranking(qg, qq, gg, k1=5, k2=2, lambda_value=0.5), atol=1e-5)


def test_chunk_size_independence_dense():
    qf, gf = feats(4, 20, 90)
    qg, qq, gg = dense(qf, gf)
    base = re_ranking(qg, qq, gg)
    for cs in (1, 13, 110, 500):
        np.testing.assert_array_equal(re_ranking(qg, qq, gg, chunk_size=cs), base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_path_on_cuda():
    qf, gf = feats(5, 40, 200)
    cpu = re_ranking_features(qf, gf)
    gpu = re_ranking_features(qf.cuda(), gf.cuda(), chunk_size=17)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


def test_bad_input_errors():
    qf, gf = feats(6, 5, 9)
    qg, qq, gg = dense(qf, gf)
    with pytest.raises(ValueError, match=r"expected q_q_dist \(5, 5\) and g_g_dist \(9, 9\)"):
        re_ranking(qg, qq[:4, :4], gg)
    with pytest.raises(ValueError, match="k1 must be a positive int"):
        re_ranking(qg, qq, gg, k1=0)
    with pytest.raises(ValueError, match=r"lambda_value must be a number in \[0, 1\]"):
        re_ranking(qg, qq, gg, lambda_value=1.5)
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        re_ranking_features(qf, gf, metric="manhattan")
    with pytest.raises(ValueError, match="same feature dim"):
        re_ranking_features(qf, gf[:, :3])
    bad = qg.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        re_ranking(bad, qq, gg)
    badf = qf.clone()
    badf[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        re_ranking_features(badf, gf)


def test_compute_distance_matrix_against_plain_formulas():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((23, 9)), rng.standard_normal((31, 9))
    sq = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    expected = {"sqeuclidean": sq, "euclidean": np.sqrt(sq), "cosine": 1 - an @ bn.T}
    for metric, ref in expected.items():
        d64 = compute_distance_matrix(a, b, metric, dtype=torch.float64)
        assert d64.dtype == torch.float64 and d64.shape == (23, 31)
        np.testing.assert_allclose(d64.numpy(), ref, atol=1e-10)
        d32 = compute_distance_matrix(torch.from_numpy(a).float(), torch.from_numpy(b).float(), metric)
        assert d32.dtype == torch.float32
        np.testing.assert_allclose(d32.numpy(), ref, atol=2e-5)
        for cs in (1, 5, 100):  # BLAS may round differently per block shape: equal to float64 precision
            chunked = compute_distance_matrix(a, b, metric, chunk_size=cs, dtype=torch.float64).numpy()
            np.testing.assert_allclose(chunked, d64.numpy(), rtol=0, atol=1e-12)
    # identical rows: the squared distance is clamped at exactly 0, never negative
    same = compute_distance_matrix(a, a, "sqeuclidean").numpy()
    assert same.min() >= 0 and np.abs(np.diag(same)).max() < 1e-4
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        compute_distance_matrix(a, b, "l1")
    with pytest.raises(ValueError, match="feature dims differ: a has 9, b has 4"):
        compute_distance_matrix(a, b[:, :4])
    with pytest.raises(ValueError, match="must be 2-D"):
        compute_distance_matrix(a[0], b)
