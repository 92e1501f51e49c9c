"""``python:package.module:factory[@weights]`` (or ``python:path/to/file.py:factory``): any function returning an
``nn.Module`` that maps normalised images to features; WEIGHTS, if given, is loaded into it (exactly, ``module.``
prefixes stripped, read safely). The module is imported like ``python -m`` would (the current folder included)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

from advreid.models.external.base import Built, ModelCard, load_state, read_weights, register_model_kind


def import_user_module(where: str) -> ModuleType:
    """Import ``package.module`` (the current folder on the path, as with ``python -m``) or a ``.py`` file."""
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"python:{where}: file {str(path)!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"advreid_user_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = mod  # type: ignore[union-attr]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ValueError(f"python:{where}: cannot import {e.name!r} ({e}); make it importable (pip install -e, "
                         "PYTHONPATH) or give a file: python:path/to/file.py:factory") from None


@register_model_kind("python")
def load_python(name: str, weights: Path | None, card: ModelCard) -> Built:
    """Call ``factory()`` of the named module; load ``weights`` into the module it returns."""
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"python:{name}: expected python:package.module:factory[@weights]")
    fn = getattr(import_user_module(where), attr, None)
    if not callable(fn):
        raise ValueError(f"python:{name}: {where} has no function {attr!r}")
    net = fn()
    if not isinstance(net, nn.Module):
        raise ValueError(f"python:{name}: {attr}() returned {type(net).__name__}, expected a torch.nn.Module")
    if weights is not None:
        load_state(net, read_weights(weights), str(weights))
    return Built(net.eval(), weights_file=weights, notes={"factory": name})
