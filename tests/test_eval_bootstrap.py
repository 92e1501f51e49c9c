"""Bootstrap intervals over queries: exact point estimates, a plain reference loop, coverage, pairing, JSON."""

import json
import math
import statistics

import numpy as np
import pytest

from advreid.evaluation import bootstrap as bs
from advreid.evaluation.bootstrap import (
    PerQueryScores,
    mean_std_across_seeds,
    metric_intervals,
    paired_difference,
    per_query_from_json,
    per_query_to_json,
)
from advreid.evaluation.rank import evaluate_rank


def random_case(seed, q=60, g=300, ids=20, cams=3, signal=0.0):
    """Random labels (some gallery pids -1, some queries skipped) and distances, optionally informative."""
    rng = np.random.default_rng(seed)
    qp, gp = rng.integers(0, ids, q), rng.integers(0, ids, g)
    gp[rng.random(g) < 0.1] = -1
    qp[rng.random(q) < 0.1] = ids  # an identity absent from the gallery: a skipped query
    qc, gc = rng.integers(0, cams, q), rng.integers(0, cams, g)
    d = rng.random((q, g))
    d -= signal * (qp[:, None] == gp[None, :])
    return d, qp, gp, qc, gc


def scores(seed, **kw):
    d, qp, gp, qc, gc = random_case(seed, **kw)
    return evaluate_rank(d, qp, gp, qc, gc, max_rank=20, return_per_query=True)


