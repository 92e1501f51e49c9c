"""Tests for the attack API: budgets in pixel units, the registry, presets, params round trip, argument errors."""

from __future__ import annotations

import json

import pytest
import torch

from advreid.attacks import (
    ATTACKS,
    Attack,
    GuideBank,
    build,
    list_attacks,
    parse_eps,
    px,
    register_attack,
    resolve_steps,
)
from advreid.attacks.sma import SMA
from advreid.models import build_model

REQUIRED = {"fgsm", "ifgsm", "mifgsm", "sma", "fna", "fna_pull", "odfa", "lta", "lta_star", "pgd", "noise",
            "ifgsm_seed", "ifgsm_bai"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn4", 10, pretrained=False)


def test_px_and_parse_eps_forms() -> None:
    assert px(5) == 5 / 255
    assert parse_eps(0.0196) == 0.0196
    assert parse_eps("5px") == parse_eps("5/255") == parse_eps(" 5 px ") == 5 / 255
    assert parse_eps("0.5") == 0.5 and parse_eps(1.0) == 1.0 and parse_eps(0) == 0.0


@pytest.mark.parametrize("bad, match", [
    (5, r"eps=5 looks like pixel units.*px\(5\) or '5px' \(= 5/255\)"),
    ("8", r"eps=8 looks like pixel units"),
    ("300px", r"exceeds 1"),
    (-0.1, r"must be >= 0"),
    ("abc", r"not a number"),
    ("1/0", r"not a number"),
    (float("nan"), r"finite"),
])
def test_parse_eps_errors(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_eps(bad)  # type: ignore[arg-type]


def test_parse_eps_names_the_argument_and_rejects_bool() -> None:
    with pytest.raises(ValueError, match="alpha=3 looks like pixel"):
        parse_eps(3, "alpha")
    with pytest.raises(TypeError):
        parse_eps(True)  # type: ignore[arg-type]


def test_step_rules() -> None:
    assert resolve_steps("kurakin", 5 / 255) == 6  # int(min(9, 6.25))
    assert resolve_steps("kurakin", 3 / 255) == 3 and resolve_steps("kurakin_round", 3 / 255) == 4  # 3.75
    assert resolve_steps("kurakin_round", 16 / 255) == 20 and resolve_steps("kurakin", 20 / 255) == 24
    assert resolve_steps(7, 0.1) == 7
    with pytest.raises(ValueError, match="steps=-1"):
        resolve_steps(-1, 0.1)
    with pytest.raises(ValueError, match="steps='many'"):
        resolve_steps("many", 0.1)


def test_registry_names_and_presets(model: torch.nn.Module) -> None:
    names = set(list_attacks())
    assert REQUIRED <= names
    assert ATTACKS.kind == "attack"
    a = build("ifgsm_bai", model, eps="5px")
    assert (a.steps, a.side, a.guide_source_default, a.guide_select) == (6, "gallery", "query", "all")
    assert build("ifgsm_bai", model, eps=px(8)).steps == 10  # int(min(12, 10))
    s = build("ifgsm_seed", model)
    assert (s.steps, s.guide_select, s.guide_source_default, s.momentum, s.side) == (15, "last", "gallery", 0, "query")
    f = build("fgsm", model, eps=px(4))
    assert (f.steps, f.alpha, f.eps) == (1, px(4), px(4))
    m = build("mifgsm", model)
    assert (m.momentum, m.grad_norm) == (1.0, "mean_abs")
    lta, star = build("lta", model), build("lta_star", model)
    assert (lta.momentum, lta.grad_norm, lta.redraw, star.redraw) == (1.0, "mean_abs", True, False)
    assert build("odfa", model).steps == 6 and build("odfa", model, eps=px(16)).steps == 20
    assert build("sma", model).random_start and not build("ifgsm", model).random_start
    assert build("fna", model).guide_source_default == "query" and build("fna_pull", model).push is False
    assert build("pgd", model).needs_guides is False and build("pgd", model, objective="guided").needs_guides
    assert [build(n, model).needs_guides for n in ("sma", "odfa", "lta", "noise")] == [False] * 4
    assert all(build(n, model).needs_guides for n in ("fgsm", "ifgsm", "mifgsm", "fna", "fna_pull", "ifgsm_seed"))


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_params_are_json_and_rebuild_the_same_attack(model: torch.nn.Module, name: str) -> None:
    a = build(name, model, seed=3)
    p = a.params()
    assert p["name"] == name == a.name and p["seed"] == 3
    q = json.loads(json.dumps(p))
    b = build(q.pop("name"), model, **q)
    assert b.params() == p
    assert f"[{name}]" in repr(a)


def test_unknown_name_and_parameter_errors(model: torch.nn.Module) -> None:
    with pytest.raises(KeyError, match="unknown attack 'bim'.*lta"):
        build("bim", model)
    with pytest.raises(TypeError, match="unknown parameter.*'epsilon'.*did you mean 'eps'"):
        build("lta", model, epsilon=0.1)
    with pytest.raises(TypeError, match="'guide_select'"):
        build("sma", model, guide_select="all")  # a metric-attack option on a self-sufficient attack
    with pytest.raises(TypeError, match="nn.Module"):
        build("sma", lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps=5 looks like pixel units"):
        build("ifgsm", model, eps=5)
    with pytest.raises(ValueError, match="distance='l1'"):
        build("sma", model, distance="l1")
    with pytest.raises(ValueError, match="grad_norm='l2'"):
        build("sma", model, grad_norm="l2")
    with pytest.raises(ValueError, match="restarts=3 needs random_start=True"):
        build("pgd", model, restarts=3, random_start=False)


def test_pgd_l2_allows_radius_above_one(model: torch.nn.Module) -> None:
    a = build("pgd", model, norm="l2", eps=2.0, alpha=0.25)
    assert a.eps == 2.0
    with pytest.raises(ValueError, match="looks like pixel units"):
        build("pgd", model, eps=2.0)


def test_guides_required_errors(model: torch.nn.Module) -> None:
    x = torch.rand(2, 3, 64, 32)
    for name in ("ifgsm", "fgsm", "mifgsm", "ifgsm_seed", "fna", "fna_pull"):
        with pytest.raises(ValueError, match=rf"attack '{name}' needs guides.*GuideBank"):
            build(name, model)(x)
    bank = GuideBank(torch.randn(4, 128), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="pass the images' pids"):
        build("ifgsm", model)(x, guides=bank)
    with pytest.raises(ValueError, match="exclude_self=True: pass bank_index"):
        build("ifgsm_bouniot_sg", model)(x, pids=torch.tensor([0, 1]), guides=bank)
    with pytest.raises(ValueError, match="features have D=128 but the reference/guide features have D=7"):
        build("ifgsm", model)(x, pids=torch.tensor([0, 1]), guides=GuideBank(torch.randn(4, 7), [0, 0, 1, 1]))
    with pytest.raises(ValueError, match="pids must be an integer tensor of shape \\(2,\\)"):
        build("ifgsm", model)(x, pids=torch.tensor([0, 1, 1]), guides=bank)


def test_image_validation(model: torch.nn.Module) -> None:
    a = build("sma", model)
    with pytest.raises(ValueError, match="must lie in \\[0,1\\]"):
        a(torch.rand(1, 3, 64, 32) * 2)
    with pytest.raises(ValueError, match="float tensor"):
        a(torch.zeros(1, 3, 64, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float tensor"):
        a([0.5])  # type: ignore[arg-type]


def test_register_custom_attack_preset(model: torch.nn.Module) -> None:
    class Wide(SMA):
        pass

    register_attack("test_wide_sma", Wide, eps=8 / 255, overwrite=True)
    try:
        a = build("test_wide_sma", model)
        assert isinstance(a, Attack) and a.eps == 8 / 255 and a.name == "test_wide_sma"
        assert "test_wide_sma" in list_attacks()
    finally:
        ATTACKS._items.pop("test_wide_sma", None)  # keep the global registry as other tests expect it
    with pytest.raises(TypeError, match="has no parameter"):
        register_attack("test_bad_preset", Wide, bogus=1)
