"""The one config system: YAML files (with ``_base_`` inheritance) + ``key=value`` overrides, checked
against the defaults so a typo is an error instead of a silently ignored setting."""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from advreid.registry import did_you_mean

# Every key a training/eval run understands, with its default. ``None`` means "any type".
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "data": {
        "name": "market1501",
        "root": None,
        "train_all": False,
        "height": 256,
        "width": 128,
        "skip_bad_images": False,
        "num_workers": 4,
    },
    "transforms": {"flip_p": 0.5, "pad": 10, "random_erasing_p": 0.5},
    "sampler": {"type": "pk", "p": 16, "k": 4, "batch_size": 64, "drop_last": True},
    "model": {
        "name": "bot_r50",
        "pretrained": True,
        "last_stride": None,
        "pooling": None,
        "head": None,
        "embed_dim": None,
        "dropout": None,
        "neck_feat": None,
    },
    "loss": {"ce_weight": 1.0, "label_smooth": 0.1, "triplet_weight": 1.0, "margin": 0.3},
    "optim": {
        "name": "adam",
        "lr": 3.5e-4,
        "backbone_lr": None,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "nesterov": True,
    },
    "sched": {
        "name": "multistep",
        "milestones": [40, 70],
        "step_size": 40,
        "gamma": 0.1,
        "warmup_epochs": 10,
        "warmup_factor": 0.01,
    },
    "train": {
        "epochs": 120,
        "amp": True,
        "channels_last": True,
        "cudnn_benchmark": True,
        "max_iters_per_epoch": None,
        "eval_every": 0,
        "keep_every": 0,
        "progress": True,
        "step": "standard",  # the training step (advreid.experiments.TRAIN_STEPS); step_params override its preset
        "step_params": None,
    },
    # Proactive defense (training-time batch transform) and passive defense (test-time preprocessor), by name
    # (``advreid.defenses``); ``*_params`` override the preset's parameters.
    "defense": {"proactive": None, "proactive_params": None, "passive": None, "passive_params": None},
    # Adversarial training: ``method`` null | goat (online, each batch replaced by adversarial examples) |
    # offline (Bai-style: a frozen ``source_run`` attacks the training set once; train on clean + adversarial).
    "adv": {
        "method": None,
        "eps": None,  # budget, "5px" / 0.0196 (default 5px); [0,1] units unless eps_space=normalized
        "alpha": None,  # step size (default 1px)
        "steps": 7,
        "random_start": True,
        "push": 4,
        "pull": 1,
        "guides": "pool",  # GOAT: pool (the reference: push draws per identity from the training set) or batch
        "eps_space": "pixel",
        "attack_mode": "train",
        "source_run": None,
        "attack": "ifgsm",
        "attack_params": None,
        "mix": "union",
    },
    "eval": {
        "metric": "cosine",
        "normalize": True,
        "flip": False,
        "rerank": False,
        "ap": "standard",
        "batch_size": 128,
    },
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "sampler.type": ("pk", "random"),
    "optim.name": ("adam", "sgd", "adamw"),
    "sched.name": ("multistep", "step", "cosine", "constant"),
    "eval.metric": ("cosine", "euclidean", "sqeuclidean"),
    "eval.ap": ("standard", "official"),
    "adv.method": (None, "goat", "offline"),
    "adv.eps_space": ("pixel", "normalized"),
    "adv.attack_mode": ("train", "eval"),
    "adv.mix": ("union", "replace"),
    "adv.guides": ("pool", "batch"),
}


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def preset_dir() -> Path:
    """Folder of the YAML presets shipped with the package (``configs/`` in the repository)."""
    return Path(str(resources.files("advreid") / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, folder: Path | None = None) -> Path:
    """A file path, or the name of a preset in ``folder`` (default ``configs/``; with or without ``.yaml``)."""
    folder = preset_dir() if folder is None else Path(folder)
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = folder / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if p.parent == Path(".") and cand.is_file():
        return cand
    names = sorted(q.stem for q in folder.glob("*.yaml"))
    raise ConfigError(
        f"config {str(name_or_path)!r}: no such file, and not a preset name{did_you_mean(p.stem, names)} "
        f"(presets: {', '.join(names)})"
    )


def _merge(base: dict, new: dict, where: str, schema: dict | None,
           choices: dict[str, tuple] | None = None) -> dict:
    choices = _CHOICES if choices is None else choices
    out = copy.deepcopy(base)
    for key, val in new.items():
        path = f"{where}{key}"
        if schema is not None and key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; valid keys here: {', '.join(schema)}")
        sub_schema = schema.get(key) if schema is not None else None
        if sub_schema is None and isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], val)  # a free-form mapping (schema default None): merged, not replaced
        elif isinstance(sub_schema, dict):
            if not isinstance(val, dict):
                raise ConfigError(f"config key {path!r} must be a mapping, got {val!r}")
            out[key] = _merge(out.get(key, {}), val, f"{path}.", sub_schema, choices)
        else:
            out[key] = _check_type(path, val, sub_schema, choices)
    return out


