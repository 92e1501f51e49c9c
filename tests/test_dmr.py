"""DMR (Deep Mis-Ranking): budget/clamp, losses on hand-built cases, mask head, MS-SSIM against a float64 reference,
network shapes, the attack's per-sample independence, and a tiny end-to-end train / resume / validation choice."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.torch import load_file
from tests.conftest import tiny_overrides

import advreid.attacks.dmr  # noqa: F401 -- registers "dmr"
from advreid.attacks import build, px
from advreid.attacks.dmr import (
    Discriminator,
    DMRNets,
    Generator,
    apply_delta,
    auto_win_size,
    bound_delta,
    build_nets,
    least_likely_ce,
    load_dmr_config,
    load_generator,
    misranking_loss,
    msssim,
    split_validation,
    ssim,
    topk_mask,
    train_dmr,
)
from advreid.config import ConfigError
from advreid.data import ImageDataset, build_dataset, build_transforms
from advreid.models import build_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny convolutions run several times faster than with 2 on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _nets(init="normal", temperature=-1, center="zero", seed=0, ngf=4, ndf=4, dtype=torch.float64):
    torch.manual_seed(seed)
    g = Generator(ngf, 1, init=init)
    d = Discriminator(ndf, temperature=temperature, init=init)
    return DMRNets(g, d, center).to(dtype).eval()


# ------------------------------------------------------------------------------------------ budget, clamp


@pytest.mark.parametrize("init", ["normal", "reference"])
@pytest.mark.parametrize("center", ["zero", "reference"])
def test_outputs_within_eps_and_valid_pixels(init, center):
    x = torch.rand(3, 3, 32, 16, dtype=torch.float64)
    x[0, :, :4] = 0.0
    x[1, :, :4] = 1.0  # saturated pixels: the [0,1] clip must act
    for seed in range(2):
        nets = _nets(init, center=center, seed=seed)
        for eps in (px(1), px(4), px(16), 0.3):
            delta = nets.candidate(x, eps)
            peak = delta.abs().amax(dim=(-2, -1))
            assert (peak <= eps * (1 + 1e-12)).all()
            adv = nets.perturb(x, eps)
            assert (adv - x).abs().max() <= eps + 1e-12
            assert adv.min() >= 0 and adv.max() <= 1
            assert not torch.equal(adv, x)


def test_bound_delta_scales_each_image_and_channel_to_eps():
    raw = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    raw[0, 0, 0, 0], raw[0, 1, 1, 1], raw[1, 2, 2, 2] = 0.5, -1.0, 0.01  # 0.01 < eps: left unscaled
    raw[0, 0, 3, 3] = 0.25
    d = bound_delta(raw, 0.1)
    assert d[0, 0, 0, 0] == pytest.approx(0.1) and d[0, 0, 3, 3] == pytest.approx(0.05)
    assert d[0, 1, 1, 1] == pytest.approx(-0.1) and d[1, 2, 2, 2] == pytest.approx(0.01)
    assert d[0, 2].abs().max() == 0
    # the reference centring: (raw+1)/2 - ImageNet mean, then the same bound
    r = bound_delta(torch.full((1, 3, 2, 2), 1.0, dtype=torch.float64), 1.0, "reference")
    assert torch.allclose(r[0, :, 0, 0], torch.tensor([0.515, 0.544, 0.594], dtype=torch.float64))
    # mask: no change outside it; the clip to [0,1] is a real clamp
    x = torch.tensor([[[[0.0, 0.98]]]], dtype=torch.float64).expand(1, 3, 1, 2)
    out = apply_delta(x, torch.full_like(x, 0.05), 0.05, mask=torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64))
    assert torch.equal(out[..., 0], x[..., 0]) and torch.equal(out[..., 1], torch.ones_like(out[..., 1]))


# ------------------------------------------------------------------------------------------------- losses


def test_misranking_loss_hand_computed():
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1])
    m = 0.3
    # fixed: nearest *other* positive, farthest negative
    terms = [10 - 3 + m, math.sqrt(73) - 3 + m, max(0.0, 5 - math.sqrt(52) + m), 10 - math.sqrt(52) + m]
    assert misranking_loss(f, pids, m).item() == pytest.approx(math.log(sum(terms) / 4), abs=1e-12)
    # reference quirk: the anchor is its own positive at distance sqrt(1e-12) = 1e-6
    terms = [10 + m - 1e-6, math.sqrt(73) + m - 1e-6, 5 + m - 1e-6, 10 + m - 1e-6]
    assert misranking_loss(f, pids, m, self_positive=True).item() == pytest.approx(math.log(sum(terms) / 4),
                                                                                   abs=1e-12)
    # an identity seen once has no positive: left out of the mean (fixed mode)
    f5 = torch.cat([f, torch.tensor([[100.0, 0.0]], dtype=torch.float64)])
    p5 = torch.tensor([0, 0, 1, 1, 2])
    terms = [math.sqrt(100**2) - 3 + m, math.sqrt(97**2) - 3 + m, max(0.0, math.sqrt(100**2 + 16) - math.sqrt(52) + m),
             math.sqrt(94**2 + 64) - math.sqrt(52) + m]
    assert misranking_loss(f5, p5, m).item() == pytest.approx(math.log(sum(terms) / 4), abs=1e-12)
    # minimising it pulls the farthest negative of anchor 0 (sample 3) towards it
    g = f.clone().requires_grad_(True)
    misranking_loss(g, pids, m).backward()
    assert g.grad[3, 1] > 0 and g.grad[3, 0] > 0


def test_least_likely_ce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 3.0, 1.0, -2.0]], dtype=torch.float64)
    pids = torch.tensor([0, 1])

    def ce(row, target):  # smoothing 0.1 over classes 2, 3 (not the batch's IDs), 1/(C-1) = 1/3 each
        lse = math.log(sum(math.exp(v) for v in row))
        q = [0.0, 0.0, 0.1 / 3, 0.1 / 3]
        q[target] += 0.9
        return -sum(qc * (v - lse) for qc, v in zip(q, row, strict=True))

    expected = math.log((ce(logits[0].tolist(), 2) + ce(logits[1].tolist(), 3)) / 2)
    assert least_likely_ce(logits, pids, 0.1).item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="class indices"):
        least_likely_ce(logits, torch.tensor([0, 7]))


# Transcription of the reference's losses (whj363636/Adversarial-attack-on-Person-ReID-With-Deep-Mis-Ranking,
# advloss.py: adv_TripletLoss with ak_type=-1, adv_CrossEntropyLabelSmooth, adv_CrossEntropyLoss), kept line for line
# so advreid's losses can be matched to it value for value. Only the device moves (.cuda()) are dropped and the
# deprecated ``addmm_(1, -2, a, b)`` is written with keywords; tensors created without a dtype follow torch's default
# dtype, which the test sets to float64.
def _ref_adv_triplet(features, pids, margin=0.3):
    n = features.size(0)
    dist = torch.pow(features, 2).sum(dim=1, keepdim=True).expand(n, n)
    dist = dist + dist.t()
    dist.addmm_(features, features.t(), beta=1, alpha=-2)
    dist = dist.clamp(min=1e-12).sqrt()  # for numerical stability
    mask = pids.expand(n, n).eq(pids.expand(n, n).t())
    dist_ap, dist_an = [], []
    for i in range(n):
        dist_an.append(dist[i][mask[i]].min().unsqueeze(0))  # make nearest pos-pos far away
        dist_ap.append(dist[i][mask[i] == 0].max().unsqueeze(0))  # make hardest pos-neg closer
    dist_ap = torch.cat(dist_ap)
    dist_an = torch.cat(dist_an)
    y = torch.ones_like(dist_an)
    loss = torch.nn.MarginRankingLoss(margin=margin)(dist_an, dist_ap, y)
    return torch.log(loss)


def _ref_adv_xent_label_smooth(logits, pids, num_classes, epsilon=0.1):
    _, adv_target = torch.min(logits, 1)
    log_probs = torch.nn.LogSoftmax(dim=1)(logits)
    adv_target = torch.zeros(log_probs.size()).scatter_(1, adv_target.unsqueeze(1).data.cpu(), 1)
    smooth = torch.ones(log_probs.size()) / (num_classes - 1)
    smooth[:, pids.data.cpu()] = 0  # Pytorch1.0
    adv_target = (1 - epsilon) * adv_target + epsilon * smooth
    loss = (- adv_target * log_probs).mean(0).sum()
    return torch.log(loss)


def _ref_adv_xent(logits, pids):
    _, adv_target = torch.min(logits, 1)
    loss = torch.nn.CrossEntropyLoss()(logits, adv_target)
    return torch.log(loss)


def test_losses_match_the_reference_value_for_value():
    """One fixed P x K batch (float64): the mis-ranking loss with ``self_positive=True`` and the least-likely CE equal
    the reference's values and gradients; the default (anchor not its own positive) is a different, smaller loss."""
    gen = torch.Generator().manual_seed(20200614)
    feats = torch.randn(8, 16, generator=gen, dtype=torch.float64) * 3
    logits = torch.randn(8, 12, generator=gen, dtype=torch.float64) * 4
    pids = torch.tensor([3, 3, 7, 7, 0, 0, 11, 11])  # P=4 identities x K=2, training labels of 12 classes
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for margin in (0.3, 5.0):
            f1, f2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
            ref, ours = _ref_adv_triplet(f1, pids, margin), misranking_loss(f2, pids, margin, self_positive=True)
            ref.backward()
            ours.backward()
            assert abs(ours.item() - ref.item()) < 1e-10 and torch.allclose(f1.grad, f2.grad, rtol=0, atol=1e-10)
            assert misranking_loss(feats, pids, margin).item() < ref.item() - 0.05  # the anchor's own 0 is no positive
        for smoothing in (0.1, 0.0, 0.5):
            l1, l2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            ref = _ref_adv_xent_label_smooth(l1, pids, 12, smoothing)
            ours = least_likely_ce(l2, pids, smoothing)
            ref.backward()
            ours.backward()
            assert abs(ours.item() - ref.item()) < 1e-10 and torch.allclose(l1.grad, l2.grad, rtol=0, atol=1e-10)
        assert abs(least_likely_ce(logits, pids, 0.0).item() - _ref_adv_xent(logits, pids).item()) < 1e-10
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------- mask head


