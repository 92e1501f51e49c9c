"""DDDefense Phase II training steps, registered for ``train.step`` (``metric_at``, ``fnes``, ``selfmeta``).

The builders live in :mod:`advreid.defenses.dddefense.steps` (defenses may not import experiments); this module
only registers them, each with its config dataclass's fields as the allowed ``train.step_params`` keys, so a typo
there is one "did you mean" error when the config is checked. Recipes: ``configs/dddefense.yaml`` (Phase I data +
self-meta), ``dd_no_resample`` / ``dd_no_meta`` / ``dd_fnes_only`` (ablations), ``metric_at`` (plain baseline).
"""

from __future__ import annotations

from advreid.defenses.dddefense.steps import (
    FNESStepConfig,
    MetricATStepConfig,
    SelfMetaStepConfig,
    build_fnes_step,
    build_metric_at_step,
    build_selfmeta_step,
    step_param_names,
)
from advreid.experiments.training import register_train_step

__all__ = ["DDDEFENSE_STEPS", "register_dddefense_steps"]

DDDEFENSE_STEPS = {
    "metric_at": (build_metric_at_step, MetricATStepConfig),
    "fnes": (build_fnes_step, FNESStepConfig),
    "selfmeta": (build_selfmeta_step, SelfMetaStepConfig),
}


def register_dddefense_steps() -> None:
    """Register (or re-register) the DDDefense steps as training steps (``train.step``)."""
    for name, (builder, config_cls) in DDDEFENSE_STEPS.items():
        register_train_step(name, builder, allowed=step_param_names(config_cls), overwrite=True)


register_dddefense_steps()
