"""DDDefense Phase I generator: a diffusion model conditioned on identity *and* camera, trained on a ReID training
split, sampled with DDIM and used for identity-preserving SDEdit resampling.

Reconstruction (the paper names no architecture, spec section 3.11): a ``diffusers.UNet2DModel`` trained as a DDPM
(epsilon or v prediction, ``DDPMScheduler`` noise schedule) on the training images resized to the model size and
mapped to [-1, 1]. Conditioning is **two summed embeddings**, ``E_pid[pid] + E_cam[cam]``, fed through the UNet's
``class_embed_type="identity"`` slot (added to the timestep embedding). We chose this over one embedding of the joint
label ``pid * num_cams + cam`` on purpose: rule 2 of the resampling asks for an identity in a camera it was *never*
seen in, and a joint label's embedding for such a pair would never have been trained, whereas a sum composes a
learned identity with a learned camera. Each table has one extra "null" row; with ``train.cond_drop_p`` > 0 both
labels are replaced by it at random, which trains the unconditional model that classifier-free guidance needs.

Reproducibility: every training draw comes from a generator seeded by ``(seed, epoch, step)`` (``ops.batch_generator``),
so a run killed at any moment and resumed from its last epoch checkpoint equals a straight run bit for bit on CPU.
At sampling time each sample's noise comes from its own generator seeded by ``(seed, key)``, so a sample never
depends on what else is in its batch. Checkpoints use the toolkit's one format (safetensors + JSON, no pickle).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from advreid.config import ConfigError, dump_config, load_config, preset_dir
from advreid.data import build_dataset, load_image
from advreid.models import CheckpointError, read_checkpoint, save_checkpoint
from advreid.ops import batch_generator, sample_generators
from advreid.utils.io import append_jsonl, atomic_write_json, atomic_write_text, check_run_dir, prepare_run_dir
from advreid.utils.misc import get_device

__all__ = [
    "DIFFUSION_DEFAULTS",
    "DIFFUSION_CHOICES",
    "ConditionalUNet",
    "Generator",
    "load_diffusion_config",
    "train_diffusion",
    "load_generator",
]

log = logging.getLogger(__name__)

KIND = "advreid-diffusion"
RUN_FILE = "diffusion_run.json"
METRICS_FILE = "metrics.jsonl"

# Every key of a diffusion config with its default (the defaults are the CPU-sized "tiny" model).
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "data": {"num_workers": 4},  # threads decoding the training images
    "model": {
        "height": 64,
        "width": 32,
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "dropout": 0.0,
    },
    "schedule": {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
    },
    "train": {
        "epochs": 20,
        "batch_size": 32,
        "lr": 0.001,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "cond_drop_p": 0.1,  # classifier-free guidance dropout (both labels -> null); 0 disables guidance
        "flip_p": 0.5,
        "ema_decay": 0.0,  # 0 = no EMA; the final generator uses the EMA weights when > 0
        "amp": False,  # bf16 autocast on CUDA
        "keep_last": 2,  # epoch checkpoints kept
        "max_iters_per_epoch": None,
    },
    "sample": {"steps": 20, "eta": 0.0, "guidance_scale": 1.0, "batch_size": 64, "timestep_spacing": "trailing"},
}

DIFFUSION_CHOICES: dict[str, tuple] = {
    "schedule.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "schedule.prediction_type": ("epsilon", "v_prediction"),
    "sample.timestep_spacing": ("leading", "trailing", "linspace"),
}

# keys that may change when a run is resumed (they do not change what has been trained so far)
_RESUMABLE_KEYS = ("train.epochs", "device", "data.num_workers", "sample")


# ------------------------------------------------------------------------------------------------------- config
def load_diffusion_config(source: str | Path | dict | None = None, overrides: Sequence[str] | None = None) -> dict:
    """Diffusion config from a preset name in ``configs/diffusion`` (``diffusion_tiny``, ``diffusion_market``), a
    YAML path or a dict, plus ``key=value`` overrides; checked against :data:`DIFFUSION_DEFAULTS`."""
    cfg = load_config(source, list(overrides or []), schema=DIFFUSION_DEFAULTS, choices=DIFFUSION_CHOICES,
                      folder=preset_dir() / "diffusion")
    _validate(cfg)
    return cfg


def _validate(cfg: dict) -> None:
    m, t, s, sc = cfg["model"], cfg["train"], cfg["sample"], cfg["schedule"]
    levels = len(m["block_out_channels"])

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: expected {what}")

    need(levels >= 1 and all(isinstance(c, int) and c > 0 for c in m["block_out_channels"]),
         "model.block_out_channels", f"a list of positive ints, got {m['block_out_channels']!r}")
    need(len(m["down_block_types"]) == levels, "model.down_block_types", f"{levels} entries (one per level)")
    need(len(m["up_block_types"]) == levels, "model.up_block_types", f"{levels} entries (one per level)")
    need(all(c % m["norm_num_groups"] == 0 for c in m["block_out_channels"]), "model.norm_num_groups",
         f"a divisor of every block_out_channels entry, got {m['norm_num_groups']}")
    div = 2 ** (levels - 1)
    for k in ("height", "width"):
        need(m[k] >= div and m[k] % div == 0, f"model.{k}", f"a positive multiple of {div}, got {m[k]}")
    need(sc["num_train_timesteps"] >= 2, "schedule.num_train_timesteps", ">= 2")
    need(0 < sc["beta_start"] < sc["beta_end"] < 1, "schedule.beta_start/beta_end", "0 < beta_start < beta_end < 1")
    need(t["epochs"] >= 1, "train.epochs", f">= 1, got {t['epochs']}")
    need(t["batch_size"] >= 1, "train.batch_size", f">= 1, got {t['batch_size']}")
    need(t["lr"] > 0, "train.lr", f"> 0, got {t['lr']}")
    need(0 <= t["cond_drop_p"] < 1, "train.cond_drop_p", f"a probability in [0, 1), got {t['cond_drop_p']}")
    need(0 <= t["flip_p"] <= 1, "train.flip_p", f"a probability in [0, 1], got {t['flip_p']}")
    need(0 <= t["ema_decay"] < 1, "train.ema_decay", f"a value in [0, 1), got {t['ema_decay']}")
    need(t["keep_last"] >= 1, "train.keep_last", f">= 1, got {t['keep_last']}")
    need(t["max_iters_per_epoch"] is None or t["max_iters_per_epoch"] >= 1, "train.max_iters_per_epoch",
         "null or >= 1")
    need(1 <= s["steps"] <= sc["num_train_timesteps"], "sample.steps", f"1..{sc['num_train_timesteps']}")
    need(s["batch_size"] >= 1, "sample.batch_size", ">= 1")
    need(s["eta"] >= 0, "sample.eta", ">= 0")


def _train_scheduler(cfg: dict) -> DDPMScheduler:
    sc = cfg["schedule"]
    return DDPMScheduler(num_train_timesteps=sc["num_train_timesteps"], beta_schedule=sc["beta_schedule"],
                         beta_start=sc["beta_start"], beta_end=sc["beta_end"], prediction_type=sc["prediction_type"])


# -------------------------------------------------------------------------------------------------------- model
class ConditionalUNet(nn.Module):
    """``UNet2DModel`` whose class embedding is ``E_pid[pid] + E_cam[cam]`` (index ``num_pids`` / ``num_cams`` =
    the null label for classifier-free guidance). Input/output (B,3,H,W) in the [-1,1] diffusion space."""

    def __init__(self, num_pids: int, num_cams: int, *, height: int, width: int, block_out_channels: Sequence[int],
                 layers_per_block: int, down_block_types: Sequence[str], up_block_types: Sequence[str],
                 norm_num_groups: int, attention_head_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_pids, self.num_cams = int(num_pids), int(num_cams)
        self._arch = dict(num_pids=self.num_pids, num_cams=self.num_cams, height=int(height), width=int(width),
                          block_out_channels=list(block_out_channels), layers_per_block=int(layers_per_block),
                          down_block_types=list(down_block_types), up_block_types=list(up_block_types),
                          norm_num_groups=int(norm_num_groups), attention_head_dim=attention_head_dim,
                          dropout=float(dropout))
        self.unet = UNet2DModel(
            sample_size=(int(height), int(width)), in_channels=3, out_channels=3,
            block_out_channels=tuple(block_out_channels), layers_per_block=int(layers_per_block),
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            norm_num_groups=int(norm_num_groups), attention_head_dim=attention_head_dim, dropout=float(dropout),
            class_embed_type="identity",
        )
        dim = int(block_out_channels[0]) * 4  # UNet2DModel's time-embedding width
        self.pid_embed = nn.Embedding(self.num_pids + 1, dim)
        self.cam_embed = nn.Embedding(self.num_cams + 1, dim)
        # the sum of two N(0, 1/2) rows has the N(0, 1) scale of diffusers' own class embedding
        for emb in (self.pid_embed, self.cam_embed):
            nn.init.normal_(emb.weight, std=math.sqrt(0.5))

    def arch_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this module (stored in the checkpoint JSON)."""
        return copy.deepcopy(self._arch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, pid_idx: torch.Tensor, cam_idx: torch.Tensor) -> torch.Tensor:
        emb = self.pid_embed(pid_idx) + self.cam_embed(cam_idx)
        return self.unet(x, t, class_labels=emb).sample