def test_mask_head_keeps_exactly_k_pixels():
    logits = torch.randn(3, 200, dtype=torch.float64)
    logits[0, :10] = 5.0  # ties at the top
    for k in (1, 7, 50):
        hard = topk_mask(logits, k)
        assert torch.equal(hard.sum(1), torch.full((3,), float(k), dtype=torch.float64))
        assert set(hard.unique().tolist()) <= {0.0, 1.0}
        req = logits.clone().requires_grad_(True)
        soft = topk_mask(req, k, gumbel=True, generator=torch.Generator().manual_seed(k))
        assert torch.equal((soft != 0).sum(1), torch.full((3,), k))
        assert torch.allclose(soft, (soft > 0.5).double(), atol=1e-12)
        (soft * torch.arange(200.0, dtype=torch.float64)).sum().backward()
        assert req.grad.abs().sum() > 0  # straight-through: the soft path carries a gradient
    nets = _nets(temperature=37)
    m = nets.discriminator.mask(torch.rand(2, 3, 64, 32, dtype=torch.float64), torch.rand(2, 3, 64, 32,
                                                                                           dtype=torch.float64))
    assert m.shape == (2, 1, 64, 32) and torch.equal(m.sum((1, 2, 3)), torch.full((2,), 37.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        Discriminator(4, temperature=0)


# -------------------------------------------------------------------------------------------------- MS-SSIM


def _ref_components(x, y, win, sigma=1.5, c1=1e-4, c2=9e-4):
    """Slow float64 numpy reference: explicit windows, per-image per-channel (ssim, cs) means."""
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    b, c = x.shape[:2]
    s, cs = np.zeros((b, c)), np.zeros((b, c))
    for i in range(b):
        for j in range(c):
            wx, wy = sliding_window_view(x[i, j], (win, win)), sliding_window_view(y[i, j], (win, win))
            mx, my = np.einsum("abkl,kl->ab", wx, w2), np.einsum("abkl,kl->ab", wy, w2)
            vx = np.einsum("abkl,kl->ab", (wx - mx[..., None, None]) ** 2, w2)
            vy = np.einsum("abkl,kl->ab", (wy - my[..., None, None]) ** 2, w2)
            cxy = np.einsum("abkl,kl->ab", (wx - mx[..., None, None]) * (wy - my[..., None, None]), w2)
            cmap = (2 * cxy + c2) / (vx + vy + c2)
            s[i, j] = ((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cmap).mean()
            cs[i, j] = cmap.mean()
    return s, cs


def _ref_msssim(x, y, win, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    out = np.ones(x.shape[:2])
    for lev, w in enumerate(weights):
        s, cs = _ref_components(x, y, win)
        if lev == len(weights) - 1:
            out *= s**w
        else:
            out *= cs**w
            h, wd = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
            x = x[:, :, :h, :wd].reshape(*x.shape[:2], h // 2, 2, wd // 2, 2).mean((3, 5))
            y = y[:, :, :h, :wd].reshape(*y.shape[:2], h // 2, 2, wd // 2, 2).mean((3, 5))
    return out.mean(1)


@pytest.mark.parametrize("size", [(256, 128), (128, 64)])
def test_msssim_matches_reference_and_window_rule(size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *size, generator=g, dtype=torch.float64)
    y = (x + 0.08 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    win = auto_win_size(*size)
    assert win == {256: 7, 128: 3}[size[0]]
    ref = _ref_msssim(x.numpy(), y.numpy(), win)
    assert np.allclose(msssim(x, y).numpy(), ref, rtol=0, atol=1e-12)
    if size[0] == 128:  # single-scale SSIM with the standard 11x11 window
        s_ref, _ = _ref_components(x.numpy(), y.numpy(), 11)
        assert np.allclose(ssim(x, y, win_size=11).numpy(), s_ref.mean(1), rtol=0, atol=1e-12)


def test_msssim_identity_monotone_and_small_images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 128, 64, generator=g, dtype=torch.float64)
    assert msssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    vals = [msssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.005, 0.02, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(vals, vals[1:], strict=False)) and vals[-1] < 0.8
    with pytest.raises(ValueError, match="too small"):
        auto_win_size(64, 32, levels=5)
    assert auto_win_size(64, 32, levels=3) == 7


# ----------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("size", [(256, 128), (128, 64)])
def test_network_shapes(size):
    h, w = size
    nets = _nets(temperature=100, ngf=4, ndf=4, dtype=torch.float32)
    x = torch.rand(2, 3, h, w)
    raw = nets.generator(x)
    assert raw.shape == x.shape and raw.abs().max() <= 1
    preds = nets.discriminator(torch.cat([x, x], 1))
    assert [tuple(p.shape) for p in preds] == [(2, 1, h // 8, w // 8), (2, 1, h // 16, w // 16),
                                               (2, 1, h // 32, w // 32)]
    assert nets.discriminator.mask(x, x).shape == (2, 1, h, w)
    patch = Discriminator(4, num_scales=1, spectral=False)
    assert [tuple(p.shape) for p in patch(torch.cat([x, x], 1))] == [(2, 1, h // 8, w // 8)]
    if size == (256, 128):  # the real generator (ngf 32, 6 blocks) at full size
        assert Generator().eval()(x[:1]).shape == (1, 3, 256, 128)


# ------------------------------------------------------------------------------------------------- attack


def test_attack_is_per_sample_independent_and_bounded():
    model = build_model("cnn4", 5).eval()
    nets = _nets(temperature=50)
    atk = build("dmr", model, generator=nets, eps="16px")
    assert atk.eps == px(16) and atk.params()["generator_sha256"] == atk.generator_sha256
    x = torch.rand(5, 3, 64, 32, dtype=torch.float64)
    batch = atk(x)
    singles = torch.cat([atk(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(batch, singles, rtol=0, atol=1e-12)
    assert (batch - x).abs().max() <= px(16) + 1e-12 and batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(atk(x[:2]), atk(x[:2]))  # deterministic (eval mode, noiseless mask)
    out32 = atk(x.float())  # float32 images through float64 networks: the caller's dtype comes back
    assert out32.dtype == torch.float32 and (out32 - x.float()).abs().max() <= px(16) + 1e-6
    with pytest.raises(ValueError, match="does not match"):
        build("dmr", model, generator=nets, generator_sha256="0" * 64)
    assert torch.equal(build("dmr", model, generator=nets, steps=3)(x), batch)  # single shot whatever steps says
    zero = build("dmr", model, generator=nets, steps=0)(x)
    assert torch.equal(zero, x) and zero.data_ptr() != x.data_ptr()
    with pytest.raises(TypeError, match="alpha"):
        build("dmr", model, generator=nets, alpha="1px")


# ------------------------------------------------------------------------------------------------- config


def test_config_presets_and_errors():
    tiny, market = load_dmr_config("dmr_tiny"), load_dmr_config("dmr_market")
    assert tiny["generator"]["ngf"] == 8 and tiny["device"] == "cpu" and tiny["perturb"]["eps"] == px(16)
    assert tiny["train"]["epochs"] == 6 and tiny["data"]["train_scale"] == 0.5 and market["data"]["train_scale"] == 1
    assert market["generator"]["ngf"] == 32 and market["train"]["epochs"] == 50
    assert market["sampler"]["p"] * market["sampler"]["k"] == 32 and market["sampler"]["k"] == 4
    assert (market["data"]["height"], market["data"]["width"]) == (256, 128)
    with pytest.raises(ConfigError, match="did you mean"):
        load_dmr_config("dmr_tiny", ["generator.ngff=4"])
    with pytest.raises(ConfigError, match="too small"):
        load_dmr_config("dmr_tiny", ["data.height=64", "data.width=32", "loss.ssim_levels=5"])
    with pytest.raises(ConfigError, match="patch"):
        load_dmr_config("dmr_tiny", ["discriminator.type=patch", "discriminator.temperature=10"])


def test_training_size_follows_the_victim_unless_set():
    """dmr_tiny leaves data.height/width null: the victim checkpoint's input_size fills them; explicit sizes stay."""
    from types import SimpleNamespace

    from advreid.attacks.dmr.training import resolve_input_size, train_size

    victim = SimpleNamespace(checkpoint_meta={"meta": {"input_size": [128, 64]}})
    cfg = load_dmr_config("dmr_tiny")
    assert (cfg["data"]["height"], cfg["data"]["width"]) == (None, None)
    resolve_input_size(cfg, victim)
    assert (cfg["data"]["height"], cfg["data"]["width"]) == (128, 64) and train_size(cfg) == (64, 32)
    cfg = load_dmr_config("dmr_tiny", ["data.train_scale=1"])
    resolve_input_size(cfg, victim)
    assert train_size(cfg) == (128, 64)
    cfg = load_dmr_config("dmr_tiny", ["data.height=96"])
    resolve_input_size(cfg, victim)
    assert (cfg["data"]["height"], cfg["data"]["width"]) == (96, 64)
    cfg = load_dmr_config("dmr_tiny", ["data.height=64", "data.width=32"])
    resolve_input_size(cfg, SimpleNamespace(checkpoint_meta={}))  # both set: the victim is not asked
    assert (cfg["data"]["height"], cfg["data"]["width"]) == (64, 32)
    with pytest.raises(ValueError, match="no input_size; set data.height and data.width"):
        resolve_input_size(load_dmr_config("dmr_tiny"), SimpleNamespace(checkpoint_meta={"meta": {}}))
    with pytest.raises(ConfigError, match="ssim_levels=4 at the training size 32x16"):
        resolve_input_size(load_dmr_config("dmr_tiny", ["loss.ssim_levels=4"]),
                           SimpleNamespace(checkpoint_meta={"meta": {"input_size": [64, 32]}}))
    with pytest.raises(ConfigError, match="data.width"):
        load_dmr_config("dmr_tiny", ["data.width=0"])
    with pytest.raises(ConfigError, match="data.train_scale"):
        load_dmr_config("dmr_tiny", ["data.train_scale=1.5"])


# -------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def victim_run(synth_root, tmp_path_factory):
    from advreid.experiments import train

    run = tmp_path_factory.mktemp("dmr_victim") / "victim"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1))
    return run


def test_train_resume_and_validation_choice(synth_root, victim_run, tmp_path):
    ov = ["train.progress=false", "train.epochs=2"]  # dmr_tiny's 6 epochs are for real victims; 2 keep this short
    a = train_dmr(victim_run, synth_root, tmp_path / "a", config="dmr_tiny", overrides=ov)
    with pytest.raises(FileExistsError):
        train_dmr(victim_run, synth_root, tmp_path / "a", config="dmr_tiny", overrides=ov)
    train_dmr(victim_run, synth_root, tmp_path / "b", config="dmr_tiny", overrides=ov + ["train.epochs=1"])
    b = train_dmr(None, None, tmp_path / "b", resume=True, overrides=["train.epochs=2"])
    la, lb = load_file(a / "checkpoints" / "last.safetensors"), load_file(b / "checkpoints" / "last.safetensors")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)  # bit-identical resume

    res = json.loads((a / "results.json").read_text())
    saved = load_dmr_config(a / "config.yaml")["data"]  # validated at the victim's input size, trained at half of it
    assert (saved["height"], saved["width"], saved["train_scale"]) == (64, 32, 0.5)
    hist = [h["val_mAP"] for h in res["history"]]
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert res["best"]["epoch"] == 1 + int(np.argmin(hist)) and res["best"]["val_mAP"] == min(hist)
    # validation identities are training identities, never test (query/gallery) ones, and left out of training
    ds = build_dataset("market1501", synth_root)
    train_pids = {int(Path(r.path).name.split("_")[0]) for r in ds.train}
    test_pids = {r.pid for r in ds.query + ds.gallery}
    assert res["val_pids"] and set(res["val_pids"]) <= train_pids and not set(res["val_pids"]) & test_pids
    split = split_validation(ds.train, 0.25, 0)
    assert split.labels == res["val_labels"] and not {r.pid for r in split.train} & set(split.labels)

    # the recorded best mAP is the victim's mAP on the validation split under the kept generator
    from advreid.evaluation import evaluate_features
    from advreid.models import find_checkpoint, load_checkpoint

    victim = load_checkpoint(find_checkpoint(victim_run))
    nets = load_generator(a)
    assert nets.victim["run"] == str(Path(victim_run).resolve())
    tf = build_transforms(64, 32, is_train=False)

    def feats(records, attack):
        x = torch.stack([ImageDataset(records, tf)[i][0] for i in range(len(records))])
        with torch.no_grad():
            return victim.features(nets.perturb(x, px(16)) if attack else x)

    pid = lambda rs: np.array([r.pid for r in rs])  # noqa: E731
    cam = lambda rs: np.array([r.camid for r in rs])  # noqa: E731
    q, g = split.query, split.gallery
    m = evaluate_features(feats(q, True), pid(q), cam(q), feats(g, False), pid(g), cam(g), metric="cosine",
                          max_rank=10)
    assert m["mAP"] == pytest.approx(res["best"]["val_mAP"], abs=1e-5)

    atk = build("dmr", victim, generator=a)
    p = atk.params()
    assert p["victim"] == str(Path(victim_run).resolve()) and p["generator"].endswith("best")
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(build(p.pop("name"), victim, **p)(x), atk(x))  # params() rebuilds the same attack


def test_mask_head_training_and_patch_discriminator(synth_root, victim_run, tmp_path):
    ov = ["train.progress=false", "train.epochs=1", "train.max_iters_per_epoch=2"]
    out = train_dmr(victim_run, synth_root, tmp_path / "mask", config="dmr_tiny",
                    overrides=ov + ["discriminator.temperature=300", "discriminator.use_gumbel=true"])
    nets = load_generator(out)
    init = build_nets(load_dmr_config("dmr_tiny", ["discriminator.temperature=300"]))
    trained, fresh = nets.discriminator.mask_head.state_dict(), init.discriminator.mask_head.state_dict()
    assert not torch.equal(trained["tau"], fresh["tau"])  # optimised with the generator (straight-through Gumbel)
    x = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    changed = ((build("dmr", build_model("cnn4", 5), generator=out)(x) - x).abs().amax(1) > 0).sum((1, 2))
    assert (changed <= 300).all() and (changed > 0).all()  # only the mask's top-k pixels move
    patch = train_dmr(victim_run, synth_root, tmp_path / "patch", config="dmr_tiny",
                      overrides=ov + ["discriminator.type=patch"])
    assert len(load_generator(patch).discriminator.scales) == 1


def test_a_failed_start_leaves_nothing_and_the_retry_runs(synth_root, victim_run, tmp_path):
    """Data the victim cannot have been trained on is refused before the output folder exists."""
    out = tmp_path / "gen"
    with pytest.raises(FileNotFoundError, match="cannot find the dataset"):
        train_dmr(victim_run, tmp_path / "nope", out, config="dmr_tiny", overrides=["train.progress=false"])
    assert not out.exists()
    train_dmr(victim_run, synth_root, out, config="dmr_tiny", overrides=["train.progress=false", "train.epochs=1"])
    assert (out / "results.json").is_file()
