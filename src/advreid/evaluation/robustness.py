"""The attack runner: perturb the query (or gallery) set with an attack, score clean vs attacked retrieval.

``advreid.attacks`` knows nothing about evaluation; this module drives it. Adversarial batches are embedded on the
fly (only features, norms and timings are kept, images only when asked), so memory stays that of a plain
evaluation. :func:`run_attack` is what ``advreid attack`` calls: it loads run directories and writes
``results.json`` atomically after every eps (``"complete": false`` until the last one).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.data import ImageDataset, Record, build_transforms
from advreid.evaluation.evaluator import evaluate_features
from advreid.evaluation.features import embed, extract_features
from advreid.ops import eps_label, parse_eps_list

__all__ = [
    "AttackOutput",
    "attack_dataset",
    "build_guide_bank",
    "eval_protocol",
    "evaluate_attack",
    "evaluate_clean",
    "guide_set",
    "parse_eps_list",
    "default_out_dir",
    "run_attack",
    "run_defense",
    "subset_indices",
]

SIDES = ("query", "gallery")


# --------------------------------------------------------------------------------------------- small helpers
def eval_protocol(model: nn.Module) -> dict[str, Any]:
    """The evaluation protocol saved with a checkpoint: metric, normalize, flip, ap, batch_size, height, width."""
    meta = getattr(model, "checkpoint_meta", {}).get("meta", {})
    ecfg = meta.get("config", {}).get("eval", {})
    h, w = meta.get("input_size", [256, 128])
    return {"metric": ecfg.get("metric", "cosine"), "normalize": bool(ecfg.get("normalize", True)),
            "flip": bool(ecfg.get("flip", False)), "ap": ecfg.get("ap", "standard"),
            "batch_size": int(ecfg.get("batch_size", 128)), "height": int(h), "width": int(w)}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def guide_set(guide_source_default: str | None, side: str, declared_side: str = "query") -> str | None:
    """Which set the guides come from. ``guide_source_default`` is stated for the attack's ``declared_side``
    (``ifgsm``: query attack, gallery guides; ``ifgsm_bai``: gallery attack, query guides); run on the other side,
    query and gallery swap roles (Bai et al.: a gallery attack is guided by the queries)."""
    if guide_source_default is None or side == declared_side or guide_source_default not in SIDES:
        return guide_source_default
    return {"gallery": "query", "query": "gallery"}[guide_source_default]


def subset_indices(n: int, max_images: int | None) -> list[int]:
    """``max_images`` evenly spaced indices of ``range(n)`` (all of them when ``None`` or >= n)."""
    if max_images is None or max_images >= n:
        return list(range(n))
    if max_images < 1:
        raise ValueError(f"--max-images {max_images}: expected a positive number of images")
    if max_images == 1:
        return [0]
    return sorted({round(i * (n - 1) / (max_images - 1)) for i in range(max_images)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_guide_bank(model: nn.Module, records: Sequence[Record], source: str, *, height: int, width: int,
                     batch_size: int = 128, num_workers: int = 0, progress: bool = False) -> Any:
    """A :class:`advreid.attacks.GuideBank` of ``model``'s raw embeddings (no flip, no L2) of ``records``, kept on
    the model's device (where the attack looks guides up)."""
    from advreid.attacks import GuideBank

    dev = _device_of(model)
    tf = build_transforms(height, width, is_train=False)
    f, p, c = extract_features(model, ImageDataset(list(records), tf), batch_size=batch_size, flip=False,
                               normalize=False, num_workers=num_workers, progress=progress,
                               desc=f"guides ({source})")
    return GuideBank(f.to(dev), p.to(dev), c.to(dev), source=source)


# -------------------------------------------------------------------------------------------- attack_dataset
@dataclass
class AttackOutput:
    """What :func:`attack_dataset` keeps: eval-protocol features of the adversarial images and their stats."""

    features: torch.Tensor  # (N, D), on CPU
    pids: torch.Tensor
    camids: torch.Tensor
    linf: torch.Tensor  # (N,) L-inf norm of each perturbation after finalize, [0,1] units
    l2: torch.Tensor  # (N,) L2 norm of each perturbation after finalize
    seconds: float  # attack + finalize time, all batches
    images: torch.Tensor | None = None  # (N,3,H,W) finalized adversarial images, only with keep_images
    saved: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def stats(self) -> dict[str, float | int]:
        """Perturbation norms (also in pixel units, x255) and timing, JSON-ready."""
        n = max(self.num_images, 1)
        return {"num_attacked": self.num_images,
                "linf_mean": float(self.linf.mean()), "linf_max": float(self.linf.max()),
                "linf_mean_px": float(self.linf.mean()) * 255, "linf_max_px": float(self.linf.max()) * 255,
                "l2_mean": float(self.l2.mean()),
                "seconds": round(self.seconds, 4), "time_per_image_s": self.seconds / n}


