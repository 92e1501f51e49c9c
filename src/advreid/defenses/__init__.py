"""Defenses: proactive training-time transforms (JAD's channel fusion, AutoAugment policy, LGT/LHT), passive test-time
preprocessors with differentiable or BPDA paths (circuitous scaling, resizes, RRP, JPEG, bit depth) and the
adversarial-training baselines (offline AT, GOAT). Images are float (B,3,H,W) tensors in [0,1].
"""

from advreid.defenses.adv_training import build_goat, prepare_offline_adv, resolve_adv
from advreid.defenses.hooks import AdversarialBatchHook, GuidePool, ProactiveHook
from advreid.defenses.passive import (
    JPEG,
    PASSIVE,
    BitDepth,
    Chain,
    CircuitousScaling,
    DefendedModel,
    Preprocess,
    RandomResizePad,
    bpda,
    build_passive,
    list_passive,
    register_passive,
)
from advreid.defenses.proactive import (
    PROACTIVE,
    LocalGrayscale,
    ProactiveDefense,
    auto_aug,
    build_proactive,
    channel_fusion,
    grayscale,
    list_proactive,
    local_homogeneous,
    sketch,
)

__all__ = [
    "JPEG", "PASSIVE", "PROACTIVE", "AdversarialBatchHook", "BitDepth", "Chain", "CircuitousScaling", "DefendedModel",
    "GuidePool", "LocalGrayscale", "Preprocess", "ProactiveDefense", "ProactiveHook", "RandomResizePad", "auto_aug",
    "bpda", "build_goat", "build_passive", "build_proactive", "channel_fusion", "grayscale", "list_passive",
    "list_proactive", "local_homogeneous", "prepare_offline_adv", "register_passive", "resolve_adv", "sketch",
]
