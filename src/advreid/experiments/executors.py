"""Where the work of a bench runs: ``local`` (in this process, in grid order: the default) or ``submitit`` (SLURM jobs
through `submitit <https://github.com/facebookincubator/submitit>`_, or its local executor's subprocesses).

Both run the same units. A unit is a picklable job (a dataclass with ``__call__``) holding the resolved bench config,
the output folder and what to do; a worker re-creates a :class:`~advreid.experiments.bench.Bench` from them and
writes exactly the files an in-process bench writes (a cell is complete iff its JSON exists, a model iff its
``checkpoints/final.json`` does), so ``--resume`` and ``--tables-only`` work unchanged and the tables of both
executors are the same. The submitit scheduler runs trainings first (a resampled dataset before the models trained on
it, an offline-AT or ``init`` model after its source model, a DMR generator after its victim), then the cells of a
(model, dataset) in one job (its clean features extracted once; ``cells_per_job`` splits them), jobs of one kind
submitted together as a job array. A failed job is resubmitted (a finished model or cell is kept, so a retry only
does what is left) up to ``max_tries`` times, then reported by name with its log; the work that needed it is
reported as not run. A preempted or timed-out job is requeued by submitit (the jobs are checkpointable) and resumes
from its last checkpoint. ``submitit`` is an optional extra (``pip install advreid[cluster]``), imported lazily.
"""

from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advreid.experiments.bench import Bench, finished_cell, run_cell
from advreid.experiments.grid import Cell, cell_key

__all__ = ["EXECUTORS", "BenchJob", "CellJob", "DataJob", "Executor", "GeneratorJob", "LocalExecutor", "Node",
           "SubmititExecutor", "SubmititOptions", "TrainJob", "make_executor", "parse_slurm_params", "plan",
           "warn_failures"]

EXECUTORS = ("local", "submitit")
OnCell = Callable[[Cell, dict], None]  # called with each finished cell and its result document


class Executor(ABC):
    """Runs the unfinished cells ``todo`` of ``bench`` (and the trainings they need); ``on_cell`` receives each
    finished cell's document as it comes; returns one line per failed unit (empty: everything ran)."""

    name = "?"

    @abstractmethod
    def run(self, bench: Bench, todo: list[Cell], on_cell: OnCell) -> list[str]: ...


