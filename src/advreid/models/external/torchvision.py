"""``torchvision:<arch>[@weights]``: a torchvision classification network whose last ``Linear`` (the classifier) is
replaced by ``Identity``, so the output is the pooled feature (ResNet: the 2048-d average pool). WEIGHTS is a file
(state dict or .safetensors), or a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) found in the torch hub
cache; advreid never downloads."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from advreid.models.external.base import Built, ModelCard, load_state, read_weights, register_model_kind
from advreid.models.pretrained import hub_checkpoint_dir
from advreid.registry import did_you_mean


def last_linear(net: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` of ``net`` (its classifier)."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no Linear classifier to remove")
    return names[-1]


def _hub_file(arch: str, weights: Path) -> Path:
    """The hub-cache file of a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(arch)
        w = enum[weights.name] if weights.name != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        raise FileNotFoundError(f"torchvision:{arch}@{weights}: no such weights file, and not a torchvision "
                                f"weights name of {arch}") from None
    path = hub_checkpoint_dir() / Path(urlparse(w.url).path).name
    if not path.is_file():
        raise FileNotFoundError(f"torchvision:{arch}@{weights.name}: {path} is not in the torch hub cache; advreid "
                                f"never downloads: fetch {w.url} there, or pass a weights file")
    return path


@register_model_kind("torchvision")
def load_torchvision(name: str, weights: Path | None, card: ModelCard) -> Built:
    """Build ``name`` with ``torchvision.models.get_model`` (random init), drop its classifier, load ``weights``."""
    import torchvision.models as tvm

    arch = name.lower()
    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise ValueError(f"torchvision:{name}: unknown classification model{did_you_mean(arch, known)}")
    net = tvm.get_model(arch, weights=None)
    head = last_linear(net)
    parent, _, leaf = head.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    notes: dict = {"classifier_removed": head}
    path = None
    if weights is not None:
        path = weights if weights.is_file() else _hub_file(arch, weights)
        notes["dropped_keys"] = load_state(net, read_weights(path), str(path), droppable=(head + ".",))
    return Built(net.eval(), weights_file=path, notes=notes)
