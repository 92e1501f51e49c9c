"""EOT in the attack base class, and attacks through passive defenses (BPDA, adaptive vs non-adaptive)."""

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import attack_extra
from torch import nn

from advreid.attacks import build, list_attacks
from advreid.defenses.passive import DefendedModel, build_passive

EPS = 4 / 255


class Net(nn.Module):
    """A small fixed conv net (tanh, no biases, centred input) whose features react to 4/255 perturbations."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.Tanh(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.Tanh(),
            nn.AdaptiveAvgPool2d((4, 2)), nn.Flatten(), nn.Linear(256, 32, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 0.5) * 4)


def images(seed: int = 0, n: int = 6, h: int = 64, w: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 8, w // 8, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def test_every_attack_accepts_eot_samples() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 4, 5))
    for name in list_attacks():
        a = build(name, model, **attack_extra(name), eot_samples=4)
        assert a.eot_samples == 4 and a.params()["eot_samples"] == 4, name
        assert build(name, model, **attack_extra(name)).params()["eot_samples"] == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="eot_samples=.* must be an int >= 1"):
            build("lta", model, eot_samples=bad)


@pytest.mark.parametrize("name", ["pgd", "lta", "sma"])
def test_eot_1_is_bit_identical_and_deterministic_eot_is_a_no_op(name: str) -> None:
    model, x = Net().eval(), images(n=3)
    ref = build(name, model, **attack_extra(name), eps=EPS, steps=4)(x)
    assert torch.equal(build(name, model, **attack_extra(name), eps=EPS, steps=4, eot_samples=1)(x), ref)
    if name == "pgd":  # sign steps, no momentum: the mean of k identical gradients has the same sign
        assert torch.equal(build(name, model, **attack_extra(name), eps=EPS, steps=4, eot_samples=3)(x), ref)


def test_eot_gradient_is_the_mean_of_single_sample_gradients() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 8, 6)).eval()
    dm = DefendedModel(linear, build_passive("rrp", {"scale": (0.6, 1.0)}))
    x = images(n=2, h=16, w=8)
    state = {"ref": torch.randn(2, 6)}
    k = 5
    eot = build("pgd", dm, eot_samples=k)
    one = build("pgd", dm)
    torch.manual_seed(11)
    g = eot.input_grad(x, state)
    torch.manual_seed(11)
    singles = [one.input_grad(x, state) for _ in range(k)]
    assert torch.allclose(g, torch.stack(singles).mean(0), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(singles[0], singles[1])  # the defense really is random per pass
    # hand check for one pass: the gradient of the linear model's loss through the sampled resize-and-pad
    torch.manual_seed(11)
    xr = x.clone().requires_grad_(True)
    f = F.normalize(linear(dm.preprocess(xr)), dim=1)
    (g1,) = torch.autograd.grad((f - state["ref"]).pow(2).mean(-1).sum(), xr)
    assert torch.allclose(g1, singles[0], atol=1e-7)


@pytest.mark.parametrize("name", ["jpeg", "bitdepth", "cs", "cs_pil", "rrp"])
def test_attack_through_a_defense_respects_the_budget(name: str) -> None:
    model, x = Net().eval(), images(n=3)
    dm = DefendedModel(model, build_passive(name))
    torch.manual_seed(0)
    adv = build("pgd", dm, eps=EPS, alpha=1 / 255, steps=3, eot_samples=2 if dm.randomized else 1)(x)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().amax(dim=(1, 2, 3)).min() > EPS / 2  # BPDA/EOT gave a usable gradient to every sample


def _similarity(dm: DefendedModel, x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        torch.manual_seed(1)
        f0 = F.normalize(dm(x), dim=1)
        torch.manual_seed(1)
        return (f0 * F.normalize(dm(adv), dim=1)).sum(1)


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_attack_beats_non_adaptive_through_cs(seed: int) -> None:
    """Observed (seeds 0-3): defended similarity adaptive 0.978-0.986 vs non-adaptive 0.9992-0.9994, every sample."""
    model, x = Net(seed).eval(), images(seed)
    dm = DefendedModel(model, build_passive("cs"))
    adaptive = build("pgd", dm, eps=EPS, alpha=1 / 255, steps=8)(x)
    transfer = build("pgd", model, eps=EPS, alpha=1 / 255, steps=8)(x)
    sa, sn = _similarity(dm, x, adaptive), _similarity(dm, x, transfer)
    assert (sa < sn).all()
    assert sn.mean() - sa.mean() > 0.005
    # CS does blunt the non-adaptive attack: on the bare model the same perturbation moves features far more
    with torch.no_grad():
        bare = (F.normalize(model(x), dim=1) * F.normalize(model(transfer), dim=1)).sum(1)
    assert (bare < sn).all()


def test_adaptive_eot_attack_beats_non_adaptive_through_rrp() -> None:
    """Observed (seeds 0-3): mean defended similarity adaptive+EOT(4) 0.992-0.994 vs non-adaptive 0.995-0.997."""
    model, x = Net(0).eval(), images(0)
    dm = DefendedModel(model, build_passive("rrp"))
    torch.manual_seed(0)
    adaptive = build("pgd", dm, eps=EPS, alpha=1 / 255, steps=8, eot_samples=4)(x)
    transfer = build("pgd", model, eps=EPS, alpha=1 / 255, steps=8)(x)
    assert _similarity(dm, x, adaptive).mean() < _similarity(dm, x, transfer).mean()
