"""Train a DMR generator against a frozen victim, choosing the kept generator on held-out *training* identities.

Recipe (reference ``train.py``): per P x K batch (images at ``data.train_scale`` times ``data.height`` x
``data.width``, the size the generator is validated at and attacks at; null sizes = the victim checkpoint's
``input_size``), ``x' = perturb(x)``; the discriminator learns (LSGAN) to tell
``cat(x, x')`` (fake) from ``cat(x[:B/2], x[B/2:])`` (real: two clean images of different people); the generator
minimises ``L_GAN + 10 (L_xent + L_tri) + 0.1 (1 - MS-SSIM(x, x'))`` (:mod:`.losses`, weights configurable). Adam
(lr 2e-4, betas 0.5/0.999) for both; the generator step comes first, then the discriminator's. The victim is loaded
with ``advreid.models.load_checkpoint``, frozen and kept in eval mode (the reference leaves it in train mode). The mask
head (``discriminator.temperature > 0``) is optimised with the generator (the reference never updates it: its
gradients only come from the generator loss and are zeroed before the discriminator step).

Validation (replaces the reference's choice of the epoch with the worst *test-query* scores, which leaks the test
set): ``data.val_fraction`` of the training identities (at least one), drawn with a generator seeded by ``seed``,
are held out of the generator's training. For each held-out identity and camera the first image (by path) is a query;
every other image of the held-out identities is gallery. After each epoch the victim's mAP with attacked queries
against the clean gallery is measured (L2-normalised features, no flip, cosine ranking, Market protocol: same-ID
same-camera gallery items are ignored, queries without a match are skipped; AP = mean precision at the matches,
scikit-learn's ``average_precision_score``) and the epoch with the lowest mAP (first on ties) is kept as ``best``.

Files in ``out``: ``config.yaml``; ``checkpoints/last.{safetensors,json}`` (generator, discriminator, both Adam states,
epoch, history; rewritten atomically every epoch); ``checkpoints/best.{safetensors,json}`` (the kept networks);
``results.json`` at the end. Every epoch re-seeds python/numpy/torch from ``(seed, epoch)`` and the sampler from
``(seed, epoch)``, so ``resume=True`` continues exactly as a straight run (bit-identical on CPU).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from advreid.attacks.dmr.losses import LossWeights, generator_total, least_likely_ce, lsgan_loss, misranking_loss
from advreid.attacks.dmr.msssim import auto_win_size, msssim, ssim
from advreid.attacks.dmr.networks import Discriminator, DMRNets, Generator
from advreid.config import ConfigError, dump_config, load_config, preset_dir
from advreid.data import ImageDataset, PKSampler, Record, build_dataset, build_transforms
from advreid.models import (
    CheckpointError,
    checkpoint_paths,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from advreid.ops import parse_eps
from advreid.utils.io import atomic_write_json, atomic_write_text, check_run_dir, prepare_run_dir, sha256_file
from advreid.utils.misc import get_device, seed_everything

__all__ = ["DMR_CHOICES", "DMR_DEFAULTS", "ValidationSplit", "build_nets", "load_dmr_config", "load_generator",
           "resolve_input_size", "split_validation", "train_dmr", "train_size", "victim_outputs"]

DMR_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "victim_run": None,
    # height/width: the size the generator is validated at and attacks at (null: the victim checkpoint's
    # input_size); train_scale: it trains at round(train_scale * height) x round(train_scale * width)
    "data": {"name": "market1501", "root": None, "train_all": False, "height": 256, "width": 128, "train_scale": 1.0,
             "num_workers": 4, "flip_p": 0.5, "pad": 10, "val_fraction": 0.1},
    "sampler": {"p": 8, "k": 4},
    "generator": {"ngf": 32, "n_blocks": 6, "init": "normal", "spectral": True},
    "discriminator": {"type": "multiscale", "ndf": 64, "n_layers": 3, "temperature": -1, "use_gumbel": False,
                      "init": "normal"},
    "perturb": {"eps": None, "center": "zero"},  # eps: "16px" when null; [0,1] units or "Npx" / "N/255"
    "loss": {"gan": 1.0, "reid": 10.0, "xent": 1.0, "tri": 1.0, "ssim": 0.1, "ssim_kind": "msssim",
             "ssim_levels": 5, "ssim_win": None, "margin": 0.3, "label_smooth": 0.1, "self_positive": False},
    "optim": {"lr": 2e-4, "beta1": 0.5, "beta2": 0.999},
    "train": {"epochs": 50, "max_iters_per_epoch": None, "eval_batch_size": 64, "progress": True},
}

DMR_CHOICES: dict[str, tuple] = {
    "generator.init": ("normal", "reference"),
    "discriminator.init": ("normal", "reference"),
    "discriminator.type": ("multiscale", "patch"),
    "perturb.center": ("zero", "reference"),
    "loss.ssim_kind": ("msssim", "ssim", "none"),
}

_CKPT, _LAST, _BEST = "checkpoints", "last", "best"


# -------------------------------------------------------------------------------------------------- config


def load_dmr_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> dict:
    """DMR defaults <- preset (``dmr_tiny``, ``dmr_market``) / YAML file / dict <- ``key=value`` overrides, checked."""
    cfg = load_config(source, overrides, schema=DMR_DEFAULTS, choices=DMR_CHOICES, folder=preset_dir() / "dmr")
    _validate(cfg)
    return cfg


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r} = {value!r}; expected {expected}")


def _validate(cfg: dict) -> None:
    """Check values the schema cannot (ranges, combinations); resolves ``perturb.eps`` to a float."""
    eps = cfg["perturb"]["eps"]
    try:
        cfg["perturb"]["eps"] = parse_eps("16px" if eps is None else eps, "perturb.eps")
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    d, s, disc = cfg["data"], cfg["sampler"], cfg["discriminator"]
    if not 0 < d["val_fraction"] < 1:
        raise _bad("data.val_fraction", d["val_fraction"], "a fraction in (0, 1) of the training identities")
    if s["p"] < 2 or s["k"] < 2 or (s["p"] * s["k"]) % 2:
        raise _bad("sampler", s, "p >= 2 and k >= 2 with p*k even (real pairs are the two batch halves)")
    if disc["type"] == "patch" and disc["temperature"] != -1:
        raise _bad("discriminator.temperature", disc["temperature"], "-1 with discriminator.type=patch "
                   "(the mask head needs the multi-stage discriminator)")
    if disc["temperature"] != -1 and disc["temperature"] < 1:
        raise _bad("discriminator.temperature", disc["temperature"], "-1 (no mask) or a pixel count k >= 1")
    if cfg["train"]["epochs"] < 1:
        raise _bad("train.epochs", cfg["train"]["epochs"], "an int >= 1")
    if cfg["optim"]["lr"] <= 0:
        raise _bad("optim.lr", cfg["optim"]["lr"], "a positive number")
    for key in ("height", "width"):
        if d[key] is not None and d[key] < 1:
            raise _bad(f"data.{key}", d[key], "a positive pixel count, or null for the victim's input size")
    if not 0 < d["train_scale"] <= 1:
        raise _bad("data.train_scale", d["train_scale"], "a fraction in (0, 1] of data.height x data.width")
    _check_ssim_window(cfg)


def train_size(cfg: dict) -> tuple[int, int]:
    """(height, width) the generator trains at: ``data.train_scale`` times the validation/attack size."""
    d = cfg["data"]
    return max(1, round(d["train_scale"] * d["height"])), max(1, round(d["train_scale"] * d["width"]))


def _check_ssim_window(cfg: dict) -> None:
    """MS-SSIM's automatic window must fit the training size (checked once the size is known)."""
    d, loss = cfg["data"], cfg["loss"]
    if loss["ssim_kind"] == "msssim" and loss["ssim_win"] is None and None not in (d["height"], d["width"]):
        h, w = train_size(cfg)
        try:
            auto_win_size(h, w, loss["ssim_levels"])
        except ValueError as e:
            raise ConfigError(f"loss.ssim_levels={loss['ssim_levels']} at the training size {h}x{w}: {e}") from None


