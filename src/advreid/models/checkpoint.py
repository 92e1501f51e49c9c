"""The one checkpoint format: ``<stem>.safetensors`` (weights + ``train_state/*`` tensors) + ``<stem>.json``.

The JSON holds ``format``, ``version``, ``arch`` (enough to rebuild the model), ``num_classes``, user
``meta`` and the skeleton of the training state. The .safetensors is written first and the .json last (both
atomically), so a checkpoint is complete iff its .json exists; a random id stored in both ties the pair
together. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advreid.models.reidnet import ReIDNet
from advreid.utils.io import atomic_write_json, atomic_write_with

FORMAT = "advreid-checkpoint"
VERSION = 1
TRAIN_PREFIX = "train_state/"
_SUFFIXES = (".safetensors", ".json")
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.json$")


class CheckpointError(ValueError):
    """A file is not a (complete, consistent) advreid checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's architecture or weights do not match what was expected."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, meta)`` paths for a stem or a path ending in ``.safetensors`` / ``.json``."""
    p = Path(path)
    if p.suffix in _SUFFIXES:
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """Checkpoint stem in ``run_dir/checkpoints``: ``final`` if present (``which='best'``) else the latest epoch."""
    ck = Path(run_dir) / "checkpoints"
    if which in ("best", "final") and (ck / "final.json").is_file():
        return ck / "final"
    epochs = sorted(int(m.group(1)) for p in ck.glob("epoch_*.json") if (m := _EPOCH_RE.match(p.name)))
    if not epochs:
        raise FileNotFoundError(
            f"no checkpoint in {ck} (expected final.json or epoch_NNN.json written by `advreid train`)"
        )
    return ck / f"epoch_{epochs[-1]:03d}"


# ----------------------------------------------------------------------------- train-state (de)flattening


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON skeleton of ``obj``; tensors go into ``tensors`` under ``train_state/<n>``."""
    if isinstance(obj, torch.Tensor):
        key = f"{TRAIN_PREFIX}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{TRAIN_PREFIX}{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _flatten(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if k is not None and not isinstance(k, bool | int | float | str):
                raise TypeError(f"train_state: unsupported dict key {k!r} ({type(k).__name__}) at {where}")
            items.append([k, _flatten(v, tensors, f"{where}[{k!r}]")])
        return {"__dict__": items}
    raise TypeError(
        f"train_state: unsupported value of type {type(obj).__name__} at {where}; expected dict/list/tuple/"
        "tensor/ndarray/int/float/bool/str/None"
    )


def _unflatten(skel: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(skel, list):
        return [_unflatten(v, tensors, source) for v in skel]
    if isinstance(skel, dict):
        if len(skel) == 1:
            (tag, val), = skel.items()
            if tag in ("__tensor__", "__ndarray__"):
                if val not in tensors:
                    raise CheckpointError(f"{source}: training-state tensor {val!r} is missing")
                return tensors[val] if tag == "__tensor__" else tensors[val].numpy()
            if tag == "__tuple__":
                return tuple(_unflatten(v, tensors, source) for v in val)
            if tag == "__dict__":
                return {k: _unflatten(v, tensors, source) for k, v in val}
        return {k: _unflatten(v, tensors, source) for k, v in skel.items()}
    return skel


# -------------------------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    meta: dict | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write ``model`` (+ training state) as ``<stem>.safetensors`` + ``<stem>.json``; return the json path.

    ``meta`` is JSON-able user metadata (epoch, config, metrics); ``train_state`` any nested structure of
    dicts/lists/tuples/tensors/numbers/str/None (optimizer/scheduler state dicts, RNG states).
    """
    from safetensors.torch import save_file

    if not hasattr(model, "arch_config"):
        raise TypeError("save_checkpoint needs a model with arch_config() (a ReIDNet), "
                        f"got {type(model).__name__}")
    weights_path, meta_path = checkpoint_paths(path)
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith(TRAIN_PREFIX):
            raise ValueError(f"model state key {k!r} collides with the reserved prefix {TRAIN_PREFIX!r}")
        tensors[k] = v.detach().to("cpu").contiguous().clone()  # clone: no shared storage in safetensors
    skeleton = _flatten(train_state, tensors, "train_state") if train_state is not None else None
    ckpt_id = uuid.uuid4().hex
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "id": ckpt_id,
        "weights_file": weights_path.name,
        "arch": {"class": type(model).__name__, **model.arch_config()},
        "num_classes": getattr(model, "num_classes", None),
        "meta": meta or {},
        "train_state": skeleton,
    }
    try:  # fail before writing anything if the metadata is not JSON-able
        json.dumps(doc, default=_json_probe)
    except TypeError as e:
        raise TypeError(f"save_checkpoint: meta is not JSON-serialisable: {e}") from e
    atomic_write_with(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"advreid_id": ckpt_id}))
    atomic_write_json(meta_path, doc)
    return meta_path


