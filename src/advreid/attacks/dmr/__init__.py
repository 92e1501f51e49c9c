"""DMR, Deep Mis-Ranking (Wang et al., CVPR 2020): a generator trained against a white-box ReID model, applied in one
forward pass (and transferable to other models).

``train_dmr(victim_run, data_root, out, config="dmr_tiny")`` trains it; ``build("dmr", model, generator=out)`` attacks
with it. Importing this package registers the ``"dmr"`` attack.
"""

from advreid.attacks.dmr.attack import DMRAttack
from advreid.attacks.dmr.losses import LossWeights, least_likely_ce, lsgan_loss, misranking_loss
from advreid.attacks.dmr.msssim import auto_win_size, msssim, ssim
from advreid.attacks.dmr.networks import Discriminator, DMRNets, Generator, apply_delta, bound_delta, topk_mask
from advreid.attacks.dmr.training import (
    DMR_DEFAULTS,
    ValidationSplit,
    build_nets,
    load_dmr_config,
    load_generator,
    split_validation,
    train_dmr,
)

__all__ = [
    "DMR_DEFAULTS", "DMRAttack", "DMRNets", "Discriminator", "Generator", "LossWeights", "ValidationSplit",
    "apply_delta", "auto_win_size", "bound_delta", "build_nets", "least_likely_ce", "load_dmr_config",
    "load_generator", "lsgan_loss", "misranking_loss", "msssim", "split_validation", "ssim", "topk_mask", "train_dmr",
]