def resolve_input_size(cfg: dict, victim: nn.Module) -> None:
    """Fill ``data.height`` / ``data.width`` left null with the victim checkpoint's ``input_size`` (the size it was
    trained at and is attacked at), so the generator is validated and kept at the resolution it will attack."""
    d = cfg["data"]
    if d["height"] is not None and d["width"] is not None:
        return
    size = (getattr(victim, "checkpoint_meta", None) or {}).get("meta", {}).get("input_size")
    if not (isinstance(size, list | tuple) and len(size) == 2):
        raise ValueError(f"victim {cfg['victim_run']}: its checkpoint records no input_size; set data.height and "
                         "data.width (e.g. data.height=256 data.width=128)")
    d["height"] = int(size[0]) if d["height"] is None else d["height"]
    d["width"] = int(size[1]) if d["width"] is None else d["width"]
    _check_ssim_window(cfg)


def _weights(cfg: dict) -> LossWeights:
    lc = cfg["loss"]
    return LossWeights(gan=lc["gan"], reid=lc["reid"], xent=lc["xent"], tri=lc["tri"],
                       ssim=lc["ssim"] if lc["ssim_kind"] != "none" else 0.0)


def build_nets(cfg: dict, seed: int | None = None) -> DMRNets:
    """Generator + discriminator of ``cfg``, initialised from ``seed`` (default ``cfg["seed"]``) without touching the
    global RNG."""
    g, d = cfg["generator"], cfg["discriminator"]
    multi = d["type"] == "multiscale"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"] if seed is None else seed))
        gen = Generator(g["ngf"], g["n_blocks"], init=g["init"], spectral=g["spectral"])
        disc = Discriminator(d["ndf"], d["n_layers"], 3 if multi else 1, spectral=multi,
                             temperature=d["temperature"], use_gumbel=d["use_gumbel"], init=d["init"])
    return DMRNets(gen, disc, cfg["perturb"]["center"])