def _json_probe(o: Any) -> Any:
    if isinstance(o, np.generic | np.ndarray | Path) or hasattr(o, "tolist"):
        return None
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Low-level read: ``(model state_dict, json document, train_state or None)``; validates the format."""
    from safetensors import safe_open

    weights_path, meta_path = checkpoint_paths(path)
    if not meta_path.is_file():
        hint = " (its .safetensors exists: the checkpoint is incomplete)" if weights_path.is_file() else ""
        raise FileNotFoundError(f"checkpoint metadata {str(meta_path)!r} not found{hint}")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(meta_path)!r} is not an advreid checkpoint: invalid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{str(meta_path)!r} is not an advreid checkpoint: format is {found!r}, "
                              f"expected {FORMAT!r}")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise CheckpointError(f"{str(meta_path)!r}: unsupported checkpoint version {doc.get('version')!r} "
                              f"(this advreid reads up to {VERSION})")
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights {str(weights_path)!r} not found "
                                f"(metadata: {str(meta_path)!r})")
    device = str(map_location)
    try:
        with safe_open(str(weights_path), framework="pt", device=device) as fh:
            file_id = (fh.metadata() or {}).get("advreid_id")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types; re-raise with the file
        raise CheckpointError(f"{str(weights_path)!r} is not a valid safetensors file: "
                              f"{type(e).__name__}: {e}") from e
    if doc.get("id") is not None and file_id != doc["id"]:
        raise CheckpointError(
            f"{str(weights_path)!r} does not belong to {str(meta_path)!r} (checkpoint id {file_id!r} vs "
            f"{doc['id']!r}): the pair is from different saves, probably an interrupted write"
        )
    state = {k: v for k, v in tensors.items() if not k.startswith(TRAIN_PREFIX)}
    train = {k: v for k, v in tensors.items() if k.startswith(TRAIN_PREFIX)}
    skeleton = doc.get("train_state")
    train_state = _unflatten(skeleton, train, str(weights_path)) if skeleton is not None else None
    return state, doc, train_state


def _normalise(v: Any) -> Any:
    return json.loads(json.dumps(v))


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    expect_arch: dict | None = None,
) -> ReIDNet:
    """Rebuild the model from the checkpoint's ``arch``, load weights strictly; returns it in eval mode.

    ``model.checkpoint_meta`` is the JSON document (user metadata under ``["meta"]``). With ``expect_arch``,
    each key given there must equal the stored one, else CheckpointMismatchError lists the differences.
    """
    state, doc, _ = read_checkpoint(path, map_location="cpu")
    _, meta_path = checkpoint_paths(path)
    arch = dict(doc.get("arch") or {})
    cls = arch.pop("class", "ReIDNet")
    if cls != "ReIDNet":
        raise CheckpointError(f"{str(meta_path)!r}: model class {cls!r} is not supported "
                              "(expected 'ReIDNet')")
    if expect_arch is not None:
        found = {"class": cls, **arch}
        diffs = []
        for k, v in expect_arch.items():
            if k not in found:
                diffs.append(f"{k}: expected {v!r}, found <absent>")
            elif _normalise(v) != _normalise(found[k]):
                diffs.append(f"{k}: expected {v!r}, found {found[k]!r}")
        if diffs:
            raise CheckpointMismatchError(f"{str(meta_path)!r}: architecture differs from the expected one: "
                                          + "; ".join(diffs))
    try:
        model = ReIDNet(**arch, pretrained=False)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{str(meta_path)!r}: cannot rebuild the model from arch {arch!r}: {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        groups = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        parts = [f"{len(items)} {label} (first: {', '.join(items[:5])})" for label, items in groups if items]
        raise CheckpointMismatchError(f"{str(meta_path)!r}: weights do not match the architecture: "
                                      + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    model.checkpoint_meta = doc
    return model.to(map_location).eval()
