"""``advreid robust``: run a versioned ensemble on every query, keep the per-query worst case, write ``results.json``.

Every member attacks every query (so each member's metrics are its own), through
:func:`advreid.evaluation.attack_dataset`; each member's per-query scores are saved under ``members/<name>.json`` as
it finishes, so ``resume`` redoes only the unfinished members. The clean query and gallery features are extracted
once. Under a randomised defense the evaluated model runs ``draws`` seeded draws of the defense (per-sample streams
named by the set and the image's position, so the clean and the adversarial version of a query see the same draw).

Under ``torchrun`` the work is split over the ranks exactly as ``advreid attack`` splits it
(:mod:`advreid.evaluation.sharding`): each member's attacked batches (saved under ``shards/<member>`` as they
finish, with APGD's per-sample loss trace, so a killed run resumes with any number of ranks) and the clean
features; rank 0 scores and writes, and the result equals the single-process run's (docs/sharding.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.data import ImageDataset, Record, build_transforms
from advreid.evaluation import (
    AttackSpec,
    EvalProtocol,
    RunOptions,
    ThreatModel,
    attack_dataset,
    build_guide_bank,
    embed,
    extract_features,
)
from advreid.evaluation.robustness import guide_set, subset_indices
from advreid.evaluation.sharding import (
    BatchStore,
    ShardPlan,
    distributed_session,
    extract_sharded,
    gather_batches,
    is_main,
    on_main,
)
from advreid.ops import eps_label, sample_generators
from advreid.robust.ensemble import DEFAULT_EPS, Ensemble, Member, get_ensemble
from advreid.robust.schema import FORMAT, validate_file
from advreid.robust.worst import QueryScores, masking_flags, score_draws, summarize, worst_case
from advreid.utils.io import atomic_write_json, check_run_dir, paths_overlap, prepare_run_dir
from advreid.utils.misc import jsonable

__all__ = ["DrawStack", "RobustJob", "data_fingerprint", "run_robust"]


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class RobustJob:
    """``advreid robust``: a loaded ``model`` (``model_info`` describes it in the results: the CLI loads run folders
    and model specs with :func:`advreid.experiments.runs.load_run`) on the dataset at ``data``.

    ``defense`` "auto" is the model's own passive defense (none for a model without a training config), "none" or
    None the bare model; ``max_images`` an evenly spaced query subset (a smoke run: recorded, and the leaderboard
    never ranks it with full runs); ``ensemble`` replaces the version's table (tests only; labelled as such)."""

    model: nn.Module
    model_info: dict
    data: str
    out: str
    dataset: str | None = None
    eps: float | str | None = None
    norm: str = "linf"
    defense: str | nn.Module | None = "auto"
    adaptive: bool = False
    version: str = "standard"
    max_images: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    options: RunOptions = field(default_factory=RunOptions)
    ensemble: Ensemble | None = None
    on_member: Callable[[str, dict], None] | None = None


# ------------------------------------------------------------------------------------- randomised defense
class DrawStack(nn.Module):
    """The evaluated (defended) model under ``draws`` seeded draws of its random defense, features stacked along
    dim 1. ``index`` (the images' positions) and ``stream`` (the set) name each image's draws; set them before
    each batch."""

    def __init__(self, model: nn.Module, draws: int, seed: int) -> None:
        super().__init__()
        self.model, self.draws, self.seed = model, int(draws), int(seed)
        self.index: torch.Tensor | None = None
        self.stream = "query"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None or len(self.index) != x.shape[0]:
            raise RuntimeError("DrawStack: set .index to the batch's image positions before embedding")
        outs = []
        for d in range(self.draws):
            self.model.set_random_streams(sample_generators(self.seed, self.index, f"eval/{self.stream}/{d}"))
            try:
                outs.append(self.model.features(x).flatten(1))
            finally:
                self.model.set_random_streams(None)
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Indexed:
    """The attack as ``attack_dataset`` calls it, telling the draw stack which images come next and handing the
    batch's loss trace (APGD's ``progress``) to the store that saves the batch."""

    def __init__(self, attack: Any, stack: DrawStack | None, store: _TraceStore) -> None:
        self.attack, self.stack, self.store = attack, stack, store
        self.eps = attack.eps
        self.norm = getattr(attack, "norm", "linf")

    def params(self) -> dict:
        """The member's settings (part of each saved batch's key)."""
        return self.attack.params()

    def __call__(self, x: torch.Tensor, pids: Any, camids: Any, guides: Any, *, index: torch.Tensor) -> torch.Tensor:
        trace = getattr(self.attack, "progress", None)
        start = len(trace) if trace is not None else 0
        adv = self.attack(x, pids, camids, guides, index=index)
        if trace is not None:
            self.store.pending = trace[start:]
        if self.stack is not None:
            self.stack.index, self.stack.stream = index, "query"
        return adv


