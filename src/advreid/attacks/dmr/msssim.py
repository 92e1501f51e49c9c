"""SSIM and MS-SSIM (Wang, Simoncelli, Bovik 2003) for (B,C,H,W) images, differentiable, any float dtype.

Definition: a Gaussian window (sigma 1.5, normalised, separable) slides over each channel with *valid* filtering
(no padding, as Wang's code, ``pytorch-msssim`` and scikit-image's cropped output). Per scale ``j``
``cs_j = mean((2 s_xy + C2) / (s_x^2 + s_y^2 + C2))`` and at the coarsest scale
``ssim = mean(l * cs)`` with ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``, ``C1 = (0.01 L)^2``,
``C2 = (0.03 L)^2`` (population variances). ``MS-SSIM = ssim_M^w_M * prod_{j<M} cs_j^w_j`` per channel, averaged over
channels; between scales the image is 2x2 average-pooled (an odd last row/column is dropped). Negative ``cs``/``ssim``
values are clamped to a tiny positive number before the power (``pytorch-msssim`` clamps to 0), so gradients stay
finite.

Window rule (``auto_win_size``): the largest odd size <= 11 that still fits the coarsest scale,
``win <= min(H, W) // 2**(levels-1)``. With 5 levels that is 7 at 256x128 (``pytorch-msssim``'s default 11 fails
there) and 3 at 128x64; at 64x32 five levels do not fit and a clear error asks for fewer levels. Fewer than 5 levels
use the first ``levels`` of Wang's weights renormalised to sum to 1 (a documented reconstruction for small images;
5 levels use the published weights unchanged).

The DMR reference (``util/ms_ssim.py``) differs: it runs on ImageNet-normalised tensors with an auto-detected range,
shrinks the window per scale and multiplies the coarsest term four times (``prod(mcs[:-1] * ssim[-1])``); this module
implements the published definition on [0,1] images instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WANG_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_FLOOR = 1e-12  # clamp for cs/ssim before a fractional power

__all__ = ["WANG_WEIGHTS", "auto_win_size", "gaussian_window", "msssim", "msssim_weights", "ssim", "ssim_components"]


def gaussian_window(size: int, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalised 1-D Gaussian of odd ``size`` (the separable factor of the 2-D SSIM window)."""
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"win_size={size!r} must be an odd int >= 1")
    if not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be > 0")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def auto_win_size(height: int, width: int, levels: int = 5, max_win: int = 11) -> int:
    """Largest odd window <= ``max_win`` with ``win <= min(height, width) // 2**(levels-1)`` (fits every scale)."""
    side = min(int(height), int(width)) // 2 ** (levels - 1)
    win = min(max_win, side)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ValueError(f"images of {height}x{width} are too small for MS-SSIM with levels={levels}: the coarsest "
                         f"scale is {side} pixel(s) wide, a window needs >= 3; use fewer levels "
                         f"(e.g. levels={max(1, levels - 2)}) or larger images")
    return win


def msssim_weights(levels: int) -> tuple[float, ...]:
    """Wang's five weights, or the first ``levels`` of them renormalised to sum to 1."""
    if not isinstance(levels, int) or not 1 <= levels <= len(WANG_WEIGHTS):
        raise ValueError(f"levels={levels!r} must be an int in 1..{len(WANG_WEIGHTS)}")
    if levels == len(WANG_WEIGHTS):
        return WANG_WEIGHTS
    w = WANG_WEIGHTS[:levels]
    s = math.fsum(w)
    return tuple(v / s for v in w)


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid separable filtering of every channel of (B,C,H,W) with the 1-D window ``g``."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def _check_pair(x: torch.Tensor, y: torch.Tensor, win: int) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"SSIM needs two (B,C,H,W) tensors of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < win:
        raise ValueError(f"images of {x.shape[-2]}x{x.shape[-1]} are smaller than the SSIM window ({win})")


def ssim_components(x: torch.Tensor, y: torch.Tensor, *, win_size: int = 11, sigma: float = 1.5,
                    data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel ``(ssim, cs)``, each (B,C): the means of the SSIM and contrast-structure maps."""
    _check_pair(x, y, win_size)
    g = gaussian_window(win_size, sigma, dtype=x.dtype, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mu_x * mu_x
    syy = _filter(y * y, g) - mu_y * mu_y
    sxy = _filter(x * y, g) - mu_x * mu_y
    cs_map = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (lum * cs_map).mean(dim=(-2, -1)), cs_map.mean(dim=(-2, -1))


def ssim(x: torch.Tensor, y: torch.Tensor, *, win_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Single-scale SSIM per image (B,), averaged over channels (scikit-image's ``gaussian_weights=True`` setting)."""
    s, _ = ssim_components(x, y, win_size=win_size, sigma=sigma, data_range=data_range)
    return s.mean(dim=1)


def msssim(x: torch.Tensor, y: torch.Tensor, *, levels: int = 5, win_size: int | None = None, sigma: float = 1.5,
           data_range: float = 1.0) -> torch.Tensor:
    """MS-SSIM per image (B,), averaged over channels; ``win_size=None`` picks :func:`auto_win_size`."""
    weights = msssim_weights(levels)
    win = auto_win_size(x.shape[-2], x.shape[-1], levels) if win_size is None else win_size
    if min(x.shape[-2:]) // 2 ** (levels - 1) < win:
        raise ValueError(f"win_size={win} does not fit the coarsest of {levels} scales of a "
                         f"{x.shape[-2]}x{x.shape[-1]} image; use win_size=None (auto) or fewer levels")
    out = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    for j, w in enumerate(weights):
        s, cs = ssim_components(x, y, win_size=win, sigma=sigma, data_range=data_range)
        if j == len(weights) - 1:
            out = out * s.clamp_min(_FLOOR) ** w
        else:
            out = out * cs.clamp_min(_FLOOR) ** w
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return out.mean(dim=1)
