"""ODFA's first step (issue: the reference's first gradient, at x itself, is rounding noise).

With L2-normalised features d(f(x'), -f(x)) is stationary at x' = x. The default ``start="sign"`` starts one step
away along a +-alpha pattern from the sample's own stream, so the first step is a real gradient step: the same in
float32 and float64, and the same for a sample alone or in a batch.
"""

from __future__ import annotations

import pytest
import torch

from advreid.attacks import build
from advreid.models import build_model

H, W = 64, 32


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("cnn4", 10, pretrained=False).eval()
    x = torch.rand(6, 3, H, W, generator=torch.Generator().manual_seed(1))
    return model, x


def _one_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, **kw) -> torch.Tensor:
    m = build_model("cnn4", 10, pretrained=False).eval()
    m.load_state_dict(model.state_dict())
    atk = build("odfa", m.to(dtype), steps=1, seed=3, **kw)
    return atk(x.to(dtype), index=torch.arange(x.shape[0]))


def test_first_step_agrees_between_float32_and_float64(setup) -> None:
    model, x = setup
    y32 = _one_step(model, x, torch.float32).double()
    y64 = _one_step(model, x, torch.float64)
    # one step of 1px from a +-1px start: the values differ only where a gradient component is ~0
    agree = ((y32 - y64).abs() < 1e-6).double().mean().item()
    assert agree > 0.999, agree
    # the reference start (first gradient at x itself) is rounding noise: float32 and float64 disagree widely
    r32 = _one_step(model, x, torch.float32, start="clean").double()
    r64 = _one_step(model, x, torch.float64, start="clean")
    assert ((r32 - r64).abs() < 1e-6).double().mean().item() < 0.9


def test_batch_and_alone_equal_in_float64(setup) -> None:
    model, x = setup
    m = build_model("cnn4", 10, pretrained=False).eval()
    m.load_state_dict(model.state_dict())
    atk = build("odfa", m.double(), seed=3)
    x64 = x.double()
    full = atk(x64, index=torch.arange(6))
    for i in (0, 4):
        alone = atk(x64[i:i + 1], index=torch.tensor([i]))
        assert torch.allclose(alone[0], full[i], rtol=0, atol=1e-12)
    assert (full - x64).abs().max() <= atk.eps + 1e-12


def test_sign_start_is_within_alpha_and_descends(setup) -> None:
    model, x = setup
    m = build_model("cnn4", 10, pretrained=False).eval()
    m.load_state_dict(model.state_dict())
    atk = build("odfa", m.double(), seed=3)
    x64 = x.double()
    start = atk.init_point(x64, torch.arange(6))
    d = (start - x64).abs()
    assert d.max() <= atk.alpha + 1e-12 and (d > 0).double().mean() > 0.9
    adv = atk(x64, index=torch.arange(6))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(m.features(adv), m.features(x64))
        cos0 = torch.nn.functional.cosine_similarity(m.features(start), m.features(x64))
    assert (cos < cos0 - 0.01).all(), (cos, cos0)  # pushed away from the clean feature, towards -f(x)
    assert atk.params()["start"] == "sign"
    with pytest.raises(ValueError, match="start="):
        build("odfa", m, start="zero")
