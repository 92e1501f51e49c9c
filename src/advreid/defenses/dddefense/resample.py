"""DDDefense Phase I: the data-rebalancing rule and the resampled dataset it produces.

The rule (spec section 3.11, from the paper's reviews; it only *adds* images, nothing is removed), for every
training identity ``i`` with ``n_i`` images, ``n_{i,c}`` of them in camera ``c``:

* rule 1, *too few images*: if ``n_i < delta1``, generate ``delta1 - n_i`` images;
* rule 2, *too little camera diversity*: if the dominant camera ``c* = argmax_c n_{i,c}`` holds a share
  ``n_{i,c*} / n_i > delta2``, generate images for every other camera ``c != c*``.

Both conditions are evaluated on the real counts (the literal reading). Choices the paper leaves open, made here:

* ``delta1`` default: the **median** number of images per training identity (rounded up). The median is the
  typical identity size: topping up the lower half to it removes most of the inter-ID imbalance while adding far
  fewer images than raising everyone to the mean (pulled up by the heavy tail) or the maximum would.
* ``delta2`` default: **0.5**. Above it one camera holds more images of the identity than all other cameras
  together, so the identity is learnt mostly from one viewpoint, background and colour cast; 0.5 is the largest
  threshold at which "dominant" has that meaning for any number of cameras.
* rule-1 cameras: images are added one at a time to the camera where the identity currently has the fewest images
  (real + already planned), ties to the lowest camid ("water filling"): unseen cameras come first, then the least
  represented ones, so topping up also diversifies.
* rule-2 amount ``per_camera``: an int ``k`` = ``k`` images for *each* other camera (default 1, the literal "for every
  other camera" at the lowest cost), or ``"balance"`` = the fewest images that bring the dominant camera's share
  down to ``delta2`` given the rule-1 additions, water-filled over the other cameras. Dominant-camera ties go to
  the lowest camid. An identity seen in one camera only has share 1 and always triggers rule 2.

:func:`resample_dataset` realises the plan with a trained :class:`~advreid.defenses.dddefense.Generator` (SDEdit
from a real image of the identity by default, or pure class-conditional sampling) into a *new* Market-layout folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from advreid.data import Record, build_dataset, load_image
from advreid.defenses.dddefense.diffusion import Generator, load_generator, resize_images
from advreid.ops import to_uint8
from advreid.utils.io import atomic_write_bytes, atomic_write_json, paths_overlap, prepare_run_dir, sha256_file

__all__ = [
    "GenerationTask",
    "ResampleConfig",
    "MANIFEST_NAME",
    "GENERATED_SEQUENCE",
    "default_delta1",
    "plan_resampling",
    "generated_name",
    "resample_dataset",
]

MANIFEST_NAME = "resample_manifest.json"
GENERATED_SEQUENCE = 9  # generated files are named <pid>_c<cam>s9_9NNNNN_00.png (Market has sequences s1..s6)
_SPLITS = ("bounding_box_train", "query", "bounding_box_test")
_FORMAT = "advreid-resample"


@dataclass(frozen=True)
class GenerationTask:
    """One image to generate: identity ``pid``, 0-based target camera ``camid``, the ``rule`` that asked for it
    ("count" = rule 1, "camera" = rule 2) and its ``index`` among the identity's generated images (0, 1, ...)."""

    pid: int
    camid: int
    rule: str
    index: int


