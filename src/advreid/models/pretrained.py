"""ImageNet weights for backbones, read only from local files (never downloaded at run time).

``pretrained=True`` looks in the torch hub cache (``torch.hub.get_dir()/checkpoints``) for the file
torchvision would have downloaded; ``pretrained=PATH`` reads that file (``.safetensors``, or a ``.pth``
/``.pt`` state dict read with ``torch.load(weights_only=True)``, which never unpickles arbitrary objects).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import nn

# torchvision weights that BoT / layumi / torchreid started from (IMAGENET1K_V1, not the newer V2 recipe).
TORCHVISION_WEIGHTS: dict[str, tvm.WeightsEnum] = {
    "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": tvm.ResNet101_Weights.IMAGENET1K_V1,
    "densenet121": tvm.DenseNet121_Weights.IMAGENET1K_V1,
}
# Older torchvision file names of the same V1 weights, also accepted when found in the hub cache.
LEGACY_FILES: dict[str, str] = {
    "resnet18": "resnet18-5c106cde.pth",
    "resnet34": "resnet34-333f7ec4.pth",
    "resnet50": "resnet50-19c8e357.pth",
    "resnet101": "resnet101-5d3b4d8f.pth",
}
# IBN-a ImageNet weights are not part of torchvision; this is the IBN-Net release fast-reid uses.
EXTERNAL_URLS: dict[str, str] = {
    "resnet50_ibn_a": "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth",
}

# Prefixes under which a backbone may sit inside a saved model (advreid, BoT ``base.``, layumi ``model.``).
_CANDIDATE_PREFIXES = ("", "backbone.", "base.", "model.")
_DROPPED_PREFIXES = ("fc.", "classifier.")
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class PretrainedWeightsNotFound(FileNotFoundError):
    """The ImageNet weights file is not in the local cache (advreid never downloads weights)."""


class PretrainedWeightsError(ValueError):
    """A weights file does not fit the backbone (missing, unexpected or mis-shaped keys)."""


class UnsafeCheckpointError(PretrainedWeightsError):
    """A pickled weights file needs arbitrary code to be read (refused; the code never runs)."""


def hub_checkpoint_dir() -> Path:
    """The directory torchvision downloads weights to: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_url(backbone: str) -> str:
    """The URL the ImageNet weights of ``backbone`` come from (to download on another machine)."""
    key = backbone.lower()
    if key in TORCHVISION_WEIGHTS:
        return TORCHVISION_WEIGHTS[key].url
    if key in EXTERNAL_URLS:
        return EXTERNAL_URLS[key]
    raise ValueError(
        f"no ImageNet weights are available for backbone {backbone!r} "
        f"(known: {', '.join(sorted([*TORCHVISION_WEIGHTS, *EXTERNAL_URLS]))}); "
        "use pretrained=False or pretrained=PATH to a weights file"
    )


def weights_file_name(backbone: str) -> str:
    """The file name torch.hub would store the ImageNet weights of ``backbone`` under."""
    return Path(urlparse(weights_url(backbone)).path).name