def attack_dataset(
    model: nn.Module,
    attack: Callable[..., torch.Tensor],
    records: Sequence[Record],
    *,
    guides: Any = None,
    indices: Sequence[int] | None = None,
    eval_model: nn.Module | None = None,
    flip: bool = False,
    normalize: bool = True,
    batch_size: int = 32,
    height: int = 256,
    width: int = 128,
    device: torch.device | str | None = None,
    finalize_kw: dict | None = None,
    keep_images: bool = False,
    save_dir: str | os.PathLike | None = None,
    save_fmt: str = "png",
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "attack",
) -> AttackOutput:
    """Attack ``records`` batch by batch and embed each adversarial batch at once with ``eval_model``.

    ``model`` is the model the attack was built on (it only fixes the device); ``eval_model`` (default: ``model``)
    embeds the finalized images under the eval protocol (``flip``, ``normalize``) -- another model for black-box
    transfer. ``indices[i]`` is the dataset index of ``records[i]`` (default ``i``), passed to the attack as
    ``index=`` so per-sample random streams do not depend on batching or on a subset. ``finalize_kw``
    (``quantize``, ``reencode``) is applied before anything is measured; with ``save_dir`` the quantized images are
    written as ``save_fmt`` (``png`` lossless, or ``jpeg:Q``) under the records' file stems.
    """
    from advreid.attacks import finalize, save_images

    device = torch.device(device) if device is not None else _device_of(model)
    eval_model = model if eval_model is None else eval_model
    records = list(records)
    idx_all = torch.as_tensor(list(indices) if indices is not None else range(len(records)), dtype=torch.long)
    if idx_all.numel() != len(records):
        raise ValueError(f"attack_dataset: {len(records)} records but {idx_all.numel()} indices")
    fkw = dict(finalize_kw or {})
    quantize, reencode = fkw.get("quantize"), fkw.get("reencode")
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(ImageDataset(records, build_transforms(height, width, is_train=False)),
                                         batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    it: Any = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None, unit="batch")
    modes = (model.training, eval_model.training)
    model.eval()
    eval_model.eval()
    feats, pids, camids, linf, l2, imgs, saved = [], [], [], [], [], [], []
    seconds = 0.0
    try:
        for x, pid, cam, local in it:
            x = x.to(device, non_blocking=True)
            _sync(device)
            t0 = time.perf_counter()
            adv = attack(x, pid.to(device), cam.to(device), guides, index=idx_all[local])
            adv_q = finalize(adv.detach(), quantize=quantize) if quantize else adv.detach()
            adv_e = finalize(adv_q, reencode=reencode) if reencode else adv_q
            _sync(device)
            seconds += time.perf_counter() - t0
            d = (adv_e - x).flatten(1).float()
            linf.append(d.abs().amax(dim=1).cpu())
            l2.append(d.norm(dim=1).cpu())
            feats.append(embed(eval_model, adv_e, flip=flip, normalize=normalize).cpu())
            pids.append(pid)
            camids.append(cam)
            if save_dir is not None:  # adv_q is on the 8-bit grid already when quantized: "round" is exact
                names = [Path(records[int(i)].path).name for i in local]
                saved += [str(p) for p in save_images(adv_q, names, save_dir, fmt=save_fmt, quantize="round")]
            if keep_images:
                imgs.append(adv_e.cpu())
    finally:
        model.train(modes[0])
        eval_model.train(modes[1])
    if not feats:
        raise ValueError(f"{desc}: no images to attack")
    return AttackOutput(torch.cat(feats), torch.cat(pids), torch.cat(camids), torch.cat(linf), torch.cat(l2),
                        seconds, torch.cat(imgs) if keep_images else None, saved)