# ---------------------------------------------------------------------------------------------- validation


@dataclass
class ValidationSplit:
    """Generator-training records, and the held-out identities' validation queries and gallery."""

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    labels: list[int]  # held-out training labels (0-based classifier indices)


def split_validation(records: list[Record], fraction: float, seed: int) -> ValidationSplit:
    """Hold out ``max(1, round(fraction * #ids))`` training identities; one query per (identity, camera)."""
    ids = sorted({r.pid for r in records})
    n_val = max(1, round(fraction * len(ids)))
    if n_val >= len(ids):
        raise ValueError(f"data.val_fraction={fraction} holds out {n_val} of {len(ids)} training identities; "
                         "at least one must remain for training")
    rng = np.random.default_rng([int(seed), zlib.crc32(b"dmr-validation")])
    labels = sorted(int(i) for i in rng.permutation(ids)[:n_val])
    held = set(labels)
    query, gallery, seen = [], [], set()
    for r in sorted((r for r in records if r.pid in held), key=lambda r: r.path):
        (gallery if (r.pid, r.camid) in seen else query).append(r)
        seen.add((r.pid, r.camid))
    return ValidationSplit([r for r in records if r.pid not in held], query, gallery, labels)


def _ranking_scores(qf: torch.Tensor, qp: np.ndarray, qc: np.ndarray, gf: torch.Tensor, gp: np.ndarray,
                    gc: np.ndarray) -> dict[str, float]:
    """mAP and rank-1 (fractions) of L2-normalised query vs gallery features under the Market protocol."""
    from sklearn.metrics import average_precision_score

    dist = (1 - qf.double() @ gf.double().T).numpy()
    aps, top1 = [], []
    for i in range(len(qp)):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        match = gp[keep] == qp[i]
        if not match.any():
            continue
        d = dist[i, keep]
        aps.append(average_precision_score(match, -d))
        top1.append(float(match[np.argmin(d)]))
    if not aps:
        raise ValueError("the validation split has no query with a match in another camera; raise data.val_fraction")
    return {"mAP": float(np.mean(aps)), "rank1": float(np.mean(top1)), "num_valid_queries": len(aps)}


# --------------------------------------------------------------------------------------------------- victim


