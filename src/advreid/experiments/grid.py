"""Benchmark grids on the one config system: the schema, validation of every name against its registry before
anything is trained, and the enumeration of cells (model x dataset x defense x attack x threat model).

A bench config (YAML in ``configs/bench`` or a file, ``_base_`` inheritance, ``KEY=VALUE`` overrides) has free-form
sections ``datasets``, ``models``, ``defenses``, ``attacks`` (user keys -> specs), the ``grid`` (blocks naming those
keys) and ``tables``. Without a passive defense both threat models are the same white-box attack, one cell.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advreid.config import ConfigError, load_config, preset_dir
from advreid.registry import did_you_mean

__all__ = ["BENCH_SCHEMA", "BENCH_THREATS", "Cell", "attack_spec", "bench_dir", "cell_key", "cells",
           "list_bench_presets", "load_bench_config", "spec_of"]

BENCH_THREATS = ("non_adaptive", "adaptive")
SETTINGS: dict[str, Any] = {
    "rerank": True, "max_images": None, "batch_size": 32, "eot_samples": 10, "side": "query", "quantize": None,
    "reencode": None, "num_workers": 2, "progress": True, "save_features": True, "report": True,
}
BENCH_SCHEMA: dict[str, Any] = {
    "name": None, "description": None, "seed": 0, "device": "auto", "datasets": None, "models": None,
    "defenses": None, "attacks": None, "settings": SETTINGS, "grid": None, "tables": None, "ranklist": None,
    "report": None,
}
_ATTACK_KEYS = {"name", "eps", "alpha", "steps", "params", "quantize", "reencode", "label", "source", "generator"}
_GENERATOR_KEYS = {"model", "config", "overrides"}
_MODEL_KEYS = {"run", "config", "train_on", "overrides", "source", "init"}
# a model given as a spec (KIND:NAME[@WEIGHTS], loaded, not trained) and its model card, inline or as a file
SPEC_CARD_KEYS = ("input_size", "norm", "mean", "std", "feature_layer", "metric", "flip", "normalize")
_SPEC_MODEL_KEYS = {"spec", "card", "train_on", *SPEC_CARD_KEYS}
_DATASET_KEYS = {"name", "root", "synthetic", "resampled"}
_TABLE_KEYS = {"name", "title", "kind", "dataset", "datasets", "rows", "columns", "threats", "rerank", "per_identity",
               "note"}
_BLOCK_KEYS = {"models", "datasets", "defenses", "attacks", "threats"}
SYNTH_KEYS = {"ids": "num_train_ids", "test_ids": "num_test_ids", "cams": "num_cams", "height": "height",
              "width": "width", "seed": "seed", "distractors": "num_distractors", "junk": "num_junk",
              "imbalance": "imbalance", "camera_bias": "camera_bias"}

Cell = tuple[str, str, str, str, str]  # (model, dataset, defense, attack, threat)


def bench_dir() -> Path:
    """Folder of the shipped benchmark presets (``configs/bench``)."""
    return preset_dir() / "bench"


def list_bench_presets() -> list[str]:
    return sorted(p.stem for p in bench_dir().glob("*.yaml"))


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"bench config {where}: {msg}")


def load_bench_config(source: str | Path | dict, overrides: Sequence[str] | None = None) -> dict:
    """A bench config (file, preset name in ``configs/bench`` or dict) with ``KEY=VALUE`` overrides, validated:
    structure, and every dataset parser, model config, passive defense and attack (with its parameters) checked
    against its registry, so a typo fails before anything is trained."""
    where = "<dict>" if isinstance(source, dict) else str(source)
    cfg = load_config(copy.deepcopy(source) if isinstance(source, dict) else source, list(overrides or []),
                      schema=BENCH_SCHEMA, folder=bench_dir())
    if not isinstance(source, dict) and cfg.get("name") is None:
        cfg["name"] = Path(str(source)).stem
    cfg["name"] = cfg.get("name") or "bench"
    cfg["defenses"] = cfg.get("defenses") or {"none": None}
    _validate_structure(cfg, where)
    _validate_names(cfg, where)
    return cfg


def _unknown(keys: set, allowed: set, at: str, where: str) -> None:
    for k in sorted(keys - allowed):
        raise _err(where, f"unknown key {at}{k!r}{did_you_mean(k, allowed)}; valid: {', '.join(sorted(allowed))}")


def _validate_structure(cfg: dict, where: str) -> None:
    for sec in ("datasets", "models", "attacks", "grid"):
        if not cfg.get(sec):
            raise _err(where, f"{sec!r} is missing or empty")
    s = cfg["settings"]
    if s["side"] not in ("query", "gallery"):
        raise _err(where, f"settings.side={s['side']!r}; expected query or gallery")
    for key, d in cfg["datasets"].items():
        if not isinstance(d, dict):
            raise _err(where, f"datasets.{key} must be a mapping like {{name: market1501, root: /data/Market}}")
        _unknown(set(d), _DATASET_KEYS, f"datasets.{key}.", where)
        if d.get("root") is None and d.get("synthetic") is None and d.get("resampled") is None:
            raise _err(where, f"datasets.{key}: give root: PATH (or synthetic: {{...}} for generated data, or "
                              f"resampled: {{from: DATASET, ...}} for DDDefense Phase I); "
                              f"override with datasets.{key}.root=PATH")
        if d.get("resampled") is not None:
            from advreid.experiments.demos import check_resampled_spec

            try:
                check_resampled_spec(key, d["resampled"], cfg["datasets"])
            except ValueError as e:
                raise _err(where, str(e)) from None
        _unknown(set(d.get("synthetic") or {}), set(SYNTH_KEYS), f"datasets.{key}.synthetic.", where)
    for key, m in cfg["models"].items():
        if not isinstance(m, dict):
            raise _err(where, f"models.{key} must be a mapping ({{run: DIR}} or {{config: PRESET, train_on: DATA}})")
        if m.get("spec") is not None:
            _validate_spec_model(cfg, key, m, where)
            continue
        _unknown(set(m), _MODEL_KEYS, f"models.{key}.", where)
        if m.get("run") is None and m.get("config") is None:
            raise _err(where, f"models.{key}: give run: DIR (a trained run), config: PRESET (trained here) or spec: "
                              "KIND:NAME[@WEIGHTS] (a model loaded from elsewhere)")
        if m.get("config") is not None and m.get("train_on") not in cfg["datasets"]:
            raise _err(where, f"models.{key}.train_on={m.get('train_on')!r}; expected one of the datasets: "
                              f"{', '.join(cfg['datasets'])}")
        if m.get("source") is not None and m["source"] not in cfg["models"]:
            raise _err(where, f"models.{key}.source={m['source']!r} is not a model of this bench")
        if m.get("init") is not None and (m["init"] not in cfg["models"] or m["init"] == key):
            raise _err(where, f"models.{key}.init={m['init']!r} is not another model of this bench (its trained "
                              "backbone initialises this one: model.pretrained)")
    _validate_attacks(cfg, where)
    for key, d in cfg["defenses"].items():
        if d is not None and (not isinstance(d, dict) or "name" not in d or set(d) - {"name", "params"}):
            raise _err(where, f"defenses.{key} must be null (no defense) or {{name: cs, params: {{...}}}}")
    _validate_grid(cfg, where)
    for i, t in enumerate(cfg.get("tables") or []):
        _unknown(set(t), _TABLE_KEYS, f"tables[{i}].", where)
        if t.get("kind", "attack") not in ("attack", "clean", "cross_domain"):
            raise _err(where, f"tables[{i}].kind={t.get('kind')!r}; expected attack, clean or cross_domain")


def spec_model_card(m: dict) -> Any:
    """The :class:`~advreid.models.external.ModelCard` of a spec model entry (its inline keys over its ``card``)."""
    import dataclasses

    from advreid.models.external import ModelCard

    card = ModelCard.from_dict({k: m[k] for k in SPEC_CARD_KEYS if k in m}, "model card")
    return dataclasses.replace(card, path=str(Path(m["card"]).expanduser())) if m.get("card") else card


def _validate_spec_model(cfg: dict, key: str, m: dict, where: str) -> None:
    """A spec model: known kind, valid card, and no use that needs a run folder (training from it)."""
    from advreid.models.external import parse_spec

    _unknown(set(m), _SPEC_MODEL_KEYS, f"models.{key}.", where)
    if m.get("train_on") is not None and m["train_on"] not in cfg["datasets"]:
        raise _err(where, f"models.{key}.train_on={m['train_on']!r}; expected one of the datasets: "
                          f"{', '.join(cfg['datasets'])}")
    try:
        parse_spec(str(m["spec"]))
        spec_model_card(m)
    except ValueError as e:
        raise _err(where, f"models.{key}: {e}") from None
    users = [f"models.{k}.{r}" for k, o in cfg["models"].items() for r in ("source", "init") if o.get(r) == key]
    users += [f"attacks.{k}.generator" for k, a in (cfg.get("attacks") or {}).items()
              if isinstance(a, dict) and isinstance(a.get("generator"), dict) and a["generator"].get("model") == key]
    if users:
        raise _err(where, f"{users[0]} names models.{key}, a model spec: training from it needs a run folder "
                          "(give run: DIR instead)")


def _validate_attacks(cfg: dict, where: str) -> None:
    for key, a in cfg["attacks"].items():
        if a is None:
            continue
        if not isinstance(a, dict) or "name" not in a:
            raise _err(where, f"attacks.{key} must be null (no attack) or a mapping with a name, e.g. {{name: lta}}")
        _unknown(set(a), _ATTACK_KEYS, f"attacks.{key}.", where)
        if a.get("source") is not None and a["source"] not in cfg["models"]:
            raise _err(where, f"attacks.{key}.source={a['source']!r} is not a model of this bench (black-box transfer: "
                              "the images are crafted on that model)")
        g = a.get("generator")
        if g is not None:
            if not isinstance(g, dict) or g.get("model") not in cfg["models"]:
                raise _err(where, f"attacks.{key}.generator must be {{model: KEY, config: dmr_tiny}} naming the model "
                                  f"the generator is trained against (one of {', '.join(cfg['models'])})")
            _unknown(set(g), _GENERATOR_KEYS, f"attacks.{key}.generator.", where)


def _validate_grid(cfg: dict, where: str) -> None:
    grid = cfg["grid"]
    if not isinstance(grid, list):
        raise _err(where, "grid must be a list of blocks {models, datasets, defenses, attacks, threats}")
    for i, b in enumerate(grid):
        if not isinstance(b, dict):
            raise _err(where, f"grid[{i}] must be a mapping {{models, datasets, defenses, attacks, threats}}")
        _unknown(set(b), _BLOCK_KEYS, f"grid[{i}].", where)
        for sec in ("models", "datasets", "defenses", "attacks"):
            names = b.get(sec, list(cfg[sec]) if sec != "datasets" else None)
            if names is None:
                names = [cfg["models"][m].get("train_on") for m in b.get("models", [])]
            for n in names:
                if n not in cfg[sec]:
                    raise _err(where, f"grid[{i}].{sec}: {n!r} is not defined under {sec}"
                                      f"{did_you_mean(str(n), map(str, cfg[sec]))} ({', '.join(map(str, cfg[sec]))})")
        for t in b.get("threats", ["non_adaptive"]):
            if t not in BENCH_THREATS:
                raise _err(where, f"grid[{i}].threats: {t!r}; expected {', '.join(BENCH_THREATS)}")


def attack_spec(cfg: dict, key: str) -> Any:
    """The :class:`~advreid.evaluation.AttackSpec` of ``attacks.<key>`` with the bench settings (side,
    quantisation) and the bench's seed; None for the no-attack column."""
    from advreid.evaluation import AttackSpec

    a = cfg["attacks"][key]
    if a is None:
        return None
    s = cfg["settings"]
    return AttackSpec(a["name"], eps=a.get("eps"), alpha=a.get("alpha"), steps=a.get("steps"),
                      params=a.get("params") or {}, side=s["side"], quantize=a.get("quantize", s["quantize"]),
                      reencode=a.get("reencode", s["reencode"]), seed=int(cfg["seed"]))


