"""The robustness evaluator: perturb the query (or gallery) set with an attack, score clean vs attacked retrieval.

``advreid.attacks`` knows nothing about evaluation; this module drives it. Adversarial batches are embedded on the
fly (only features, norms and timings are kept, images only when asked), so memory stays that of a plain
evaluation. Everything is described by typed objects (:mod:`advreid.evaluation.protocol`): an :class:`AttackSpec`,
a :class:`ThreatModel`, an :class:`EvalProtocol` and :class:`RunOptions`.

Under ``torchrun`` the attacked batches and the feature extraction are split over the ranks by whole batches of the
single-process run, with bit-identical results; rank 0 scores (:mod:`advreid.evaluation.sharding`,
docs/sharding.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.data import ImageDataset, Record, build_transforms
from advreid.evaluation.evaluator import score
from advreid.evaluation.protocol import (
    SIDES,
    AttackResult,
    AttackSpec,
    CleanResult,
    EvalProtocol,
    RunOptions,
    ThreatModel,
)
from advreid.evaluation.sharding import BatchStore, ShardPlan, extract_sharded, gather_batches, is_main
from advreid.models.features import embed
from advreid.ops import eps_label, finalize, parse_format, quantize_within, save_images
from advreid.utils.misc import jsonable

__all__ = ["AttackOutput", "attack_dataset", "build_guide_bank", "evaluate_attack", "evaluate_clean", "guide_set",
           "score", "subset_indices"]


# --------------------------------------------------------------------------------------------- small helpers
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
        raise ValueError(f"max_images={max_images}: expected a positive number of images")
    if max_images == 1:
        return [0]
    return sorted({round(i * (n - 1) / (max_images - 1)) for i in range(max_images)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module, options: RunOptions) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def build_guide_bank(model: nn.Module, records: Sequence[Record], source: str, *, protocol: EvalProtocol,
                     options: RunOptions | None = None) -> Any:
    """A :class:`advreid.attacks.GuideBank` of ``model``'s raw embeddings (no flip, no L2) of ``records``, kept on
    the model's device (where the attack looks guides up); on every rank of a sharded run."""
    from advreid.attacks import GuideBank

    options = options or RunOptions()
    tf = build_transforms(protocol.height, protocol.width, is_train=False)
    device = _device(model, options)
    # GuideBank.from_images of a dataset, with the extraction split over the ranks of a sharded run (every rank
    # attacks, so every rank gets the whole bank)
    f, p, c = extract_sharded(model, ImageDataset(list(records), tf), batch_size=protocol.batch_size, flip=False,
                              normalize=False, device=device, num_workers=options.num_workers,
                              progress=options.progress and is_main(), desc=f"guides ({source})")
    return GuideBank(f.to(device), p.to(device), c.to(device), source=source)


# -------------------------------------------------------------------------------------------- attack_dataset
@dataclass
class AttackOutput:
    """What :func:`attack_dataset` keeps: eval-protocol features of the adversarial images and their stats."""

    features: torch.Tensor  # (N, D), on CPU
    pids: torch.Tensor
    camids: torch.Tensor
    linf: torch.Tensor  # (N,) L-inf norm of each perturbation after finalize, [0,1] units
    l2: torch.Tensor  # (N,) L2 norm of each perturbation after finalize
    seconds: float  # attack + finalize time, all batches (of all ranks when sharded; as measured when read back)
    images: torch.Tensor | None = None  # (M,3,H,W) finalized adversarial images kept (``keep_images``)
    image_index: list[int] = field(default_factory=list)  # their dataset indices
    saved: list[str] = field(default_factory=list)
    resumed: int = 0  # images read back from ``options.batch_store`` instead of attacked again
    shards: list[dict] = field(default_factory=list)  # [{"rank", "queries"}]: how the batches were split

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
                "seconds": round(self.seconds, 4), "time_per_image_s": self.seconds / n,
                "num_resumed": self.resumed}