_TRACE = ("index", "loss_start", "loss_best")


class _TraceStore(BatchStore):
    """A :class:`BatchStore` that also saves, and reads back, each batch's loss trace (``progress_*`` tensors), and
    keeps the trace of every batch this rank attacked or read back by batch number: APGD's loss-rise flags then come
    from every batch, in batch order, however the run was split or resumed."""

    def __init__(self, root: str | Path, key: str = "") -> None:
        super().__init__(root, key)
        self.pending: list[dict[str, torch.Tensor]] | None = None
        self.traces: dict[int, dict[str, torch.Tensor]] = {}

    def save(self, i: int, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
        pending, self.pending = self.pending, None
        if pending:
            self.traces[i] = {k: torch.cat([rec[k] for rec in pending]) for k in _TRACE}
            tensors = {**tensors, **{f"progress_{k}": v for k, v in self.traces[i].items()}}
        return super().save(i, key, tensors, info)

    def load(self, i: int, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        got = super().load(i, key)
        if got is not None and all(f"progress_{k}" in got[0] for k in _TRACE):
            self.traces[i] = {k: got[0][f"progress_{k}"] for k in _TRACE}
        return got


# ---------------------------------------------------------------------------------------------- the context
@dataclass
class _Context:
    """Everything the members share: models, protocol, the attacked queries, clean gallery features, guides."""

    job: RobustJob
    ens: Ensemble
    eps: float
    threat: ThreatModel
    protocol: EvalProtocol
    options: RunOptions
    eval_model: nn.Module
    attacker: nn.Module
    extra: dict
    stack: DrawStack | None
    sets: dict[str, list[Record]]
    query: list[Record]
    sub: list[int]
    gallery: tuple
    guides: dict = field(default_factory=dict)


def _embed_set(ctx: _Context, records: list[Record], indices: Sequence[int], stream: str, device: torch.device
               ) -> tuple | None:
    """Clean (features, pids, camids) of ``records`` under the protocol, through the draw stack when there is one.
    Sharded: each rank embeds its batches of the single-process batching, rank 0 gets the whole set (None on the
    other ranks, which do not score)."""
    p = ctx.protocol
    tf = build_transforms(p.height, p.width, is_train=False)
    ds = ImageDataset(list(records), tf)
    if ctx.stack is None:
        return extract_sharded(ctx.eval_model, ds, batch_size=p.batch_size, to_all=False, flip=p.flip,
                               normalize=p.normalize, device=device, num_workers=ctx.options.num_workers,
                               desc=f"clean {stream}")
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    plan = ShardPlan.current(len(ds), p.batch_size)
    mine = plan.mine()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, plan.positions(mine)), batch_size=p.batch_size,
                                         shuffle=False, num_workers=ctx.options.num_workers)
    local: dict[int, tuple] = {}
    ctx.stack.eval()
    for i, (x, pid, cam, pos) in zip(mine, loader, strict=True):  # the draws: per-sample streams, exact when split
        ctx.stack.index, ctx.stack.stream = idx[pos], stream
        local[i] = (embed(ctx.stack, x.to(device), flip=p.flip, normalize=p.normalize).cpu(), pid, cam)
    parts = gather_batches(local, plan.num_batches, to_all=False)
    if parts is None:
        return None
    return tuple(torch.cat([part[k] for part in parts]) for k in range(3))