def victim_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retrieval embedding (raw, as ranked) and classifier logits of a ReIDNet in its current mode."""
    if not all(hasattr(model, a) for a in ("normalize", "backbone", "pool", "head")):
        fn = getattr(model, "features", model)
        return fn(x).flatten(1), None
    before, after = model.head.embed(model.pool(model.backbone(model.normalize(x))))
    feats = after if getattr(model, "neck_feat", "after") == "after" else before
    logits = model.head.classify(after) if getattr(model, "num_classes", 0) > 0 else None
    return feats, logits


def _load_victim(victim_run: str, device: torch.device) -> tuple[nn.Module, dict]:
    stem = find_checkpoint(victim_run)
    model = load_checkpoint(stem, map_location=device)
    model.requires_grad_(False)
    doc = model.checkpoint_meta
    info = {"run": victim_run, "checkpoint": str(stem), "checkpoint_id": doc.get("id"), "arch": doc.get("arch"),
            "num_classes": getattr(model, "num_classes", None)}
    return model.eval(), info


# -------------------------------------------------------------------------------------------------- session


def _seed_epoch(seed: int, epoch: int) -> int:
    s = int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])
    seed_everything(s)
    return s


class DMRTrainer:
    """Everything one training run holds: data, victim, networks, optimisers, history."""

    def __init__(self, cfg: dict, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.device = get_device(cfg["device"])
        self.eps = float(cfg["perturb"]["eps"])
        self.weights = _weights(cfg)
        d = cfg["data"]
        ds = build_dataset(d["name"], d["root"], train_all=d["train_all"])
        self.split = split_validation(ds.train, d["val_fraction"], cfg["seed"])
        inv = {v: k for k, v in ds.train_pid_map.items()}
        self.val_pids = [int(inv[i]) for i in self.split.labels]
        self.victim, self.victim_info = _load_victim(cfg["victim_run"], self.device)
        resolve_input_size(cfg, self.victim)
        ncls = self.victim_info["num_classes"] or 0
        if self.weights.xent and ncls != ds.num_train_pids:
            raise ValueError(f"victim {cfg['victim_run']} has {ncls} classes but {d['name']} at {d['root']} has "
                             f"{ds.num_train_pids} training identities: train the victim on the same data "
                             "(data.train_all), or set loss.xent=0")
        self.train_ds = ImageDataset(self.split.train, build_transforms(
            *train_size(cfg), is_train=True, flip_p=d["flip_p"], pad=d["pad"], random_erasing_p=0.0))
        s = cfg["sampler"]
        self.sampler = PKSampler([r.pid for r in self.split.train], p=s["p"], k=s["k"], seed=int(cfg["seed"]))
        self.nets = build_nets(cfg).to(self.device)
        disc = self.nets.discriminator
        mask_params = list(disc.mask_head.parameters()) if disc.mask_head is not None else []
        mask_ids = {id(p) for p in mask_params}
        o = cfg["optim"]
        betas = (o["beta1"], o["beta2"])
        self.opt_g = torch.optim.Adam(list(self.nets.generator.parameters()) + mask_params, lr=o["lr"], betas=betas)
        self.opt_d = torch.optim.Adam([p for p in disc.parameters() if id(p) not in mask_ids], lr=o["lr"],
                                      betas=betas)
        self.epoch, self.history, self.best = 0, [], None
        self.val_clean: dict | None = None
        self._gallery: tuple | None = None

    # ------------------------------------------------------------------------------------------ training

    def _train_loader(self, seed: int) -> DataLoader:
        """P x K batches of the generator-training identities (augmented), workers seeded from ``seed``."""
        s = self.cfg["sampler"]
        return DataLoader(self.train_ds, batch_size=s["p"] * s["k"], sampler=self.sampler, drop_last=True,
                          num_workers=self.cfg["data"]["num_workers"], generator=torch.Generator().manual_seed(seed))

    def _eval_loader(self, records: list[Record]) -> DataLoader:
        d = self.cfg["data"]
        return DataLoader(ImageDataset(records, build_transforms(d["height"], d["width"], is_train=False)),
                          batch_size=self.cfg["train"]["eval_batch_size"], shuffle=False, num_workers=d["num_workers"])

    def step(self, x: torch.Tensor, pids: torch.Tensor) -> dict[str, float]:
        """One generator step then one discriminator step on the batch ``x`` (B,3,H,W) with labels ``pids``."""
        nets, disc, lc = self.nets, self.nets.discriminator, self.cfg["loss"]
        x_adv = nets.perturb(x, self.eps)
        half = x.shape[0] // 2
        loss_d = (lsgan_loss(disc(torch.cat([x, x_adv.detach()], 1)), 0.0)
                  + lsgan_loss(disc(torch.cat([x[:half], x[half:2 * half]], 1)), 1.0)) / 2
        terms = {"gan": lsgan_loss(disc(torch.cat([x, x_adv], 1)), 1.0)}
        feats, logits = victim_outputs(self.victim, x_adv)
        if self.weights.xent:
            terms["xent"] = least_likely_ce(logits, pids, lc["label_smooth"])
        if self.weights.tri:
            terms["tri"] = misranking_loss(feats, pids, lc["margin"], self_positive=lc["self_positive"])
        if self.weights.ssim:
            sim = msssim(x, x_adv, levels=lc["ssim_levels"], win_size=lc["ssim_win"]) \
                if lc["ssim_kind"] == "msssim" else ssim(x, x_adv, win_size=lc["ssim_win"] or 11)
            terms["ssim"] = 1 - sim.mean()
        loss_g = generator_total(terms, self.weights)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        return {"loss_G": loss_g.item(), "loss_D": loss_d.item(), **{k: v.item() for k, v in terms.items()}}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the P x K batches of the generator-training identities (mean of each loss term)."""
        seed = _seed_epoch(self.cfg["seed"], epoch)
        self.sampler.set_epoch(epoch)
        self.nets.train()
        limit = self.cfg["train"]["max_iters_per_epoch"]
        sums: dict[str, float] = {}
        n = 0
        for it, (x, pids, _, _) in enumerate(self._train_loader(seed)):
            if limit is not None and it >= limit:
                break
            for k, v in self.step(x.to(self.device), pids.to(self.device)).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        if n == 0:
            raise ValueError("no P x K batch could be formed from the generator-training identities; lower sampler.p")
        return {k: v / n for k, v in sums.items()}

    # ---------------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def _embed(self, records: list[Record], attack: bool) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        feats, pids, cams = [], [], []
        for x, pid, cam, _ in self._eval_loader(records):
            x = x.to(self.device)
            if attack:
                x = self.nets.perturb(x, self.eps)
            feats.append(F.normalize(victim_outputs(self.victim, x)[0].float(), dim=1).cpu())
            pids.append(pid.numpy())
            cams.append(cam.numpy())
        return torch.cat(feats), np.concatenate(pids), np.concatenate(cams)

    def validate(self) -> dict[str, float]:
        """The victim's mAP / rank-1 on the held-out identities with attacked queries (generator in eval mode)."""
        self.nets.eval()
        if self._gallery is None:
            self._gallery = self._embed(self.split.gallery, attack=False)
        if self.val_clean is None:
            self.val_clean = _ranking_scores(*self._embed(self.split.query, attack=False), *self._gallery)
        return _ranking_scores(*self._embed(self.split.query, attack=True), *self._gallery)

    # ------------------------------------------------------------------------------------------ checkpoint

    def meta(self) -> dict:
        return {"kind": "dmr", "epoch": self.epoch, "eps": self.eps, "victim": self.victim_info,
                "val_pids": self.val_pids, "val_labels": self.split.labels, "val_clean": self.val_clean,
                "val_images": {"query": len(self.split.query), "gallery": len(self.split.gallery)},
                "best": self.best, "history": self.history, "config": self.cfg}

    def save(self, which: str) -> Path:
        stem = self.out / _CKPT / which
        state = {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()} if which == _LAST else None
        return save_checkpoint(stem, self.nets, meta=self.meta(), train_state=state)

    def restore(self) -> None:
        """Continue from ``checkpoints/last`` when it exists (else from scratch)."""
        stem = self.out / _CKPT / _LAST
        if not checkpoint_paths(stem)[1].is_file():
            return
        state, doc, train = read_checkpoint(stem, map_location="cpu")
        meta = doc.get("meta", {})
        if meta.get("val_labels") != self.split.labels:
            raise ValueError(f"{self.out}: the validation identities differ from the saved run's; changing seed or "
                             "data.val_fraction on resume is not supported")
        self.nets.load_state_dict(state, strict=True)
        self.opt_g.load_state_dict(train["opt_g"])
        self.opt_d.load_state_dict(train["opt_d"])
        self.epoch, self.history, self.best = int(meta["epoch"]), list(meta["history"]), meta["best"]
        self.val_clean = meta.get("val_clean")


