"""Dataset-bias measurement (DDDefense, spec §3.11 "model bias"): inter-identity imbalance, camera dominance
and intra-identity redundancy of a ReID split, plus the spread of per-identity accuracy.

DDDefense motivates its data balancing with three properties of Market-1501 / DukeMTMC-reID, none of which the
paper defines numerically; this module gives each one a named, documented reconstruction:

* **Imbalance** - images per identity: min / median / max / mean / std and the Gini coefficient
  (:func:`gini`, population form: 0 = every identity has as many images, ``(n-1)/n`` = one identity has all).
* **Camera dominance** - for identity ``i`` the share ``max_c n_{i,c} / n_i`` of its dominant camera (the
  quantity the paper's second resampling rule thresholds with δ₂); we report its mean / median and how many
  identities exceed ``dominance_threshold`` (strictly, as in "a share above δ₂").
* **Redundancy** - the near-duplicate rate: the fraction of images that have a near-duplicate among the
  *other images of the same identity and camera* (consecutive-frame redundancy; images of other identities or
  cameras are never compared). Similarity = Pearson correlation of 16x8 (height x width) grey thumbnails,
  i.e. the cosine of the mean-centred, L2-normalised thumbnails (``1 - corr`` is half their squared
  normalised L2 distance). It ignores exposure/contrast changes and JPEG re-encoding and tolerates box
  jitter of a few pixels, while different poses and backgrounds decorrelate the thumbnails. Thumbnails of
  JPEGs are decoded directly at 1/8 scale (PIL draft mode), so Market's 12,936 training images take seconds.

The default threshold ``DUP_THRESHOLD = 0.90`` was calibrated on 300 synthetic 128x64 boxes (``advreid
synth``): copies re-encoded at JPEG quality 50, 10% darker or shifted by 1 px all score >= 0.90; copies shifted
by 2 px (3% of the width) do in 98% of cases (93% for a 2 px diagonal shift), by 4 px only in 21% (median 0.86);
95% of pairs of *independently rendered* boxes of one synthetic identity and camera score below 0.90. So
"near-duplicate" means "the same frame up to re-encoding, exposure and a box jitter of about 2 px at 64 px
width". On default synthetic sets 1.5-10% of the training images get flagged (depending on the seed's
cameras): independent renders that share the view, the camera and a similar background crop, i.e. genuinely
near-identical boxes. An identical but featureless (flat)
thumbnail has no correlation; two flat thumbnails count as duplicates when their mean grey levels differ by at
most 2/255.

Per-identity accuracy (:func:`per_identity_accuracy`): the paper's "per-ID accuracy variance" rises from
18.78 to 23.40 under plain adversarial training on Market. With Market's few queries per identity (one per
camera, ~4.5) per-identity rank-1 accuracies in percent have a *variance* of hundreds of %²: a simulation of
750 identities with 2-6 queries each gives 250-390 %² (std 16-20%) at 90% rank-1 and 470-680 %² (std 22-26%)
at 80%, with or without per-identity difficulty spread. So 18.78 -> 23.40 matches the *standard deviation in
percentage points* (a clean model at ~90% dropping towards ~80%), not the variance in %² nor a variance of
fractions (0.01-0.07); we report both (population form, ``ddof=0``) and read the paper's figure as the std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from advreid.data.images import BadImageError

__all__ = [
    "DUP_THRESHOLD",
    "THUMB_SIZE",
    "BiasReport",
    "IdentityBias",
    "dataset_bias",
    "gini",
    "near_duplicate_mask",
    "per_identity_accuracy",
]

DUP_THRESHOLD = 0.90  # Pearson correlation of grey thumbnails; calibration in the module docstring
THUMB_SIZE = (8, 16)  # (width, height): a 128x64 box reduced 8x in each direction
_FLAT_STD = 1e-3  # a thumbnail with a grey-level std below this (in [0, 1] units) is flat
_FLAT_MEAN_TOL = 2.0 / 255.0


# ------------------------------------------------------------------------------------------------ helpers
def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative ``values`` (population form, ``sum|x_i - x_j| / (2 n^2 mean)``)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("gini: values is empty; expected at least one value")
    if not np.all(np.isfinite(x)) or x[0] < 0:
        raise ValueError("gini: values must be finite and >= 0")
    total = x.sum()
    if total == 0:
        return 0.0
    n = x.size
    rank = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * (rank * x).sum() / (n * total) - (n + 1.0) / n)


def _thumbnail(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.draft("L", THUMB_SIZE)  # JPEG: decode at 1/2..1/8 scale directly (no-op for other formats)
            grey = im.convert("L").resize(THUMB_SIZE, Image.Resampling.BOX)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc
    return np.asarray(grey, dtype=np.float32).ravel() / 255.0


def _thumbnails(paths: Sequence[str], num_workers: int | None) -> np.ndarray:
    """(N, 128) float32 grey thumbnails in [0, 1], decoded in threads (PIL releases the GIL while decoding)."""
    if not paths:
        return np.zeros((0, THUMB_SIZE[0] * THUMB_SIZE[1]), np.float32)
    workers = max(1, num_workers or min(8, os.cpu_count() or 1))
    if workers == 1:
        return np.stack([_thumbnail(p) for p in paths])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(_thumbnail, paths, chunksize=64)))


def _similarity(thumbs: np.ndarray) -> np.ndarray:
    """Pairwise Pearson correlation of thumbnails (float64); flat thumbnails match flat ones of equal mean."""
    x = thumbs.astype(np.float64)
    mean = x.mean(axis=1)
    c = x - mean[:, None]
    std = np.sqrt((c * c).mean(axis=1))
    flat = std < _FLAT_STD
    c[flat] = 0.0
    norm = np.linalg.norm(c, axis=1)
    c[~flat] /= norm[~flat, None]
    sim = c @ c.T
    both_flat = flat[:, None] & flat[None, :]
    sim[both_flat] = (np.abs(mean[:, None] - mean[None, :]) <= _FLAT_MEAN_TOL)[both_flat].astype(np.float64)
    return sim


def _as_arrays(records: Sequence[Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    if len(records) == 0:
        raise ValueError("records is empty; expected a list of Record(path, pid, camid), e.g. dataset.train")
    try:
        paths = [str(r[0]) for r in records]
        pids = np.fromiter((int(r[1]) for r in records), dtype=np.int64, count=len(records))
        cams = np.fromiter((int(r[2]) for r in records), dtype=np.int64, count=len(records))
    except (TypeError, ValueError, IndexError):
        raise ValueError(
            "records: expected a sequence of Record(path, pid, camid) (or (path, pid, camid) tuples with integer "
            f"pid and camid), got an element like {records[0]!r}"
        ) from None
    return paths, pids, cams


def _check_threshold(name: str, value: float, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _dup_flags(
    paths: list[str], pids: np.ndarray, cams: np.ndarray, threshold: float, num_workers: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(near-duplicate flags, flags for 'duplicate of an earlier image', #pairs compared), per record."""
    n = len(paths)
    dup, later = np.zeros(n, bool), np.zeros(n, bool)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(pids.tolist(), cams.tolist(), strict=True)):
        groups.setdefault(key, []).append(i)
    multi = [np.asarray(g) for g in groups.values() if len(g) > 1]  # singletons have nothing to compare
    if not multi:
        return dup, later, 0
    idx = np.concatenate(multi)
    thumbs = _thumbnails([paths[i] for i in idx.tolist()], num_workers)
    pos = {int(i): j for j, i in enumerate(idx.tolist())}
    pairs = 0
    for g in multi:
        sim = _similarity(thumbs[[pos[int(i)] for i in g]])
        hit = sim >= threshold
        np.fill_diagonal(hit, False)
        dup[g] = hit.any(axis=1)
        later[g] = np.tril(hit, k=-1).any(axis=1)  # record order: a match with an earlier record
        pairs += len(g) * (len(g) - 1) // 2
    return dup, later, pairs


