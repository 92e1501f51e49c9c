"""Grad-CAM for a retrieval model (seed Fig. 8): where in the image the evidence for "this is the same person as the
target" lies, for clean and adversarial queries alike.

pytorch-grad-cam's ``GradCAM`` on the model's embedding, with a similarity score as the target instead of a class logit.
The score is a named reconstruction (the seed says only "Grad-CAM activation map"):

- ``"projection"`` (default): ``<f(x), t / |t|>``, the embedding's component along the target feature. With the
  query's own clean feature as target this is the natural choice: its gradient is ``t / |t|`` everywhere, so the
  clean map shows what supports the clean identity and the adversarial map what still does.
- ``"cosine"``: ``cos(f(x), t)``, pytorch-grad-cam's ``SimilarityToConceptTarget``. Its gradient vanishes where
  ``f(x)`` is parallel to ``t``, so with the image's own clean feature as target the clean map is numerical noise;
  use it for targets from other images.

The layer is the backbone's output (the last backbone block: ResNet ``layer4``, DenseNet ``features`` + ReLU, the
last conv-bn-relu of ``cnn4``). Model modes, ``requires_grad`` flags and existing ``.grad`` tensors are restored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCORES", "gradcam_layer", "similarity_gradcam"]

SCORES = ("projection", "cosine")


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The default Grad-CAM layer: the model's own choice (``model.gradcam_layer()``, e.g. a model spec's wrapper),
    else the ``backbone`` of the (first, possibly wrapped) ReIDNet in ``model``."""
    for m in model.modules():
        if callable(getattr(m, "gradcam_layer", None)):
            return m.gradcam_layer()
        bb = getattr(m, "backbone", None)
        if isinstance(bb, nn.Module):
            return bb
    raise ValueError(f"layer=None: no backbone found in {type(model).__name__}; pass layer=<the conv block to use>")


class _Similarity:
    """Grad-CAM target for one image: the similarity of its embedding to ``target``."""

    def __init__(self, target: torch.Tensor, score: str) -> None:
        self.target = F.normalize(target.float(), dim=0)
        self.score = score

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        t = self.target.to(output.device)
        if self.score == "cosine":
            return F.cosine_similarity(output.float(), t, dim=0)
        return (output.float() * t).sum()


class _Embedding(nn.Module):
    """``model``'s retrieval embedding as ``forward`` (pytorch-grad-cam calls ``model(x)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fn: Callable[[torch.Tensor], torch.Tensor] = model.features if hasattr(model, "features") else model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _check(images: torch.Tensor, target_features: torch.Tensor | np.ndarray) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float (N,3,H,W) tensor in [0,1], got {got}")
    t = torch.as_tensor(np.asarray(target_features) if not isinstance(target_features, torch.Tensor)
                        else target_features).float().cpu()
    if t.dim() == 1:
        t = t.expand(images.shape[0], -1)
    if t.dim() != 2 or t.shape[0] != images.shape[0]:
        raise ValueError(f"target_features must be (N, D) with N = {images.shape[0]} images (or one (D,) feature), "
                         f"got shape {tuple(t.shape)}")
    if not torch.all(t.norm(dim=1) > 0):
        raise ValueError("target_features must be non-zero vectors (a similarity to 0 is undefined)")
    return t


def similarity_gradcam(model: nn.Module, images: torch.Tensor, target_features: torch.Tensor | np.ndarray, *,
                       layer: nn.Module | None = None, score: str = "projection",
                       batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in [0,1] (float32) of each image's similarity ``score`` to its target feature.

    ``images``: (N,3,H,W) in [0,1]; ``target_features``: (N, D) (or one (D,) for all), e.g. the clean query's
    evaluation feature; ``layer``: default :func:`gradcam_layer`. Runs on the model's device, in eval mode.
    """
    from pytorch_grad_cam import GradCAM

    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    targets = _check(images, target_features)
    layer = gradcam_layer(model) if layer is None else layer
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    wrapper = _Embedding(model)
    cam = None
    try:
        for p, _, _ in params:
            p.requires_grad_(False)  # only the activations need gradients (the input carries the graph)
        cam = GradCAM(model=wrapper, target_layers=[layer])
        out = []
        with torch.enable_grad():
            for i in range(0, images.shape[0], batch_size):
                x = images[i:i + batch_size].detach().to(device).requires_grad_(True)
                out.append(cam(x, [_Similarity(t, score) for t in targets[i:i + batch_size]]))
    finally:
        if cam is not None:
            cam.activations_and_grads.release()
        for p, req, grad in params:
            p.requires_grad_(req)
            p.grad = grad
        for m, mode in modes:
            m.training = mode
    return np.clip(np.concatenate(out).astype(np.float32), 0.0, 1.0)