def _guides(ctx: _Context, attack: Any, device: torch.device) -> Any:
    """The guide bank an attack needs (its set for the query side, embedded raw by the attacking model), cached."""
    if not getattr(attack, "needs_guides", False):
        return None
    src = guide_set(getattr(attack, "guide_source_default", None), "query")
    if src not in ctx.sets:
        raise ValueError(f"member attack {attack.name!r} wants guides from the {src!r} set")
    if src not in ctx.guides:
        d = ctx.threat.defense
        if d is None or not getattr(d, "randomized", False):
            ctx.guides[src] = build_guide_bank(ctx.attacker, ctx.sets[src], src, protocol=ctx.protocol,
                                               options=RunOptions(device=device, num_workers=ctx.options.num_workers))
            return ctx.guides[src]
        # a seeded sequential draw makes the bank reproducible; it depends on the batch order, so every rank of a
        # sharded run builds the whole bank itself (not split), the same bank as one process
        from advreid.attacks import GuideBank

        d.generator = torch.Generator().manual_seed(ctx.job.seed)
        try:
            tf = build_transforms(ctx.protocol.height, ctx.protocol.width, is_train=False)
            f, p, c = extract_features(ctx.attacker, ImageDataset(list(ctx.sets[src]), tf),
                                       batch_size=ctx.protocol.batch_size, flip=False, normalize=False,
                                       device=device, num_workers=ctx.options.num_workers, desc=f"guides ({src})")
        finally:
            d.generator = None
        ctx.guides[src] = GuideBank(f.to(device), p.to(device), c.to(device), source=src)
    return ctx.guides[src]


def _run_member(ctx: _Context, member: Member, device: torch.device, store: _TraceStore) -> dict | None:
    """Attack every query with one member; its per-query scores, perturbation stats, time and loss trace (on rank 0;
    None on the other ranks of a sharded run). ``store`` keeps the finished batches for resume."""
    spec: AttackSpec = member.spec(ctx.eps, ctx.job.seed)
    atk = spec.build(ctx.attacker, **ctx.extra)  # eot_samples: the ensemble's, through the threat model
    guides = _guides(ctx, atk, device)
    opts = RunOptions(batch_size=ctx.options.batch_size, device=device, num_workers=ctx.options.num_workers,
                      progress=ctx.options.progress and is_main(), batch_store=store)
    out = attack_dataset(_Indexed(atk, ctx.stack, store), ctx.query, ctx.eval_model, protocol=ctx.protocol,
                         guides=guides, indices=ctx.sub, options=opts, desc=f"{member.name} eps={eps_label(ctx.eps)}")
    traces = None
    if hasattr(atk, "progress"):  # every batch's loss trace, attacked here, by another rank or before a resume
        traces = gather_batches(store.traces, ShardPlan.current(len(ctx.query), opts.batch_size).num_batches,
                                to_all=False)
    if not is_main():
        return None
    qs = score_draws((out.features, out.pids, out.camids), ctx.gallery, ctx.protocol, ctx.ens.draws)
    rise = None
    if traces is not None:
        from advreid.attacks.apgd import loss_rises

        pos = {int(i): k for k, i in enumerate(ctx.sub)}
        rise = {str(pos[i]): r for i, r in loss_rises(traces).items() if i in pos}
    return {"member": member.to_dict(), "spec": spec.to_dict(), "params": jsonable(atk.params()),
            "scores": qs.to_json(), "loss_rise": rise, **out.stats()}


# ---------------------------------------------------------------------------------------------- helpers
def data_fingerprint(query: Sequence[Record], gallery: Sequence[Record]) -> str:
    """sha256 over every query and gallery image's file name, size, pid and camera: the same data, the same print."""
    h = hashlib.sha256()
    for split, records in (("query", query), ("gallery", gallery)):
        for r in records:
            p = Path(r.path)
            size = p.stat().st_size if p.is_file() else -1
            h.update(f"{split}\t{p.name}\t{size}\t{r.pid}\t{r.camid}\n".encode())
    return h.hexdigest()


def _threat_doc(threat: ThreatModel, norm: str, eps: float, extra: dict) -> dict:
    info = threat.defense_info()
    return {"norm": norm, "eps": eps, "eps_px": eps * 255 if norm == "linf" else None,
            "eps_label": eps_label(eps) if norm == "linf" else f"{eps:.4g}", "kind": threat.kind,
            "adaptive": threat.adaptive, "defense": None if info is None else {k: info[k] for k in
                                                                                ("name", "params", "randomized",
                                                                                 "differentiable")},
            "eot_samples": extra.get("eot_samples")}


