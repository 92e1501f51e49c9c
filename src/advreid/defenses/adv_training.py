"""Adversarial-training baselines: online GOAT (Bouniot et al.) and offline AT (Bai et al., as the seed uses it).

* GOAT (:class:`advreid.attacks.goat.GOAT`, applied by :class:`advreid.defenses.hooks.AdversarialBatchHook`)
  replaces every training batch by adversarial versions made by the *current* model (spec 3.9): L-inf PGD
  maximising ``sum_k d(f(x'), g_k) - sum_q d(f(x'), p_q)`` with ``d`` the squared L2 distance (MSE-sum) between
  raw embeddings. The trainer uses it when ``adv.method=goat``.
* :func:`prepare_offline_adv` attacks every training image once with a frozen source model (spec 3.8), saves the
  adversarial images losslessly under ``RUN_DIR/adv_train/<attack>/`` with a ``manifest.json``, and returns them as
  extra :class:`~advreid.data.Record` s of the same identities. The trainer uses it when ``adv.method=offline``.
* :func:`resolve_adv` validates the ``adv`` config section (errors name the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import nn

from advreid.attacks.goat import EPS_SPACES, MODEL_MODES
from advreid.config import ConfigError
from advreid.data import ImageDataset, Record, build_transforms
from advreid.ops import parse_eps
from advreid.utils.io import sha256_file
from advreid.utils.misc import jsonable

__all__ = [
    "ADV_METHODS",
    "build_goat",
    "offline_adv_dir",
    "prepare_offline_adv",
    "resolve_adv",
]

ADV_METHODS = ("goat", "offline")
ATTACK_MODES = MODEL_MODES  # GOAT's model mode during the attack
MIXES = ("union", "replace")
GUIDE_MODES = ("pool", "batch")  # GOAT's pushing guides: training-set draws (reference) or same-identity batch-mates
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "advreid-offline-at/1"
DEFAULT_EPS = "5px"
DEFAULT_ALPHA = "1px"


# ------------------------------------------------------------------------------------------------- config


def _int(adv: dict, key: str, minimum: int = 0) -> int:
    v = adv.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"config key 'adv.{key}' = {v!r}; expected an integer >= {minimum}")
    return int(v)


def _budget(adv: dict, key: str, default: str) -> float:
    raw = adv.get(key)
    try:
        return parse_eps(default if raw is None else raw, f"adv.{key}")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'adv.{key}': {e}") from None


def resolve_adv(cfg: dict, *, check_source: bool = True) -> dict | None:
    """Validated, resolved ``adv`` settings (eps/alpha as floats in [0,1] units, source_run absolute), or None.
    ``check_source=False`` skips the offline source run (a bench trains it first).

    Raises :class:`~advreid.config.ConfigError` naming the ``adv.*`` key that is wrong.
    """
    adv = dict(cfg.get("adv") or {})
    method = adv.get("method")
    if method is None or (isinstance(method, str) and method.lower() == "none"):
        return None
    if method not in ADV_METHODS:
        raise ConfigError(f"config key 'adv.method' = {method!r}; expected one of null, {', '.join(ADV_METHODS)}")
    out: dict[str, Any] = {"method": method, "eps": _budget(adv, "eps", DEFAULT_EPS),
                           "alpha": _budget(adv, "alpha", DEFAULT_ALPHA), "steps": _int(adv, "steps")}
    for key, choices in (("eps_space", EPS_SPACES), ("attack_mode", ATTACK_MODES), ("mix", MIXES)):
        if adv.get(key) not in choices:
            raise ConfigError(f"config key 'adv.{key}' = {adv.get(key)!r}; expected one of {', '.join(choices)}")
    if method == "goat":
        if not isinstance(adv.get("random_start"), bool):
            raise ConfigError(f"config key 'adv.random_start' = {adv.get('random_start')!r}; expected true/false")
        if adv.get("guides", "pool") not in GUIDE_MODES:
            raise ConfigError(f"config key 'adv.guides' = {adv.get('guides')!r}; expected one of "
                              f"{', '.join(GUIDE_MODES)} (pool: the reference's draws from the training set)")
        out.update(push=_int(adv, "push"), pull=_int(adv, "pull"), random_start=adv["random_start"],
                   eps_space=adv["eps_space"], attack_mode=adv["attack_mode"], guides=adv.get("guides", "pool"))
        return out
    # offline
    if adv["eps_space"] != "pixel":
        raise ConfigError("config key 'adv.eps_space' = 'normalized' is only supported with adv.method=goat; "
                          "offline AT budgets are in [0,1] pixel units (adv.eps_space=pixel)")
    from advreid.attacks import list_attacks

    attack = adv.get("attack")
    if not isinstance(attack, str) or attack.lower() not in list_attacks():
        raise ConfigError(f"config key 'adv.attack' = {attack!r}; expected one of {', '.join(list_attacks())}")
    params = adv.get("attack_params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"config key 'adv.attack_params' = {params!r}; expected a mapping of attack parameters, "
                          "e.g. adv.attack_params={momentum: 1.0}")
    for bad in ("eps", "alpha", "steps"):
        if bad in params:
            raise ConfigError(f"config key 'adv.attack_params' sets {bad!r}; use adv.{bad} instead")
    from advreid.attacks.base import ATTACKS

    allowed = ATTACKS.get(attack).allowed()
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"config key 'adv.attack_params': attack {attack!r} has no parameter(s) {unknown}; "
                          f"allowed: {sorted(allowed)}")
    out.update(attack=attack.lower(), attack_params=dict(params), mix=adv["mix"])
    if not check_source:  # a bench names the source run before it has been trained
        return out
    src = adv.get("source_run")
    if src is None or (isinstance(src, str) and not src.strip()):
        raise ConfigError("config key 'adv.source_run' is not set: adv.method=offline needs the run directory of a "
                          "trained (frozen) model whose attacks make the adversarial training set, e.g. "
                          "adv.source_run=runs/baseline")
    src_path = Path(str(src)).expanduser().resolve()
    if not src_path.is_dir():
        raise ConfigError(f"config key 'adv.source_run' = {str(src)!r}: no such run directory")
    from advreid.models import find_checkpoint

    try:
        stem = find_checkpoint(src_path)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'adv.source_run' = {str(src)!r}: {e}") from None
    out.update(source_run=str(src_path), source_checkpoint=str(stem))
    return out


# --------------------------------------------------------------------------------------------------- GOAT


def build_goat(model: nn.Module, settings: dict, *, amp: bool = False) -> Any:
    """The GOAT attack (:class:`advreid.attacks.GOAT`) of resolved ``adv`` settings (:func:`resolve_adv`)."""
    from advreid.attacks import build

    return build("goat", model, eps=settings["eps"], alpha=settings["alpha"], steps=settings["steps"],
                 random_start=settings["random_start"], push=settings["push"], pull=settings["pull"],
                 eps_space=settings["eps_space"], model_mode=settings["attack_mode"], amp=amp)


# ----------------------------------------------------------------------------------------------- offline


def offline_adv_dir(run_dir: str | os.PathLike, attack: str) -> Path:
    """Where offline AT keeps its adversarial training images: ``RUN_DIR/adv_train/<attack>/``."""
    return Path(run_dir) / "adv_train" / attack


def _adv_names(records: Sequence[Record]) -> list[str]:
    """Output names (PNG): the original file names (Market's encode pid and camera); relative paths on a clash."""
    from advreid.attacks import output_name

    base = [Path(r.path).name for r in records]
    names = [str(output_name(n, "png")) for n in base]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(Path(r.path).parent) for r in records]))
    names = [str(output_name(PurePosixPath(Path(r.path).relative_to(common).as_posix()), "png")) for r in records]
    if len(set(names)) != len(names):
        raise ValueError("offline AT: two training images map to the same adversarial file name")
    return names