# ------------------------------------------------------------------------------------------- evaluate_attack
def _score(qf, qp, qc, gf, gp, gc, *, metric: str, ap: str, rerank: bool) -> dict:
    """Plain metrics, plus the re-ranked ones under ``rr_`` keys when ``rerank``."""
    out = evaluate_features(qf, qp, qc, gf, gp, gc, metric=metric, ap=ap)
    if rerank:
        rr = evaluate_features(qf, qp, qc, gf, gp, gc, metric=metric, ap=ap, rerank=True)
        out.update({f"rr_{k}": v for k, v in rr.items() if k != "num_valid_queries"})
    return out


def evaluate_attack(
    model: nn.Module,
    query: Sequence[Record],
    gallery: Sequence[Record],
    attack: str,
    *,
    eps_list: Sequence[float] = (5 / 255,),
    alpha: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    attack_params: dict | None = None,
    side: str | None = None,
    source_model: nn.Module | None = None,
    guide_source: str | None = None,
    train: Sequence[Record] | None = None,
    metric: str = "cosine",
    normalize: bool = True,
    flip: bool = False,
    ap: str = "standard",
    rerank: bool = False,
    quantize: str | None = None,
    reencode: str | None = None,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    height: int = 256,
    width: int = 128,
    device: torch.device | str | None = None,
    max_images: int | None = None,
    save_dir: str | os.PathLike | None = None,
    keep_images: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    on_eps: Callable[[dict], None] | None = None,
    defense: nn.Module | None = None,
    adaptive: bool = False,
    eot_samples: int | None = None,
    cache: dict | None = None,
    keep_features: bool = False,
) -> dict:
    """Clean vs attacked rank-1/5/10, mAP, mINP (and re-ranked) for each eps in ``eps_list``.

    ``side="query"`` perturbs the queries against the clean gallery; ``"gallery"`` the gallery against clean
    queries; ``None``: the attack's own side (query, except gallery presets such as ``ifgsm_bai``). The attack is
    built on ``source_model`` (black-box transfer) or ``model``; ``model`` is always the one evaluated. Guides
    (when the attack needs them) come from ``guide_source`` or the attack's set for the side (:func:`guide_set`),
    embedded once (raw, no flip) by the attacking model. ``max_images`` keeps an evenly spaced subset of the
    attacked side (for clean and attacked rows alike). ``on_eps(result)`` is called after each eps (partial result).
    With ``keep_images`` the result holds the finalized images under ``"images"`` (a list, one tensor per eps).

    ``defense`` (a passive preprocess, :mod:`advreid.defenses.passive`) is applied to every evaluated image, queries
    and gallery alike. The attacker is *non-adaptive* by default (it attacks the bare model, as in the seed paper);
    with ``adaptive=True`` it attacks ``preprocess ∘ model`` (BPDA through non-differentiable steps, and EOT with
    ``eot_samples`` draws -- default 10 -- when the defense is randomised). ``cache`` (a dict the caller reuses across
    calls on the same model, data and protocol) keeps clean features and guide banks between calls;
    ``keep_features`` returns the attacked side's features under ``"features"`` (one tensor per eps).
    """
    from advreid.ops import parse_format

    if side is not None and side not in SIDES:
        raise ValueError(f"side={side!r}; expected one of {', '.join(SIDES)}")
    _check_attack_name(attack)
    if not eps_list:
        raise ValueError("eps_list is empty")
    _check_finalize(quantize, reencode)
    device = torch.device(device) if device is not None else _device_of(model)
    bare_attacker = model if source_model is None else source_model
    model.to(device).eval()
    bare_attacker.to(device).eval()
    params = dict(attack_params or {})
    if "side" in params:
        raise ValueError("pass the side as side= (--side), not as an attack parameter")
    if adaptive and defense is None:
        raise ValueError("adaptive=True needs a defense: an adaptive attacker differentiates through the defense")
    defense_info = _defense_info(defense)
    eval_model, attacker = model, bare_attacker
    if defense is not None:
        from advreid.defenses.passive import DefendedModel

        defense = defense.to(device).eval()
        eval_model = DefendedModel(model, defense)
        if adaptive:
            attacker = DefendedModel(bare_attacker, defense)
            if getattr(defense, "randomized", False):  # EOT only where there is randomness to average over
                params.setdefault("eot_samples", 10 if eot_samples is None else int(eot_samples))
    threat = "adaptive" if adaptive else ("non_adaptive" if defense is not None else "white_box")
    if source_model is not None:
        threat = "transfer" + ("_adaptive" if adaptive else "")
    cache = {} if cache is None else cache
    opt = _opt(alpha=alpha, steps=steps)
    # the preset's own side (``ifgsm_bai`` is a gallery attack) is the default and anchors its guide set
    declared_side = getattr(_build(attack, attacker, eps=float(eps_list[0]), **opt, seed=seed, **params), "side",
                            "query")
    side = side or declared_side

    sets = {"query": list(query), "gallery": list(gallery)}
    if train is not None:
        sets["train"] = list(train)

    def make(eps: float) -> Any:
        return _build(attack, attacker, eps=float(eps), **opt, seed=seed, side=side, **params)

    probe = make(eps_list[0])
    needs_guides = bool(getattr(probe, "needs_guides", False))
    gsrc = guide_source or guide_set(getattr(probe, "guide_source_default", None), side, declared_side)
    if needs_guides and gsrc not in sets:
        raise ValueError(f"attack {attack!r} wants guides from the {gsrc!r} set; available: {', '.join(sets)} "
                         "(pass guide_source= or the train records)")
    if needs_guides and probe.params().get("exclude_self") and gsrc != side:
        raise ValueError(f"attack {attack!r} has exclude_self=True, which needs the guides to come from the "
                         f"attacked ({side}) set, not the {gsrc} set")
    # files as scored: JPEG when the images were scored after a JPEG round-trip, else lossless PNG
    save_fmt = reencode if reencode is not None and parse_format(reencode)[0] == "jpeg" else "png"
    fkw = {"quantize": quantize, "reencode": reencode}

    attacked_all = sets[side]
    sub = subset_indices(len(attacked_all), max_images)
    attacked = [attacked_all[i] for i in sub]
    sets_eval = {s: sets[s] for s in SIDES}
    sets_eval[side] = attacked

    # clean features under the eval protocol (subset on the attacked side), once for the whole sweep
    tf = build_transforms(height, width, is_train=False)
    ekw = dict(batch_size=eval_batch_size, flip=flip, normalize=normalize, device=device, num_workers=num_workers,
               progress=progress)
    dkey = defense_info["key"] if defense_info else "none"
    clean, clean_metrics = _clean(eval_model, dkey, sets_eval, tf, ekw, cache, side=side, max_images=max_images,
                                  metric=metric, ap=ap, rerank=rerank)
    guides, guide_info = None, None
    if needs_guides:  # the full set (not the subset), embedded once by the attacking model (and cached)
        gkey = ("guides", gsrc, "source" if source_model is not None else "target", dkey if adaptive else "none",
                height, width)
        if gkey not in cache:
            cache[gkey] = build_guide_bank(attacker, sets[gsrc], gsrc, height=height, width=width,
                                           batch_size=eval_batch_size, num_workers=num_workers, progress=progress)
        guides = cache[gkey]
        guide_info = {"source": gsrc, "num": len(sets[gsrc]), "model": "source" if source_model else "target",
                      "through_defense": bool(adaptive)}

    result: dict[str, Any] = {
        "attack": attack, "side": side, "guides": guide_info, "transfer": source_model is not None,
        "defense": defense_info, "threat": threat, "finalize": fkw, "seed": seed,
        "protocol": {"metric": metric, "normalize": normalize, "flip": flip, "ap": ap, "rerank": rerank,
                     "height": height, "width": width, "num_query": len(sets_eval["query"]),
                     "num_gallery": len(sets_eval["gallery"]), "max_images": max_images},
        "runs": [],
    }
    images: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    for k, eps in enumerate(eps_list):
        atk = probe if k == 0 else make(eps)
        sdir = None
        if save_dir is not None:
            sdir = Path(save_dir) if len(eps_list) == 1 else Path(save_dir) / f"eps_{eps_label(eps)}"
        out = attack_dataset(attacker, atk, attacked, guides=guides, indices=sub, eval_model=eval_model, flip=flip,
                             normalize=normalize, batch_size=batch_size, height=height, width=width, device=device,
                             finalize_kw=fkw, keep_images=keep_images, save_dir=sdir, save_fmt=save_fmt,
                             num_workers=num_workers, progress=progress, desc=f"{attack} eps={eps_label(eps)}")
        feats = dict(clean)
        feats[side] = (out.features, out.pids, out.camids)
        attacked_metrics = _score(*feats["query"], *feats["gallery"], metric=metric, ap=ap, rerank=rerank)
        entry = {"eps": float(eps), "eps_px": float(eps) * 255, "params": _jsonable(atk.params()),
                 "clean": clean_metrics, "attacked": attacked_metrics, **out.stats()}
        if sdir is not None:
            entry["saved_to"] = str(sdir)
        result["runs"].append(entry)
        if keep_images and out.images is not None:
            images.append(out.images)
        if keep_features:
            features.append(out.features)
        if on_eps is not None:
            on_eps(result)
    if keep_images:
        result["images"] = images
    if keep_features:
        result["features"] = features
    return result


