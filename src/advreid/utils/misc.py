"""Seeding and device selection."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors/arrays as lists and unknown objects as strings (a JSON-safe copy)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; otherwise the device named, checked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model`` in train (``training``) or eval mode for the block; afterwards every submodule gets its own flag
    back, so a model with mixed modes (e.g. frozen BatchNorm) comes back as it was."""
    modes = [(mod, mod.training) for mod in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for mod, mode in modes:
            mod.training = mode
