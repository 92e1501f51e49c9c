"""Behavioural oracles (spec section 7) and exact agreement with hand-written update rules on a linear feature model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advreid.attacks import AttackInputs, GuideBank, Guides, build, pil_luma, rect_masks

H, W = 8, 4


class Linear(nn.Module):
    """f(x) = A vec(x): gradients known in closed form."""

    def __init__(self, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(d, 3 * H * W, generator=g, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.A.T


def _x(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.9 + 0.05


def _clip(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x, (x0 - eps).clamp(min=0)), (x0 + eps).clamp(max=1))


# ------------------------------------------------------------------------------- exact update rules


def test_ifgsm_sqeuclidean_raw_matches_closed_form_with_mask_and_self_padding() -> None:
    m = Linear()
    A = m.A.detach()
    x0 = _x()
    guides = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    eps, alpha, T = 6 / 255, 1 / 255, 5
    attack = build("ifgsm", m, eps=eps, alpha=alpha, steps=T, normalize=False, distance="sqeuclidean",
                   pad_self=True)
    got = attack(x0, guides=Guides(push=guides, push_mask=mask))
    f0 = x0.flatten(1) @ A.T
    x = x0.clone()
    for _ in range(T):
        f = x.flatten(1) @ A.T
        # d/dx sum_k m_k |f - g_k|^2 + (K - n) |f - f0|^2 = 2 A^T (sum_k m_k (f - g_k) + (K - n)(f - f0))
        r = ((f[:, None] - guides) * mask[..., None]).sum(1) + (2 - mask.sum(1))[:, None] * (f - f0)
        grad = (2 * r @ A).view_as(x)
        x = _clip(x + alpha * grad.sign(), x0, eps)
    assert torch.equal(got, x)
    assert torch.equal(got[2], x0[2])  # no real guide: only the self term, whose gradient at x0 is zero
    nopad = build("ifgsm", m, eps=eps, alpha=alpha, steps=T, normalize=False, distance="sqeuclidean")
    y = nopad(x0, guides=Guides(push=guides, push_mask=mask))
    assert torch.equal(y[0], got[0]) and not torch.equal(y[1], got[1])  # padding weight K - n = 0 vs 1


def test_mifgsm_normalised_mse_matches_hand_loop() -> None:
    m = Linear()
    A = m.A.detach()
    x0 = _x()
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps, alpha, T = 5 / 255, 1 / 255, 7
    got = build("mifgsm", m, eps=eps, alpha=alpha, steps=T)(x0, guides=Guides(push=g))
    gn = F.normalize(g, dim=1)
    x, acc = x0.clone(), torch.zeros_like(x0)
    for _ in range(T):
        u = x.flatten(1) @ A.T
        n = u.norm(dim=1, keepdim=True)
        v = u / n
        # mse on unit vectors: d/du mean((v - g)^2) = (2 / D) (I - v v^T)(v - g) / |u|
        e = v - gn
        du = (2 / 6) * (e - v * (v * e).sum(1, keepdim=True)) / n
        grad = (du @ A).view_as(x)
        grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True)
        acc = acc + grad
        x = _clip(x + alpha * acc.sign(), x0, eps)
    assert torch.allclose(got, x, rtol=0, atol=1e-12)
    assert (got - x0).abs().max() > 4.5 / 255  # far from trivial


def test_fgsm_is_one_step_of_eps() -> None:
    m = Linear()
    x0 = _x()
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = build("fgsm", m, eps=4 / 255, normalize=False, distance="sqeuclidean")(x0, guides=Guides(push=g))
    f = x0.flatten(1) @ m.A.detach().T
    want = (x0 + 4 / 255 * ((f - g) @ m.A.detach()).view_as(x0).sign()).clamp(0, 1)
    assert torch.equal(got, want)


def test_seed_variant_uses_the_last_same_identity_gallery_guide() -> None:
    m = Linear()
    x0 = _x(2)
    bank = GuideBank(torch.randn(5, 6, dtype=torch.float64), [4, 9, 4, 4, 9], [1, 1, 1, 2, 3])
    got = build("ifgsm_seed", m, steps=4)(x0, torch.tensor([4, 9]), torch.tensor([1, 3]), guides=bank)
    want = build("ifgsm", m, steps=4)(x0, guides=Guides(push=bank.features[[3, 4]]))
    assert torch.equal(got, want)  # rows 3 and 4 are the last of ids 4 and 9 (same camera included)


# ------------------------------------------------------------------------------------------- SMA


def test_sma_without_random_start_does_nothing_and_with_it_moves() -> None:
    torch.manual_seed(0)
    from advreid.models import build_model

    model = build_model("cnn4", 10, pretrained=False).eval()
    x = torch.rand(2, 3, 64, 32)
    assert torch.equal(build("sma", model, random_start=False)(x), x)
    y = build("sma", model)(x)
    assert (y - x).abs().max() > 4 / 255


# ------------------------------------------------------------------------------------------- FNA


def test_fna_pulls_towards_the_furthest_other_centroid() -> None:
    m = Linear(d=2)
    x0 = _x(1)
    f0 = (x0.flatten(1) @ m.A.detach().T)[0]
    dirs = torch.stack([f0 + torch.tensor([1.0, 0.0], dtype=torch.float64),  # own identity (7): never pulled to
                        f0 + torch.tensor([40.0, 0.0], dtype=torch.float64),
                        f0 + torch.tensor([0.0, 3.0], dtype=torch.float64),
                        f0 + torch.tensor([0.0, 60.0], dtype=torch.float64)])
    bank = GuideBank(dirs, [7, 1, 2, 2], source="query")  # centroids: id1 at +40x, id2 at +31.5y
    attack = build("fna_pull", m, normalize=False, distance="sqeuclidean", steps=3)
    inp = AttackInputs(torch.tensor([7]), None, bank, torch.tensor([0]), None)
    state = attack.setup(x0, inp)
    assert torch.equal(state["pull"][0, 0], f0 + torch.tensor([40.0, 0.0], dtype=torch.float64))
    y = attack(x0, torch.tensor([7]), guides=bank)
    fy = (y.flatten(1) @ m.A.detach().T)[0]
    c = state["pull"][0, 0]
    assert (fy - c).norm() < (f0 - c).norm() - 0.5  # pulled towards it
    # the full FNA also pushes from its own identity's guide (row 0)
    full = build("fna", m, normalize=False, distance="sqeuclidean", steps=3, pad_self=False)
    st = full.setup(x0, inp)
    assert torch.equal(st["push"][0, :, :], dirs[:1]) and torch.equal(st["pull"], state["pull"])


# ------------------------------------------------------------------------------------------- LTA


def test_lta_references_are_gray_inside_their_rectangle_and_the_input_outside() -> None:
    torch.manual_seed(0)
    from advreid.models import build_model

    model = build_model("cnn4", 10, pretrained=False).eval()
    x = torch.rand(3, 3, 64, 32)
    idx = torch.tensor([3, 8, 1])
    lta = build("lta", model, steps=5)
    refs = lta.reference_images(x, index=idx)
    rects = lta.rects(x, idx)
    assert refs.shape == (5, 3, 3, 64, 32) and rects.shape == (5, 3, 4)
    gray = pil_luma(x).expand_as(x)
    for t in range(5):
        m = rect_masks(rects[t], 64, 32).expand_as(x)
        assert m.flatten(1).any(1).all()  # probability 1: every reference has a patch
        assert torch.equal(refs[t][~m], x[~m]) and torch.equal(refs[t][m], gray[m])
    assert not torch.equal(rects[0], rects[1])  # re-drawn every step
    assert build("lta_star", model).reference_images(x, index=idx).shape[0] == 1


def test_lta_matches_the_spec_loop_with_its_references() -> None:
    m = Linear()
    A = m.A.detach()
    x0 = _x()
    idx = torch.tensor([0, 1, 2])
    lta = build("lta", m, steps=6, rect_mode="random_erasing")
    refs = lta.reference_images(x0, index=idx)
    got = lta(x0, index=idx)
    x, acc = x0.clone(), None
    for t in range(6):
        ref = F.normalize(refs[t].flatten(1) @ A.T, dim=1)
        xr = x.clone().requires_grad_(True)
        loss = ((F.normalize(xr.flatten(1) @ A.T, dim=1) - ref) ** 2).mean(1).sum()
        (d,) = torch.autograd.grad(loss, xr)
        d = d / d.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        acc = d if acc is None else acc + d
        x = _clip(x + 1 / 255 * acc.sign(), x0, 5 / 255)
    assert torch.allclose(got, x, rtol=0, atol=1e-12)


def test_lta_reference_fn_generalises() -> None:
    m = Linear()
    x0 = _x()
    calls = []

    def darker(x: torch.Tensor, gens) -> torch.Tensor:
        calls.append(len(gens))
        return x * 0.5

    got = build("lta", m, steps=3, reference_fn=darker)(x0)
    assert calls == [3, 3, 3]  # one fresh reference per step, one generator per sample
    star = build("lta_star", m, steps=3, reference_fn=darker)(x0)
    assert calls == [3, 3, 3, 3] and torch.equal(star, got)  # deterministic reference: LTA == LTA*


# ------------------------------------------------------------------------------------------- PGD


def test_pgd_l2_ball_and_restarts_keep_the_best() -> None:
    m = Linear()
    x0 = _x(4)
    eps = 0.3
    one = build("pgd", m, norm="l2", eps=eps, alpha=0.05, steps=5, seed=2)
    y1 = one(x0)
    assert ((y1 - x0).flatten(1).norm(dim=1) <= eps + 1e-9).all() and y1.min() >= 0 and y1.max() <= 1
    assert ((y1 - x0).flatten(1).norm(dim=1) > 0.2).all()
    three = build("pgd", m, norm="l2", eps=eps, alpha=0.05, steps=5, seed=2, restarts=3)
    y3 = three(x0)
    with torch.no_grad():
        f0 = F.normalize(x0.flatten(1) @ m.A.T, dim=1)

        def shift(y: torch.Tensor) -> torch.Tensor:
            return ((F.normalize(y.flatten(1) @ m.A.T, dim=1) - f0) ** 2).mean(1)

        assert (shift(y3) >= shift(y1)).all() and (shift(y3) > shift(y1)).any()


# ----------------------------------------------------------------------------------------- noise


def test_noise_is_uniform_in_the_ball() -> None:
    m = Linear()
    x = torch.full((2, 3, 64, 32), 0.5, dtype=torch.float64)
    m.A = nn.Parameter(torch.zeros(2, 3 * 64 * 32, dtype=torch.float64))
    d = (build("noise", m, eps=8 / 255)(x) - x).flatten()
    assert d.abs().max() <= 8 / 255 and abs(d.abs().mean().item() - 4 / 255) < 0.05 / 255 * 4
    assert abs(d.mean().item()) < 0.1 / 255


# ------------------------------------------------------------------------ sanity on a trained model


def _synthetic_ids(n_ids: int, per_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(n_ids, 3, 8, 4, generator=g)
    base = F.interpolate(protos, size=(64, 32), mode="nearest")
    x = base.repeat_interleave(per_id, 0)
    x = (x * (0.8 + 0.4 * torch.rand(x.shape[0], 1, 1, 1, generator=g)) + 0.08 * torch.randn(x.shape, generator=g))
    return x.clamp(0, 1), torch.arange(n_ids).repeat_interleave(per_id)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    from advreid.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn4", 6, pretrained=False)
    x, y = _synthetic_ids(6, 8, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for it in range(40):
        sel = torch.randperm(48, generator=torch.Generator().manual_seed(it))[:24]
        loss = F.cross_entropy(model(x[sel])["logits"], y[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_attacks_beat_noise_by_far_on_a_trained_model(trained: nn.Module) -> None:
    xs, pids = _synthetic_ids(6, 6, seed=1)
    q, qp = xs[0::6], pids[0::6]  # one query per identity, the rest is the gallery
    keep = torch.arange(36) % 6 != 0
    bank = GuideBank.from_images(trained, xs[keep], pids[keep], torch.zeros(30, dtype=torch.long))
    qbank = GuideBank.from_images(trained, q, qp, torch.zeros(6, dtype=torch.long), source="query")
    with torch.no_grad():
        f0 = F.normalize(trained.features(q), dim=1)

    def moved(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ((F.normalize(trained.features(y), dim=1) - f0) ** 2).sum(1).mean()

    base = moved(build("noise", trained)(q))
    results = {}
    for name in ("fgsm", "ifgsm", "mifgsm", "ifgsm_seed", "sma", "fna", "odfa", "lta", "lta_star", "pgd"):
        a = build(name, trained)
        bank_for = qbank if a.guide_source_default == "query" else bank
        results[name] = moved(a(q, qp, guides=bank_for)).item()
    assert all(v > 50 * base.item() for v in results.values()), (base.item(), results)
    # guided attacks also move away from their guides: same-identity gallery features
    gal, gmask, _ = bank.same_identity(qp)
    gal = F.normalize(gal, dim=-1)

    def to_guides(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            d = ((F.normalize(trained.features(y), dim=1)[:, None] - gal) ** 2).sum(-1)
        return (d * gmask).sum(1).mean()

    clean = to_guides(q)
    noise_gain = to_guides(build("noise", trained)(q)) - clean
    ifgsm_gain = to_guides(build("ifgsm", trained)(q, qp, guides=bank)) - clean
    assert ifgsm_gain > 20 * noise_gain.abs() and ifgsm_gain > 0.5 * clean


def test_odfa_lowers_cosine_and_the_sign_flip_raises_it(trained: nn.Module) -> None:
    import copy

    model = copy.deepcopy(trained).double()
    x = _synthetic_ids(6, 1, seed=2)[0].double()
    idx = torch.arange(6)
    with torch.no_grad():
        f0 = F.normalize(model.features(x), dim=1)

        def cos(y: torch.Tensor) -> torch.Tensor:
            return (F.normalize(model.features(y), dim=1) * f0).sum(1)

        # one small step from a common random start: first order, so the direction of the change is the sign's
        kw = {"random_start": True, "steps": 1, "alpha": 0.01 / 255}
        toward, away = build("odfa", model, **kw), build("odfa", model, direction="away", **kw)
        cos_start = cos(toward.init_point(x, idx))
        assert (cos(toward(x, index=idx)) < cos_start).all() and (cos(away(x, index=idx)) > cos_start).all()
        # the full attacks: ODFA drives the cosine far down, the sign-flipped one stays near the clean feature
        full_toward = cos(build("odfa", model)(x))
        full_away = cos(build("odfa", model, direction="away", random_start=True)(x))
    assert ((1 - full_toward) > 20 * (1 - cos_start)).all()
    assert ((1 - full_away) < 0.2 * (1 - full_toward)).all()