def find_imagenet_weights(backbone: str) -> Path:
    """Locate the ImageNet weights of ``backbone`` in the hub cache, or raise PretrainedWeightsNotFound."""
    name = weights_file_name(backbone)
    folder = hub_checkpoint_dir()
    candidates = [folder / name]
    if backbone.lower() in LEGACY_FILES:
        candidates.append(folder / LEGACY_FILES[backbone.lower()])
    for c in candidates:
        if c.is_file():
            return c
    raise PretrainedWeightsNotFound(
        f"ImageNet weights for backbone {backbone!r} not found: expected the file {name!r} in the directory "
        f"{str(folder)!r} (torch.hub.get_dir()/checkpoints). advreid never downloads weights at run time: "
        f"download {weights_url(backbone)} on a machine with internet access and copy it into that "
        "directory, "
        "or pass pretrained=PATH (a .pth/.pt or .safetensors file) instead of pretrained=True."
    )


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes: what training loops store beside the weights (torchreid's ``rank1``), all plain
    data (``scalar(dtype, bytes)``), never code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    out: list = [core.multiarray.scalar, np.dtype]
    out += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")]
    return out


def torch_load_safe(path: str | Path) -> object:
    """``torch.load(weights_only=True)``, with numpy scalars/dtypes allowed; a file that needs any other global
    (arbitrary code: a ``__reduce__`` calling ``os.system``, a pickled class) is refused by
    :class:`UnsafeCheckpointError` in one line, and nothing from it runs (the restricted unpickler stops at the first
    unknown global)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        err: Exception = first
    try:  # numpy scalars are plain data: retry with them allowed
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as second:
        err = second
    names = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    what = ", ".join(names) if names else " ".join(str(err).split())[:200]
    raise UnsafeCheckpointError(
        f"weights file {str(path)!r} refused: unpickling it needs {what}, which torch.load(weights_only=True) does "
        "not allow (it could run arbitrary code); nothing from it was run. Re-save the weights as a plain state "
        "dict (torch.save(model.state_dict(), PATH)) or as .safetensors") from None


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat name->tensor dict from ``.safetensors`` or a ``.pth``/``.pt`` file (weights_only, safe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch_load_safe(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- re-raised with the file name
        raise PretrainedWeightsError(
            f"cannot read weights file {str(path)!r}: {type(e).__name__}: {e}. "
            "Expected a .safetensors file or a "
            "PyTorch state dict (.pth/.pt) loadable with torch.load(weights_only=True)."
        ) from e
    # Unwrap training checkpoints such as {"state_dict": {...}, "epoch": ...}.
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise PretrainedWeightsError(f"weights file {str(path)!r} holds no state dict (name -> tensor)")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise PretrainedWeightsError(f"weights file {str(path)!r} holds no tensors")
    return out


def _clean(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip ``module.``, fix legacy DenseNet names, pick the prefix matching the backbone, drop heads."""
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        m = _DENSENET_LEGACY.match(k)
        if m:
            k = m.group(1) + m.group(2)
        fixed[k] = v
    best = max(_CANDIDATE_PREFIXES, key=lambda p: sum((p + k) in fixed for k in model_keys))
    out = {}
    for k, v in fixed.items():
        if not k.startswith(best):
            continue  # e.g. the head of a ReID checkpoint
        k = k[len(best):]
        if k.startswith(_DROPPED_PREFIXES):
            continue
        out[k] = v
    return out


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``backbone``, requiring a full match; else PretrainedWeightsError listing keys."""
    own = backbone.state_dict()
    state = _clean(state, set(own))
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        parts = []
        groups = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped))
        for label, items in groups:
            if items:
                parts.append(f"{len(items)} {label} (first: {', '.join(items[:5])})")
        matched = sum(k in state for k in own)
        raise PretrainedWeightsError(
            f"weights in {source!r} do not fit backbone {type(backbone).__name__} "
            f"({matched}/{len(own)} keys matched): " + "; ".join(parts)
        )
    with torch.no_grad():
        for k, t in own.items():
            if k in state:
                t.copy_(state[k].to(dtype=t.dtype))


def load_pretrained_backbone(backbone: nn.Module, name: str, pretrained: bool | str | Path) -> Path | None:
    """Initialise ``backbone`` (built by name ``name``) from ImageNet weights; return the file used."""
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        if name.lower() == "cnn4":
            raise ValueError(
                "backbone 'cnn4' is a tiny test network: no ImageNet weights exist for it; "
                "use pretrained=False or pretrained=PATH to weights you trained"
            )
        path = find_imagenet_weights(name)
    elif isinstance(pretrained, str | Path):
        path = Path(pretrained).expanduser()
    else:
        raise TypeError(f"pretrained must be a bool or a file path, got {type(pretrained).__name__}")
    load_backbone_weights(backbone, read_state_dict_file(path), str(path))
    return path