def _check_resume(out: Path, key: dict) -> None:
    """On resume, the stored job must be the same job (model, data, threat, ensemble, seed, protocol)."""
    path = out / "job.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is missing; {out} is not an `advreid robust` folder")
    old = json.loads(path.read_text(encoding="utf-8"))
    for k, v in key.items():
        if old.get(k) != jsonable(v):
            raise ValueError(f"--resume: {out} was written for another {k} ({json.dumps(old.get(k))[:200]}); "
                             f"now {json.dumps(jsonable(v))[:200]}; use another --out or --overwrite")


def _load_member(path: Path, member: Member, spec: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # a damaged partial file: redo the member
    return rec if rec.get("member") == member.to_dict() and rec.get("spec") == spec else None


# ------------------------------------------------------------------------------------------------ the run
def _setup(job: RobustJob, device: torch.device) -> tuple[_Context, dict, dict]:
    """Load the model and data, resolve the threat model and ensemble; check everything before any folder exists."""
    from advreid.data import build_dataset
    from advreid.ops import parse_eps, parse_number

    ens = job.ensemble or get_ensemble(job.version, job.norm)
    if ens.norm != job.norm:
        raise ValueError(f"the ensemble is for --norm {ens.norm}, not {job.norm}")
    eps = DEFAULT_EPS[job.norm] if job.eps is None else (parse_eps(job.eps, "--eps") if job.norm == "linf"
                                                         else parse_number(job.eps, "--eps"))
    if eps <= 0:
        raise ValueError(f"--eps {job.eps}: a robust evaluation needs a positive budget")
    model, info = job.model, job.model_info
    cfg = getattr(model, "checkpoint_meta", {}).get("meta", {}).get("config", {})
    ds_name = job.dataset or cfg.get("data", {}).get("name", "market1501")
    ds = build_dataset(ds_name, job.data)
    defense = None if isinstance(job.defense, str) and job.defense == "none" else job.defense
    threat = ThreatModel(defense=defense, adaptive=job.adaptive, eot_samples=ens.eot).resolve(model)
    randomized = bool(threat.defense is not None and getattr(threat.defense, "randomized", False))
    if ens.draws > 1 and not randomized:
        raise ValueError(f"--version {ens.version} is for randomised defenses (e.g. --defense rrp); "
                         f"{'no defense' if threat.defense is None else threat.defense_info()['name']} is "
                         "deterministic: use --version standard")
    protocol = EvalProtocol.of_model(model, max_images=job.max_images)
    model.to(device).eval()
    eval_model, attacker, extra = threat.models(model)
    stack = DrawStack(eval_model, ens.draws, job.seed) if randomized else None
    sets = {"query": list(ds.query), "gallery": list(ds.gallery)}
    sub = subset_indices(len(sets["query"]), protocol.max_images)
    ctx = _Context(job, ens, eps, threat, protocol, job.options, stack if stack is not None else eval_model,
                   attacker, extra, stack, sets, [sets["query"][i] for i in sub], sub, ())
    import advreid

    header = {"format": FORMAT, "advreid_version": advreid.__version__, "model": jsonable(info),
              "data": {"name": ds_name, "root": str(Path(job.data).resolve()),
                       "fingerprint": data_fingerprint(sets["query"], sets["gallery"]),
                       "num_query": len(sets["query"]), "num_gallery": len(sets["gallery"]),
                       "num_attacked": len(sub), "max_images": protocol.max_images},
              "threat": _threat_doc(threat, job.norm, eps, extra), "ensemble": ens.to_dict(),
              "seed": job.seed, "protocol": protocol.to_dict()}
    key = {k: header[k] for k in ("model", "data", "threat", "ensemble", "seed", "protocol")}
    return ctx, header, key


def _check_out(out: Path, job: RobustJob, key: dict) -> None:
    """Refuse an output folder that cannot be used (every rank, before any folder exists)."""
    if paths_overlap(out, job.data):
        raise ValueError(f"--out {out} is inside (or contains) the dataset folder {job.data}: choose another folder")
    check_run_dir(out, resume=job.resume, overwrite=job.overwrite)
    if job.resume:
        _check_resume(out, key)


def _prepare(out: Path, job: RobustJob, key: dict) -> None:
    """Create the output folder and write ``job.json`` (rank 0 of a sharded run)."""
    prepare_run_dir(out, resume=job.resume, overwrite=job.overwrite)
    validate_file(jsonable(key), "job")
    atomic_write_json(out / "job.json", jsonable(key))
    (out / "members").mkdir(exist_ok=True)


def run_robust(job: RobustJob) -> tuple[dict, Path]:
    """Run the job; write ``members/<name>.json`` per member and ``results.json`` (schema-valid); return both.

    Under ``torchrun`` every rank runs every member: ``attack_dataset`` splits the batches over the ranks (batch
    ``i`` of the single-process batching to rank ``i mod N``), saves each finished batch under ``shards/<member>``
    and gives every rank the whole output; rank 0 alone scores and writes (the result equals the single-process
    run's), and the other ranks return ``({}, out)``. A killed run resumes with any number of ranks, recomputing only
    the unfinished members' missing batches (docs/sharding.md)."""
    from advreid.engine.distributed import barrier

    out = Path(job.out)
    with distributed_session(job.options.device) as device:
        ctx, header, key = _setup(job, device)
        _check_out(out, job, key)
        barrier()  # every rank has checked the folder before rank 0 creates it
        on_main(_prepare, out, job, key)
        header["shards"] = ShardPlan.current(len(ctx.sub), ctx.options.batch_size).counts()
        t0 = time.perf_counter()
        ctx.gallery = _embed_set(ctx, ctx.sets["gallery"], range(len(ctx.sets["gallery"])), "gallery", device)
        clean_q = _embed_set(ctx, ctx.query, ctx.sub, "query", device)
        records: dict[str, dict] = {}
        for m in ctx.ens.members:
            path = out / "members" / f"{m.name}.json"
            spec = m.spec(ctx.eps, job.seed).to_dict()
            rec = on_main(_load_member, path, m, spec) if job.resume else None  # every rank: the same decision
            if rec is None:
                store = _TraceStore(out / "shards" / m.name,
                                    key=json.dumps({"job": jsonable(key), "spec": spec}, sort_keys=True, default=str))
                rec = _run_member(ctx, m, device, store)
                if is_main():
                    validate_file(rec, "member")
                    atomic_write_json(path, rec)
                    shutil.rmtree(store.root, ignore_errors=True)  # the member file holds everything now
            if is_main():
                records[m.name] = rec
                if job.on_member is not None:
                    job.on_member(m.name, rec)
        if not is_main():
            return {}, out
        clean = score_draws(clean_q, ctx.gallery, ctx.protocol, ctx.ens.draws)
        doc = assemble(header, clean, records, ctx.sub, seconds=time.perf_counter() - t0)
        validate_file(doc, "results")
        atomic_write_json(out / "results.json", doc)
        shutil.rmtree(out / "shards", ignore_errors=True)
    return doc, out


def assemble(header: dict, clean: QueryScores, records: dict[str, dict], sub: Sequence[int], *,
             seconds: float) -> dict:
    """The results document: clean, worst case and per-member metrics, per-query winners, masking flags."""
    scores = {n: QueryScores.from_json(r["scores"]) for n, r in records.items()}
    worst, winners = worst_case(scores)
    free = [n for n, r in records.items() if r["member"]["gradient_free"]]
    rises = {n: {int(k): bool(v) for k, v in (r.get("loss_rise") or {}).items()} for n, r in records.items()}
    masking = masking_flags(scores, free, rises)
    members = {}
    for n, r in records.items():
        wins = sum(1 for w in winners if w == n)
        members[n] = {**summarize(scores[n]), "wins": wins, "attack": r["spec"], "params": r["params"],
                      "gradient_free": r["member"]["gradient_free"], "seconds": r["seconds"],
                      "linf_max_px": r["linf_max_px"], "l2_mean": r["l2_mean"]}
    mean_ap = worst.mean_ap()
    per_query = {"index": [int(i) for i in sub],
                 "worst_ap": [None if w is None else round(float(a), 6) for a, w in zip(mean_ap, winners, strict=True)],
                 "first_match": [None if w is None else round(float(f), 4)
                                 for f, w in zip(worst.mean_first_match(), winners, strict=True)],
                 "winner": winners}
    return {**header, "complete": True, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "clean": summarize(clean), "worst_case": summarize(worst), "members": members,
            "per_query": per_query, "masking": masking,
            "cost": {"seconds_total": round(seconds, 3),
                     "member_seconds": {n: r["seconds"] for n, r in records.items()}}}