def _attack_kwargs(name: str, settings: dict, seed: int) -> dict:
    """Keyword arguments for ``advreid.attacks.build``: budgets, seed, same-identity guides excluding the image
    itself (for attacks that take them), then ``adv.attack_params``."""
    from advreid.attacks.base import ATTACKS

    allowed = ATTACKS.get(name).allowed()
    kw: dict[str, Any] = {"eps": settings["eps"], "alpha": settings["alpha"], "steps": settings["steps"]}
    if "seed" in allowed:
        kw["seed"] = int(seed) % (2**31)
    if "exclude_self" in allowed:
        kw["exclude_self"] = True
    if "guide_source" in allowed:
        kw["guide_source"] = "train"
    kw.update(settings["attack_params"])
    return kw


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_offline_adv(
    settings: dict,
    run_dir: str | os.PathLike,
    train_records: Sequence[Record],
    *,
    height: int,
    width: int,
    device: torch.device | str,
    batch_size: int = 32,
    seed: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
    log: Callable[[str], None] | None = None,
) -> tuple[list[Record], dict]:
    """Attack every training image once with the frozen source model; return (adversarial records, info).

    The images (test transform: resize to ``height`` x ``width``) are attacked in batches with ``index=`` the
    record index, so results do not depend on batching or on the number of ranks (each rank does ``rank::world``).
    Guides, when the attack needs them, are the other same-identity training images (``GuideBank`` of the source
    model's embeddings of the training set, ``exclude_self``). The adversarial images are written as 8-bit PNGs
    (rounded) under ``RUN_DIR/adv_train/<attack>/`` with the original file names, then ``manifest.json`` last,
    atomically. A complete manifest with the same key (attack parameters, source checkpoint hash, records, size)
    and all its files present is reused without regenerating. Records keep the originals' pid and camid.
    """
    from advreid.attacks import GuideBank, build, save_images
    from advreid.models import load_checkpoint
    from advreid.utils.io import atomic_write_json

    log = log or (lambda m: None)
    device = torch.device(device)
    records = [Record(str(r[0]), int(r[1]), int(r[2])) for r in train_records]
    if not records:
        raise ValueError("offline AT: the training set is empty")
    name = settings["attack"]
    out_dir = offline_adv_dir(run_dir, name)
    names = _adv_names(records)
    stem = Path(settings["source_checkpoint"])
    source = load_checkpoint(stem).to(device).eval()
    for p in source.parameters():
        p.requires_grad_(False)
    try:
        attack = build(name, source, **_attack_kwargs(name, settings, seed))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'adv.attack_params' (attack {name!r}): {e}") from None
    rec_hash = hashlib.sha256("\n".join(f"{n}|{r.pid}|{r.camid}" for n, r in zip(names, records, strict=True))
                              .encode()).hexdigest()
    key = jsonable({
        "attack": name, "params": attack.params(), "source_weights_sha256": sha256_file(Path(f"{stem}.safetensors")),
        "height": int(height), "width": int(width), "records_sha256": rec_hash, "count": len(records),
        "format": "png", "quantize": "round",
    })
    files = [str(out_dir / n) for n in names]
    adv_records = [Record(f, r.pid, r.camid) for f, r in zip(files, records, strict=True)]
    info: dict[str, Any] = {"method": "offline", "attack": name, "dir": str(out_dir), "count": len(records),
                            "source_run": settings["source_run"], "source_checkpoint": str(stem),
                            "mix": settings["mix"], "params": key["params"]}
    manifest_path = out_dir / MANIFEST

    def reusable() -> bool:
        try:
            doc = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return bool(doc.get("complete")) and doc.get("key") == key and all(Path(f).is_file() for f in files)

    if reusable():
        log(f"offline AT: reusing {len(files)} adversarial training images in {out_dir}")
        return adv_records, {**info, "reused": True}
    _barrier()  # every rank has decided before rank 0 removes a stale manifest
    if rank == 0:
        manifest_path.unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    log(f"offline AT: attacking {len(records)} training images with {name} from {stem} -> {out_dir}")
    t0 = time.perf_counter()
    guides = None
    needs_guides = bool(getattr(attack, "needs_guides", False))
    if needs_guides:
        guides = GuideBank.from_images(source, ImageDataset(records, build_transforms(height, width, is_train=False)),
                                       source="train", batch_size=batch_size, device=device, num_workers=num_workers)
    mine = list(range(rank, len(records), max(world, 1)))
    ds = torch.utils.data.Subset(ImageDataset(records, build_transforms(height, width, is_train=False)), mine)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    linf = torch.zeros((), dtype=torch.float64)
    for x, pid, cam, idx in loader:
        x = x.to(device, non_blocking=True)
        adv = attack(x, pid.to(device), cam.to(device), guides, index=idx)
        linf = torch.maximum(linf, (adv - x).abs().max().double().cpu())
        save_images(adv.cpu(), [names[int(i)] for i in idx], out_dir, fmt="png", quantize="round")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = linf.to(device) if dist.get_backend() == "nccl" else linf.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        linf = t.cpu()
    seconds = time.perf_counter() - t0
    _barrier()
    if rank == 0:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise RuntimeError(f"offline AT: {len(missing)} adversarial image(s) were not written, e.g. {missing[0]}")
        atomic_write_json(manifest_path, {
            "format": MANIFEST_FORMAT, "complete": True, "key": key, "attack": name, "params": key["params"],
            "source_run": settings["source_run"], "source_checkpoint": str(stem),
            "guides": {"source": "train", "num": len(records), "exclude_self": key["params"].get("exclude_self")}
            if needs_guides else None,
            "count": len(records), "files": names, "linf_max": float(linf), "linf_max_px": float(linf) * 255,
            "seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    _barrier()
    log(f"offline AT: wrote {len(records)} images in {seconds:.1f}s (max L-inf {float(linf) * 255:.2f} px)")
    return adv_records, {**info, "reused": False, "linf_max_px": float(linf) * 255}
