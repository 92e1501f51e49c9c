"""Training: the loop, optimisers, schedules, resume and DDP."""

from advreid.engine.optim import build_optimizer, build_scheduler
from advreid.engine.trainer import TrainResult, train

__all__ = ["train", "TrainResult", "build_optimizer", "build_scheduler"]
