"""Evaluation: feature extraction, distances, CMC/mAP/mINP (Market-1501 protocol) and k-reciprocal re-ranking."""

from advreid.evaluation.distance import compute_distance_matrix
from advreid.evaluation.evaluator import evaluate_features, evaluate_model
from advreid.evaluation.features import embed, extract_features
from advreid.evaluation.rank import RankResult, evaluate_rank
from advreid.evaluation.rerank import re_ranking, re_ranking_features

__all__ = [
    "compute_distance_matrix",
    "evaluate_rank",
    "RankResult",
    "re_ranking",
    "re_ranking_features",
    "embed",
    "extract_features",
    "evaluate_features",
    "evaluate_model",
]

from advreid.evaluation.robustness import (  # noqa: E402 -- the attack runner (appended section)
    AttackOutput,
    attack_dataset,
    build_guide_bank,
    eval_protocol,
    evaluate_attack,
    run_attack,
)

__all__ += ["AttackOutput", "attack_dataset", "build_guide_bank", "eval_protocol", "evaluate_attack", "run_attack"]
