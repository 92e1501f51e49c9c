"""ReID losses: label-smoothed CE, batch-hard / soft-margin triplet, and the combined ReIDLoss."""

from advreid.losses.losses import (
    LOSSES,
    CrossEntropyLabelSmooth,
    ReIDLoss,
    TripletLoss,
    euclidean_dist,
)

__all__ = ["LOSSES", "CrossEntropyLabelSmooth", "ReIDLoss", "TripletLoss", "euclidean_dist"]
