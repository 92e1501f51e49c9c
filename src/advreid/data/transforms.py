"""Train/test image transforms (torchvision.transforms.v2): output float32 (3,H,W) in [0,1], never
normalised -- normalisation lives inside the model so attack budgets stay in pixel units."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2 as v2

__all__ = ["IMAGENET_MEAN", "build_transforms"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


def _check(cond: bool, name: str, value: object, expected: str) -> None:
    if not cond:
        raise ValueError(f"build_transforms: {name}={value!r}; expected {expected}")


def build_transforms(
    height: int = 256,
    width: int = 128,
    *,
    is_train: bool,
    flip_p: float = 0.5,
    pad: int = 10,
    random_erasing_p: float = 0.0,
    random_erasing_value: float | Sequence[float] = IMAGENET_MEAN,
) -> v2.Compose:
    """BoT pipeline for PIL (or uint8 tensor) images.

    Train: bicubic Resize -> RandomHorizontalFlip(flip_p) -> Pad(pad) + RandomCrop -> float in [0,1] ->
    RandomErasing(random_erasing_p), filled with ``random_erasing_value`` (default: the ImageNet mean,
    which is BoT's fill expressed in [0,1] pixel space). Test: bicubic Resize -> float in [0,1].
    """
    _check(isinstance(height, int) and height > 0, "height", height, "a positive int")
    _check(isinstance(width, int) and width > 0, "width", width, "a positive int")
    _check(0.0 <= flip_p <= 1.0, "flip_p", flip_p, "a probability in [0, 1]")
    _check(isinstance(pad, int) and pad >= 0, "pad", pad, "an int >= 0")
    _check(0.0 <= random_erasing_p <= 1.0, "random_erasing_p", random_erasing_p, "a probability in [0, 1]")
    if isinstance(random_erasing_value, int | float):
        fill: float | list[float] = float(random_erasing_value)
        values = [fill]
    else:
        fill = [float(v) for v in random_erasing_value]
        values = fill
        _check(len(fill) == 3, "random_erasing_value", random_erasing_value, "a float or 3 floats (RGB)")
    in_range = all(0.0 <= v <= 1.0 for v in values)
    _check(in_range, "random_erasing_value", random_erasing_value, "values in [0, 1]")

    size = (height, width)
    resize = v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if not is_train:
        return v2.Compose([resize, *to_float])
    steps: list[v2.Transform] = [resize]
    if flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_p))
    if pad > 0:
        steps += [v2.Pad(pad), v2.RandomCrop(size)]
    steps += to_float
    if random_erasing_p > 0:
        steps.append(v2.RandomErasing(p=random_erasing_p, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=fill))
    return v2.Compose(steps)
