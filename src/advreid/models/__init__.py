"""ReID models: torchvision backbones, pooling, heads (BNNeck, layumi bottleneck), presets and checkpoints."""

from advreid.models.backbones import (
    BACKBONES,
    CNN4,
    IBN,
    POOLINGS,
    GeM,
    build_backbone,
    build_pooling,
)
from advreid.models.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    checkpoint_paths,
    find_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from advreid.models.features import embed, extract_features
from advreid.models.pretrained import (
    PretrainedWeightsError,
    PretrainedWeightsNotFound,
    UnsafeCheckpointError,
    hub_checkpoint_dir,
    load_pretrained_backbone,
    read_state_dict_file,
    weights_file_name,
    weights_url,
)
from advreid.models.reidnet import HEADS, IMAGENET_MEAN, IMAGENET_STD, MODELS, ReIDNet, build_model

__all__ = [
    "BACKBONES", "CNN4", "HEADS", "IBN", "IMAGENET_MEAN", "IMAGENET_STD", "MODELS", "POOLINGS", "CheckpointError",
    "CheckpointMismatchError", "GeM", "PretrainedWeightsError", "PretrainedWeightsNotFound", "ReIDNet",
    "build_backbone", "build_model", "build_pooling", "checkpoint_paths", "embed", "extract_features",
    "find_checkpoint", "hub_checkpoint_dir", "load_checkpoint", "load_pretrained_backbone", "read_checkpoint",
    "read_state_dict_file", "save_checkpoint", "UnsafeCheckpointError", "weights_file_name", "weights_url",
]
