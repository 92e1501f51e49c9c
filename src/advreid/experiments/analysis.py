"""``advreid data bias``: a dataset's bias (images per identity, dominant cameras, near-duplicates) and, with a
trained run, the per-identity accuracy spread the DDDefense paper reports (clean and under an attack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BiasJob", "bias_report", "per_identity_scores"]


@dataclass
class BiasJob:
    """What to measure: a dataset split, and optionally a run (with an attack) on its test split."""

    root: str
    dataset: str = "market1501"
    split: str = "train"
    dominance_threshold: float = 0.5
    duplicates: bool = True
    run: str | None = None
    attack: str | None = None
    eps: str = "8px"
    device: str | None = None


def per_identity_scores(metrics: dict, query_pids: list[int]) -> dict:
    """Per-identity rank-1 (mean, variance, std in % across identities) from a metrics dict with ``per_query``."""
    from advreid.data import per_identity_accuracy

    pq = metrics.get("per_query")
    if pq is None:
        raise ValueError("the metrics carry no per-query scores (evaluate with intervals=True)")
    return per_identity_accuracy(pq["first_match"], query_pids, k=1)


def bias_report(job: BiasJob, *, per_id: bool = False) -> tuple[dict, str]:
    """(JSON document, text) of the dataset's bias, plus the run's per-identity accuracy when ``job.run``."""
    from advreid.data import build_dataset, dataset_bias

    ds = build_dataset(job.dataset, job.root)
    rep = dataset_bias(getattr(ds, job.split), dominance_threshold=job.dominance_threshold,
                       check_duplicates=job.duplicates)
    doc: dict[str, Any] = {"dataset": job.dataset, "root": str(job.root), "split": job.split,
                           **rep.to_dict(per_id=per_id)}
    text = rep.format(title=f"{job.dataset} {job.split} ({job.root})")
    if job.run is not None:
        acc = _run_accuracy(job, ds)
        doc["per_identity_accuracy"] = acc
        lines = [f"per-identity rank-1 of {job.run} on the test split ({acc['clean']['num_ids']} identities): "
                 f"clean mean {acc['clean']['mean']:.2f}%, std {acc['clean']['std']:.2f}, "
                 f"variance {acc['clean']['variance']:.1f}"]
        if "attacked" in acc:
            a = acc["attacked"]
            lines.append(f"under {acc['attack']}: mean {a['mean']:.2f}%, std {a['std']:.2f}, variance "
                         f"{a['variance']:.1f}")
        text += "\n" + "\n".join(lines)
    return doc, text


def _run_accuracy(job: BiasJob, ds: Any) -> dict:
    from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, evaluate_attack, evaluate_clean
    from advreid.experiments.runs import load_run
    from advreid.utils.misc import get_device

    model, _ = load_run(job.run)
    model.to(get_device(job.device)).eval()
    proto = EvalProtocol.of_model(model)
    q_pids = [r.pid for r in ds.query]
    opts = RunOptions(device=get_device(job.device), progress=True)
    clean = evaluate_clean(model, ds.query, ds.gallery, protocol=proto, options=opts)
    out: dict[str, Any] = {"clean": per_identity_scores(clean["clean"], q_pids)}
    if job.attack is not None:
        spec = AttackSpec(job.attack, eps=job.eps)
        res = evaluate_attack(model, ds.query, ds.gallery, spec, protocol=proto, options=opts)
        out["attack"] = spec.label()
        out["attacked"] = per_identity_scores(res["runs"][0]["attacked"], q_pids)
    return out
