"""Guide features for metric attacks: a ``GuideBank`` (raw embeddings + pids + camids) and explicit ``Guides``.

Lookups are vectorised: the bank is indexed once by identity into a padded (identities, K) table, and a batch's
guides come back as padded (B,K,D) tensors with (B,K) masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

GUIDE_SELECT = ("all", "random1", "last")


@dataclass
class Guides:
    """Explicit per-sample guides: pushing ``push`` (B,K,D) or (B,D) and pulling ``pull`` (B,L,D) or (B,D) features.

    Masks (B,K) / (B,L) mark real entries (default all). Features are raw; attacks normalise them as they do their own.
    """

    push: torch.Tensor | None = None
    push_mask: torch.Tensor | None = None
    pull: torch.Tensor | None = None
    pull_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.push, self.push_mask = self._fix(self.push, self.push_mask, "push")
        self.pull, self.pull_mask = self._fix(self.pull, self.pull_mask, "pull")

    @staticmethod
    def _fix(f: torch.Tensor | None, m: torch.Tensor | None, name: str) -> tuple[Any, Any]:
        if f is None:
            return None, None
        if f.dim() == 2:
            f = f.unsqueeze(1)
            m = None if m is None else torch.as_tensor(m).reshape(-1, 1)
        if f.dim() != 3:
            raise ValueError(f"Guides.{name} must be (B,D) or (B,K,D), got {tuple(f.shape)}")
        m = torch.ones(f.shape[:2], dtype=torch.bool, device=f.device) if m is None else torch.as_tensor(m).bool()
        if m.shape != f.shape[:2]:
            raise ValueError(f"Guides.{name}_mask must be {tuple(f.shape[:2])}, got {tuple(m.shape)}")
        return f, m

    def batch_size(self) -> int | None:
        for f in (self.push, self.pull):
            if f is not None:
                return f.shape[0]
        return None


class GuideBank:
    """Raw model embeddings (N,D) of a set (gallery, query, train) with pids and camids, indexed by identity.

    Store the output of ``model.features`` (no flip, no normalisation); attacks normalise consistently themselves.
    Bank order is kept within an identity ("last" = last in record order).
    """

    def __init__(self, features: torch.Tensor, pids: torch.Tensor | Sequence[int],
                 camids: torch.Tensor | Sequence[int] | None = None, *, source: str = "gallery") -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
            desc = f"{tuple(features.shape)} {features.dtype}" if isinstance(features, torch.Tensor) else \
                type(features).__name__
            raise ValueError(f"GuideBank features must be a float (N,D) tensor, got {desc}")
        n = features.shape[0]
        if n == 0:
            raise ValueError("GuideBank needs at least one feature, got an empty set")
        self.features = features.detach()
        self.pids = self._labels(pids, n, "pids", features.device)
        self.camids = (torch.full((n,), -1, dtype=torch.long, device=features.device) if camids is None
                       else self._labels(camids, n, "camids", features.device))
        self.source = str(source)
        order = torch.argsort(self.pids, stable=True)
        sp = self.pids[order]
        self.ids, counts = torch.unique_consecutive(sp, return_counts=True)
        self.counts = counts
        self.max_count = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        cols = torch.arange(self.max_count, device=features.device)
        valid = cols[None, :] < counts[:, None]
        pos = (starts[:, None] + cols[None, :]).clamp(max=n - 1)
        self.table = torch.where(valid, order[pos], torch.full_like(pos, -1))  # (C, Kmax) bank rows per identity
        self._centroids: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _labels(v: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(v, device=device)
        if t.shape != (n,) or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"GuideBank {name} must be an integer tensor of shape ({n},), got "
                             f"{tuple(t.shape)} {t.dtype}")
        return t.long()

    @classmethod
    def from_images(cls, model: nn.Module, data: torch.Tensor | Dataset | Iterable, pids: Any = None,
                    camids: Any = None, *,
                    batch_size: int = 128, source: str = "gallery", device: torch.device | str | None = None,
                    num_workers: int = 0, progress: bool = False) -> GuideBank:
        """Bank from images: a (N,3,H,W) tensor with ``pids`` (and ``camids``), a Dataset yielding
        ``(img, pid, camid, ...)``, or an iterable of such batches (a DataLoader). Raw ``model.features`` (no flip,
        no L2), eval mode, restored after; the bank lives on ``device`` (default: the model's)."""
        from advreid.models.features import extract_features

        no_cams = False
        if not isinstance(data, torch.Tensor | Dataset):  # an iterable of batches (img, pid, camid, ...)
            batches = list(data)
            if not batches:
                raise ValueError("GuideBank.from_images: no images given")
            data = TensorDataset(*(torch.cat([torch.as_tensor(b[i]) for b in batches]) for i in range(3)))
        if isinstance(data, torch.Tensor):
            if pids is None:
                raise ValueError("GuideBank.from_images(tensor): pass pids=... for the images")
            no_cams = camids is None
            cams = torch.full((data.shape[0],), -1) if no_cams else torch.as_tensor(camids)
            data = TensorDataset(data, torch.as_tensor(pids), cams)
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("GuideBank.from_images: no images given")
        f, p, c = extract_features(model, data, batch_size=batch_size, flip=False, normalize=False, device=device,
                                   num_workers=num_workers, progress=progress, desc=f"guides ({source})")
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        return cls(f.to(dev), p.to(dev), None if no_cams else c.to(dev), source=source)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def num_ids(self) -> int:
        return self.ids.shape[0]

    def __repr__(self) -> str:
        return f"GuideBank(source={self.source!r}, n={len(self)}, ids={self.num_ids}, dim={self.dim})"

    def to(self, device: torch.device | str) -> GuideBank:
        """Copy of the bank on ``device``."""
        return GuideBank(self.features.to(device), self.pids.to(device), self.camids.to(device), source=self.source)

    def _rows(self, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Identity row of each pid in the table and whether the pid is in the bank."""
        pids = torch.as_tensor(pids, device=self.ids.device).long().contiguous()
        pos = torch.searchsorted(self.ids, pids).clamp(max=self.num_ids - 1)
        return pos, self.ids[pos] == pids

    def same_identity(self, pids: torch.Tensor, camids: torch.Tensor | None = None, *, select: str = "all",
                      exclude_same_camera: bool = False, exclude: torch.Tensor | None = None,
                      generators: Sequence[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Same-identity guides of a batch: features (B,K,D), mask (B,K), bank rows (B,K) (-1 = padding).

        ``select``: "all", "last" (last in bank order) or "random1" (one uniformly, from ``generators[i]``).
        ``exclude_same_camera`` drops guides with the sample's camid; ``exclude`` (B,) drops bank row ``exclude[i]``
        (the sample itself when the bank contains it; -1 = none). A pid absent from the bank gets no guides.
        """
        if select not in GUIDE_SELECT:
            raise ValueError(f"guide select={select!r} is not supported; expected one of {GUIDE_SELECT}")
        rows, found = self._rows(pids)
        b = rows.shape[0]
        if b == 0:
            return self.features.new_zeros((0, 0, self.dim)), torch.zeros((0, 0), dtype=torch.bool), \
                torch.zeros((0, 0), dtype=torch.long)
        k = int(self.counts[rows[found]].max()) if bool(found.any()) else 1
        idx = self.table[rows, :k]  # (B,K)
        mask = (idx >= 0) & found[:, None]
        safe = idx.clamp(min=0)
        if exclude_same_camera:
            if camids is None:
                raise ValueError("exclude_same_camera=True needs the samples' camids")
            cam = torch.as_tensor(camids, device=idx.device).long()
            mask &= self.camids[safe] != cam[:, None]
        if exclude is not None:
            ex = torch.as_tensor(exclude, device=idx.device).long()
            mask &= safe != ex[:, None]
        if select != "all":
            cols = torch.arange(k, device=idx.device).expand(b, k)
            if select == "last":
                pick = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values
            else:
                if generators is None or len(generators) != b:
                    raise ValueError("select='random1' needs one generator per sample")
                u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
                nvalid = mask.sum(1)
                kth = torch.floor(u.to(idx.device) * nvalid).long()  # k-th valid entry, 0-based
                hit = mask & (torch.cumsum(mask.long(), 1) == (kth + 1)[:, None])
                pick = torch.where(nvalid > 0, hit.long().argmax(1), torch.full_like(nvalid, -1))
            has = pick >= 0
            pick = pick.clamp(min=0)[:, None]
            idx = torch.where(has[:, None], idx.gather(1, pick), torch.full_like(pick, -1))
            mask = has[:, None].clone()
            safe = idx.clamp(min=0)
        return self.features[safe], mask, torch.where(mask, idx, torch.full_like(idx, -1))

    def centroids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Identities (C,) and their centroids (C,D) (mean raw feature); negative pids (junk) are left out."""
        if self._centroids is None:
            keep = self.ids >= 0
            rows = self.table[keep]
            m = (rows >= 0).unsqueeze(-1).to(self.features.dtype)
            sums = (self.features[rows.clamp(min=0)] * m).sum(1)
            self._centroids = (self.ids[keep], sums / self.counts[keep, None].to(self.features.dtype))
        return self._centroids

    def _other_centroids(self, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cids, cents = self.centroids()
        pids = torch.as_tensor(pids, device=cids.device).long()
        other = cids[None, :] != pids[:, None]  # (B,C)
        if not bool(other.any(1).all()):
            raise ValueError("the guide bank needs at least one identity other than each sample's own "
                             f"(bank identities with pid >= 0: {cids.tolist()[:10]})")
        return cids, cents, other

    def furthest_centroid(self, feats: torch.Tensor, pids: torch.Tensor, *, normalize: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid (B,D, raw) and pid (B,) of the other identity furthest (L2) from each feature (B,D).

        With ``normalize`` the distance compares L2-normalised features with L2-normalised centroids.
        """
        cids, cents, other = self._other_centroids(pids)
        f = feats.to(device=cents.device, dtype=cents.dtype)
        c = cents
        if normalize:
            f, c = torch.nn.functional.normalize(f, dim=1), torch.nn.functional.normalize(c, dim=1)
        d = torch.cdist(f, c, compute_mode="donot_use_mm_for_euclid_dist")  # exact, row-independent
        d = torch.where(other, d, torch.full_like(d, -1.0))
        j = d.argmax(1)
        return cents[j], cids[j]

    def random_centroid(self, pids: torch.Tensor, generators: Sequence[torch.Generator]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid (B,D) and pid (B,) of a uniformly drawn other identity, from per-sample ``generators``."""
        cids, cents, other = self._other_centroids(pids)
        if len(generators) != other.shape[0]:
            raise ValueError("random_centroid needs one generator per sample")
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cids.device)
        n = other.sum(1)
        kth = torch.floor(u * n).long()
        j = (other & (torch.cumsum(other.long(), 1) == (kth + 1)[:, None])).long().argmax(1)
        return cents[j], cids[j]
