"""Atomic writes and run-directory handling: nothing a user wrote is lost or half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def naming_path(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` as an OSError whose message names ``path`` ("[Errno 28] No space left on device: '/runs/x/y.json'"):
    disk-full and permission errors raised deep inside a writer often name a temporary file or nothing."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def _atomic(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Write via ``writer(tmp_path)`` into a temp file beside ``path``, fsync, then rename over it. An OSError
    (disk full, permission denied, ...) leaves the old file untouched and names ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError | FileExistsError):
            raise naming_path(e, path) from None
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Atomic write for libraries that want a filename (e.g. ``safetensors.torch.save_file``)."""
    return _atomic(path, writer)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (a whole line per write, flushed and fsynced)."""
    line = json.dumps(record, default=_json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise naming_path(e, path) from None


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (content ids of weights and generated images)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same folder or one lies inside the other (after resolving links)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or rb in ra.parents or ra in rb.parents


def check_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Raise what :func:`prepare_run_dir` would refuse, changing nothing (so a tool can validate its inputs before
    touching the folder); returns whether the folder exists and is non-empty."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run directory {path} exists and is not a directory")
    nonempty = path.is_dir() and any(path.iterdir())
    if resume and not nonempty:
        raise FileNotFoundError(f"--resume given but run directory {path} is missing or empty")
    if nonempty and not resume and not overwrite:
        raise FileExistsError(
            f"run directory {path} already exists and is not empty; "
            "pass --resume to continue it or --overwrite to start over (the old one is kept as .old-N)"
        )
    return nonempty


def prepare_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create a run directory; refuse to reuse a non-empty one unless ``resume`` or ``overwrite``.

    ``overwrite`` moves the old directory aside to ``<path>.old-N`` instead of deleting it.
    """
    path = Path(path)
    nonempty = check_run_dir(path, resume=resume, overwrite=overwrite)
    if resume:
        return path
    if nonempty:
        n = 1
        while Path(f"{path}.old-{n}").exists():
            n += 1
        shutil.move(str(path), f"{path}.old-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path