@dataclass
class _BatchAttack:
    """One attacked batch, start to finish: attack, finalize, measure, embed (and save/keep images)."""

    attack: Callable[..., torch.Tensor]
    eval_model: nn.Module
    protocol: EvalProtocol
    guides: Any
    finalize_kw: dict
    save_dir: Path | None
    device: torch.device
    keep: bool | set[int]
    records: list

    def key_parts(self, index: list[int]) -> dict:
        """What a saved batch must match to be reused: its images, the attack's settings, finalize, outputs."""
        params = self.attack.params() if hasattr(self.attack, "params") else {}
        plain = {k: v for k, v in params.items() if v is None or isinstance(v, bool | int | float | str)}
        keep = self.keep if isinstance(self.keep, bool) else sorted(i for i in index if i in self.keep)
        return {"index": index, "attack": type(self.attack).__name__, "eps": float(getattr(self.attack, "eps", -1)),
                "params": plain, "finalize": self.finalize_kw, "keep": keep,
                "save_dir": None if self.save_dir is None else str(self.save_dir),
                "protocol": [self.protocol.flip, self.protocol.normalize, self.protocol.height, self.protocol.width]}

    def __call__(self, x: torch.Tensor, pid: torch.Tensor, cam: torch.Tensor, index: torch.Tensor,
                 positions: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        device, quantize, reencode = self.device, self.finalize_kw.get("quantize"), self.finalize_kw.get("reencode")
        x = x.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        adv = self.attack(x, pid.to(device), cam.to(device), self.guides, index=index)
        if quantize and getattr(self.attack, "norm", "linf") == "linf" and hasattr(self.attack, "eps"):
            adv_q = quantize_within(adv.detach(), x, float(self.attack.eps), quantize)  # stays within eps in levels
        else:
            adv_q = finalize(adv.detach(), quantize=quantize) if quantize else adv.detach()
        adv_e = finalize(adv_q, reencode=reencode) if reencode else adv_q
        _sync(device)
        seconds = time.perf_counter() - t0
        d = (adv_e - x).flatten(1).float()
        out = {"features": embed(self.eval_model, adv_e, flip=self.protocol.flip,
                                 normalize=self.protocol.normalize).cpu(),
               "pids": torch.as_tensor(pid), "camids": torch.as_tensor(cam),
               "linf": d.abs().amax(dim=1).cpu(), "l2": d.norm(dim=1).cpu()}
        saved: list[str] = []
        if self.save_dir is not None:  # adv_q is on the 8-bit grid already when quantized: "round" is exact
            fmt = reencode if reencode is not None and parse_format(reencode)[0] == "jpeg" else "png"
            names = [Path(self.records[int(i)].path).name for i in positions]
            saved = [str(p) for p in save_images(adv_q, names, self.save_dir, fmt=fmt, quantize="round")]
        rows = list(range(len(index))) if self.keep is True else \
            [j for j, i in enumerate(index.tolist()) if self.keep and i in self.keep]
        if rows:
            out["images"] = adv_e[rows].cpu()
            out["kept"] = index[rows].clone()
        return out, {"seconds": seconds, "saved": saved}


def _loader(records: list, positions: list[int], protocol: EvalProtocol, options: RunOptions,
            device: torch.device, desc: str, progress: bool) -> Any:
    """(test-transformed image, pid, camid, position) batches of ``records[positions]``, in that order."""
    tf = build_transforms(protocol.height, protocol.width, is_train=False)
    loader: Any = torch.utils.data.DataLoader(torch.utils.data.Subset(ImageDataset(records, tf), positions),
                                              batch_size=options.batch_size, shuffle=False,
                                              num_workers=options.num_workers, pin_memory=device.type == "cuda")
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None, unit="batch")
    return loader


def _assemble(parts: list[tuple[dict, dict, bool]], shards: list[dict], desc: str) -> AttackOutput:
    """The :class:`AttackOutput` of all batches' (tensors, info, read back) in batch order."""
    if not parts:
        raise ValueError(f"{desc}: no images to attack")
    cat = {k: torch.cat([p[0][k] for p in parts]) for k in ("features", "pids", "camids", "linf", "l2")}
    imgs = [p[0]["images"] for p in parts if "images" in p[0]]
    return AttackOutput(cat["features"], cat["pids"], cat["camids"], cat["linf"], cat["l2"],
                        sum(float(p[1]["seconds"]) for p in parts), torch.cat(imgs) if imgs else None,
                        [int(i) for p in parts if "kept" in p[0] for i in p[0]["kept"].tolist()],
                        [s for p in parts for s in p[1]["saved"]],
                        resumed=sum(len(p[0]["pids"]) for p in parts if p[2]), shards=shards)


