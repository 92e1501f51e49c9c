"""Standard worst-case robust evaluation: versioned attack ensembles, the per-query worst case over their members,
gradient-masking flags and the versioned JSON Schema of the results (``advreid robust``; ``advreid leaderboard`` is a
reporting view of the files)."""

from advreid.robust.ensemble import ENSEMBLE_REVISION, NORMS, VERSIONS, Ensemble, Member, get_ensemble
from advreid.robust.runner import DrawStack, RobustJob, data_fingerprint, run_robust
from advreid.robust.schema import FORMAT, results_schema, validate_file, validate_results
from advreid.robust.worst import QueryScores, masking_flags, score_draws, summarize, worst_case

__all__ = [
    "ENSEMBLE_REVISION", "FORMAT", "NORMS", "VERSIONS", "DrawStack", "Ensemble", "Member", "QueryScores",
    "RobustJob", "data_fingerprint", "get_ensemble", "masking_flags", "results_schema", "run_robust", "score_draws",
    "summarize", "validate_file", "validate_results", "worst_case",
]