def _clean(eval_model: nn.Module, dkey: str, sets_eval: dict, tf: Any, ekw: dict, cache: dict, *, side: str,
           max_images: int | None, metric: str, ap: str, rerank: bool) -> tuple[dict, dict]:
    """Clean query/gallery features (cached under a key naming everything they depend on) and their scores."""
    clean = {}
    base = (dkey, side, max_images, ekw["flip"], ekw["normalize"], tuple(tf.transforms[0].size))
    for s in SIDES:
        ckey = ("clean", s, *base)
        if ckey not in cache:
            cache[ckey] = extract_features(eval_model, ImageDataset(sets_eval[s], tf), desc=f"clean {s}", **ekw)
        clean[s] = cache[ckey]
    mkey = ("metrics", *base, metric, ap, rerank)
    if mkey not in cache:
        cache[mkey] = _score(*clean["query"], *clean["gallery"], metric=metric, ap=ap, rerank=rerank)
    return clean, cache[mkey]


def evaluate_clean(
    model: nn.Module,
    query: Sequence[Record],
    gallery: Sequence[Record],
    *,
    defense: nn.Module | None = None,
    side: str = "query",
    max_images: int | None = None,
    metric: str = "cosine",
    normalize: bool = True,
    flip: bool = False,
    ap: str = "standard",
    rerank: bool = False,
    eval_batch_size: int = 128,
    height: int = 256,
    width: int = 128,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
    cache: dict | None = None,
) -> dict:
    """Clean scores of ``model`` (behind ``defense``) on exactly the images :func:`evaluate_attack` scores as its
    clean row (same subset, same cache): the no-attack cell of a robustness table."""
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device).eval()
    eval_model = model
    if defense is not None:
        from advreid.defenses.passive import DefendedModel

        eval_model = DefendedModel(model, defense.to(device).eval())
    info = _defense_info(defense)
    sets_eval = {"query": list(query), "gallery": list(gallery)}
    sub = subset_indices(len(sets_eval[side]), max_images)
    sets_eval[side] = [sets_eval[side][i] for i in sub]
    tf = build_transforms(height, width, is_train=False)
    ekw = dict(batch_size=eval_batch_size, flip=flip, normalize=normalize, device=device, num_workers=num_workers,
               progress=progress)
    _, metrics = _clean(eval_model, info["key"] if info else "none", sets_eval, tf, ekw,
                        {} if cache is None else cache, side=side, max_images=max_images, metric=metric, ap=ap,
                        rerank=rerank)
    return {"attack": None, "side": side, "defense": info, "threat": "clean", "clean": metrics,
            "protocol": {"metric": metric, "normalize": normalize, "flip": flip, "ap": ap, "rerank": rerank,
                         "height": height, "width": width, "num_query": len(sets_eval["query"]),
                         "num_gallery": len(sets_eval["gallery"]), "max_images": max_images}}


