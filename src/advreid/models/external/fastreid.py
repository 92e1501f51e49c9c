"""``fastreid:<config.yml>@model.pth``: a fast-reid model built from its config by fast-reid's own code
(``fastreid.config.get_cfg`` + ``merge_from_file`` + ``fastreid.modeling.build_model``, on the CPU, with
``MODEL.BACKBONE.PRETRAIN`` off so nothing is downloaded) and the weights of its checkpointer
(``model_final.pth``: ``{"model": state_dict, ...}``). fast-reid takes images in [0,255] and normalises them inside
its ``forward`` (``MODEL.PIXEL_MEAN/PIXEL_STD``), so the wrapper scales [0,1] by 255 and applies no normalisation of
its own. Input size, metric and flip default to the config's ``INPUT.SIZE_TEST``, ``TEST.METRIC``, ``TEST.FLIP``.
Install with ``pip install --no-deps fastreid==1.4.0`` plus yacs, termcolor, tabulate, faiss-cpu,
opencv-python-headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.models.external.base import Built, ModelCard, load_state, read_weights, register_model_kind
from advreid.utils.io import sha256_file


class FastReIDForward(nn.Module):
    """fast-reid's meta-architecture on [0,1] images: its eval-mode ``forward`` on ``255 * x``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x * 255.0)


def build_fastreid(config: Path) -> tuple[nn.Module, Any]:
    """(model, frozen cfg) of a fast-reid config file, built on the CPU without downloading anything."""
    try:
        from fastreid.config import get_cfg
        from fastreid.modeling import build_model
    except ImportError as e:
        raise ValueError(f"fastreid: specs need the fastreid package ({e}); install it with pip install --no-deps "
                         "fastreid==1.4.0 yacs termcolor tabulate faiss-cpu opencv-python-headless") from None
    if not config.is_file():
        raise FileNotFoundError(f"fastreid: config {str(config)!r} does not exist")
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(config))
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"fastreid: config {str(config)!r}: {' '.join(str(e).split())}") from None
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return build_model(cfg).eval(), cfg


@register_model_kind("fastreid")
def load_fastreid(name: str, weights: Path | None, card: ModelCard) -> Built:
    """Build the config's model with fast-reid and load its checkpoint (the classifier dropped)."""
    config = Path(name).expanduser()
    model, cfg = build_fastreid(config)
    if weights is None:
        raise ValueError(f"fastreid:{name}: give the checkpoint, fastreid:{name}@model_final.pth")
    dropped = load_state(model, read_weights(weights), str(weights), droppable=("heads.weight", "heads.classifier"))
    h, w = (int(v) for v in cfg.INPUT.SIZE_TEST)
    metric = str(cfg.TEST.METRIC).lower()
    mean, std = ([round(float(v), 4) for v in vs] for vs in (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD))
    defaults = ModelCard(input_size=(h, w), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), flip=bool(cfg.TEST.FLIP.ENABLED),
                         metric=metric if metric in ("cosine", "euclidean") else None, normalize=metric == "cosine")
    notes = {"config": str(config.resolve()), "config_sha256": sha256_file(config), "dropped_keys": dropped,
             "meta_architecture": str(cfg.MODEL.META_ARCHITECTURE),
             "inside_normalization": f"fast-reid preprocess_image on 255*x: (x - {mean}) / {std}"}
    backbone = getattr(model, "backbone", None)
    return Built(FastReIDForward(model), defaults=defaults, weights_file=weights, notes=notes,
                 owns_normalization=True, cam_layer=backbone if isinstance(backbone, nn.Module) else None)
