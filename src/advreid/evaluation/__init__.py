"""Evaluation: feature extraction, distances, CMC/mAP/mINP (Market-1501 protocol), k-reciprocal re-ranking, bootstrap
intervals, the typed protocol objects and the robustness evaluator (clean vs attacked, defenses, adaptive and
transfer attackers)."""

from advreid.evaluation.bootstrap import (
    PerQueryScores,
    mean_std_across_seeds,
    metric_intervals,
    paired_difference,
    per_query_from_json,
    per_query_to_json,
)
from advreid.evaluation.distance import compute_distance_matrix
from advreid.evaluation.evaluator import evaluate_features, evaluate_model
from advreid.evaluation.protocol import (
    AttackResult,
    AttackSpec,
    CleanResult,
    EpsResult,
    EvalProtocol,
    Metrics,
    RunOptions,
    ThreatModel,
)
from advreid.evaluation.rank import RankResult, evaluate_rank
from advreid.evaluation.rerank import re_ranking, re_ranking_features
from advreid.evaluation.robustness import (
    AttackOutput,
    attack_dataset,
    build_guide_bank,
    evaluate_attack,
    evaluate_clean,
)
from advreid.models.features import embed, extract_features

__all__ = [
    "AttackOutput", "AttackResult", "AttackSpec", "CleanResult", "EpsResult", "EvalProtocol", "Metrics",
    "PerQueryScores", "RankResult", "RunOptions", "ThreatModel", "attack_dataset", "build_guide_bank",
    "compute_distance_matrix", "embed", "evaluate_attack", "evaluate_clean", "evaluate_features", "evaluate_model",
    "evaluate_rank", "extract_features", "mean_std_across_seeds", "metric_intervals", "paired_difference",
    "per_query_from_json", "per_query_to_json", "re_ranking", "re_ranking_features",
]
