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
    opts = RunOptions(device=get_device(job.device), progress=True, cache={})  # clean features shared by both
    clean = evaluate_clean(model, ds.query, ds.gallery, protocol=proto, options=opts)
    out: dict[str, Any] = {"clean": per_identity_scores(clean["clean"], q_pids)}
    if job.attack is not None:
        spec = AttackSpec(job.attack, eps=job.eps)
        res = evaluate_attack(model, ds.query, ds.gallery, spec, protocol=proto, options=opts)
        out["attack"] = spec.label()
        out["attacked"] = per_identity_scores(res["runs"][0]["attacked"], q_pids)
    return out


def _leave_one_out_top1(feats: Any, labels: Any) -> float:
    """The same measure on the real images, each against the centroids without itself: what it gives on real
    data (images of identities with a single image are left out)."""
    import torch
    import torch.nn.functional as F

    ids = sorted(set(labels.tolist()))
    sums = torch.stack([feats[labels == i].sum(0) for i in ids])
    counts = torch.tensor([int((labels == i).sum()) for i in ids], dtype=feats.dtype)
    pos = torch.tensor([ids.index(int(p)) for p in labels])
    keep = counts[pos] > 1
    hits = 0
    for k in keep.nonzero().flatten().tolist():
        c = sums.clone()
        c[pos[k]] = (c[pos[k]] - feats[k]) / (counts[pos[k]] - 1)
        others = torch.ones(len(ids), dtype=torch.bool)
        others[pos[k]] = False
        c[others] = c[others] / counts[others, None]
        hits += int(int((F.normalize(c, dim=1) @ feats[k]).argmax()) == int(pos[k]))
    return hits / max(int(keep.sum()), 1)


def generated_fidelity(resampled_root: str, run: str, *, dataset: str = "market1501", device: str | None = None,
                       batch_size: int = 64) -> dict:
    """Do Phase-I images carry their identity and their target camera? A run trained on the *original* data embeds
    the real and the generated training images; each generated image's identity is ranked among the identity
    centroids of the real images (top-1 / top-5 accuracy vs chance), and its camera among the camera centroids
    (accuracy vs chance, and how often the prediction is just its source image's camera, which an
    identity-preserving edit starts from). Reads ``resample_manifest.json`` (which images are generated)."""
    import json
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from advreid.data import ImageDataset, Record, build_dataset, build_transforms
    from advreid.evaluation import EvalProtocol, extract_features
    from advreid.experiments.runs import load_run
    from advreid.utils.misc import get_device

    root = Path(resampled_root)
    gen = [e for e in json.loads((root / "resample_manifest.json").read_text(encoding="utf-8"))["files"]]
    if not gen:
        raise ValueError(f"{root / 'resample_manifest.json'} lists no generated image")
    model, _ = load_run(run)
    dev = get_device(device)
    model.to(dev).eval()
    proto = EvalProtocol.of_model(model)
    tf = build_transforms(proto.height, proto.width, is_train=False)
    gen_paths = {str(root / e["file"]) for e in gen}
    ds = build_dataset(dataset, str(root))
    real = [r for r in ds.train if r.path not in gen_paths]
    relabel = ds.train_pid_map  # the manifest names original pids; training records carry the relabelled ones
    fake = [Record(str(root / e["file"]), int(relabel[int(e["pid"])]), int(e["camid"])) for e in gen]
    kw = dict(batch_size=batch_size, flip=False, normalize=True, device=dev)
    rf, rp, rc = extract_features(model, ImageDataset(real, tf), **kw)
    ff, fp, fc = extract_features(model, ImageDataset(fake, tf), **kw)
    real_cam = {r.path: r.camid for r in real}
    src_cam = torch.tensor([real_cam.get(str(root / e["source"]), -1) if e.get("source") else -1 for e in gen])

    def centroids(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = sorted(set(labels.tolist()))
        return torch.tensor(ids), F.normalize(torch.stack([rf[labels == i].mean(0) for i in ids]), dim=1)

    ids, ic = centroids(rp)
    top = (ff @ ic.T).topk(min(5, len(ids)), dim=1).indices
    cams, cc = centroids(rc)
    cam_pred = cams[(ff @ cc.T).argmax(1)]
    return {"generated": len(fake), "real": len(real), "identities": len(ids), "cameras": len(cams),
            "identity_top1_real_loo": _leave_one_out_top1(rf, rp),
            "identity_top1": (ids[top[:, 0]] == fp).float().mean().item(),
            "identity_top5": (ids[top] == fp[:, None]).any(1).float().mean().item(),
            "identity_chance_top1": 1 / len(ids), "identity_chance_top5": min(5, len(ids)) / len(ids),
            "camera_acc": (cam_pred == fc).float().mean().item(), "camera_chance": 1 / len(cams),
            "camera_equals_source": (cam_pred == src_cam).float().mean().item(),
            "method": "nearest identity / camera centroid of the real training images in the features of a run "
                      "trained on the original data (cosine)"}
