"""Adversarial attacks on ReID models: metric FGSM family, SMA, FNA, ODFA, LTA, feature PGD, APGD, a gallery-guided
rank attack, a gradient-free random search (Square) and a noise baseline.

Images are float (B,3,H,W) tensors in [0,1]; ``eps``/``alpha`` are in [0,1] units (``px(5)`` = 5/255). Build by name
with ``build("lta", model, eps="5px")``; ``list_attacks()`` names them all.
"""

from advreid.attacks.apgd import APGD
from advreid.attacks.base import (
    ATTACKS,
    DISTANCES,
    Attack,
    AttackInputs,
    build,
    list_attacks,
    register_attack,
)
from advreid.attacks.dmr import DMRAttack
from advreid.attacks.fna import FNA
from advreid.attacks.goat import GOAT, GoatGuides, goat_guides, goat_objective
from advreid.attacks.guides import GuideBank, Guides
from advreid.attacks.lta import LTA
from advreid.attacks.metric_fgsm import MetricFGSM, MetricIFGSM
from advreid.attacks.noise import UniformNoise
from advreid.attacks.odfa import ODFA
from advreid.attacks.pgd import FeaturePGD, FeaturePGDL2, GuidedPGD, GuidedPGDL2
from advreid.attacks.rank import RankAttack
from advreid.attacks.sma import SMA
from advreid.attacks.square import SquareSearch
from advreid.ops import (
    SEED_COMPAT,
    finalize,
    lgt,
    linear_luma,
    local_grayscale,
    luma,
    output_name,
    parse_eps,
    per_sample_rand,
    pil_luma,
    px,
    quantize,
    rect_masks,
    rects_from_uniform,
    reencode,
    resolve_steps,
    sample_generators,
    sample_lgt_rects,
    save_images,
    to_uint8,
)

__all__ = [
    "APGD", "ATTACKS", "DISTANCES", "FNA", "GOAT", "LTA", "ODFA", "SEED_COMPAT", "SMA", "Attack", "AttackInputs",
    "DMRAttack", "FeaturePGD", "FeaturePGDL2", "GoatGuides", "GuideBank", "GuidedPGD", "GuidedPGDL2", "Guides",
    "MetricFGSM", "MetricIFGSM", "RankAttack", "SquareSearch", "UniformNoise", "build", "finalize", "goat_guides",
    "goat_objective", "lgt", "linear_luma", "list_attacks", "local_grayscale", "luma", "output_name", "parse_eps",
    "per_sample_rand", "pil_luma", "px", "quantize", "rect_masks", "rects_from_uniform", "reencode",
    "register_attack", "resolve_steps", "sample_generators", "sample_lgt_rects", "save_images", "to_uint8",
]