def reference_intervals(pq, ks, resamples, level, seed):
    """The documented procedure as plain loops. AP/INP: chunk c of CHUNK resamples of query indices from child
    1 + c of SeedSequence(seed). Rank-k: counts of the first-match classes from child 0, multinomial."""
    v = pq.first_match >= 0
    ap, inp, fm = pq.ap[v], pq.inp[v], pq.first_match[v]
    n = len(fm)
    children = np.random.SeedSequence(seed).spawn(1 + -(-resamples // bs.CHUNK))
    floats = []
    for c, child in enumerate(children[1:]):
        m = min(bs.CHUNK, resamples - c * bs.CHUNK)
        for idx in np.random.default_rng(child).integers(0, n, size=(m, n)):
            floats.append([ap[idx].mean(), inp[idx].mean()])
    classes = sorted({tuple(int(f < k) for k in ks) for f in fm}, key=lambda t: t[::-1])  # np.unique's order
    freq = [sum(tuple(int(f < k) for k in ks) == cl for f in fm) / n for cl in classes]
    counts = np.random.default_rng(children[0]).multinomial(n, freq, size=resamples)
    ranks = np.array([[sum(cnt * cl[j] for cnt, cl in zip(row, classes, strict=True)) / n for j in range(len(ks))]
                      for row in counts])
    q = np.quantile(np.hstack([ranks, np.array(floats)]), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {name: [q[0, j], q[1, j]] for j, name in enumerate([f"rank{k}_ci" for k in ks] + ["mAP_ci", "mINP_ci"])}


# ------------------------------------------------------------------------------------------ intervals
def test_point_estimates_are_the_metrics_bitwise_and_inside_the_interval():
    res = scores(0, signal=0.3)
    assert 0 < res.num_valid_queries < res.num_queries  # some queries are skipped
    pq = PerQueryScores.from_result(res)
    assert pq.metrics() == res.to_dict()  # exact equality, not approx
    ci = metric_intervals(res)
    for k, point in res.to_dict().items():
        lo, hi = ci[f"{k}_ci"]
        assert lo <= point <= hi, k
    assert ci["mAP_ci"][0] < ci["mAP_ci"][1]
    # a permutation of the queries: the point estimates stay that evaluation's metrics
    d, qp, gp, qc, gc = random_case(0, signal=0.3)
    perm = np.random.default_rng(1).permutation(len(qp))
    res_p = evaluate_rank(d[perm], qp[perm], gp, qc[perm], gc, max_rank=20, return_per_query=True)
    assert PerQueryScores.from_result(res_p).metrics() == res_p.to_dict()


def test_matches_a_plain_reference_loop():
    pq = PerQueryScores.from_result(scores(1, signal=0.2))
    got = metric_intervals(pq, ks=(1, 3), resamples=300, level=0.9, seed=7, min_resamples=100)
    ref = reference_intervals(pq, (1, 3), 300, 0.9, 7)
    assert got.keys() == ref.keys()
    for key in ("rank1_ci", "rank3_ci"):  # integer counts: exact
        assert got[key] == ref[key]
    for key in ("mAP_ci", "mINP_ci"):  # float32 sums of centred values
        np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-7)
    # 69 ks that each split the queries: 2**69 class keys, the row-wise class search, same classes, same order
    fm = np.random.default_rng(2).permutation(140)
    wide = PerQueryScores(np.full(140, 0.5), np.full(140, 0.5), fm)
    many = tuple(range(1, 70))
    got = metric_intervals(wide, ks=many, resamples=100, seed=3, min_resamples=100)
    ref = reference_intervals(wide, many, 100, 0.95, 3)
    assert all(got[f"rank{k}_ci"] == ref[f"rank{k}_ci"] for k in many)


def test_all_equal_queries_collapse_the_interval_to_the_point():
    fm = np.array([3, 3, -1, 3, 3, 3])
    ap = np.array([0.6, 0.6, np.nan, 0.6, 0.6, 0.6])
    inp = np.array([0.25, 0.25, np.nan, 0.25, 0.25, 0.25])
    ci = metric_intervals(PerQueryScores(ap, inp, fm))
    assert ci == {"rank1_ci": [0.0, 0.0], "rank5_ci": [1.0, 1.0], "rank10_ci": [1.0, 1.0],
                  "mAP_ci": [0.6, 0.6], "mINP_ci": [0.25, 0.25]}


def test_two_query_case_has_the_closed_form_interval():
    # resampled rank-1 of {hit, miss} is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4: the 95% interval is [0, 1]
    pq = PerQueryScores(np.array([1.0, 0.5]), np.array([1.0, 0.5]), np.array([0, 1]))
    ci = metric_intervals(pq, ks=(1, 2))
    assert ci["rank1_ci"] == [0.0, 1.0]
    assert ci["rank2_ci"] == [1.0, 1.0]
    assert ci["mAP_ci"] == [0.5, 1.0]


def test_coverage_of_a_known_rate():
    """95% intervals from many synthetic query sets cover the true rank-1 rate and the true mean AP ~95%."""
    rng = np.random.default_rng(123)
    p, a, b, n, trials = 0.3, 2.0, 5.0, 150, 300
    hit = {"rank1": 0, "mAP": 0}
    for t in range(trials):
        fm = np.where(rng.random(n) < p, 0, 7)
        ap = rng.beta(a, b, n)
        ci = metric_intervals(PerQueryScores(ap, ap, fm), ks=(1,), seed=t)
        hit["rank1"] += ci["rank1_ci"][0] <= p <= ci["rank1_ci"][1]
        hit["mAP"] += ci["mAP_ci"][0] <= a / (a + b) <= ci["mAP_ci"][1]
    for k, h in hit.items():
        assert 0.90 <= h / trials <= 0.99, (k, h / trials)


def test_reproducible_per_seed_and_independent_of_threads():
    pq = PerQueryScores.from_result(scores(2, signal=0.2))
    first = metric_intervals(pq, seed=5, num_workers=1)
    assert metric_intervals(pq, seed=5, num_workers=3) == first
    assert metric_intervals(pq, seed=5) == first
    assert metric_intervals(pq, seed=6) != first
    assert metric_intervals(pq, seed=5, level=0.8)["mAP_ci"][1] < first["mAP_ci"][1]  # narrower


# ----------------------------------------------------------------------------------------------- paired
def test_paired_difference_of_identical_evaluations_is_exactly_zero():
    res = scores(3, signal=0.2)
    out = paired_difference(res, res)
    assert set(out) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    for v in out.values():
        assert v == {"diff": 0.0, "ci": [0.0, 0.0], "significant": False}


def test_paired_difference_clean_vs_degraded_is_significant_and_antisymmetric():
    d, qp, gp, qc, gc = random_case(4, signal=0.5)
    clean = evaluate_rank(d, qp, gp, qc, gc, max_rank=20, return_per_query=True)
    noisy = d + np.random.default_rng(5).random(d.shape)  # an "attack": most of the signal drowned
    attacked = evaluate_rank(noisy, qp, gp, qc, gc, max_rank=20, return_per_query=True)
    out = paired_difference(clean, attacked)
    mc, ma = clean.to_dict(), attacked.to_dict()
    for k, v in out.items():
        assert v["diff"] == mc[k] - ma[k]
        assert v["ci"][0] <= v["diff"] <= v["ci"][1]
    assert out["mAP"]["significant"] and out["mAP"]["ci"][0] > 0.1
    assert out["rank1"]["significant"]
    back = paired_difference(attacked, clean)
    for k, v in out.items():
        assert back[k]["diff"] == -v["diff"] and back[k]["significant"] == v["significant"]
    for k in ("mAP", "mINP"):  # the same query draws, negated values
        np.testing.assert_allclose(back[k]["ci"], [-out[k]["ci"][1], -out[k]["ci"][0]], rtol=0, atol=1e-12)


def test_paired_difference_refuses_different_query_sets():
    a = PerQueryScores(np.array([0.5, 0.5, np.nan]), np.array([0.5, 0.5, np.nan]), np.array([0, 1, -1]))
    b = PerQueryScores(np.array([0.5, 0.5]), np.array([0.5, 0.5]), np.array([0, 1]))
    with pytest.raises(ValueError, match="same queries.*3 vs 2"):
        paired_difference(a, b)
    c = PerQueryScores(np.array([0.5, np.nan, 0.5]), np.array([0.5, np.nan, 0.5]), np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="valid queries"):
        paired_difference(a, c)
    d = PerQueryScores(a.ap, a.inp, a.first_match, ap_mode="official")
    with pytest.raises(ValueError, match="AP mode"):
        paired_difference(a, d)


# ------------------------------------------------------------------------------------------------- JSON
def test_json_round_trip():
    res_a, res_b = scores(6, signal=0.3), scores(6, signal=0.1)
    pq = PerQueryScores.from_result(res_a)
    exact = per_query_from_json(json.loads(json.dumps(per_query_to_json(res_a, decimals=None))))
    for name in ("ap", "inp", "first_match"):
        np.testing.assert_array_equal(getattr(exact, name), getattr(pq, name))  # NaN positions included
    assert exact.metrics() == res_a.to_dict()

    doc = per_query_to_json(pq)  # 6 decimals
    assert doc["first_match"].count(-1) == pq.num_queries - res_a.num_valid_queries
    assert doc["AP"].count(None) == pq.num_queries - res_a.num_valid_queries
    back = per_query_from_json(json.loads(json.dumps(doc)))
    assert per_query_to_json(back) == doc
    np.testing.assert_array_equal(back.first_match, pq.first_match)
    v = pq.valid
    assert np.abs(back.ap[v] - pq.ap[v]).max() <= 5e-7
    m = back.metrics()
    assert m["rank1"] == res_a.to_dict()["rank1"] and abs(m["mAP"] - res_a.mAP) <= 5e-7

    # a paired difference later, from the stored files only
    stored = [per_query_from_json(json.loads(json.dumps(per_query_to_json(r, decimals=None)))) for r in (res_a, res_b)]
    assert paired_difference(*stored) == paired_difference(res_a, res_b)


def test_json_rejects_foreign_documents():
    with pytest.raises(ValueError, match="format"):
        per_query_from_json({"AP": []})
    doc = per_query_to_json(PerQueryScores(np.array([0.5]), np.array([0.5]), np.array([2])))
    doc["AP"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="ap must have one entry per query"):
        per_query_from_json(doc)


# ----------------------------------------------------------------------------------------- seeds, errors
def test_mean_std_across_seeds():
    xs = [0.61, 0.64, 0.58, 0.65]
    out = mean_std_across_seeds(xs)
    assert out["n"] == 4 and out["mean"] == pytest.approx(statistics.mean(xs), rel=1e-14)
    assert out["std"] == pytest.approx(statistics.stdev(xs), rel=1e-12)  # sample std (ddof=1), not population
    assert out["std"] != pytest.approx(statistics.pstdev(xs), rel=1e-3)
    assert mean_std_across_seeds([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    per_key = mean_std_across_seeds([{"mAP": 0.2, "rank1": 0.4}, {"mAP": 0.4, "rank1": 0.4}])
    assert per_key["mAP"]["mean"] == pytest.approx(0.3) and math.isclose(per_key["mAP"]["std"], math.sqrt(0.02))
    assert per_key["rank1"] == {"mean": 0.4, "std": 0.0, "n": 2}


@pytest.mark.parametrize(("call", "param"), [
    (lambda pq: metric_intervals(pq, resamples=999), "resamples"),
    (lambda pq: metric_intervals(pq, resamples=50, min_resamples=50), "min_resamples"),
    (lambda pq: metric_intervals(pq, level=0.0), "level"),
    (lambda pq: metric_intervals(pq, level=1.0), "level"),
    (lambda pq: metric_intervals(pq, level=95), "level"),
    (lambda pq: metric_intervals(pq, seed=-1), "seed"),
    (lambda pq: metric_intervals(pq, ks=()), "ks"),
    (lambda pq: metric_intervals(pq, ks=(0, 5)), "ks"),
    (lambda pq: paired_difference(pq, pq, resamples=10), "resamples"),
    (lambda pq: metric_intervals(PerQueryScores(np.array([]), np.array([]), np.array([], dtype=int))),
     "per_query"),
    (lambda pq: metric_intervals(PerQueryScores(np.array([np.nan]), np.array([np.nan]), np.array([-1]))),
     "per_query"),
    (lambda pq: metric_intervals(evaluate_rank(*random_case(0))), "return_per_query"),
    (lambda pq: PerQueryScores(np.array([0.5, 0.5]), np.array([0.5]), np.array([0, 1])), "inp"),
    (lambda pq: PerQueryScores(np.array([1.5]), np.array([0.5]), np.array([0])), "ap"),
    (lambda pq: mean_std_across_seeds([]), "values"),
])
def test_invalid_inputs_give_one_line_errors_naming_the_parameter(call, param):
    pq = PerQueryScores(np.array([0.5, 1.0]), np.array([0.5, 1.0]), np.array([1, 0]))
    with pytest.raises(ValueError) as err:
        call(pq)
    msg = str(err.value)
    assert param in msg and "\n" not in msg, msg


def test_lowered_minimum_is_allowed_down_to_the_floor():
    pq = PerQueryScores(np.array([0.5, 1.0]), np.array([0.5, 1.0]), np.array([1, 0]))
    ci = metric_intervals(pq, resamples=bs.FLOOR_RESAMPLES, min_resamples=bs.FLOOR_RESAMPLES)
    assert ci["rank1_ci"] == [0.0, 1.0]