def _build_model(cfg: dict, num_pids: int, num_cams: int) -> ConditionalUNet:
    return ConditionalUNet(num_pids, num_cams, **cfg["model"])


# --------------------------------------------------------------------------------------------------- train data
@dataclass
class _TrainData:
    images: torch.Tensor  # uint8 (N,3,h,w) at the model size
    pid_idx: torch.Tensor  # long (N,)
    cam_idx: torch.Tensor
    pid_map: dict[int, int]  # original dataset pid -> label index
    cam_map: dict[int, int]  # 0-based camid -> label index
    image_size: list[int]  # the dataset's most common (H, W)


def _load_one(path: str, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    img = load_image(path)
    size = (img.height, img.width)
    if size != (h, w):
        img = img.resize((w, h), resample=3)  # PIL bicubic (with its own antialiasing), deterministic
    return np.asarray(img, dtype=np.uint8), size


def _load_training_data(dataset: str, root: str | Path, cfg: dict) -> _TrainData:
    """The training split, decoded once into memory at the model size (uint8), with its label maps."""
    ds = build_dataset(dataset, root)
    if not ds.train:
        raise ValueError(f"dataset {dataset!r} at {root}: the training split is empty; the diffusion model "
                         "trains on it")
    orig = {v: k for k, v in ds.train_pid_map.items()}  # relabelled index -> original pid
    pid_map = {orig[i]: i for i in sorted(orig)}
    cam_map = {c: i for i, c in enumerate(sorted({r.camid for r in ds.train}))}
    h, w = cfg["model"]["height"], cfg["model"]["width"]
    with ThreadPoolExecutor(max_workers=max(1, cfg["data"]["num_workers"])) as pool:
        loaded = list(pool.map(lambda r: _load_one(r.path, h, w), ds.train))
    images = torch.from_numpy(np.stack([a for a, _ in loaded])).permute(0, 3, 1, 2).contiguous()
    (common, _), = Counter(s for _, s in loaded).most_common(1)
    return _TrainData(
        images=images,
        pid_idx=torch.tensor([r.pid for r in ds.train], dtype=torch.long),  # train pids are already 0..N-1
        cam_idx=torch.tensor([cam_map[r.camid] for r in ds.train], dtype=torch.long),
        pid_map=pid_map, cam_map=cam_map, image_size=list(common),
    )


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class _State:
    model: ConditionalUNet
    ema: ConditionalUNet | None
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)


