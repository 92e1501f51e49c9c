"""Image loading with clear errors, an up-front image checker, and the torch Dataset over records."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torchvision.transforms.v2 as v2
from PIL import Image

from advreid.data.datasets import Record

__all__ = ["BadImageError", "load_image", "check_images", "ImageDataset"]


class BadImageError(OSError):
    """An image file that cannot be opened or fully decoded; the message names the file.

    Raised in a DataLoader worker it comes back to the main process as the same one-line error: torch re-raises
    worker exceptions as ``type(exc)(message_with_the_worker_traceback)``, and that one-argument form recovers
    the original message (and path) from the traceback's last line.
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        self.path, self.reason = str(path), reason
        msg = self.path if reason is None else f"cannot load image {self.path}: {reason}"
        if reason is None and _WORKER_MARK in self.path:  # torch's re-raise of a worker error
            original = _original_message(self.path)
            if original is not None:
                msg = original
                self.path, self.reason = _split_message(original)
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


_WORKER_MARK = "Original Traceback"
_PREFIX = "cannot load image "
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?BadImageError: ", re.M)


def _original_message(text: str) -> str | None:
    """The message of the BadImageError whose formatted traceback ends ``text`` (None if there is none)."""
    starts = list(_LAST_LINE.finditer(text))
    if not starts:
        return None
    return text[starts[-1].end():].strip().replace("\n", " ") or None


def _split_message(msg: str) -> tuple[str, str | None]:
    """(path, reason) of ``"cannot load image PATH: REASON"``: the first split whose PATH exists, else the first."""
    if not msg.startswith(_PREFIX):
        return msg, None
    rest = msg[len(_PREFIX):]
    cuts = [m.start() for m in re.finditer(": ", rest)]
    for c in cuts:
        if os.path.exists(rest[:c]):
            return rest[:c], rest[c + 2:]
    return (rest[:cuts[0]], rest[cuts[0] + 2:]) if cuts else (rest, None)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` as an RGB PIL image, fully decoded (so truncated files fail here, not later)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc


def _try_load(path: str) -> str | None:
    try:
        load_image(path)
    except BadImageError as exc:
        return exc.reason
    return None


def check_images(
    records: Sequence[Record], skip_bad: bool = False, num_workers: int | None = None
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Decode every image (in threads). Return ``(good_records, [(path, reason), ...])`` when ``skip_bad``,
    else raise :class:`BadImageError` for the first bad record (in record order)."""
    workers = num_workers or min(8, os.cpu_count() or 1)
    good: list[Record] = []
    bad: list[tuple[str, str]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for rec, reason in zip(records, pool.map(_try_load, [str(r[0]) for r in records]), strict=True):
            if reason is None:
                good.append(rec)
            elif skip_bad:
                bad.append((str(rec[0]), reason))
            else:
                raise BadImageError(rec[0], reason)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return good, bad


def _to_float() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class ImageDataset(torch.utils.data.Dataset):
    """Records -> ``(image, pid, camid, index)``; image is a float32 (3,H,W) tensor in [0,1].

    ``transform=None`` keeps the image's own size (ToImage + ToDtype). With ``skip_bad_images=True`` a file
    that fails to load is replaced (with a warning) by the next loadable record, whose pid/camid/index are
    returned -- meant for training; for evaluation run :func:`check_images` first so nothing is duplicated.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Any], torch.Tensor] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        self.records = [Record(str(r[0]), int(r[1]), int(r[2])) for r in records]
        self.transform = transform if transform is not None else _to_float()
        self.skip_bad_images = skip_bad_images
        self.bad_paths: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        n = len(self.records)
        for step in range(n):
            i = (index + step) % n
            rec = self.records[i]
            if rec.path in self.bad_paths:
                continue
            try:
                img = load_image(rec.path)
            except BadImageError as exc:
                if not self.skip_bad_images:
                    raise
                self.bad_paths.add(rec.path)
                warnings.warn(f"skipping bad image: {exc}", RuntimeWarning, stacklevel=2)
                continue
            return self.transform(img), rec.pid, rec.camid, i
        raise BadImageError(self.records[index].path, "no loadable image left in the dataset")
