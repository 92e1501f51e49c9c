"""``torchscript:model.pt``: a traced or scripted feature model (``torch.jit.save``), [normalised images] ->
features. The archive holds its weights (no ``@WEIGHTS``); forward hooks do not reach inside it, so there is no
``feature_layer`` and no Grad-CAM."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from advreid.models.external.base import Built, ModelCard, register_model_kind


@register_model_kind("torchscript")
def load_torchscript(name: str, weights: Path | None, card: ModelCard) -> Built:
    """``torch.jit.load`` the file ``name`` on the CPU."""
    if weights is not None:
        raise ValueError(f"torchscript:{name}@{weights}: a TorchScript file holds its weights; drop '@{weights}'")
    if card.feature_layer:
        raise ValueError(f"torchscript:{name}: feature_layer does not apply (no hooks inside TorchScript); export "
                         "the feature you want as the module's output")
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"torchscript:{name}: file {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; loading a user's export stays valid
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split()).split(". ")[0][:200]  # torch's first sentence; the rest is generic advice
        raise ValueError(f"torchscript:{name}: not a TorchScript archive (torch.jit.save): {msg}") from None
    return Built(net.eval(), weights_file=path, cam_layer="skip: TorchScript modules take no forward hooks")
