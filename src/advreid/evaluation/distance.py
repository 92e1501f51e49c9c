"""Pairwise distance matrices between feature sets, computed in row chunks (CPU or GPU)."""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("euclidean", "sqeuclidean", "cosine")

# Rows of ``a`` per chunk are chosen so that one chunk of the output holds about this many elements.
_CHUNK_ELEMS = 1 << 22


def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_items, feat_dim), got shape {tuple(x.shape)}")
    return x


def compute_distance_matrix(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    metric: str = "euclidean",
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distance matrix ``(len(a), len(b))`` on ``a``'s device.

    ``metric``: ``"euclidean"`` (sqrt of the squared distance clamped at 0), ``"sqeuclidean"`` (torchreid's
    ``"euclidean"``: ``|a|^2 + |b|^2 - 2 a.b``, here clamped at 0) or ``"cosine"`` (``1 - cos`` of the
    L2-normalised rows). Computed in ``dtype`` (float32 or float64), ``chunk_size`` rows of ``a`` at a time.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    a = _as_tensor(a, "a")
    b = _as_tensor(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: a has {a.shape[1]}, b has {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    a = a.to(dtype)
    b = b.to(dtype)
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMS // max(n, 1))
    if metric == "cosine":
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1)
    b_sq = None if metric == "cosine" else (b * b).sum(1)
    for i0 in range(0, m, chunk_size):
        ai = a[i0:i0 + chunk_size]
        rows_into(ai, b, b_sq, metric, out[i0:i0 + ai.shape[0]])
    return out


def rows_into(ai: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None, metric: str,
               out: torch.Tensor) -> torch.Tensor:
    """Write the distances of rows ``ai`` to all rows of ``b`` into ``out``.

    For ``"cosine"`` both inputs must already be L2-normalised; otherwise ``b_sq`` is ``(b * b).sum(1)``.
    """
    torch.mm(ai, b.t(), out=out)
    if metric == "cosine":
        return out.neg_().add_(1.0)
    out.mul_(-2.0).add_((ai * ai).sum(1, keepdim=True)).add_(b_sq).clamp_min_(0.0)
    if metric == "euclidean":
        out.sqrt_()
    return out


def pair_distances(x: torch.Tensor, x_sq: torch.Tensor | None, i: torch.Tensor, j: torch.Tensor,
                    metric: str) -> torch.Tensor:
    """Distances between rows ``x[i[k]]`` and ``x[j[k]]``, by the same formula as ``rows_into``."""
    dot = (x[i] * x[j]).sum(1)
    if metric == "cosine":
        return dot.neg_().add_(1.0)
    d = dot.mul_(-2.0).add_(x_sq[i]).add_(x_sq[j]).clamp_min_(0.0)
    return d.sqrt_() if metric == "euclidean" else d