def _defense_info(defense: nn.Module | None) -> dict | None:
    """JSON description of a passive defense (its registry name when it has one, and its parameters)."""
    if defense is None:
        return None
    import json

    params = _jsonable(defense.params()) if hasattr(defense, "params") else {}
    name = getattr(defense, "name", None) or type(defense).__name__
    return {"name": name, "class": type(defense).__name__, "params": params,
            "randomized": bool(getattr(defense, "randomized", False)),
            "differentiable": bool(getattr(defense, "differentiable", True)),
            "key": f"{name}:{json.dumps(params, sort_keys=True)}"}


def _check_attack_name(attack: str) -> None:
    from advreid.attacks import list_attacks

    if attack.lower() not in {n.lower() for n in list_attacks()}:
        raise ValueError(f"unknown attack {attack!r}; known attacks: {', '.join(sorted(list_attacks()))}")


def _build(attack: str, model: nn.Module, **kw: Any) -> Any:
    """``advreid.attacks.build`` with a bad parameter reported as ValueError (a one-line CLI error)."""
    from advreid.attacks import build

    try:
        return build(attack, model, **kw)
    except TypeError as e:
        raise ValueError(_one_line(e)) from e


def _check_finalize(quantize: str | None, reencode: str | None) -> None:
    """Fail early (naming the flag) on a quantize / re-encode setting ``finalize`` would refuse."""
    from advreid.attacks import finalize

    try:
        finalize(torch.zeros(1, 3, 2, 2), quantize=quantize, reencode=reencode)
    except ValueError as e:
        flag = "--reencode" if reencode is not None and "quantize" not in str(e) else "--quantize"
        raise ValueError(f"{flag}: {_one_line(e)}") from None