def _validate_names(cfg: dict, where: str) -> None:
    """Every registry name (and parameter) of the config, checked now rather than after hours of training."""
    from advreid.data import DATASETS
    from advreid.defenses import build_passive
    from advreid.experiments.training import check_train_config

    for key, d in cfg["datasets"].items():
        name = d.get("name", "market1501")
        if name not in DATASETS:
            raise _err(where, f"datasets.{key}.name={name!r}: unknown dataset parser{did_you_mean(name, DATASETS)} "
                              f"({', '.join(DATASETS.names())})")
    for key in cfg["attacks"]:
        try:
            attack_spec(cfg, key)
        except (KeyError, TypeError, ValueError) as e:
            raise _err(where, f"attacks.{key}: {e}") from None
    for key, d in cfg["defenses"].items():
        if d is not None:
            try:
                build_passive(d["name"], d.get("params"))
            except (KeyError, TypeError, ValueError) as e:
                raise _err(where, f"defenses.{key}: {e}") from None
    for key, m in cfg["models"].items():
        if m.get("config") is not None:
            try:
                check_train_config(m["config"], list(m.get("overrides") or []))
            except (KeyError, TypeError, ValueError) as e:
                raise _err(where, f"models.{key}: {e}") from None


def cell_key(model: str, dataset: str, defense: str, attack: str, threat: str) -> str:
    """File-system-safe name of one grid cell."""
    raw = f"{model}__{dataset}__{defense}__{attack}__{threat}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def crafted_on(attack_spec_: dict | None) -> str | None:
    """The bench model an attack column is crafted on (``source``, or the model a DMR generator was trained
    against), None for an attack made on the evaluated model itself."""
    if attack_spec_ is None:
        return None
    if attack_spec_.get("source") is not None:
        return str(attack_spec_["source"])
    g = attack_spec_.get("generator")
    return str(g["model"]) if isinstance(g, dict) and g.get("model") is not None else None