def attack_dataset(attack: Callable[..., torch.Tensor], records: Sequence[Record], eval_model: nn.Module, *,
                   protocol: EvalProtocol, guides: Any = None, indices: Sequence[int] | None = None,
                   finalize_kw: dict | None = None, options: RunOptions | None = None, save_dir: Any = None,
                   desc: str = "attack") -> AttackOutput:
    """Attack ``records`` batch by batch and embed each adversarial batch at once with ``eval_model`` under the
    eval protocol (flip, normalize; another model than the attacked one for black-box transfer).

    ``indices[i]`` is the dataset index of ``records[i]`` (default ``i``), passed to the attack as ``index=`` so
    per-sample random streams do not depend on batching or on a subset. ``finalize_kw`` (``quantize``,
    ``reencode``) is applied before anything is measured; with ``save_dir`` the quantized images are written
    (PNG, or JPEG when re-encoded as JPEG) under the records' file stems.

    In a process group (``torchrun``) batch ``i`` of the single-process batching is attacked by rank ``i mod N``
    and every rank returns the whole output, gathered in batch order (bit-identical to one process:
    :mod:`advreid.evaluation.sharding`). With ``options.batch_store`` each finished batch is saved as it goes and
    a batch saved earlier under the same key is read back instead of attacked again (``resumed`` counts them).
    """
    options = options or RunOptions()
    device = _device(eval_model, options)
    records = list(records)
    idx = torch.as_tensor(list(indices) if indices is not None else range(len(records)), dtype=torch.long)
    if idx.numel() != len(records):
        raise ValueError(f"attack_dataset: {len(records)} records but {idx.numel()} indices")
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    keep = options.keep_images if isinstance(options.keep_images, bool) else {int(i) for i in options.keep_images}
    step = _BatchAttack(attack, eval_model, protocol, guides, dict(finalize_kw or {}), save_dir, device, keep,
                        records)
    plan = ShardPlan.current(len(records), options.batch_size)
    store: BatchStore | None = options.batch_store
    local: dict[int, tuple[dict, dict, bool]] = {}
    todo: dict[int, str] = {}
    for i in plan.mine():  # batches saved earlier (resume) are read back, the others attacked below
        key = store.batch_key(step.key_parts(idx[list(plan.batch(i))].tolist())) if store is not None else ""
        got = store.load(i, key) if store is not None else None
        if got is not None:
            local[i] = (*got, True)
        else:
            todo[i] = key
    loader = _loader(records, plan.positions(list(todo)), protocol, options, device, desc,
                     progress=options.progress and plan.rank == 0)
    was_training = eval_model.training
    eval_model.eval()
    try:
        for i, (x, pid, cam, pos) in zip(todo, loader, strict=True):
            tensors, info = step(x, pid, cam, idx[pos], pos)
            if store is not None:
                store.save(i, todo[i], tensors, info)
            local[i] = (tensors, info, False)
    finally:
        eval_model.train(was_training)
    parts = gather_batches(local, plan.num_batches)
    return _assemble(parts or [], plan.counts(), desc)


# ----------------------------------------------------------------------------------------------- clean rows
def _clean(eval_model: nn.Module, dkey: str, sets_eval: dict, side: str, protocol: EvalProtocol,
           options: RunOptions, device: torch.device) -> tuple[dict, dict]:
    """Clean query/gallery features (cached under a key naming everything they depend on) and their scores.
    Sharded: each rank extracts its batches, rank 0 gathers and scores (the other ranks get None values)."""
    cache = options.cache if options.cache is not None else {}
    tf = build_transforms(protocol.height, protocol.width, is_train=False)
    base = (dkey, side, protocol.max_images, protocol.flip, protocol.normalize, (protocol.height, protocol.width))
    clean = {}
    for s in SIDES:
        ckey = ("clean", s, *base)
        if ckey not in cache:
            cache[ckey] = extract_sharded(eval_model, ImageDataset(sets_eval[s], tf), desc=f"clean {s}",
                                          batch_size=protocol.batch_size, flip=protocol.flip,
                                          normalize=protocol.normalize, device=device, to_all=False,
                                          num_workers=options.num_workers, progress=options.progress and is_main())
        clean[s] = cache[ckey]
    mkey = ("metrics", *base, protocol.metric, protocol.ap, protocol.rerank)
    if mkey not in cache:
        cache[mkey] = score(clean["query"], clean["gallery"], protocol) if is_main() else None
    return clean, cache[mkey]