def _opt(**kw: Any) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


# ------------------------------------------------------------------------------------------------ run_attack
def _load_run(run_dir: str | os.PathLike, checkpoint: str | None = None) -> tuple[nn.Module, dict]:
    from advreid.models import find_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    stem = Path(checkpoint) if checkpoint else find_checkpoint(run_dir)
    model = load_checkpoint(stem)
    doc = model.checkpoint_meta
    info = {"run_dir": str(run_dir), "checkpoint": str(stem), "arch": doc.get("arch"),
            "model_name": doc.get("meta", {}).get("model_name"),
            "trained_on": doc.get("meta", {}).get("dataset")}
    return model, info


def run_defense(model: nn.Module, name: str | None = None, params: dict | None = None) -> nn.Module | None:
    """The passive defense to evaluate ``model`` behind: ``name`` ("none" for the bare model), or by default the
    one its training config names (``defense.passive``, e.g. the JAD recipe's circuitous scaling)."""
    from advreid.defenses.passive import build_passive

    if name is None:
        dcfg = getattr(model, "checkpoint_meta", {}).get("meta", {}).get("config", {}).get("defense", {}) or {}
        name, params = dcfg.get("passive"), dcfg.get("passive_params") if params is None else params
    if name is None or str(name).lower() == "none":
        return None
    d = build_passive(name, params)
    d.name = str(name)
    return d


def default_out_dir(run_dir: str | os.PathLike, attack: str, side: str, *, sweep: bool,
                    source_run: str | os.PathLike | None = None, defense: str | None = None) -> Path:
    """``RUN_DIR/attacks/<attack>-<side>[-sweep][-<defense>[-adaptive]][-from-<source run name>]``."""
    name = f"{attack}-{side}" + ("-sweep" if sweep else "") + (f"-{defense}" if defense else "")
    if source_run is not None:
        name += f"-from-{Path(source_run).resolve().name}"
    return Path(run_dir) / "attacks" / name


