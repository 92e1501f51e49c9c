"""Randomised defenses under EOT draw each sample's randomness from its own stream (seed, index, step, draw): an
adaptive attack through RRP or jittered CS gives the same result for a sample alone or in a batch (float64)."""

from __future__ import annotations

import pytest
import torch

from advreid.attacks import build
from advreid.defenses import DefendedModel, build_passive
from advreid.models import build_model


@pytest.fixture(scope="module")
def model64() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn4", 10, pretrained=False).double().eval()


@pytest.mark.parametrize("defense", ["rrp", "cs_random"])
@pytest.mark.parametrize("attack", ["lta", "sma", "odfa"])
def test_eot_through_a_random_defense_is_batch_independent(model64, defense, attack) -> None:
    x = torch.rand(4, 3, 64, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dm = DefendedModel(model64, build_passive(defense))
    atk = build(attack, dm, steps=3, eot_samples=2, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    full = atk(x, index=torch.arange(10, 14))
    torch.manual_seed(999)
    for i in (0, 3):
        alone = atk(x[i:i + 1], index=torch.tensor([10 + i]))
        assert torch.allclose(alone[0], full[i], rtol=0, atol=1e-12), (attack, defense, i)
    assert dm.preprocess.streams is None  # the streams are only used during the attack
    other = build(attack, dm, steps=3, eot_samples=2, seed=8)(x, index=torch.arange(10, 14))
    assert not torch.equal(other, full)  # another seed: other draws


def test_preprocess_streams_are_per_sample() -> None:
    rrp = build_passive("rrp")
    x = torch.rand(3, 3, 32, 16, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    rrp.set_streams(gens)
    both = rrp(x)
    rrp.set_streams([torch.Generator().manual_seed(2)])
    assert torch.equal(rrp(x[1:2])[0], both[1])
    rrp.set_streams([torch.Generator().manual_seed(2)])
    with pytest.raises(ValueError, match="1 random streams for 3 images"):
        rrp(x)
    rrp.set_streams(None)
    torch.manual_seed(0)
    a = rrp(x)
    torch.manual_seed(0)
    assert torch.equal(rrp(x), a)  # without streams: the global RNG, as before