def _protocol_doc(protocol: EvalProtocol, sets_eval: dict) -> dict:
    return {"metric": protocol.metric, "normalize": protocol.normalize, "flip": protocol.flip, "ap": protocol.ap,
            "rerank": protocol.rerank, "height": protocol.height, "width": protocol.width,
            "num_query": len(sets_eval["query"]), "num_gallery": len(sets_eval["gallery"]),
            "max_images": protocol.max_images}


def _eval_sets(query: Sequence[Record], gallery: Sequence[Record], side: str,
               max_images: int | None) -> tuple[dict, list[int]]:
    sets = {"query": list(query), "gallery": list(gallery)}
    sub = subset_indices(len(sets[side]), max_images)
    sets[side] = [sets[side][i] for i in sub]
    return sets, sub


def evaluate_clean(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], *,
                   threat: ThreatModel | None = None, protocol: EvalProtocol | None = None, side: str = "query",
                   options: RunOptions | None = None) -> CleanResult:
    """Clean scores of ``model`` (behind the threat model's defense) on exactly the images
    :func:`evaluate_attack` scores as its clean row (same subset, same cache): the no-attack cell of a table."""
    protocol, options = protocol or EvalProtocol(), options or RunOptions()
    threat = (threat or ThreatModel()).resolve(model)
    device = _device(model, options)
    model.to(device).eval()
    eval_model, _, _ = threat.models(model)
    sets_eval, sub = _eval_sets(query, gallery, side, protocol.max_images)
    info = threat.defense_info()
    clean, metrics = _clean(eval_model, info["key"] if info else "none", sets_eval, side, protocol, options, device)
    out = {"attack": None, "side": side, "defense": info, "threat": "clean", "clean": metrics,
           "protocol": _protocol_doc(protocol, sets_eval)}
    if options.keep_features:
        out["features"] = dict(clean)
        other = "gallery" if side == "query" else "query"
        out["feature_index"] = {side: sub, other: list(range(len(sets_eval[other])))}
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ evaluate_attack
@dataclass
class _Plan:
    """A resolved attack run: spec with its side, feature functions, guides, subset and clean scores."""

    spec: AttackSpec
    side: str
    eval_model: nn.Module
    attacker: nn.Module
    extra: dict
    guides: Any
    guide_info: dict | None
    sub: list[int]
    clean: dict
    clean_metrics: dict
    sets_eval: dict


def _plan(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], spec: AttackSpec,
          threat: ThreatModel, protocol: EvalProtocol, options: RunOptions,
          train: Sequence[Record] | None) -> _Plan:
    device = _device(model, options)
    model.to(device).eval()
    if threat.source_model is not None:
        threat.source_model.to(device).eval()
    eval_model, attacker, extra = threat.models(model)
    # the preset's own side (ifgsm_bai: gallery) anchors its guide set
    first = spec.replace(side=None).build(attacker, **extra)
    declared = getattr(first, "side", "query")
    side = spec.side or declared
    spec = spec.replace(side=side)
    probe = first if side == declared else spec.build(attacker, **extra)  # built once (a DMR build loads weights)
    sets = {"query": list(query), "gallery": list(gallery)}
    if train is not None:
        sets["train"] = list(train)
    needs_guides = bool(getattr(probe, "needs_guides", False))
    gsrc = spec.guide_source or guide_set(getattr(probe, "guide_source_default", None), side, declared)
    if needs_guides and gsrc not in sets:
        raise ValueError(f"attack {spec.name!r} wants guides from the {gsrc!r} set; available: {', '.join(sets)} "
                         "(pass guide_source= or the train records)")
    if needs_guides and probe.params().get("exclude_self") and gsrc != side:
        raise ValueError(f"attack {spec.name!r} has exclude_self=True, which needs the guides to come from the "
                         f"attacked ({side}) set, not the {gsrc} set")
    sets_eval, sub = _eval_sets(query, gallery, side, protocol.max_images)
    info = threat.defense_info()
    dkey = info["key"] if info else "none"
    clean, clean_metrics = _clean(eval_model, dkey, sets_eval, side, protocol, options, device)
    guides, guide_info = None, None
    if needs_guides:  # the full set (not the subset), embedded once by the attacking model (and cached)
        cache = options.cache  # evaluate_attack always gives one
        gkey = ("guides", gsrc, "source" if threat.source_model is not None else "target",
                dkey if threat.adaptive else "none", protocol.height, protocol.width)
        if gkey not in cache:
            cache[gkey] = build_guide_bank(attacker, sets[gsrc], gsrc, protocol=protocol, options=options)
        guides = cache[gkey]
        guide_info = {"source": gsrc, "num": len(sets[gsrc]),
                      "model": "source" if threat.source_model is not None else "target",
                      "through_defense": bool(threat.adaptive)}
    return _Plan(spec, side, eval_model, attacker, extra, guides, guide_info, sub, clean, clean_metrics, sets_eval)