def canonical_threat(defense_spec: dict | None, attack_spec_: dict | None, threat: str,
                     model: str | None = None) -> str:
    """clean (no attack), white_box (no defense), else the block's threat model; an attack crafted on another
    model than ``model`` (``source``, or a DMR ``generator``) is transfer (transfer_adaptive through the defense)."""
    if attack_spec_ is None:
        return "clean"
    origin = crafted_on(attack_spec_)
    if origin is not None and origin != model:
        return "transfer_adaptive" if defense_spec is not None and threat == "adaptive" else "transfer"
    if defense_spec is None:
        return "white_box"
    return threat


def cells(cfg: dict) -> list[Cell]:
    """All distinct (model, dataset, defense, attack, threat) cells of the grid, in grid order."""
    out, seen = [], set()
    for b in cfg["grid"]:
        for m in b.get("models", list(cfg["models"])):
            for d in b.get("datasets") or [cfg["models"][m].get("train_on")]:
                for df in b.get("defenses", list(cfg["defenses"])):
                    for a in b.get("attacks", list(cfg["attacks"])):
                        for t in b.get("threats", ["non_adaptive"]):
                            c = (m, d, df, a, canonical_threat(cfg["defenses"][df], cfg["attacks"][a], t, m))
                            if c not in seen:
                                seen.add(c)
                                out.append(c)
    return out


def spec_of(cfg: dict, cell: Cell) -> dict:
    """What a cell's result depends on (compared on resume: a changed spec is recomputed)."""
    m, d, f, a, _t = cell
    return {"model": cfg["models"][m], "dataset": cfg["datasets"][d], "defense": cfg["defenses"][f],
            "attack": cfg["attacks"][a], "settings": {k: v for k, v in cfg["settings"].items()
                                                     if k not in ("progress", "num_workers", "save_features",
                                                                  "report")},
            "seed": cfg["seed"]}
