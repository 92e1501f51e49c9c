"""Training engine: the :class:`Trainer` with hooks, optimisers and schedules, exact resume and DDP.

A training *recipe* (which hooks, which step) is composed from a config by :func:`advreid.experiments.train`; the
engine itself never imports evaluation or defenses.
"""

from advreid.engine.distributed import DistInfo, dist_info
from advreid.engine.hooks import Checkpointer, ConsoleLogger, HookBase, PeriodicEval, ProgressBar
from advreid.engine.optim import build_optimizer, build_scheduler
from advreid.engine.trainer import Batch, TrainData, Trainer, TrainerOptions, rng_state, set_rng_state, standard_step

__all__ = [
    "Batch", "Checkpointer", "ConsoleLogger", "DistInfo", "HookBase", "PeriodicEval", "ProgressBar", "TrainData",
    "Trainer", "TrainerOptions", "build_optimizer", "build_scheduler", "dist_info", "rng_state", "set_rng_state",
    "standard_step",
]