def run_attack(
    run_dir: str | os.PathLike,
    data: str | os.PathLike,
    attack: str,
    *,
    eps_list: Sequence[float],
    alpha: float | None = None,
    steps: int | None = None,
    side: str | None = None,
    dataset: str | None = None,
    source_run: str | os.PathLike | None = None,
    rerank: bool = False,
    quantize: str | None = None,
    reencode: str | None = None,
    seed_compat: bool = False,
    seed: int = 0,
    attack_params: dict | None = None,
    max_images: int | None = None,
    save_adv: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    sweep: bool | None = None,
    defense: str | None = None,
    adaptive: bool = False,
    eot_samples: int | None = None,
) -> tuple[dict, Path]:
    """Load the run(s), attack, write ``<out>/results.json`` (atomically, after each eps); return (results, out)."""
    from advreid.data import build_dataset
    from advreid.utils.io import atomic_write_json, prepare_run_dir
    from advreid.utils.misc import get_device

    _check_attack_name(attack)
    if side is not None and side not in SIDES:
        raise ValueError(f"--side {side!r}; expected one of {', '.join(SIDES)}")
    if seed_compat:
        from advreid.attacks import SEED_COMPAT

        for flag, given, want in (("--quantize", quantize, SEED_COMPAT["quantize"]),
                                  ("--reencode", reencode, SEED_COMPAT["reencode"])):
            if given is not None and given != want:
                raise ValueError(f"--seed-compat means {flag} {want}; it conflicts with {flag} {given}")
        quantize, reencode = SEED_COMPAT["quantize"], SEED_COMPAT["reencode"]
    model, target = _load_run(run_dir)
    proto = eval_protocol(model)
    defense_mod = run_defense(model, defense)
    if adaptive and defense_mod is None:
        raise ValueError("--adaptive attacks through the run's passive defense, but there is none (the run's config "
                         "has no defense.passive): pass --defense NAME (e.g. cs)")
    source, src_info = None, None
    if source_run is not None:
        source, src_info = _load_run(source_run)
        sp = eval_protocol(source)
        if (sp["height"], sp["width"]) != (proto["height"], proto["width"]):
            raise ValueError(f"--source-model {source_run} takes {sp['height']}x{sp['width']} images but "
                             f"{run_dir} takes {proto['height']}x{proto['width']}; transfer needs one input size")
    # everything that can be wrong with the command line fails here, before any folder is created
    if "side" in (attack_params or {}):
        raise ValueError("pass the side as --side, not as an attack parameter")
    probe = _build(attack, model, eps=float(eps_list[0]), **_opt(alpha=alpha, steps=steps), seed=seed,
                   **(attack_params or {}))
    side = side or getattr(probe, "side", "query")  # the preset's own side: query, or gallery for ifgsm_bai
    _check_finalize(quantize, reencode)
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images {max_images}: expected a positive number of images")
    cfg = model.checkpoint_meta.get("meta", {}).get("config", {})
    ds_name = dataset or cfg.get("data", {}).get("name", "market1501")
    ds = build_dataset(ds_name, data)
    dev = get_device(device)
    sweep = len(eps_list) > 1 if sweep is None else sweep
    dlabel = None if defense_mod is None else defense_mod.name + ("-adaptive" if adaptive else "")
    out = Path(out) if out is not None else default_out_dir(run_dir, attack, side, sweep=sweep,
                                                            source_run=source_run, defense=dlabel)
    dirs = [out] + ([Path(save_adv)] if save_adv is not None else [])
    for d in dirs:
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {d} already exists and is not empty; pass --overwrite (the old "
                                  f"one is kept as {d}.old-N) or choose another --out / --save-adv")
    for d in dirs:
        prepare_run_dir(d, overwrite=overwrite)

    import advreid

    header = {
        "advreid_version": advreid.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"name": ds_name, "root": str(Path(data).resolve())},
        "model": target, "source_model": src_info,
        "attack": {"name": attack, "params": None, "extra_params": dict(attack_params or {})},
        "side": side, "seed_compat": seed_compat, "seed": seed, "device": str(dev),
        "save_adv": str(save_adv) if save_adv is not None else None,
    }
    path = out / "results.json"

    def document(res: dict, complete: bool) -> dict:
        runs = res.get("runs") or []
        doc = {**header, "complete": complete, **{k: v for k, v in res.items() if k not in ("images", "attack")}}
        doc["attack"] = {**header["attack"], "params": runs[0]["params"] if runs else None}
        doc["protocol"] = {**res["protocol"], "eval_batch_size": proto["batch_size"]}
        if complete:
            doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return doc

    res = evaluate_attack(
        model, ds.query, ds.gallery, attack, eps_list=eps_list, alpha=alpha, steps=steps, seed=seed,
        attack_params=attack_params, side=side, source_model=source, metric=proto["metric"],
        normalize=proto["normalize"], flip=proto["flip"], ap=proto["ap"], rerank=rerank, quantize=quantize,
        reencode=reencode, batch_size=batch_size, eval_batch_size=proto["batch_size"], height=proto["height"],
        width=proto["width"], device=dev, max_images=max_images, save_dir=save_adv, num_workers=num_workers,
        progress=progress, on_eps=lambda r: atomic_write_json(path, document(r, complete=False)),
        defense=defense_mod, adaptive=adaptive, eot_samples=eot_samples,
    )
    doc = document(res, complete=True)
    atomic_write_json(path, doc)
    return doc, out
