"""Experiments: training recipes composed from configs (:func:`train`) and benchmark grids."""

from advreid.experiments import dddefense  # noqa: F401  (registers the metric_at / fnes / selfmeta training steps)
from advreid.experiments.training import (
    TRAIN_STEPS,
    TrainingRun,
    TrainResult,
    build_trainer,
    register_train_step,
    train,
)

__all__ = ["TRAIN_STEPS", "TrainResult", "TrainingRun", "build_trainer", "register_train_step", "train"]