def near_duplicate_mask(
    records: Sequence[Any], *, threshold: float = DUP_THRESHOLD, num_workers: int | None = None
) -> np.ndarray:
    """Boolean per record: has a near-duplicate (thumbnail correlation >= ``threshold``) of the same pid and camid.

    Both images of a near-duplicate pair are flagged; see the module docstring for the similarity.
    """
    paths, pids, cams = _as_arrays(records)
    threshold = _check_threshold("threshold", threshold, -1.0, 1.0)
    return _dup_flags(paths, pids, cams, threshold, num_workers)[0]


# ------------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class IdentityBias:
    """One identity: its image count, images per camera, dominant camera and that camera's share."""

    num_images: int
    cam_counts: dict[int, int]
    dominant_cam: int
    dominant_share: float
    near_duplicates: int | None = None


@dataclass
class BiasReport:
    """What :func:`dataset_bias` measured; :meth:`to_dict` is its JSON form, :meth:`format` a text table."""

    num_images: int
    num_ids: int
    num_cams: int
    images_per_id: dict[str, float]
    cams_per_id: dict[str, float]
    dominant_share: dict[str, float]
    dominance_threshold: float
    num_dominated: int
    frac_dominated: float
    near_duplicates: dict[str, Any] | None = None
    per_id: dict[int, IdentityBias] = field(default_factory=dict, repr=False)

    def to_dict(self, *, per_id: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``per_id=True`` adds every identity's counts, dominant camera and share."""
        out: dict[str, Any] = {
            "num_images": self.num_images,
            "num_ids": self.num_ids,
            "num_cams": self.num_cams,
            "images_per_id": dict(self.images_per_id),
            "cams_per_id": dict(self.cams_per_id),
            "dominant_camera_share": {
                **self.dominant_share,
                "threshold": self.dominance_threshold,
                "num_ids_above": self.num_dominated,
                "frac_ids_above": self.frac_dominated,
            },
            "near_duplicates": None if self.near_duplicates is None else dict(self.near_duplicates),
        }
        if per_id:
            out["per_id"] = {
                str(pid): {
                    "num_images": s.num_images,
                    "cam_counts": {str(c): n for c, n in s.cam_counts.items()},
                    "dominant_cam": s.dominant_cam,
                    "dominant_share": s.dominant_share,
                    "near_duplicates": s.near_duplicates,
                }
                for pid, s in self.per_id.items()
            }
        return out

    def format(self, title: str = "dataset bias") -> str:
        """An aligned text table (what ``advreid data bias`` prints)."""
        ipi, cpi, ds = self.images_per_id, self.cams_per_id, self.dominant_share
        rows = [
            ("images per id", f"min {ipi['min']:g} | median {ipi['median']:g} | max {ipi['max']:g} | "
                              f"mean {ipi['mean']:.2f} | std {ipi['std']:.2f} | Gini {ipi['gini']:.3f}"),
            ("cameras per id", f"min {cpi['min']:g} | median {cpi['median']:g} | max {cpi['max']:g} | "
                               f"mean {cpi['mean']:.2f}"),
            ("dominant-camera share", f"mean {ds['mean']:.3f} | median {ds['median']:.3f} | min {ds['min']:.3f} | "
                                      f"max {ds['max']:.3f}"),
            (f"ids with share > {self.dominance_threshold:g}",
             f"{self.num_dominated} of {self.num_ids} ({100 * self.frac_dominated:.1f}%)"),
        ]
        nd = self.near_duplicates
        if nd is None:
            rows.append(("near-duplicates", "not checked"))
        else:
            rows.append(("near-duplicates", f"{nd['num_images']} images ({100 * nd['rate']:.1f}%) have one; "
                                            f"{nd['num_redundant']} ({100 * nd['redundant_rate']:.1f}%) repeat an "
                                            f"earlier image [corr >= {nd['threshold']:g}, same id and camera]"))
        width = max(len(k) for k, _ in rows)
        head = f"=> {title}: {self.num_images} images, {self.num_ids} ids, {self.num_cams} cameras"
        rule = "  " + "-" * (width + 3 + max(len(v) for _, v in rows))
        return "\n".join([head, rule, *(f"  {k:<{width}} | {v}" for k, v in rows), rule])


def _summary(x: np.ndarray) -> dict[str, float]:
    return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max()), "mean": float(x.mean())}


