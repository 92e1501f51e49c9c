"""DDDefense Phase II (reconstruction): the FNES loss and adversary, the identity split, the attack pool and the
first-order self-meta step, checked against hand-computed values, independent numpy references and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from advreid.defenses.dddefense.fnes import FNESAdversary, FNESLoss, batch_guides
from advreid.defenses.dddefense.selfmeta import (
    AttackPool,
    SelfMetaConfig,
    SelfMetaStep,
    first_order_meta_step,
    split_identities,
)
from advreid.losses import TripletLoss
from advreid.models import build_model

H, W = 64, 32


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------- FNES loss


def test_fnes_matches_hand_computed_value():
    # 1-D features: every distance is |a_i - c_j|; pids 0,0,1,1; tau = 0.5, soft margins, extension weight 0.5
    adv = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    clean = torch.tensor([[0.5], [2.0], [4.0], [5.0]], dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1])
    tau = 0.5

    def smin(d1: float, d2: float) -> float:  # -tau * log(mean(exp(-d / tau)))
        return -tau * math.log((math.exp(-d1 / tau) + math.exp(-d2 / tau)) / 2)

    # anchor i: (positive distance, (negative distances)) from adversarial a_i to the clean gallery
    tri = [(2.0, (4.0, 5.0)), (0.5, (3.0, 4.0)), (2.0, (2.5, 1.0)), (2.0, (5.5, 4.0))]
    triplet = sum(_softplus(p - smin(*n)) for p, n in tri) / 4

    # extension: weights softmax(d(c_i, c_n) / tau) over the clean negatives; target uses clean, reach uses adv
    def ext(dc: tuple[float, float], da: tuple[float, float]) -> float:
        e0, e1 = math.exp(dc[0] / tau), math.exp(dc[1] / tau)
        w0, w1 = e0 / (e0 + e1), e1 / (e0 + e1)
        return _softplus((w0 * dc[0] + w1 * dc[1]) - (w0 * da[0] + w1 * da[1]))

    rows = [((3.5, 4.5), (4.0, 5.0)), ((2.0, 3.0), (3.0, 4.0)), ((3.5, 2.0), (2.5, 1.0)), ((4.5, 3.0), (5.5, 4.0))]
    extension = sum(ext(dc, da) for dc, da in rows) / 4

    loss, parts = FNESLoss(tau=tau, extension_weight=0.5)(adv, pids, clean)
    assert loss.dtype == torch.float64
    assert abs(parts["triplet"] - triplet) < 1e-12
    assert abs(parts["extension"] - extension) < 1e-12
    assert abs(float(loss) - (triplet + 0.5 * extension)) < 1e-12
    assert parts["acc"] == 0.75  # hard: anchor 2 has d_ap = 2 > d_an = 1


def _numpy_fnes(a, c, pids, tau, margin, ext_margin, w_tri, w_ext):
    """Independent loop reference (numpy float64)."""
    b = len(pids)
    g = a if c is None else c
    d = np.sqrt(((a[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    hinge = (lambda x: np.log1p(np.exp(x))) if margin is None else (lambda x: max(x + margin, 0.0))
    terms = []
    for i in range(b):
        pos = [d[i, j] for j in range(b) if j != i and pids[j] == pids[i]]
        neg = [d[i, j] for j in range(b) if pids[j] != pids[i]]
        if pos and neg:
            smax = tau * np.log(np.mean(np.exp(np.array(pos) / tau)))
            smin = -tau * np.log(np.mean(np.exp(-np.array(neg) / tau)))
            terms.append(hinge(smax - smin))
    tri = np.mean(terms) if terms else 0.0
    ext = 0.0
    if c is not None:
        dc = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
        eh = (lambda x: np.log1p(np.exp(x))) if ext_margin is None else (lambda x: max(x + ext_margin, 0.0))
        es = []
        for i in range(b):
            negs = [j for j in range(b) if pids[j] != pids[i]]
            z = np.array([dc[i, j] / tau for j in negs])
            w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            es.append(eh(sum(w[k] * dc[i, j] for k, j in enumerate(negs)) - sum(w[k] * d[i, j]
                                                                                 for k, j in enumerate(negs))))
        ext = np.mean(es)
    return w_tri * tri + w_ext * ext, tri, ext


@pytest.mark.parametrize("margin,ext_margin,with_clean", [(None, None, True), (0.3, 0.2, True), (None, None, False)])
def test_fnes_matches_numpy_reference(margin, ext_margin, with_clean):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 5))
    c = a + 0.3 * rng.normal(size=(9, 5))
    pids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])  # unequal counts; identity 3 is a singleton (no positive)
    ref, tri, ext = _numpy_fnes(a, c if with_clean else None, pids, 0.7, margin, ext_margin, 1.3, 0.6)
    loss, parts = FNESLoss(tau=0.7, margin=margin, extension_margin=ext_margin, triplet_weight=1.3,
                           extension_weight=0.6)(torch.from_numpy(a), torch.from_numpy(pids),
                                                 torch.from_numpy(c) if with_clean else None)
    assert abs(float(loss) - ref) < 1e-12
    assert abs(parts["triplet"] - tri) < 1e-12 and abs(parts["extension"] - ext) < 1e-12
    assert (parts["extension"] == 0.0) == (not with_clean)


def test_fnes_tends_to_hard_batch_hard_triplet():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 8, generator=g, dtype=torch.float64)
    pids = torch.arange(4).repeat_interleave(3)
    for margin in (None, 0.3):
        hard = float(TripletLoss(margin)(feats, pids))  # the library's batch-hard triplet (float32 inside)
        at0 = float(FNESLoss(tau=0.0, margin=margin, extension_weight=0.0)(feats, pids)[0])
        assert abs(at0 - hard) < 1e-6
        errs = []
        for tau in (1.0, 0.1, 0.01, 1e-3, 1e-6):
            soft = float(FNESLoss(tau=tau, margin=margin, extension_weight=0.0)(feats, pids)[0])
            # log-mean-exp is within tau*log|P| of the max (and tau*log|N| of the min); the hinge is 1-Lipschitz
            assert abs(soft - at0) <= tau * (math.log(2) + math.log(9)) + 1e-12
            errs.append(abs(soft - at0))
        assert errs[0] > 1e-3 and errs[-1] < 1e-5 and errs == sorted(errs, reverse=True)
    # with clean features, tau -> 0 picks the clean anchor's single farthest negative for the extension
    clean = feats + 0.1 * torch.randn(12, 8, generator=g, dtype=torch.float64)
    d = torch.cdist(feats, clean)
    dc = torch.cdist(clean, clean)
    neg = pids[:, None] != pids[None, :]
    far = dc.masked_fill(~neg, -1).argmax(1)
    r = torch.arange(12)
    expected = torch.nn.functional.softplus(dc[r, far] - d[r, far]).mean()
    got = FNESLoss(tau=1e-4, triplet_weight=0.0)(feats, pids, clean)[1]["extension"]
    assert abs(got - float(expected)) < 1e-6


def test_fnes_trains_the_embedding_only():
    assert list(FNESLoss().parameters()) == []
    torch.manual_seed(0)
    model = build_model("cnn4", 4, pretrained=False).train()
    x = torch.rand(8, 3, H, W)
    pids = torch.arange(4).repeat_interleave(2)
    out = model(torch.cat([x.clamp(0.02, 0.98) + 0.02, x]))  # "adversarial" and clean halves
    feats = out["feat_after_bn"]
    loss, _ = FNESLoss()(feats[:8], pids, feats[8:])
    loss.backward()
    assert model.head.classifier.weight.grad is None  # no classifier involvement
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    # gradients reach both the adversarial and the clean features
    a = feats[:8].detach().double().requires_grad_(True)
    c = feats[8:].detach().double().requires_grad_(True)
    FNESLoss()(a, pids, c)[0].backward()
    assert a.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


def test_fnes_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        FNESLoss(tau=-1.0)
    with pytest.raises(ValueError, match="both 0"):
        FNESLoss(triplet_weight=0.0, extension_weight=0.0)
    with pytest.raises(ValueError, match="pids"):
        FNESLoss()(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="clean_feats"):
        FNESLoss()(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(4, 3))


# ----------------------------------------------------------------------------------------- FNES adversary


def test_batch_guides_hand_built():
    feats = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 4.0], [10.0, 0.0]], dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1, 2])
    g = batch_guides(feats, pids)
    assert g.push.shape == (5, 1, 2)
    assert torch.equal(g.push_mask[:, 0], torch.tensor([True, True, True, True, False]))
    assert torch.equal(g.push[:4, 0], feats[[1, 0, 3, 2]])
    # farthest negative sample: 0 -> 4 (10), 1 -> 4 (9), 2 -> 4 (7), 3 -> 4 (sqrt 65), 4 -> 0 (10)
    assert torch.equal(g.pull[:, 0], feats[[4, 4, 4, 4, 0]]) and bool(g.pull_mask.all())
    # farthest other-identity centroid: centroids (0.5,0), (3,2), (10,0)
    c = batch_guides(feats, pids, pull="centroid")
    cents = torch.tensor([[0.5, 0.0], [3.0, 2.0], [10.0, 0.0]], dtype=torch.float64)
    assert torch.equal(c.pull[:, 0], cents[[2, 2, 2, 2, 0]])
    # the farthest choice follows the attack's space: raw vs L2-normalised features disagree here
    f2 = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 5.0], [-1.0, 0.2]], dtype=torch.float64)
    p2 = torch.tensor([0, 0, 1, 2])
    assert torch.equal(batch_guides(f2, p2).pull[0, 0], f2[2])  # raw: |(1,0)-(0,5)| = 5.10 > 2.01
    assert torch.equal(batch_guides(f2, p2, normalize=True).pull[0, 0], f2[3])  # unit: 1.99 > 1.41
    lone = batch_guides(feats[:2], pids[:2])
    assert not bool(lone.pull_mask.any())  # no negative in the batch: the pull is masked out


@pytest.fixture(scope="module")
def model64() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn4", 8, pretrained=False).double().eval()


def test_fnes_adversary_budget_streams_and_guides(model64):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 16, generator=g, dtype=torch.float64)  # small: float64 convs are slow
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    index = torch.arange(20, 26)
    # self-guided SMA: a sample's result depends only on (seed, index), not on its batch-mates
    sma = FNESAdversary.build(model64, "sma", steps=3, seed=4)
    full = sma(x, pids, index=index)
    part = sma(x[2:4], pids[2:4], index=index[2:4])
    assert torch.allclose(part, full[2:4], rtol=0, atol=1e-12)
    assert not torch.equal(sma(x, pids, index=index, seed=5), full) and sma.attack.seed == 4  # per-call seed
    # FNA with in-batch guides: within budget, deterministic, no parameter gradients, modes restored
    model64.train()
    fna = FNESAdversary.build(model64, "fna", steps=3)
    y = fna(x, pids, index=index)
    assert model64.training and all(m.training for m in model64.modules())
    model64.eval()
    assert torch.equal(y, fna(x, pids, index=index))
    assert (y - x).abs().max() <= fna.attack.eps + 1e-12 and not torch.equal(y, x)
    assert all(p.grad is None for p in model64.parameters())
    # the FNA objective went up from the clean images (push from partners, pull to the farthest negative)
    guides = fna.guides(x, pids)
    from advreid.attacks import AttackInputs

    with torch.no_grad():
        state = fna.attack.setup(x, AttackInputs(pids, None, guides, index, None))
        assert (fna.attack.loss(fna.attack.features(y), state) > fna.attack.loss(fna.attack.features(x), state)).all()


# ------------------------------------------------------------------------------------- split and pool


def test_split_identities_disjoint_covering_deterministic():
    pids = torch.tensor([5, 5, 9, 9, 2, 2, 7, 7, 4, 4, 11, 11, 3, 3])  # 7 identities
    splits = set()
    for seed in range(12):
        tr, te = split_identities(pids, 0.5, torch.Generator().manual_seed(seed))
        tr2, te2 = split_identities(pids, 0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(tr, tr2) and torch.equal(te, te2)  # deterministic per seed
        assert sorted(tr.tolist() + te.tolist()) == list(range(14))  # covers the batch, disjoint
        assert not set(pids[tr].tolist()) & set(pids[te].tolist())  # identities disjoint
        assert len(set(pids[tr].tolist())) == 4  # round(0.5 * 7) = 4 (banker's rounding of 3.5)
        splits.add(tuple(tr.tolist()))
    assert len(splits) > 3  # different seeds, different splits
    tr, _ = split_identities(pids, 0.01, torch.Generator().manual_seed(0))
    assert len(set(pids[tr].tolist())) == 1  # at least one identity on each side
    with pytest.raises(ValueError, match="2 identities"):
        split_identities(torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="ratio"):
        split_identities(pids, 1.0)


def test_attack_pool_draws_deterministic_and_from_the_pool(model64):
    names = ("odfa", "lta", "mifgsm")
    pool = AttackPool(names, model64, eps="4px", alpha="1px", steps=3, seed=2)
    assert {a.steps for a in pool.attacks.values()} == {3} and all(abs(a.eps - 4 / 255) < 1e-15
                                                                   for a in pool.attacks.values())
    draws = [pool.draw(torch.Generator().manual_seed(7)).name for _ in range(3)]
    assert len(set(draws)) == 1  # same generator state, same draw
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    seq1 = [pool.draw(g1).name for _ in range(60)]
    seq2 = [pool.draw(g2).name for _ in range(60)]
    assert seq1 == seq2 and set(seq1) == set(names)  # deterministic and only (all) from the pool
    own = AttackPool(names, model64, steps=3, seed=3)
    assert [own.draw().name for _ in range(60)] == seq1  # the pool's own generator is seeded from seed
    with pytest.raises(Exception, match="nope"):
        AttackPool(("fna", "nope"), model64)
    with pytest.raises(ValueError, match="disjoint"):
        SelfMetaConfig(pool_train=("fna", "sma"), pool_test=("sma",))


# ------------------------------------------------------------------------------------------ meta step


def _np_linear_grad(w, b, x, y):
    r = x @ w.T + b - y
    n = r.size
    return float((r ** 2).mean()), 2.0 / n * r.T @ x, 2.0 / n * r.sum(0)


def test_meta_step_equals_hand_written_first_order_update():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(2, 3)), rng.normal(size=2)
    xtr, ytr = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    xte, yte = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    inner_lr, beta, lr = 0.3, 0.7, 0.05

    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0))
        model.bias.copy_(torch.from_numpy(b0))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ttr, tytr, tte, tyte = (torch.from_numpy(v) for v in (xtr, ytr, xte, yte))
    parts = first_order_meta_step(model, lambda f: ((f(ttr) - tytr) ** 2).mean(),
                                  lambda f: (((f(tte) - tyte) ** 2).mean(), {"n": 4.0}), inner_lr, beta, opt)

    # by hand: theta' = theta - inner_lr * g_tr(theta); grad = g_tr(theta) + beta * g_te(theta')
    l_tr, gw_tr, gb_tr = _np_linear_grad(w0, b0, xtr, ytr)
    w1, b1 = w0 - inner_lr * gw_tr, b0 - inner_lr * gb_tr
    l_te, gw_te, gb_te = _np_linear_grad(w1, b1, xte, yte)
    w_new = w0 - lr * (gw_tr + beta * gw_te)
    b_new = b0 - lr * (gb_tr + beta * gb_te)
    assert np.abs(model.weight.detach().numpy() - w_new).max() < 1e-12
    assert np.abs(model.bias.detach().numpy() - b_new).max() < 1e-12
    assert abs(parts["meta_train"] - l_tr) < 1e-12 and abs(parts["meta_test"] - l_te) < 1e-12
    assert parts["test/n"] == 4.0
    # the check can tell first- from second-order: MAML's extra term (I - inner_lr * H_tr) is far from negligible
    htr = 2.0 / ytr.size * xtr.T @ xtr  # Hessian of L_tr w.r.t. each row of W
    w_maml = w0 - lr * (gw_tr + beta * (gw_te - inner_lr * gw_te @ htr))
    assert np.abs(w_maml - w_new).max() > 1e-4
    # and from evaluating L_te at theta instead of theta'
    _, gw_te0, _ = _np_linear_grad(w0, b0, xte, yte)
    assert np.abs((w0 - lr * (gw_tr + beta * gw_te0)) - w_new).max() > 1e-4


@pytest.mark.parametrize("freeze", [False, True])
def test_meta_step_batchnorm_buffers(freeze):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double().train()
    xtr, xte = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g,
                                                                                  dtype=torch.float64)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()

    def loss(f, x):
        return f(x).pow(3).mean()

    first_order_meta_step(model, lambda f: loss(f, xtr), lambda f: loss(f, xte), 0.5, 1.0,
                          torch.optim.SGD(model.parameters(), lr=0.1), freeze_outer_buffers=freeze)
    rm = 0.1 * (xtr @ w0.T + b0).mean(0)  # momentum 0.1 from zero, meta-train batch at theta
    assert model[1].num_batches_tracked.item() == (1 if freeze else 2)
    if freeze:
        assert torch.allclose(model[1].running_mean, rm, rtol=0, atol=1e-14)
    else:
        assert not torch.allclose(model[1].running_mean, rm, rtol=0, atol=1e-6)  # the outer pass counted too


@pytest.mark.parametrize("pools", [(("fna",), ("odfa",)), (("sma",), ("lta",)), (("fna", "sma"), ("mifgsm",))])
def test_self_meta_step_on_cnn4_with_real_attacks(pools):
    torch.manual_seed(0)
    model = build_model("cnn4", 8, pretrained=False).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, H, W, generator=g)
    keep = images.clone()
    pids = torch.tensor([3, 3, 1, 1, 6, 6, 2, 2])
    cfg = SelfMetaConfig(pool_train=pools[0], pool_test=pools[1], steps=2, consistency_weight=0.5, inner_lr=0.05)
    step = SelfMetaStep(model, torch.optim.SGD(model.parameters(), lr=0.05), cfg)
    teacher_before = [p.detach().clone() for p in step.teacher.parameters()]
    res = step(images, pids, index=torch.arange(100, 108), generator=torch.Generator().manual_seed(1))
    assert res.attacks[0] in pools[0] and res.attacks[1] in pools[1]
    assert sorted(res.train_index.tolist() + res.test_index.tolist()) == list(range(8))
    assert all(math.isfinite(v) for v in res.parts.values()) and "train/consistency" in res.parts
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("backbone") for n in changed)
    assert not any("classifier" in n for n in changed)  # no classifier term: grad None, SGD skips it
    assert model.head.classifier.weight.grad is None
    # nothing left on the inputs, the model's mode restored, the teacher untouched
    assert torch.equal(images, keep) and not images.requires_grad and images.grad is None
    assert not model.training
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(step.teacher.parameters(), teacher_before,
                                                                      strict=True))
    assert step.step_count == 1