# ---------------------------------------------------------------------------------------------------- entry


def _resolve_run_config(victim_run: str | Path | None, data_root: str | Path | None, out: Path,
                        config: str | Path | dict | None, overrides: list[str] | None, resume: bool) -> dict:
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"resume=True: {saved} not found; is {out} a DMR training folder?")
        cfg = load_dmr_config(saved, overrides)
        for name, given, key in (("victim_run", victim_run, cfg["victim_run"]),
                                 ("data_root", data_root, cfg["data"]["root"])):
            if given is not None and str(Path(given).resolve()) != key:
                raise ValueError(f"resume=True: {name}={str(given)!r} differs from the saved run's {key!r}")
        return cfg
    cfg = load_dmr_config(config, overrides)
    for name, value in (("victim_run", victim_run), ("data_root", data_root)):
        if value is None:
            raise ValueError(f"{name} is required (a path) unless resume=True")
    if not Path(victim_run).is_dir():
        raise FileNotFoundError(f"victim_run={str(victim_run)!r} is not a training run directory")
    cfg["victim_run"] = str(Path(victim_run).resolve())
    cfg["data"]["root"] = str(Path(data_root).resolve())
    return cfg


def train_dmr(victim_run: str | Path | None, data_root: str | Path | None, out: str | Path,
              config: str | Path | dict | None = None, overrides: list[str] | None = None, resume: bool = False,
              overwrite: bool = False) -> Path:
    """Train a DMR generator against the victim run's checkpoint on ``data_root``; returns ``out``.

    ``config``: a preset name (``dmr_tiny``, ``dmr_market``), a YAML path or a dict (default: the reference
    setting); ``overrides``: ``["train.epochs=2", ...]``. A non-empty ``out`` is refused unless ``resume`` (continue
    from its last checkpoint with its saved config, plus ``overrides``) or ``overwrite`` (the old folder is kept as
    ``out.old-N``). The attack loads the result with ``build("dmr", model, generator=out)``.
    """
    out = Path(out)
    cfg = _resolve_run_config(victim_run, data_root, out, config, overrides, resume)
    check_run_dir(out, resume=resume, overwrite=overwrite)
    sess = DMRTrainer(cfg, out)  # loads the victim and the data: bad input fails before ``out`` changes
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    if not resume or overrides:
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if resume:
        sess.restore()
    progress = cfg["train"]["progress"]
    for epoch in range(sess.epoch + 1, cfg["train"]["epochs"] + 1):
        losses = sess.train_epoch(epoch)
        val = sess.validate()
        sess.epoch = epoch
        sess.history.append({"epoch": epoch, **losses, "val_mAP": val["mAP"], "val_rank1": val["rank1"]})
        if sess.best is None or val["mAP"] < sess.best["val_mAP"]:
            sess.best = {"epoch": epoch, "val_mAP": val["mAP"], "val_rank1": val["rank1"]}
            sess.save(_BEST)
        sess.save(_LAST)
        if progress:
            print(f"dmr epoch {epoch}/{cfg['train']['epochs']}  loss_G {losses['loss_G']:.4f}  "
                  f"loss_D {losses['loss_D']:.4f}  val mAP {val['mAP']:.3f} (clean {sess.val_clean['mAP']:.3f})  "
                  f"best epoch {sess.best['epoch']}", flush=True)
    results = {k: v for k, v in sess.meta().items() if k != "config"}
    atomic_write_json(out / "results.json", {**results, "best_checkpoint": str(out / _CKPT / _BEST)})
    return out