def _new_state(cfg: dict, data: _TrainData, device: torch.device) -> _State:
    torch.manual_seed(cfg["seed"])  # weight init (and dropout) from the global stream, saved with every checkpoint
    model = _build_model(cfg, len(data.pid_map), len(data.cam_map)).to(device)
    ema = None
    if cfg["train"]["ema_decay"] > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["train"]["lr"], weight_decay=cfg["train"]["weight_decay"])
    return _State(model=model, ema=ema, optimizer=opt)


def _batch(data: _TrainData, idx: torch.Tensor, cfg: dict, g: torch.Generator, sched: DDPMScheduler) -> dict:
    """One training batch; every random draw comes from ``g`` in a fixed order."""
    t_cfg = cfg["train"]
    b = len(idx)
    x0 = data.images[idx].float() / 127.5 - 1.0
    flip = torch.rand(b, generator=g) < t_cfg["flip_p"]
    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
    drop = torch.rand(b, generator=g) < t_cfg["cond_drop_p"]
    pid = torch.where(drop, len(data.pid_map), data.pid_idx[idx])
    cam = torch.where(drop, len(data.cam_map), data.cam_idx[idx])
    noisy = sched.add_noise(x0, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    return {"x": noisy, "t": t, "pid": pid, "cam": cam, "target": target}


def _train_step(state: _State, batch: dict, cfg: dict, device: torch.device) -> float:
    t_cfg = cfg["train"]
    b = {k: v.to(device) for k, v in batch.items()}
    warm = t_cfg["warmup_steps"]
    for group in state.optimizer.param_groups:
        group["lr"] = t_cfg["lr"] * (min(1.0, (state.step + 1) / warm) if warm > 0 else 1.0)
    amp = t_cfg["amp"] and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pred = state.model(b["x"], b["t"], b["pid"], b["cam"])
    loss = F.mse_loss(pred.float(), b["target"])
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if t_cfg["grad_clip"] and t_cfg["grad_clip"] > 0:
        nn.utils.clip_grad_norm_(state.model.parameters(), t_cfg["grad_clip"])
    state.optimizer.step()
    if state.ema is not None:
        with torch.no_grad():
            for pe, p in zip(state.ema.parameters(), state.model.parameters(), strict=True):
                pe.lerp_(p, 1.0 - t_cfg["ema_decay"])
    state.step += 1
    return float(loss.detach())


def _train_epoch(state: _State, data: _TrainData, cfg: dict, device: torch.device) -> dict:
    sched = _train_scheduler(cfg)
    epoch = state.epoch + 1
    n, bs = len(data.images), cfg["train"]["batch_size"]
    perm = torch.randperm(n, generator=batch_generator(cfg["seed"], epoch, 0, 0, "diffusion-perm"))
    starts = list(range(0, n, bs))
    if cfg["train"]["max_iters_per_epoch"]:
        starts = starts[: cfg["train"]["max_iters_per_epoch"]]
    state.model.train()
    t0, losses = time.perf_counter(), []
    for i, s in enumerate(starts):
        g = batch_generator(cfg["seed"], epoch, i, 0, "diffusion")
        losses.append(_train_step(state, _batch(data, perm[s:s + bs], cfg, g, sched), cfg, device))
    state.epoch = epoch
    rec = {"epoch": epoch, "loss": float(np.mean(losses)), "steps": state.step,
           "lr": state.optimizer.param_groups[0]["lr"], "time_s": round(time.perf_counter() - t0, 3)}
    state.history.append(rec)
    return rec


def _meta(cfg: dict, data: _TrainData, state: _State, run: dict, complete: bool) -> dict:
    return {
        "kind": KIND, "version": 1, "complete": complete, "epoch": state.epoch, "epochs": cfg["train"]["epochs"],
        "step": state.step, "config": cfg, "dataset": run["dataset"], "data_root": run["data_root"],
        "pid_map": {str(k): v for k, v in data.pid_map.items()},
        "cam_map": {str(k): v for k, v in data.cam_map.items()},
        "image_size": data.image_size, "history": state.history,
    }


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def _epoch_stems(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in _ckpt_dir(out).glob("epoch_*.json"):
        tail = p.stem.removeprefix("epoch_")
        if tail.isdigit():
            found.append((int(tail), p.with_suffix("")))
    return sorted(found)


def _save_epoch(out: Path, state: _State, cfg: dict, data: _TrainData, run: dict) -> None:
    """Epoch checkpoint (weights, optimiser, EMA, RNG) written atomically, then older ones pruned."""
    train_state = {
        "optimizer": state.optimizer.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    stem = _ckpt_dir(out) / f"epoch_{state.epoch:03d}"
    save_checkpoint(stem, state.model, meta=_meta(cfg, data, state, run, False), train_state=train_state)
    for ep, old in _epoch_stems(out):
        if ep <= state.epoch - cfg["train"]["keep_last"]:
            for suffix in (".json", ".safetensors"):  # json first: a checkpoint without its json is ignored
                old.with_name(old.name + suffix).unlink(missing_ok=True)


def _restore(out: Path, state: _State, data: _TrainData) -> None:
    """Load the newest epoch checkpoint of ``out`` into ``state`` (nothing to do when there is none yet)."""
    stems = _epoch_stems(out)
    if not stems:
        return
    weights, doc, ts = read_checkpoint(stems[-1][1])
    meta = doc["meta"]
    if meta.get("pid_map") != {str(k): v for k, v in data.pid_map.items()} or \
            meta.get("cam_map") != {str(k): v for k, v in data.cam_map.items()}:
        raise ValueError(f"resume: the training split found now differs from the one {out} was trained on "
                         "(identities or cameras changed); pass the original data_root")
    state.model.load_state_dict(weights, strict=True)
    state.optimizer.load_state_dict(ts["optimizer"])
    if state.ema is not None:
        state.ema.load_state_dict(ts["ema"], strict=True)
    torch.set_rng_state(ts["torch_rng"])
    if ts["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ts["cuda_rng"])
    state.epoch, state.step, state.history = int(meta["epoch"]), int(meta["step"]), list(meta["history"])


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _resume_config(saved: dict, config: str | Path | dict | None, overrides: Sequence[str] | None) -> dict:
    new = load_diffusion_config(saved if config is None else config, overrides)
    a, b = _flat(saved), _flat(new)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            and not any(k == r or k.startswith(r + ".") for r in _RESUMABLE_KEYS)]
    if diff:
        raise ValueError(f"resume: the config differs from the run's in {', '.join(diff)}; only "
                         f"{', '.join(_RESUMABLE_KEYS)} may change when resuming (start a new run instead)")
    return new


def _open_run(data_root: str | Path | None, out: Path, config: Any, overrides: Sequence[str] | None,
              resume: bool, overwrite: bool, dataset: str) -> tuple[dict, dict]:
    """Resolve the config and the run record, and check ``out`` can be used, changing nothing on disk."""
    check_run_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        run_path = out / RUN_FILE
        if not run_path.is_file():
            raise FileNotFoundError(f"resume: {out} has no {RUN_FILE}; it is not a run written by train_diffusion")
        run = json.loads(run_path.read_text(encoding="utf-8"))
        cfg = _resume_config(run["config"], config, overrides)
        if dataset != run["dataset"]:
            raise ValueError(f"resume: dataset={dataset!r} but {out} was trained on {run['dataset']!r}")
        root = Path(data_root).absolute() if data_root is not None else Path(run["data_root"])
    else:
        if data_root is None:
            raise ValueError("data_root is required unless resume=True")
        cfg = load_diffusion_config(config, overrides)
        root = Path(data_root).absolute()
    run = {"format": KIND + "-run", "version": 1, "dataset": dataset, "data_root": str(root), "config": cfg}
    return cfg, run


def train_diffusion(
    data_root: str | Path | None,
    out: str | Path,
    config: str | Path | dict | None = None,
    overrides: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dataset: str = "market1501",
) -> Path:
    """Train the identity+camera-conditioned diffusion model on the training split of ``data_root``; return ``out``.

    ``config`` is a preset name (``diffusion_tiny``, ``diffusion_market``), a YAML path or a dict (None = defaults).
    Every epoch writes ``out/checkpoints/epoch_NNN.{safetensors,json}`` atomically and appends to ``metrics.jsonl``;
    the end writes ``checkpoints/final`` (EMA weights when enabled), which :func:`load_generator` reads. A non-empty
    ``out`` is refused unless ``resume`` (continue from the last epoch checkpoint; ``train.epochs`` may grow) or
    ``overwrite`` (the old folder is kept as ``<out>.old-N``).
    """
    out = Path(out)
    cfg, run = _open_run(data_root, out, config, overrides, resume, overwrite, dataset)
    device = get_device(cfg["device"])
    data = _load_training_data(dataset, run["data_root"], cfg)  # bad data fails before ``out`` changes
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    atomic_write_json(out / RUN_FILE, run)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    state = _new_state(cfg, data, device)
    if resume:
        _restore(out, state, data)
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in state.history))
    final = _ckpt_dir(out) / "final"
    if state.epoch < cfg["train"]["epochs"]:
        for suffix in (".json", ".safetensors"):  # an older final is stale once training continues
            final.with_name(final.name + suffix).unlink(missing_ok=True)
    while state.epoch < cfg["train"]["epochs"]:
        rec = _train_epoch(state, data, cfg, device)
        _save_epoch(out, state, cfg, data, run)
        append_jsonl(out / METRICS_FILE, rec)
        log.info("diffusion epoch %d/%d loss %.5f (%.1fs)", rec["epoch"], cfg["train"]["epochs"], rec["loss"],
                 rec["time_s"])
    if not final.with_suffix(".json").is_file():
        save_checkpoint(final, state.ema if state.ema is not None else state.model,
                        meta=_meta(cfg, data, state, run, True))
    return out


# --------------------------------------------------------------------------------------------------- generation
def resize_images(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B,3,H,W) [0,1] images at ``size`` (bicubic, antialiased, clamped); unchanged when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


class Generator:
    """A trained identity+camera-conditioned diffusion model: :meth:`sample` (DDIM from noise) and :meth:`resample`
    (SDEdit: noise a real image part-way, denoise under the target label). Pids are the dataset's original person
    ids (as in the file names), camids 0-based (as in :class:`~advreid.data.Record`); images are float [0,1]."""

    def __init__(self, model: ConditionalUNet, meta: dict, *, source: str = "", checkpoint_id: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.config = meta["config"]
        self.pid_map = {int(k): int(v) for k, v in meta["pid_map"].items()}
        self.cam_map = {int(k): int(v) for k, v in meta["cam_map"].items()}
        self.image_size = tuple(int(v) for v in meta["image_size"])
        self.model_size = (self.config["model"]["height"], self.config["model"]["width"])
        self.epoch = int(meta["epoch"])
        self.source, self.checkpoint_id = source, checkpoint_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"Generator(source={self.source!r}, epoch={self.epoch}, pids={len(self.pid_map)}, "
                f"cams={sorted(self.cam_map)}, model_size={self.model_size}, image_size={self.image_size})")

    def labels(self, pids: Sequence[int] | torch.Tensor, camids: Sequence[int] | torch.Tensor) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Label indices for ``(pid, camid)`` pairs; a pid or camera the model was not trained on is an error."""
        pids = [int(p) for p in (pids.tolist() if isinstance(pids, torch.Tensor) else pids)]
        camids = [int(c) for c in (camids.tolist() if isinstance(camids, torch.Tensor) else camids)]
        if len(pids) != len(camids):
            raise ValueError(f"pids and camids must have the same length, got {len(pids)} and {len(camids)}")
        bad_p = sorted({p for p in pids if p not in self.pid_map})
        if bad_p:
            raise ValueError(f"pids {bad_p[:10]} are not training identities of this generator "
                             f"({len(self.pid_map)} known, e.g. {sorted(self.pid_map)[:5]})")
        bad_c = sorted({c for c in camids if c not in self.cam_map})
        if bad_c:
            raise ValueError(f"camids {bad_c} unknown to this generator; expected 0-based camids in "
                             f"{sorted(self.cam_map)}")
        return (torch.tensor([self.pid_map[p] for p in pids], dtype=torch.long),
                torch.tensor([self.cam_map[c] for c in camids], dtype=torch.long))

    def _setting(self, name: str, value: Any) -> Any:
        return self.config["sample"][name] if value is None else value

    def _scheduler(self, steps: int) -> DDIMScheduler:
        sc = self.config["schedule"]
        sched = DDIMScheduler(num_train_timesteps=sc["num_train_timesteps"], beta_schedule=sc["beta_schedule"],
                              beta_start=sc["beta_start"], beta_end=sc["beta_end"],
                              prediction_type=sc["prediction_type"],
                              timestep_spacing=self.config["sample"]["timestep_spacing"])
        if not 1 <= int(steps) <= sched.config.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{sched.config.num_train_timesteps}, got {steps}")
        sched.set_timesteps(int(steps))
        return sched

    def _keys(self, n: int, keys: Sequence[int] | None) -> list[int]:
        keys = list(range(n)) if keys is None else [int(k) for k in keys]
        if len(keys) != n or any(k < 0 for k in keys):
            raise ValueError(f"keys must be {n} non-negative ints (one per sample), got {len(keys)}")
        return keys

    @torch.no_grad()
    def _denoise(self, x: torch.Tensor, sched: DDIMScheduler, timesteps: torch.Tensor, labels: tuple,
                 gens: list[torch.Generator], eta: float, guidance: float) -> torch.Tensor:
        pid, cam = (v.to(self.device) for v in labels)
        if guidance != 1.0:
            if self.config["train"]["cond_drop_p"] <= 0:
                raise ValueError(f"guidance_scale={guidance} needs a model trained with train.cond_drop_p > 0 "
                                 "(it has no unconditional mode); use guidance_scale=1")
            pid = torch.cat([pid, torch.full_like(pid, self.model.num_pids)])
            cam = torch.cat([cam, torch.full_like(cam, self.model.num_cams)])
        x = x.to(self.device)
        for t in timesteps:
            inp = torch.cat([x, x]) if guidance != 1.0 else x
            out = self.model(inp, t.to(self.device).expand(len(inp)), pid, cam)
            if guidance != 1.0:
                cond, unc = out.chunk(2)
                out = unc + guidance * (cond - unc)
            noise = None
            if eta > 0:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(self.device)
            x = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        return ((x.float().cpu() + 1) / 2).clamp_(0, 1)

    def sample(self, pids: Sequence[int], camids: Sequence[int], seed: int, keys: Sequence[int] | None = None, *,
               steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
               batch_size: int | None = None, size: Sequence[int] | None = None) -> torch.Tensor:
        """Class-conditional DDIM samples (B,3,H,W) in [0,1] at ``size`` (default: the dataset's image size).

        Sample ``i`` starts from noise drawn by its own generator seeded from ``(seed, keys[i])`` (``keys`` default
        ``0..B-1``), so it depends only on ``(pid, camid, seed, key)`` and the settings, never on the batching.
        """
        labels = self.labels(pids, camids)
        keys = self._keys(len(labels[0]), keys)
        steps, eta = int(self._setting("steps", steps)), float(self._setting("eta", eta))
        guidance = float(self._setting("guidance_scale", guidance_scale))
        bs = int(self._setting("batch_size", batch_size))
        outs = []
        for s in range(0, len(keys), bs):
            gens = sample_generators(seed, keys[s:s + bs], "dddefense-sample")
            x = torch.stack([torch.randn((3, *self.model_size), generator=g) for g in gens])
            sched = self._scheduler(steps)
            x = x * sched.init_noise_sigma
            lab = (labels[0][s:s + bs], labels[1][s:s + bs])
            outs.append(resize_images(self._denoise(x, sched, sched.timesteps, lab, gens, eta, guidance),
                                size or self.image_size))
        return torch.cat(outs) if outs else torch.empty((0, 3, *(size or self.image_size)))

    def resample(self, images: torch.Tensor, target_camids: Sequence[int], pids: Sequence[int], strength: float,
                 seed: int, keys: Sequence[int] | None = None, *, steps: int | None = None,
                 guidance_scale: float | None = None, batch_size: int | None = None) -> torch.Tensor:
        """SDEdit: noise each real image of identity ``pids[i]`` to ``strength`` (fraction of the DDIM schedule,
        0..1) and denoise it under ``(pids[i], target_camids[i])``; returns (B,3,H,W) in [0,1] at the input size.

        The last ``floor(steps * strength)`` of the ``steps`` DDIM timesteps are run (diffusers' img2img rule), so
        the effective strength is quantised to ``1/steps``; 0 returns the images unchanged, 1 keeps almost nothing
        of them. Noise per sample from ``(seed, keys[i])`` as in :meth:`sample`; DDIM with eta 0.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or \
                not images.is_floating_point():
            raise ValueError(f"images must be float (B,3,H,W) in [0,1], got {getattr(images, 'shape', images)!r}")
        if not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (fraction of the noise schedule), got {strength}")
        labels = self.labels(pids, target_camids)
        if len(labels[0]) != len(images):
            raise ValueError(f"got {len(images)} images but {len(labels[0])} pids/camids")
        keys = self._keys(len(images), keys)
        steps = int(self._setting("steps", steps))
        guidance = float(self._setting("guidance_scale", guidance_scale))
        bs = int(self._setting("batch_size", batch_size))
        n_noise = min(int(steps * float(strength)), steps)
        if n_noise == 0:
            return images.detach().clone()
        outs = []
        for s in range(0, len(images), bs):
            gens = sample_generators(seed, keys[s:s + bs], "dddefense-sdedit")
            sched = self._scheduler(steps)
            timesteps = sched.timesteps[steps - n_noise:]
            x0 = resize_images(images[s:s + bs].detach().float().cpu(), self.model_size) * 2 - 1
            noise = torch.stack([torch.randn((3, *self.model_size), generator=g) for g in gens])
            x = sched.add_noise(x0, noise, timesteps[:1].expand(len(x0)))
            lab = (labels[0][s:s + bs], labels[1][s:s + bs])
            outs.append(resize_images(self._denoise(x, sched, timesteps, lab, gens, 0.0, guidance), images.shape[-2:]))
        return torch.cat(outs).to(images.device, images.dtype)


def load_generator(run_dir: str | Path, device: str | torch.device | None = "cpu", *,
                   allow_incomplete: bool = False) -> Generator:
    """The generator trained into ``run_dir`` by :func:`train_diffusion` (safetensors + JSON, nothing unpickled).

    Reads ``checkpoints/final``; with ``allow_incomplete`` an unfinished run's newest epoch checkpoint (its EMA
    weights when enabled) is accepted too. Missing or corrupt files raise one clear FileNotFoundError/ValueError.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"generator directory {run} does not exist (expected the output folder of "
                                "train_diffusion, holding checkpoints/final.json)")
    stem = _ckpt_dir(run) / "final"
    if not stem.with_suffix(".json").is_file():
        epochs = _epoch_stems(run)
        if not (allow_incomplete and epochs):
            last = f"; the newest epoch checkpoint is {epochs[-1][1].name}" if epochs else ""
            raise FileNotFoundError(
                f"generator directory {run}: no finished generator ({stem}.json is missing{last}); finish training "
                "with train_diffusion(..., resume=True)" + (" or pass allow_incomplete=True" if epochs else ""))
        stem = epochs[-1][1]
    try:
        weights, doc, train_state = read_checkpoint(stem)
        meta, arch = doc.get("meta") or {}, dict(doc.get("arch") or {})
        if meta.get("kind") != KIND or arch.pop("class", None) != ConditionalUNet.__name__:
            raise CheckpointError(f"{stem}.json is an advreid checkpoint but not a diffusion generator "
                                  f"(kind {meta.get('kind')!r}, expected {KIND!r})")
        model = ConditionalUNet(**arch)
        if train_state and train_state.get("ema") is not None:
            weights = train_state["ema"]
        model.load_state_dict(weights, strict=True)
        gen = Generator(model, meta, source=str(run), checkpoint_id=str(doc.get("id", "")))
    except (CheckpointError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"cannot load the diffusion generator from {run}: {e}") from e
    gen.model.to(get_device(device))
    return gen
