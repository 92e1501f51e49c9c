"""Batched feature extraction with the model's own embedding function: the one implementation used by the
evaluation (clean and attacked features) and by the attacks' guide banks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from advreid.utils.misc import module_mode


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, *, flip: bool = False, normalize: bool = True) -> torch.Tensor:
    """Embedding of a [0,1] batch: ``model.features`` (eval forward), optionally flip-averaged, optionally L2-normed."""
    fn = model.features if hasattr(model, "features") else model
    f = fn(images).float()
    if flip:
        f = f + fn(torch.flip(images, dims=[3])).float()
    return F.normalize(f, dim=1) if normalize else f


def extract_features(
    model: nn.Module,
    data: Dataset | Sequence,
    *,
    batch_size: int = 128,
    flip: bool = False,
    normalize: bool = True,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, pids, camids of a dataset yielding ``(img, pid, camid, ...)``; eval mode, restored afterwards."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, pids, camids = [], [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    with module_mode(model, False):  # restored one by one: mixed modes come back as they were
        for batch in it:
            imgs, pid, cam = batch[0], batch[1], batch[2]
            feats.append(embed(model, imgs.to(device, non_blocking=True), flip=flip, normalize=normalize).cpu())
            pids.append(torch.as_tensor(pid))
            camids.append(torch.as_tensor(cam))
    if not feats:
        raise ValueError(f"{desc}: the dataset is empty, nothing to extract")
    return torch.cat(feats), torch.cat(pids), torch.cat(camids)
