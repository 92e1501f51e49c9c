"""DDDefense (Zhou et al., arXiv 2511.09933). Phase I, data balancing: an identity+camera-conditioned diffusion
generator (``diffusion``) and the resampling rule that adds generated training images (``resample``). Phase II,
bi-adversarial self-meta defense: FNES metric adversarial training (``fnes``) and the adversarially-enhanced
self-meta step (``selfmeta``). Everything the paper leaves open is a named reconstruction (docs/dddefense.md)."""

from advreid.defenses.dddefense.diffusion import (
    DIFFUSION_CHOICES,
    DIFFUSION_DEFAULTS,
    ConditionalUNet,
    Generator,
    load_diffusion_config,
    load_generator,
    train_diffusion,
)
from advreid.defenses.dddefense.fnes import FNESAdversary, FNESLoss, batch_guides
from advreid.defenses.dddefense.resample import (
    GENERATED_SEQUENCE,
    MANIFEST_NAME,
    GenerationTask,
    ResampleConfig,
    default_delta1,
    generated_name,
    plan_resampling,
    resample_dataset,
)
from advreid.defenses.dddefense.selfmeta import (
    AttackPool,
    SelfMetaConfig,
    SelfMetaStep,
    first_order_meta_step,
    split_identities,
)

__all__ = [
    "AttackPool",
    "FNESAdversary",
    "FNESLoss",
    "SelfMetaConfig",
    "SelfMetaStep",
    "batch_guides",
    "first_order_meta_step",
    "split_identities",
    "DIFFUSION_CHOICES",
    "DIFFUSION_DEFAULTS",
    "GENERATED_SEQUENCE",
    "MANIFEST_NAME",
    "ConditionalUNet",
    "GenerationTask",
    "Generator",
    "ResampleConfig",
    "default_delta1",
    "generated_name",
    "load_diffusion_config",
    "load_generator",
    "plan_resampling",
    "resample_dataset",
    "train_diffusion",
]