class LocalExecutor(Executor):
    """In this process, in grid order; models and DMR generators are trained when a cell first needs them and an
    error stops the bench (the finished cells are kept for ``--resume``)."""

    name = "local"

    def run(self, bench: Bench, todo: list[Cell], on_cell: OnCell) -> list[str]:
        for c in todo:
            on_cell(c, run_cell(bench, c))
        return []


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class BenchJob:
    """What a worker runs: a :class:`Bench` of ``cfg`` writing into ``out`` (``threads``: torch threads; None keeps
    torch's default). Checkpointable: a preempted or timed-out job is requeued as it is and resumes from the files."""

    cfg: dict
    out: str
    threads: int | None = None

    def bench(self) -> Bench:
        if self.threads:
            import torch

            torch.set_num_threads(int(self.threads))
        return Bench(self.cfg, Path(self.out), progress=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook (as ``submitit.helpers.Checkpointable``): the same job again; the model
        training resumes from its last checkpoint and finished cells are skipped."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@dataclass(frozen=True)
class DataJob(BenchJob):
    """Prepare a (resampled: DDDefense Phase I) dataset of the bench."""

    key: str = ""

    def __call__(self) -> str:
        return self.bench().dataset_root(self.key)


@dataclass(frozen=True)
class TrainJob(BenchJob):
    """Train (or resume) bench model ``key``; with ``tasks`` > 1 every task is one DDP rank (one per GPU)."""

    key: str = ""
    tasks: int = 1

    def __call__(self) -> str:
        if self.tasks > 1:  # torch.distributed's env:// variables from SLURM's; each rank keeps every GPU visible
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return str(self.bench().run_dir(self.key))


@dataclass(frozen=True)
class GeneratorJob(BenchJob):
    """Train (or resume) the DMR generator of attack column ``key``."""

    key: str = ""

    def __call__(self) -> str:
        return str(self.bench().generator(self.key))


@dataclass(frozen=True)
class CellJob(BenchJob):
    """Score ``cells`` (all on one model and dataset: its feature caches are shared), skipping finished ones."""

    cells: tuple[Cell, ...] = ()

    def __call__(self) -> list[str]:
        bench = self.bench()
        done = []
        for c in self.cells:
            if finished_cell(self.cfg, bench.out, c) is None:
                run_cell(bench, c)
            done.append(cell_key(*c))
        return done


# ---------------------------------------------------------------------------------------------------- plan
@dataclass
class Node:
    """One unit of the plan: its job, the units it waits for, and the cells it finishes (cell jobs)."""

    name: str
    kind: str  # data, train, generator or cells
    job: BenchJob
    deps: list[str] = field(default_factory=list)
    cells: tuple[Cell, ...] = ()


def _needed(cfg: dict, todo: list[Cell]) -> tuple[list[str], list[str], list[str]]:
    """(models, datasets, generator attacks) the cells ``todo`` need, models' sources and datasets' origins
    included, in the config's order."""
    models, datasets, gens = set(), set(), set()

    def add_model(m: str) -> None:
        if m in models:
            return
        models.add(m)
        spec = cfg["models"][m]
        for dep in (spec.get("source"), spec.get("init")):
            if dep is not None:
                add_model(dep)
        if spec.get("train_on") is not None:
            add_dataset(spec["train_on"])

    def add_dataset(d: str) -> None:
        while d is not None and d not in datasets:
            datasets.add(d)
            d = (cfg["datasets"][d].get("resampled") or {}).get("from")

    for m, d, _f, a, _t in todo:
        add_model(m)
        add_dataset(d)
        spec = cfg["attacks"][a] or {}
        if spec.get("source") is not None:
            add_model(spec["source"])
        if spec.get("generator") is not None:
            gens.add(a)
            add_model(spec["generator"]["model"])
    return ([m for m in cfg["models"] if m in models], [d for d in cfg["datasets"] if d in datasets],
            [a for a in cfg["attacks"] if a in gens])


def plan(bench: Bench, todo: list[Cell], opts: SubmititOptions) -> dict[str, Node]:
    """The units of ``todo`` with their dependencies; plain datasets (a folder, synthetic data) are prepared here,
    and trained models and generators already finished in the output folder are reused, not resubmitted."""
    cfg, out = bench.cfg, str(bench.out)
    base = {"cfg": cfg, "out": out, "threads": opts.job_threads()}
    models, datasets, gens = _needed(cfg, todo)
    nodes: dict[str, Node] = {}
    for d in datasets:
        if cfg["datasets"][d].get("resampled") is None:
            bench.dataset_root(d)  # cheap, and every job reads it: prepared once, before any job starts
        else:
            nodes[f"data:{d}"] = Node(f"dataset {d!r}", "data", DataJob(**base, key=d),
                                      [f"data:{cfg['datasets'][d]['resampled']['from']}"])
    for m in models:
        spec = cfg["models"][m]
        if spec.get("config") is None or spec.get("run") is not None:
            continue  # given, not trained here
        if (bench.out / "models" / m / "checkpoints" / "final.json").is_file():
            continue
        nodes[f"train:{m}"] = Node(f"training of model {m!r}", "train",
                                   TrainJob(**base, key=m, tasks=max(1, opts.gpus_per_job)),
                                   [f"data:{spec['train_on']}", f"train:{spec.get('source')}",
                                    f"train:{spec.get('init')}"])
    for a in gens:
        if (bench.out / "generators" / a / "results.json").is_file():
            continue
        victim = cfg["attacks"][a]["generator"]["model"]
        nodes[f"generator:{a}"] = Node(f"DMR generator of attack {a!r}", "generator", GeneratorJob(**base, key=a),
                                       [f"train:{victim}", f"data:{cfg['models'][victim].get('train_on')}"])
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in todo:
        groups.setdefault((c[0], c[1]), []).append(c)
    for (m, d), group in groups.items():
        size = opts.cells_per_job if opts.cells_per_job > 0 else len(group)
        for i in range(0, len(group), size):
            chunk = tuple(group[i:i + size])
            deps = {f"train:{m}", f"data:{d}"}
            for _m, _d, _f, a, _t in chunk:
                spec = cfg["attacks"][a] or {}
                deps |= {f"train:{spec.get('source')}", f"generator:{a}"}
            part = f" (part {i // size + 1})" if len(group) > size else ""
            nodes[f"cells:{m}:{d}:{i}"] = Node(f"cells of model {m!r} on {d!r}{part}", "cells",
                                               CellJob(**base, cells=chunk), sorted(deps), chunk)
    for n in nodes.values():  # only the units that are to run are waited for
        n.deps = [dep for dep in dict.fromkeys(n.deps) if dep in nodes]
    return nodes


# --------------------------------------------------------------------------------------------- submitit
@dataclass(frozen=True)
class SubmititOptions:
    """Where and how the jobs run. ``cluster``: None picks SLURM when it is there, ``local`` runs each job as a
    subprocess of this machine (submitit's LocalExecutor: tests, a workstation).
    ``gpus_per_job``: GPUs of a training job (one DDP rank per GPU); data, generator and cell jobs take
    ``min(1, gpus_per_job)``. ``folder``: submitit's logs and pickles (default ``OUT/submitit``).
    ``cells_per_job``: cells of one (model, dataset) per job (0: all). ``max_running``: jobs in flight at once
    (None: no limit on SLURM; on ``local``: the CPU count divided by ``cpus_per_task``). ``max_tries``: submissions
    of a failing job before it is reported. ``slurm``: extra SLURM parameters (``account``, ``qos``,
    ``constraint``, ...; passed as submitit's ``slurm_<name>``)."""

    cluster: str | None = None
    folder: str | None = None
    partition: str | None = None
    gpus_per_job: int = 1
    timeout_min: int = 240
    cpus_per_task: int = 4
    mem_gb: float | None = None
    cells_per_job: int = 0
    array_parallelism: int | None = None
    max_running: int | None = None
    max_tries: int = 3
    poll_s: float | None = None
    slurm: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("gpus_per_job", "cells_per_job"):
            if getattr(self, name) < 0:
                raise ValueError(f"submitit option {name}={getattr(self, name)}: expected 0 or more")
        for name in ("timeout_min", "cpus_per_task", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"submitit option {name}={getattr(self, name)}: expected 1 or more")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"submitit option max_running={self.max_running}: expected 1 or more (or none)")
        if self.cluster not in (None, "slurm", "local"):
            raise ValueError(f"submitit cluster {self.cluster!r}: expected slurm or local (or none: auto)")

    def job_threads(self) -> int:
        """Torch threads of a job (each DDP rank of a training job): its CPUs."""
        return self.cpus_per_task

    def poll(self, cluster: str) -> float:
        """Seconds between two looks at the running jobs (1 s for local subprocesses, 10 s on SLURM)."""
        if self.poll_s is not None:
            return float(self.poll_s)
        return 1.0 if cluster == "local" else 10.0

    def limit(self, cluster: str) -> int | None:
        """Jobs in flight at once on ``cluster`` (the one submitit picked); None: no limit."""
        if self.max_running is not None or cluster != "local":
            return self.max_running
        return max(1, (os.cpu_count() or 1) // self.cpus_per_task)

    def parameters(self, kind: str, name: str) -> dict[str, Any]:
        """submitit's ``update_parameters`` of a ``kind`` job."""
        gpus = self.gpus_per_job if kind == "train" else min(1, self.gpus_per_job)
        p: dict[str, Any] = {"name": name, "timeout_min": int(self.timeout_min), "gpus_per_node": gpus,
                             "tasks_per_node": max(1, gpus) if kind == "train" else 1,
                             "cpus_per_task": int(self.cpus_per_task)}
        if self.mem_gb is not None:
            p["mem_gb"] = float(self.mem_gb)
        if self.partition is not None:
            p["slurm_partition"] = self.partition
        if self.array_parallelism is not None:
            p["slurm_array_parallelism"] = int(self.array_parallelism)
        for k, v in self.slurm:
            p[f"slurm_{k}"] = v
        return p


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise RuntimeError("--executor submitit needs the submitit package: pip install 'advreid[cluster]'") from None
    return submitit


def _failure_line(err: BaseException) -> str:
    """The last line of a job's traceback (what went wrong), not submitit's whole message."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    dashes = [i for i, ln in enumerate(lines) if ln and set(ln) == {"-"}]
    body = lines[dashes[0] + 1:dashes[1]] if len(dashes) >= 2 else lines
    body = [ln for ln in body if ln]
    return body[-1] if body else type(err).__name__


def _cells_text(cells: Iterable[Cell]) -> str:
    """`` (2 cells: KEY, KEY)``, empty without cells."""
    keys = [cell_key(*c) for c in cells]
    return f" ({len(keys)} cell{'s' * (len(keys) != 1)}: {', '.join(keys)})" if keys else ""


@dataclass
class _Running:
    node: str
    job: Any
    tries: int


class SubmititExecutor(Executor):
    """Jobs through submitit (see the module docstring); this process schedules them and waits for them."""

    name = "submitit"

    def __init__(self, options: SubmititOptions | None = None) -> None:
        self.options = options or SubmititOptions()
        self._check()

    def _check(self) -> None:
        """Fail before anything is written: submitit missing, no SLURM where it was asked for, a misspelt
        ``slurm`` parameter name or a wrong type (submitit checks them; a throwaway folder takes its files)."""
        import tempfile

        submitit = _import_submitit()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ex = submitit.AutoExecutor(folder=tmp, cluster=self.options.cluster)
                ex.update_parameters(**self.options.parameters("train", "check"))
            except (NameError, AssertionError, ValueError, RuntimeError) as e:
                raise ValueError(f"--executor submitit: {' '.join(str(e).split())}") from None

    def _executor(self, out: Path) -> Any:
        submitit = _import_submitit()
        folder = Path(self.options.folder).expanduser() if self.options.folder else out / "submitit"
        return submitit.AutoExecutor(folder=str(folder), cluster=self.options.cluster)

    def run(self, bench: Bench, todo: list[Cell], on_cell: OnCell) -> list[str]:
        nodes = plan(bench, todo, self.options)
        if not nodes:
            return []
        ex = self._executor(bench.out)
        kinds = Counter(n.kind for n in nodes.values())
        bench.log(f"submitit ({ex.cluster}): {len(nodes)} job(s) ("
                  + ", ".join(f"{v} {k}" for k, v in kinds.items()) + f"); logs in {ex.folder}")
        return _Scheduler(nodes, ex, self.options, bench, on_cell).run()


class _Scheduler:
    """Submits the ready units (their dependencies done) kind by kind as job arrays, polls the running ones,
    resubmits failures up to ``max_tries`` and marks the units behind a final failure as not run."""

    def __init__(self, nodes: dict[str, Node], ex: Any, opts: SubmititOptions, bench: Bench, on_cell: OnCell):
        self.nodes, self.ex, self.opts, self.bench, self.on_cell = nodes, ex, opts, bench, on_cell
        self.waiting: dict[str, int] = dict.fromkeys(nodes, 0)  # unit -> tries so far
        self.running: list[_Running] = []
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.collected: set[Cell] = set()
        self.not_run: set[str] = set()  # failed because something they need failed

    def run(self) -> list[str]:
        try:
            while self.waiting or self.running:
                self._skip_blocked()
                submitted = self._submit_ready()
                finished = self._poll()
                if not self.running and not submitted and not finished and self.waiting:
                    for k in list(self.waiting):  # cannot happen with the validated config: a dependency cycle
                        self.failed[k] = f"{self.nodes[k].name}: not run (its dependencies never finished)"
                        del self.waiting[k]
                elif self.running and not finished:
                    time.sleep(self.opts.poll(self.ex.cluster))
        except BaseException:
            for r in self.running:  # Ctrl-C: nothing keeps running behind the user's back
                try:
                    r.job.cancel(check=False)
                except Exception:  # noqa: BLE001 - best effort; the error being handled matters more
                    pass
            raise
        return list(self.failed.values())

    def _skip_blocked(self) -> None:
        changed = True
        while changed:
            changed = False
            for k in list(self.waiting):
                bad = next((d for d in self.nodes[k].deps if d in self.failed), None)
                if bad is not None:
                    n = self.nodes[k]
                    what = _cells_text(n.cells)
                    why = "was not run" if bad in self.not_run else "failed"
                    self.failed[k] = f"{n.name}{what}: not run because the {self.nodes[bad].name} {why}"
                    self.not_run.add(k)
                    del self.waiting[k]
                    changed = True

    def _submit_ready(self) -> int:
        limit = self.opts.limit(self.ex.cluster)
        free = len(self.waiting) if limit is None else max(0, limit - len(self.running))
        ready = [k for k in self.waiting if all(d in self.done for d in self.nodes[k].deps)][:free]
        for kind in ("data", "train", "generator", "cells"):
            keys = [k for k in ready if self.nodes[k].kind == kind]
            if not keys:
                continue
            self.ex.update_parameters(**self.opts.parameters(kind, f"advreid-{self.bench.cfg['name']}-{kind}"))
            with self.ex.batch():  # one job array per kind on SLURM
                jobs = [self.ex.submit(self.nodes[k].job) for k in keys]
            for k, job in zip(keys, jobs, strict=True):
                tries = self.waiting.pop(k) + 1
                self.running.append(_Running(k, job, tries))
                self.bench.log(f"submitted {self.nodes[k].name} (job {job.job_id}"
                               + (f", try {tries}/{self.opts.max_tries}" if tries > 1 else "") + ")")
        return len(ready)

    def _poll(self) -> int:
        finished = [r for r in self.running if r.job.done()]
        for r in finished:
            self.running.remove(r)
            err = r.job.exception()
            n = self.nodes[r.node]
            self._collect(n)
            if err is None:
                self.done.add(r.node)
                self.bench.log(f"{n.name} finished (job {r.job.job_id})")
                continue
            why = _failure_line(err)
            left = [c for c in n.cells if finished_cell(self.bench.cfg, self.bench.out, c) is None]
            if r.tries < self.opts.max_tries:
                self.bench.log(f"{n.name} failed (job {r.job.job_id}: {why}); resubmitting")
                self.waiting[r.node] = r.tries
                continue
            what = _cells_text(left)
            self.failed[r.node] = (f"{n.name}{what} failed after {r.tries} tries: {why} "
                                   f"(log: {r.job.paths.stderr})")
        return len(finished)

    def _collect(self, n: Node) -> None:
        """Hand the cells a job finished (all of them, or those before a failure) to the bench."""
        for c in n.cells:
            doc = None if c in self.collected else finished_cell(self.bench.cfg, self.bench.out, c)
            if doc is not None:
                self.collected.add(c)
                self.on_cell(c, doc)


def make_executor(name: str = "local", options: SubmititOptions | None = None) -> Executor:
    """The executor called ``name`` (:data:`EXECUTORS`)."""
    if name == "local":
        return LocalExecutor()
    if name == "submitit":
        return SubmititExecutor(options)
    raise ValueError(f"executor {name!r}: expected one of {', '.join(EXECUTORS)}")


def parse_slurm_params(items: Iterable[str]) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` strings (``--slurm-param``) as (key, value) pairs; integers become ints."""
    out = []
    for s in items:
        key, sep, value = s.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--slurm-param {s!r}: expected KEY=VALUE, e.g. account=myproject or qos=high")
        v: Any = int(value) if value.strip().lstrip("-").isdigit() else value
        out.append((key.strip().removeprefix("slurm_"), v))
    return tuple(out)


def warn_failures(failures: list[str]) -> None:
    """One warning line per failed unit (stderr)."""
    for f in failures:
        print(f"advreid: warning: {f}", file=sys.stderr, flush=True)