def evaluate_attack(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], attack: AttackSpec, *,
                    threat: ThreatModel | None = None, protocol: EvalProtocol | None = None,
                    options: RunOptions | None = None, sweep: Sequence[float] | None = None,
                    train: Sequence[Record] | None = None) -> AttackResult:
    """Clean vs attacked rank-1/5/10, mAP, mINP (and re-ranked) of ``model``, for the attack's eps or each eps of
    ``sweep``.

    The attack perturbs its side (query: against the clean gallery; gallery: against clean queries), built on the
    feature function the ``threat`` model gives (bare model, defended model, or source model for transfer);
    ``model`` (behind the defense) is always the one evaluated. Guides, when the attack needs them, come from its
    ``guide_source`` or its set for the side (:func:`guide_set`), embedded once (raw, no flip) by the attacking
    model. ``options.on_eps(result)`` is called after each eps with the partial result; ``keep_images`` /
    ``keep_features`` add the finalized images / attacked-side features per eps under "images" / "features";
    ``options.batch_store`` keeps each eps's finished batches under ``eps_<label>`` for resume.

    Under ``torchrun`` the attacked batches and the feature extraction are split over the ranks
    (:mod:`advreid.evaluation.sharding`, ``result["shards"]``); rank 0 scores and calls ``on_eps``, the other ranks'
    results hold None for the scores.
    """
    protocol, options = protocol or EvalProtocol(), options or RunOptions()
    if options.cache is None:
        options.cache = {}
    threat = (threat or ThreatModel()).resolve(model)
    eps_list: list[float | None] = [None] if sweep is None else [float(e) for e in sweep]  # None: the spec's
    if not eps_list:
        raise ValueError("sweep is empty: give at least one eps")
    p = _plan(model, query, gallery, attack, threat, protocol, options, train)
    result: dict[str, Any] = {
        "attack": attack.name, "side": p.side, "guides": p.guide_info, "transfer": threat.kind.startswith("transfer"),
        "defense": threat.defense_info(), "threat": threat.kind, "finalize": attack.finalize_kw,
        "seed": attack.seed, "protocol": _protocol_doc(protocol, p.sets_eval), "runs": [],
    }
    images, image_index, features = [], [], []
    for eps_arg in eps_list:
        atk = p.spec.build(p.attacker, eps=eps_arg, **p.extra)
        eps = float(atk.eps)
        sdir = None
        if options.save_dir is not None:
            sdir = Path(options.save_dir) if len(eps_list) == 1 else Path(options.save_dir) / f"eps_{eps_label(eps)}"
        store = options.batch_store
        eps_opts = options if store is None else replace(options, batch_store=store.child(f"eps_{eps_label(eps)}"))
        out = attack_dataset(atk, p.sets_eval[p.side], p.eval_model, protocol=protocol, guides=p.guides, indices=p.sub,
                             finalize_kw=attack.finalize_kw, options=eps_opts, save_dir=sdir,
                             desc=f"{attack.name} eps={eps_label(eps)}")
        feats = dict(p.clean)
        feats[p.side] = (out.features, out.pids, out.camids)
        entry = {"eps": float(eps), "eps_px": float(eps) * 255, "params": jsonable(atk.params()),
                 "clean": p.clean_metrics,  # distances and ranking on rank 0 only (docs/sharding.md)
                 "attacked": score(feats["query"], feats["gallery"], protocol) if is_main() else None,
                 **out.stats()}
        if sdir is not None:
            entry["saved_to"] = str(sdir)
        result["shards"] = out.shards
        result["runs"].append(entry)
        if options.keep_images:
            images.append(out.images)
            image_index.append(out.image_index)
        if options.keep_features:
            features.append((out.features, out.pids, out.camids))
        if options.on_eps is not None and is_main():
            options.on_eps(result)
    if options.keep_images:
        result["images"], result["image_index"] = images, image_index
    if options.keep_features:
        result["features"], result["feature_index"] = features, {p.side: p.sub}
    return result  # type: ignore[return-value]