def _counts(records: Iterable[Sequence[Any]], num_cams: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(lambda: [0] * num_cams)
    for r in records:
        pid, cam = int(r[1]), int(r[2])
        if not 0 <= cam < num_cams:
            raise ValueError(f"record {r[0]} has camid {cam}; expected 0-based camids in 0..{num_cams - 1}")
        out[pid][cam] += 1
    return dict(out)


def default_delta1(records: Iterable[Sequence[Any]]) -> int:
    """The median number of images per identity, rounded up (the default ``delta1``)."""
    per_id: dict[int, int] = defaultdict(int)
    for r in records:
        per_id[int(r[1])] += 1
    if not per_id:
        raise ValueError("records is empty: cannot compute the default delta1 (median images per identity)")
    return int(math.ceil(statistics.median(per_id.values())))


def _fill(counts: list[int], n: int, cams: Sequence[int]) -> list[int]:
    """Add ``n`` images one by one to the camera in ``cams`` with the fewest (ties: lowest camid); returns them."""
    chosen = []
    for _ in range(n):
        c = min(cams, key=lambda k: (counts[k], k))
        counts[c] += 1
        chosen.append(c)
    return chosen


def _check_rule(num_cams: int, delta1: int | None, delta2: float, per_camera: int | str) -> None:
    if isinstance(num_cams, bool) or not isinstance(num_cams, int) or num_cams < 1:
        raise ValueError(f"num_cams must be an int >= 1, got {num_cams!r}")
    if delta1 is not None and (isinstance(delta1, bool) or not isinstance(delta1, int) or delta1 < 1):
        raise ValueError(f"delta1 must be an int >= 1 (minimum images per identity) or None, got {delta1!r}")
    if isinstance(delta2, bool) or not isinstance(delta2, int | float) or not 0 < delta2 <= 1:
        raise ValueError(f"delta2 must be a share in (0, 1] (dominant-camera threshold), got {delta2!r}")
    if per_camera != "balance" and (isinstance(per_camera, bool) or not isinstance(per_camera, int)
                                    or per_camera < 0):
        raise ValueError(f"per_camera must be an int >= 0 (images per other camera) or 'balance', got {per_camera!r}")


def plan_resampling(records: Sequence[Sequence[Any]], num_cams: int, delta1: int | None = None,
                    delta2: float = 0.5, per_camera: int | str = 1) -> list[GenerationTask]:
    """The images to generate for the training ``records`` ``(path, pid, camid)`` under the DDDefense rule (see
    the module docstring); ``delta1=None`` = median images per identity. Sorted by pid, then index."""
    _check_rule(num_cams, delta1, delta2, per_camera)
    counts = _counts(records, num_cams)
    if not counts:
        return []
    d1 = default_delta1(records) if delta1 is None else delta1
    share = Fraction(str(float(delta2)))
    tasks: list[GenerationTask] = []
    for pid in sorted(counts):
        real = counts[pid]
        n = sum(real)
        now = list(real)
        planned = [("count", c) for c in _fill(now, max(0, d1 - n), range(num_cams))]
        dom = max(range(num_cams), key=lambda c: (real[c], -c))
        others = [c for c in range(num_cams) if c != dom]
        if others and Fraction(real[dom], n) > share:
            if per_camera == "balance":
                need = max(0, math.ceil(Fraction(real[dom]) / share) - sum(now))
                planned += [("camera", c) for c in _fill(now, need, others)]
            else:
                planned += [("camera", c) for c in others for _ in range(per_camera)]
        tasks += [GenerationTask(pid, c, rule, k) for k, (rule, c) in enumerate(planned)]
    return tasks


def generated_name(pid: int, camid: int, index: int) -> str:
    """File name of a generated image: ``<pid>_c<cam>s9_9NNNNN_00.png`` (Market pattern, reserved sequence 9)."""
    if not 0 <= index < 100_000:
        raise ValueError(f"index {index} out of range 0..99999 for a generated file name")
    return f"{pid:04d}_c{camid + 1}s{GENERATED_SEQUENCE}_9{index:05d}_00.png"


@dataclass(frozen=True)
class ResampleConfig:
    """Parameters of :func:`resample_dataset`; ``None`` = the rule default (``delta1``) or the generator's
    sampling config (``steps``, ``guidance_scale``, ``batch_size``)."""

    delta1: int | None = None
    delta2: float = 0.5
    per_camera: int | str = 1
    mode: str = "sdedit"  # "sdedit": from a real image of the identity; "sample": from pure noise
    strength: float = 0.6  # SDEdit: fraction of the noise schedule applied to the source image
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int | None = None
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        _check_rule(1, self.delta1, self.delta2, self.per_camera)
        if self.mode not in ("sdedit", "sample"):
            raise ValueError(f"mode must be 'sdedit' or 'sample', got {self.mode!r}")
        if not 0 < float(self.strength) <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")


# ------------------------------------------------------------------------------------------ output folder
def _check_out(out: Path, roots: Sequence[Path]) -> None:
    for r in roots:
        if paths_overlap(out, r):
            raise ValueError(f"out={out} overlaps the source dataset {r}: the resampled dataset must be written to a "
                             "new folder outside it (the source is never modified)")


def _copy_split(src: Path, dst: Path) -> int:
    """Copy every regular file of ``src`` into ``dst`` byte for byte (atomically); existing same-size copies of a
    resumed run are kept. Returns the number of files."""
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        if not entry.is_file():
            continue
        n += 1
        target = dst / entry.name
        if target.is_file() and target.stat().st_size == entry.stat().st_size:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".tmp", dir=dst)
        os.close(fd)
        try:
            shutil.copyfile(entry.path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return n


def _png(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(x[None])[0].permute(1, 2, 0).numpy()).save(buf, "PNG")
    return buf.getvalue()


def _load_source(path: Path, size: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    img = load_image(path)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return resize_images(x, size)[0], (img.height, img.width)


# --------------------------------------------------------------------------------------------- the manifest
def _entries(tasks: Sequence[GenerationTask], train: Sequence[Record], src: Path, cfg: ResampleConfig,
             gen: Generator) -> list[dict]:
    """One manifest entry per task: file, labels, mode, source (round-robin over the identity's real images,
    sorted by path), seed and noise key (unique per pid and index)."""
    by_pid: dict[int, list[str]] = defaultdict(list)
    for r in sorted(train, key=lambda r: r.path):
        by_pid[r.pid].append(Path(r.path).relative_to(src).as_posix())
    steps = cfg.steps or gen.config["sample"]["steps"]
    guidance = gen.config["sample"]["guidance_scale"] if cfg.guidance_scale is None else cfg.guidance_scale
    out = []
    for t in tasks:
        imgs = by_pid[t.pid]
        out.append({
            "file": f"bounding_box_train/{generated_name(t.pid, t.camid, t.index)}",
            "pid": t.pid, "camid": t.camid, "camera": t.camid + 1, "rule": t.rule, "index": t.index,
            "mode": cfg.mode, "strength": cfg.strength if cfg.mode == "sdedit" else None,
            "source": imgs[t.index % len(imgs)] if cfg.mode == "sdedit" else None,
            "steps": steps, "guidance_scale": guidance, "seed": cfg.seed, "key": t.pid * 100_000 + t.index,
            "sha256": None,
        })
    return out


def _signature(doc: dict) -> str:
    keep = {k: v for k, v in doc.items() if k not in ("complete", "files", "generator_dir")}
    keep["files"] = [{k: v for k, v in e.items() if k != "sha256"} for e in doc["files"]]
    return json.dumps(keep, sort_keys=True)


def _open_out(out: Path, doc: dict, resume: bool, overwrite: bool) -> dict:
    """Prepare ``out``; on resume, check it was started with the same plan and keep the verified entries."""
    if not resume:
        prepare_run_dir(out, overwrite=overwrite)
        atomic_write_json(out / MANIFEST_NAME, doc)
        return doc
    prepare_run_dir(out, resume=True)
    try:
        old = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"resume: {out} has no readable {MANIFEST_NAME} ({e}); it is not a folder written by "
                         "resample_dataset") from e
    if old.get("format") != _FORMAT or _signature(old) != _signature(doc):
        raise ValueError(f"resume: {out} was started with another source, generator or config (its "
                         f"{MANIFEST_NAME} differs); use the same arguments or a new out folder")
    for new_e, old_e in zip(doc["files"], old["files"], strict=True):
        path = out / old_e["file"]
        if old_e["sha256"] is not None and path.is_file() and sha256_file(path) == old_e["sha256"]:
            new_e["sha256"] = old_e["sha256"]  # written and intact: keep it
    return doc


def _generate(gen: Generator, batch: list[dict], src: Path, cfg: ResampleConfig) -> list[torch.Tensor]:
    pids, cams, keys = [e["pid"] for e in batch], [e["camid"] for e in batch], [e["key"] for e in batch]
    bs = len(batch)
    if cfg.mode == "sample":
        x = gen.sample(pids, cams, cfg.seed, keys, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                       batch_size=bs)
        return list(x)
    loaded = [_load_source(src / e["source"], gen.model_size) for e in batch]
    x = gen.resample(torch.stack([a for a, _ in loaded]), cams, pids, cfg.strength, cfg.seed, keys,
                     steps=cfg.steps, guidance_scale=cfg.guidance_scale, batch_size=bs)
    return [resize_images(xi[None], own)[0] for xi, (_, own) in zip(x, loaded, strict=True)]


def resample_dataset(root: str | os.PathLike, generator_dir: str | os.PathLike, out: str | os.PathLike,
                     config: ResampleConfig | None = None, *, resume: bool = False, overwrite: bool = False,
                     dataset: str = "market1501") -> Path:
    """Write a rebalanced copy of the Market-layout dataset at ``root`` into the new folder ``out``; return ``out``.

    ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` are copied byte for byte (the source is only
    read; ``out`` may not be, contain or lie inside it), then the images planned by :func:`plan_resampling` are
    generated into ``out/bounding_box_train`` as PNGs named by :func:`generated_name`, and
    ``resample_manifest.json`` records per file its source image, pid, camera, mode, strength, seed, key and
    SHA-256. A killed run continues with ``resume=True``: intact generated files are kept, the rest regenerated in
    the same batches as a straight run. ``build_dataset(dataset, out)`` reads the result.
    """
    cfg = config or ResampleConfig()
    cfg.validate()
    out = Path(out)
    ds = build_dataset(dataset, root)
    src = Path(ds.root).resolve()
    missing = [s for s in _SPLITS if not (src / s).is_dir()]
    if missing:
        raise ValueError(f"{src}: resampling needs the Market layout ({', '.join(_SPLITS)}); missing {missing}")
    _check_out(out, [Path(root), src])
    gen = load_generator(generator_dir, cfg.device)
    orig = {v: k for k, v in ds.train_pid_map.items()}
    train = [r._replace(pid=orig[r.pid]) for r in ds.train]
    if set(gen.pid_map) != set(orig.values()):
        raise ValueError(f"generator {generator_dir} was trained on other identities ({len(gen.pid_map)} pids) than "
                         f"the training split of {src} ({len(orig)} pids); train it on this dataset")
    num_cams = len(gen.cam_map)
    if sorted(gen.cam_map) != list(range(num_cams)):
        raise ValueError(f"generator cameras {sorted(gen.cam_map)} are not 0..K-1; cannot plan over them")
    delta1 = default_delta1(train) if cfg.delta1 is None else cfg.delta1
    tasks = plan_resampling(train, num_cams, delta1, cfg.delta2, cfg.per_camera)
    entries = _entries(tasks, train, src, cfg, gen)
    clash = {Path(e["file"]).name for e in entries} & {Path(r.path).name for r in train}
    if clash:
        raise ValueError(f"{src}: original training files already use generated names, e.g. {sorted(clash)[0]}")
    doc = {
        "format": _FORMAT, "version": 1, "complete": False, "dataset": dataset, "source_root": str(src),
        "generator_dir": str(Path(generator_dir).resolve()), "generator_id": gen.checkpoint_id,
        "config": asdict(cfg) | {"device": None},
        "rule": {"delta1": delta1, "delta1_default": cfg.delta1 is None, "delta2": cfg.delta2,
                 "per_camera": cfg.per_camera, "num_cams": num_cams},
        "summary": _summary(train, tasks), "files": entries,
    }
    doc = _open_out(out, doc, resume, overwrite)
    for split in _SPLITS:
        _copy_split(src / split, out / split)
    _run_batches(gen, doc, src, out, cfg)
    doc["complete"] = True
    atomic_write_json(out / MANIFEST_NAME, doc)
    return out


def _summary(train: Sequence[Record], tasks: Sequence[GenerationTask]) -> dict:
    return {
        "train_images": len(train), "train_ids": len({r.pid for r in train}), "generated": len(tasks),
        "generated_rule1_count": sum(t.rule == "count" for t in tasks),
        "generated_rule2_camera": sum(t.rule == "camera" for t in tasks),
        "ids_rule1": len({t.pid for t in tasks if t.rule == "count"}),
        "ids_rule2": len({t.pid for t in tasks if t.rule == "camera"}),
    }


def _run_batches(gen: Generator, doc: dict, src: Path, out: Path, cfg: ResampleConfig) -> None:
    """Generate in fixed chunks of the plan (the same composition on resume) and checkpoint the manifest after each."""
    files = doc["files"]
    bs = cfg.batch_size or gen.config["sample"]["batch_size"]
    for s in range(0, len(files), bs):
        batch = files[s:s + bs]
        if all(e["sha256"] is not None for e in batch):
            continue
        images = _generate(gen, batch, src, cfg)
        for e, x in zip(batch, images, strict=True):
            if e["sha256"] is None:
                data = _png(x)
                atomic_write_bytes(out / e["file"], data)
                e["sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write_json(out / MANIFEST_NAME, doc)