# keys whose value may take more than the default's type
_UNION_TYPES: dict[str, tuple[type, ...]] = {"model.pretrained": (bool, str)}


def _check_type(path: str, val: Any, default: Any, choices: dict[str, tuple]) -> Any:
    if path in choices and val not in choices[path]:
        raise ConfigError(f"config key {path!r} = {val!r}; expected one of {', '.join(map(str, choices[path]))}")
    if default is None or val is None:
        return val
    if path in _UNION_TYPES:
        if not isinstance(val, _UNION_TYPES[path]):
            raise ConfigError(f"config key {path!r} expects true/false or a path to a weights file, got {val!r}")
        return val
    if isinstance(default, bool):
        if not isinstance(val, bool):
            raise ConfigError(f"config key {path!r} expects true/false, got {val!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(val, bool) or not isinstance(val, int):
            raise ConfigError(f"config key {path!r} expects an integer, got {val!r}")
    elif isinstance(default, float):
        if isinstance(val, bool) or not isinstance(val, int | float):
            raise ConfigError(f"config key {path!r} expects a number, got {val!r}")
        return float(val)
    elif isinstance(default, list) and not isinstance(val, list):
        raise ConfigError(f"config key {path!r} expects a list, got {val!r}")
    elif isinstance(default, str) and not isinstance(val, str):
        raise ConfigError(f"config key {path!r} expects a string, got {val!r}")
    return val


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config file as a dict, with its ``_base_`` chain merged in (paths relative to the file, or presets)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: _base_ cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at top level, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        local = (path.parent / f"{Path(base).name}.yaml").is_file()  # a sibling preset, else one in configs/
        base_path = resolve_config_path(base, path.parent if local else None)
    parent = read_yaml(base_path, seen + (path,))
    return deep_update(parent, data)


def deep_update(a: dict, b: dict) -> dict:
    """``a`` updated recursively with ``b`` (a new dict; mappings merge, everything else replaces)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=0.01", "model.name=resnet18"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            val = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        d = out
        parts = key.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        d[parts[-1]] = val
    return out


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None, *,
                schema: dict[str, Any] | None = None, choices: dict[str, tuple] | None = None,
                folder: Path | None = None) -> dict:
    """Defaults <- YAML file/preset (or dict) <- ``key=value`` overrides, validated against ``schema``.

    ``schema`` (default: the training ``DEFAULTS``) gives every key and its default; ``choices`` the allowed values
    of some keys; ``folder`` where preset names are looked up (default ``configs/``). Other tools (the diffusion
    model, DMR) pass their own schema and folder: one config system, several schemas.
    """
    schema = DEFAULTS if schema is None else schema
    choices = _CHOICES if choices is None and schema is DEFAULTS else (choices or {})
    cfg = copy.deepcopy(schema)
    if source is not None:
        data = source if isinstance(source, dict) else read_yaml(resolve_config_path(source, folder))
        cfg = _merge(cfg, data, "", schema, choices)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "", schema, choices)
    return cfg


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