# ------------------------------------------------------------------------------------------------- loading


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> DMRNets:
    """The kept DMR networks of a training folder (``checkpoints/best``) or of a checkpoint stem/file, in eval mode.

    The result carries ``source`` (checkpoint stem), ``sha256`` (of its .safetensors), ``victim`` (the training
    victim's run, checkpoint and id) and ``eps`` (the training budget).
    """
    p = Path(path)
    stem = p / _CKPT / _BEST if p.is_dir() else p
    if p.is_dir() and not checkpoint_paths(stem)[1].is_file():
        raise FileNotFoundError(f"generator={str(path)!r}: no {_CKPT}/{_BEST}.json in this folder (expected a folder "
                                "written by train_dmr, or a checkpoint path)")
    state, doc, _ = read_checkpoint(stem, map_location="cpu")
    arch = dict(doc.get("arch") or {})
    if arch.pop("class", None) != "DMRNets":
        raise CheckpointError(f"{str(checkpoint_paths(stem)[1])!r} is not a DMR generator checkpoint "
                              f"(model class {doc.get('arch', {}).get('class')!r})")
    with torch.random.fork_rng(devices=[]):
        nets = DMRNets.from_config(arch)
    nets.load_state_dict(state, strict=True)
    nets.requires_grad_(False)
    weights = checkpoint_paths(stem)[0]
    meta = doc.get("meta", {})
    nets.source, nets.sha256 = str(checkpoint_paths(stem)[0].with_suffix("")), sha256_file(weights)
    nets.victim, nets.eps = meta.get("victim"), meta.get("eps")
    return nets.to(map_location).eval()
