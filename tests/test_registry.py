"""The one factory mechanism: presets with defaults, checked parameters, did-you-mean, one error type."""

from __future__ import annotations

import pytest
import torch

from advreid.attacks import ATTACKS, build
from advreid.defenses import build_passive, build_proactive
from advreid.models import build_model
from advreid.registry import Preset, Registry, RegistryError, param_names


class Base:
    def __init__(self, model, eps: float = 1.0, *, steps: int = 3, **kw) -> None:
        self.model, self.eps, self.steps = model, eps, steps


class Child(Base):
    def __init__(self, model, *args, depth: int = 2, **kw) -> None:
        super().__init__(model, *args, **kw)
        self.depth = depth


class Leaf(Child):
    def __init__(self, model, width: int = 4) -> None:  # no **kwargs: the walk stops here
        super().__init__(model)
        self.width = width


def test_param_names_walk_the_mro_while_kwargs_are_forwarded() -> None:
    assert param_names(Child, skip=1) == {"depth", "eps", "steps"}
    assert param_names(Leaf, skip=1) == {"width"}
    assert param_names(lambda a, b=1, *, c=2: None) == {"a", "b", "c"}


def test_preset_defaults_overrides_and_unknown_parameters() -> None:
    reg: Registry[Preset] = Registry("widget")
    reg.add_preset("deep", Child, skip=1, depth=7)
    w = reg.build("DEEP", "m", eps=0.5)  # names are case-insensitive
    assert (w.model, w.eps, w.steps, w.depth, w.name) == ("m", 0.5, 3, 7, "deep")
    with pytest.raises(RegistryError, match=r"widget 'deep': unknown parameter\(s\) 'stepz' \(did you mean "
                                            r"'steps'\?\); allowed: \['depth', 'eps', 'steps'\]"):
        reg.build("deep", "m", stepz=1)
    with pytest.raises(RegistryError, match=r"unknown widget 'deap' \(did you mean 'deep'\?\); expected one of: deep"):
        reg.get("deap")
    with pytest.raises(RegistryError, match="has no parameter"):
        reg.add_preset("bad", Leaf, skip=1, depth=1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add_preset("deep", Child, skip=1)
    reg.add_preset("deep", Child, skip=1, overwrite=True)
    assert reg.build("deep", "m").depth == 2


def test_one_error_type_for_every_registry() -> None:
    """Attacks, passive and proactive defenses and models raise the same RegistryError, which is also a KeyError,
    a ValueError and a TypeError (callers written against any of them keep working); its text is the message."""
    model = build_model("cnn4", 3)
    errors = []
    for fn in (lambda: build("lat", model), lambda: build("lta", model, epz=1),
               lambda: build_passive("cs", {"jiter": 0.1}), lambda: build_passive("csx"),
               lambda: build_proactive("referense"), lambda: build_model("cnn5", 3),
               lambda: build_model("cnn4", 3, poolng="avg")):
        with pytest.raises(RegistryError) as info:
            fn()
        errors.append(info.value)
    assert all(isinstance(e, KeyError) and isinstance(e, ValueError) and isinstance(e, TypeError) for e in errors)
    assert str(errors[0]).startswith("unknown attack 'lat' (did you mean 'lta'?)")
    assert "did you mean 'eps'" in str(errors[1])
    assert "did you mean 'cs'" in str(errors[3])
    assert "did you mean 'reference'" in str(errors[4])
    assert "did you mean 'cnn4'" in str(errors[5]) and "did you mean 'pooling'" in str(errors[6])


def test_a_user_registers_an_attack_from_outside() -> None:
    from advreid.attacks import Attack, register_attack

    class Shift(Attack):
        def setup(self, x0, inp):
            return {"ref": self.features(x0)}

        def loss(self, feats, state):
            return self.dist(feats, state["ref"])

    register_attack("test_shift", Shift, steps=2, random_start=True)
    try:
        atk = build("test_shift", build_model("cnn4", 3).eval())
        assert atk.steps == 2 and atk.random_start and atk.name == "test_shift"
        x = torch.rand(2, 3, 32, 16)
        assert (atk(x) - x).abs().max() <= atk.eps + 1e-6
    finally:
        ATTACKS.unregister("test_shift")
    assert "test_shift" not in ATTACKS


def test_attack_spec_checks_names_and_takes_l2_radii_above_one() -> None:
    from advreid.evaluation import AttackSpec

    assert AttackSpec("pgd", eps=2.0, params={"norm": "l2"}).eps == 2.0
    assert AttackSpec("pgd", eps=2.0, params={"norm": "l2"}).label().startswith("pgd(eps=2, ")
    with pytest.raises(ValueError, match="pixel units"):
        AttackSpec("pgd", eps=2.0)
    with pytest.raises(RegistryError, match="did you mean 'lta'"):
        AttackSpec("ltaa")
    with pytest.raises(RegistryError, match="did you mean 'momentum'"):
        AttackSpec("mifgsm", params={"momentun": 1.0})
    with pytest.raises(ValueError, match="AttackSpec.side"):
        AttackSpec("lta", params={"side": "gallery"})
    assert AttackSpec("lta", eps="5px", quantize="floor", reencode="jpeg:75").label() == \
        "lta(eps=5px, quantize=floor, reencode=jpeg:75)"