def dataset_bias(
    records: Sequence[Any],
    *,
    dominance_threshold: float = 0.5,
    dup_threshold: float = DUP_THRESHOLD,
    check_duplicates: bool = True,
    num_workers: int | None = None,
) -> BiasReport:
    """Measure imbalance, camera dominance and near-duplicate redundancy of one split (e.g. ``dataset.train``).

    Every record counts (pass a train split: in a gallery, distractor pid 0 would count as an identity). The
    near-duplicate check reads the images (thumbnails only); ``check_duplicates=False`` skips it.
    """
    paths, pids, cams = _as_arrays(records)
    dominance_threshold = _check_threshold("dominance_threshold", dominance_threshold, 0.0, 1.0)
    dup_threshold = _check_threshold("dup_threshold", dup_threshold, -1.0, 1.0)
    uid, pinv = np.unique(pids, return_inverse=True)
    ucam, cinv = np.unique(cams, return_inverse=True)
    table = np.zeros((len(uid), len(ucam)), np.int64)
    np.add.at(table, (pinv, cinv), 1)
    n = table.sum(axis=1)
    share = table.max(axis=1) / n
    dom_cam = ucam[table.argmax(axis=1)]  # ties: the lowest camid
    ncams = (table > 0).sum(axis=1)
    above = share > dominance_threshold

    dup_stats, per_dup = None, None
    if check_duplicates:
        dup, later, pairs = _dup_flags(paths, pids, cams, dup_threshold, num_workers)
        per_dup = np.bincount(pinv, weights=dup, minlength=len(uid)).astype(np.int64)
        dup_stats = {
            "threshold": dup_threshold,
            "method": f"Pearson correlation of {THUMB_SIZE[1]}x{THUMB_SIZE[0]} grey thumbnails, same pid and camid",
            "num_images": int(dup.sum()),
            "rate": float(dup.mean()),
            "num_redundant": int(later.sum()),
            "redundant_rate": float(later.mean()),
            "pairs_compared": int(pairs),
        }
    per_id = {
        int(p): IdentityBias(
            num_images=int(n[i]),
            cam_counts={int(ucam[j]): int(table[i, j]) for j in np.flatnonzero(table[i])},
            dominant_cam=int(dom_cam[i]),
            dominant_share=float(share[i]),
            near_duplicates=None if per_dup is None else int(per_dup[i]),
        )
        for i, p in enumerate(uid.tolist())
    }
    return BiasReport(
        num_images=len(paths),
        num_ids=len(uid),
        num_cams=len(ucam),
        images_per_id={**_summary(n), "std": float(n.std()), "gini": gini(n)},
        cams_per_id=_summary(ncams),
        dominant_share=_summary(share),
        dominance_threshold=dominance_threshold,
        num_dominated=int(above.sum()),
        frac_dominated=float(above.mean()),
        near_duplicates=dup_stats,
        per_id=per_id,
    )


