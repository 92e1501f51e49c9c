"""Invariants every registered attack must keep: budget, box, steps=0, untouched input, restored modes, no parameter
gradients, float32/float64, and per-sample independence (a sample's result does not depend on its batch-mates)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import attack_extra

from advreid.attacks import GuideBank, build, list_attacks
from advreid.models import build_model

ALL = list_attacks()
# GOAT is a training-time batch attack: in the reference's train mode BatchNorm couples the batch, and its guides are
# the batch's own features (same-identity batch-mates, the furthest batch feature), so by definition a sample's
# result depends on its batch-mates. Every other attack is independent per sample.
PER_SAMPLE = [n for n in ALL if not n.startswith("goat")]
H, W = 64, 32


@pytest.fixture(scope="module")
def model64() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn4", 10, pretrained=False).double().eval()


@pytest.fixture(scope="module")
def data(model64: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, H, W, generator=g, dtype=torch.float64)
    x[:, :, :4] = 0.0  # saturated rows exercise the [0,1] box
    x[:, :, -4:] = 1.0
    gal = torch.rand(12, 3, H, W, generator=g, dtype=torch.float64)
    bank = GuideBank.from_images(model64, gal, torch.arange(12) % 4, torch.arange(12) % 3, source="gallery")
    return {"x": x, "pids": torch.tensor([0, 1, 2]), "camids": torch.tensor([0, 1, 2]), "bank": bank,
            "index": torch.tensor([10, 11, 12])}


def _call(attack, data: dict, x: torch.Tensor, sl: slice = slice(None), bank: GuideBank | None = None):
    return attack(x, data["pids"][sl], data["camids"][sl], guides=data["bank"] if bank is None else bank,
                  index=data["index"][sl])


@pytest.mark.parametrize("name", ALL)
def test_budget_box_untouched_input_and_modes(name: str, model64: torch.nn.Module, data: dict) -> None:
    model = model64
    model.train()
    model.backbone.eval()  # mixed modes must come back exactly as they were
    modes = [m.training for m in model.modules()]
    x = data["x"].clone()
    attack = build(name, model, **attack_extra(name), seed=1)
    y = _call(attack, data, x)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    assert torch.equal(x, data["x"])  # input untouched
    assert y.shape == x.shape and y.dtype == x.dtype and y.data_ptr() != x.data_ptr()
    assert (y - x).abs().max() <= attack.eps + 1e-6
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)  # the attack does something on a random model
    assert all(p.grad is None for p in model.parameters())  # gradients only w.r.t. the input


@pytest.mark.parametrize("name", ALL)
def test_steps_zero_returns_a_copy_of_the_input(name: str, model64: torch.nn.Module, data: dict) -> None:
    attack = build(name, model64, **attack_extra(name), steps=0)
    y = _call(attack, data, data["x"])
    assert torch.equal(y, data["x"]) and y.data_ptr() != data["x"].data_ptr()


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_sample_result_independent_of_batch_mates(name: str, model64: torch.nn.Module, data: dict) -> None:
    extra = attack_extra(name)
    attack = build(name, model64, **extra, seed=5, steps=min(build(name, model64, **extra).steps, 6))
    full = _call(attack, data, data["x"])
    for i in (0, 2):
        alone = _call(attack, data, data["x"][i:i + 1], slice(i, i + 1))
        assert torch.allclose(alone[0], full[i], rtol=0, atol=1e-12), (name, i)
    # same seed + index -> same result; another seed changes the random attacks only
    again = _call(attack, data, data["x"])
    assert torch.equal(again, full)


@pytest.mark.parametrize("name", ["lta", "sma", "ifgsm", "fna", "odfa", "pgd", "noise"])
def test_float32_model_and_inputs_and_no_grad_context(name: str, data: dict) -> None:
    torch.manual_seed(0)
    model = build_model("cnn4", 10, pretrained=False).eval()
    bank = GuideBank(data["bank"].features.float(), data["bank"].pids, data["bank"].camids)
    x = data["x"].float()
    attack = build(name, model, **attack_extra(name), steps=4)
    y = _call(attack, data, x, bank=bank)
    with torch.no_grad():
        y2 = _call(attack, data, x, bank=bank)  # the attack enables gradients itself
    with torch.inference_mode():
        y3 = _call(attack, data, x, bank=bank)
    assert y.dtype == torch.float32 and torch.equal(y, y2) and torch.equal(y, y3)
    assert (y - x).abs().max() <= attack.eps + 1e-6 and not torch.equal(y, x)
    # float64 images through a float32 model: the output keeps the images' dtype
    y64 = _call(attack, data, data["x"], bank=bank)
    assert y64.dtype == torch.float64 and (y64 - data["x"]).abs().max() <= attack.eps + 1e-6


def test_random_attacks_depend_on_seed_and_index(model64: torch.nn.Module, data: dict) -> None:
    for name in ("sma", "lta", "noise"):
        extra = attack_extra(name)
        a0, a1 = build(name, model64, **extra, seed=0, steps=3), build(name, model64, **extra, seed=1, steps=3)
        x = data["x"][:1]
        y0 = a0(x, index=torch.tensor([4]))
        assert not torch.equal(y0, a1(x, index=torch.tensor([4])))
        assert not torch.equal(y0, a0(x, index=torch.tensor([5])))
        assert torch.equal(y0, a0(x, index=torch.tensor([4])))


def test_any_module_mapping_images_to_embeddings_works() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
    x = torch.rand(2, 3, 16, 8)
    y = build("sma", net, steps=3)(x)  # (B,8,2,2) output is flattened to (B,32)
    assert (y - x).abs().max() <= 5 / 255 + 1e-6 and not torch.equal(y, x)
