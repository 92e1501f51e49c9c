"""Dataset layer: record lists and parsers for the standard ReID layouts, image loading, transforms and
P x K samplers. ``generate_synthetic`` (tiny on-disk datasets for tests) is imported lazily."""

from __future__ import annotations

from typing import Any

from advreid.data.bias import (
    DUP_THRESHOLD,
    BiasReport,
    IdentityBias,
    dataset_bias,
    gini,
    near_duplicate_mask,
    per_identity_accuracy,
)
from advreid.data.datasets import (
    CUHK03NP,
    DATASETS,
    IMAGE_EXTENSIONS,
    MSMT17,
    DatasetLayoutError,
    DukeMTMCReID,
    FolderDataset,
    Market1501,
    Record,
    ReIDDataset,
    build_dataset,
    dataset_info,
    format_dataset_info,
    list_datasets,
    register_dataset,
)
from advreid.data.images import BadImageError, ImageDataset, check_images, load_image
from advreid.data.samplers import DistributedPKSampler, PKSampler
from advreid.data.transforms import IMAGENET_MEAN, build_transforms

__all__ = [
    "DUP_THRESHOLD",
    "BiasReport",
    "IdentityBias",
    "dataset_bias",
    "gini",
    "near_duplicate_mask",
    "per_identity_accuracy",
    "CUHK03NP",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "MSMT17",
    "BadImageError",
    "DatasetLayoutError",
    "DistributedPKSampler",
    "DukeMTMCReID",
    "FolderDataset",
    "ImageDataset",
    "Market1501",
    "PKSampler",
    "Record",
    "ReIDDataset",
    "build_dataset",
    "build_transforms",
    "check_images",
    "dataset_info",
    "format_dataset_info",
    "generate_synthetic",
    "list_datasets",
    "load_image",
    "register_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "generate_synthetic":
        from advreid.data.synthetic import generate_synthetic

        return generate_synthetic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