# ------------------------------------------------------------------------------------- per-identity accuracy
def per_identity_accuracy(first_match: Sequence[int] | np.ndarray, q_pids: Sequence[int] | np.ndarray,
                          k: int = 1) -> dict[str, float | int]:
    """Mean, variance (%²) and std (%) across identities of per-identity rank-``k`` accuracy in percent.

    ``first_match`` holds each query's 0-based rank of its first true match (-1: no match, query excluded),
    e.g. ``RankResult.first_match``. Identities are weighted equally; variance and std use ``ddof=0``.
    """
    fm, qp = np.asarray(first_match), np.asarray(q_pids)
    if fm.ndim != 1 or qp.ndim != 1 or len(fm) != len(qp):
        raise ValueError(
            f"first_match and q_pids must be 1-D and of equal length, got shapes {fm.shape} and {qp.shape}"
        )
    if fm.dtype.kind not in "iu" and not (
        fm.dtype.kind == "f" and np.all(np.isfinite(fm)) and np.all(fm == np.round(fm))
    ):
        raise ValueError(f"first_match must hold integer ranks (-1 for no match), got dtype {fm.dtype}")
    if fm.size and fm.min() < -1:
        raise ValueError(f"first_match must be >= -1 (-1 marks a query without a match), got {fm.min()}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    valid = fm >= 0
    if not valid.any():
        raise ValueError("first_match: no query has a true match (all -1); per-identity accuracy is undefined")
    hit = (fm[valid] < k).astype(np.float64)
    ids, inv = np.unique(qp[valid], return_inverse=True)
    acc = 100.0 * np.bincount(inv, weights=hit) / np.bincount(inv)
    return {
        "k": int(k),
        "num_ids": int(len(ids)),
        "num_queries": int(valid.sum()),
        "mean": float(acc.mean()),
        "variance": float(acc.var()),
        "std": float(acc.std()),
    }
