"""Bench executors: the demo's grid (shrunk) run in this process and as submitit jobs (submitit's local executor:
real subprocesses) gives byte-identical tables; a job that keeps failing is resubmitted, then reported by name."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_overrides

from advreid.experiments.bench import run_bench
from advreid.experiments.executors import SubmititOptions, make_executor, plan
from advreid.reporting.bench_tables import format_metric

pytest.importorskip("submitit")

# what differs between any two runs: timings, and the checkpoint file's hash (each checkpoint has a unique id)
VARYING = {"seconds", "time_per_image_s", "started", "weights_sha256"}


def _demo_grid(root) -> dict:
    """``advreid demo --quick``'s config on the tiny synthetic set: both models (1 epoch of cnn4), the white-box,
    adaptive and transfer columns of two attacks, 8 attacked queries."""
    from advreid.cli import demo_config

    cfg = demo_config(quick=True)
    cfg["datasets"]["synth"] = {"name": "market1501", "root": str(root)}
    for key, m in cfg["models"].items():
        m["overrides"] = tiny_overrides(root, epochs=1)[1:] + (["defense.proactive=reference"] if key == "jad" else [])
    cfg["attacks"] = {"clean": None, "ifgsm_seed": {**cfg["attacks"]["ifgsm_seed"], "steps": 2},
                      "lta_transfer": {**cfg["attacks"]["lta_transfer"], "steps": 2}}
    cfg["grid"] = [{"models": ["baseline", "jad"], "defenses": ["none", "cs"], "attacks": ["clean", "ifgsm_seed"],
                    "threats": ["non_adaptive", "adaptive"]},
                   {"models": ["jad"], "defenses": ["none"], "attacks": ["lta_transfer"]}]
    cfg["tables"][0]["columns"] = ["clean", "ifgsm_seed"]
    cfg["tables"][1].update(columns=["clean", "lta_transfer"], rows=["baseline", "jad"])
    cfg["ranklist"]["rows"][1:] = [{"label": "attacked", "model": "baseline", "attack": "ifgsm_seed"},
                                   {"label": "attacked, JAD", "model": "jad", "defense": "cs", "attack": "ifgsm_seed"}]
    cfg["settings"].update(max_images=8, eot_samples=2, batch_size=16, num_workers=0, progress=False, report=False)
    return cfg


def _local_jobs(tmp_path, **kw):
    opts = {"cluster": "local", "gpus_per_job": 0, "cpus_per_task": 1, "timeout_min": 10, "max_running": 2,
            "folder": str(tmp_path / "logs"), **kw}
    return make_executor("submitit", SubmititOptions(**opts))


def _comparable(doc: dict, out) -> list:
    """The cells without timings and file hashes, with the output folder's path replaced."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VARYING}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(json.loads(json.dumps(doc["cells"]).replace(str(out), "OUT")))


@pytest.mark.slow
def test_submitit_jobs_give_the_same_tables_as_the_local_run(synth_root, tmp_path):
    cfg = _demo_grid(synth_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each job (cpus_per_task=1): the same float reductions
    try:
        local, out_l = run_bench(cfg, tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    jobs, out_s = run_bench(cfg, tmp_path / "jobs", progress=False, executor=_local_jobs(tmp_path))
    assert local["complete"] and jobs["complete"] and "failed" not in jobs
    assert len(jobs["cells"]) == 11
    files = sorted(p.name for p in (out_l / "tables").iterdir())
    assert {"robustness.md", "robustness.csv", "blackbox.md", "comparisons.md"} <= set(files)
    assert files == sorted(p.name for p in (out_s / "tables").iterdir())
    for name in files:
        assert (out_s / "tables" / name).read_bytes() == (out_l / "tables" / name).read_bytes(), name
    assert _comparable(jobs, out_s) == _comparable(local, out_l)
    for m in ("baseline", "jad"):  # the same trained weights
        a, b = (load_file(str(o / "models" / m / "checkpoints" / "final.safetensors")) for o in (out_l, out_s))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out_s / "ranklist" / "ranklist.json").read_text())["rows"][1]["gallery"] == \
        json.loads((out_l / "ranklist" / "ranklist.json").read_text())["rows"][1]["gallery"]
    # the work ran in the submitit jobs: two trainings and the cells of each model, each with its log
    logs = sorted((tmp_path / "logs").glob("*_log.out"))
    assert len(logs) == 4
    text = "".join(p.read_text() for p in logs)
    assert "model 'baseline': training" in text and "model 'jad': training" in text

    # resuming the finished bench submits nothing; --tables-only rebuilds the same tables
    again, _ = run_bench(cfg, out_s, resume=True, progress=False, executor=_local_jobs(tmp_path))
    assert len(list((tmp_path / "logs").glob("*_log.out"))) == 4 and again["complete"]
    (out_s / "tables" / "robustness.md").unlink()
    run_bench(cfg, out_s, tables_only=True, progress=False)
    assert (out_s / "tables" / "robustness.md").read_bytes() == (out_l / "tables" / "robustness.md").read_bytes()


@pytest.mark.slow
def test_a_failing_job_is_retried_then_reported_by_name(synth_root, tmp_path, capsys):
    """The cells of a model whose run folder has no checkpoint fail in their job: resubmitted (max_tries), then
    named with the error and the log; the other model's cells and the tables are still written."""
    cfg = _demo_grid(synth_root)
    broken = tmp_path / "broken_run"
    broken.mkdir()
    cfg["models"] = {"baseline": cfg["models"]["baseline"], "jad": {"run": str(broken)}}
    cfg["grid"] = [{"models": ["baseline", "jad"], "datasets": ["synth"], "defenses": ["none"], "attacks": ["clean"]}]
    cfg["tables"] = [{"name": "clean", "kind": "clean", "datasets": ["synth"], "rows": ["baseline", "jad"]}]
    cfg["ranklist"] = None
    cfg["settings"]["rerank"] = False
    doc, out = run_bench(cfg, tmp_path / "b", progress=False, executor=_local_jobs(tmp_path, max_tries=2))
    assert not doc["complete"] and [c["cell"]["model"] for c in doc["cells"]] == ["baseline"]
    assert len(doc["failed"]) == 1
    msg = doc["failed"][0]
    assert msg.startswith("cells of model 'jad' on 'synth' (1 cell: jad__synth__none__clean__clean) failed "
                          "after 2 tries: ")
    assert "(log: " in msg and msg.rstrip(")").endswith("_log.err")
    assert f"advreid: warning: {msg}" in capsys.readouterr().err
    rows = {r.split("|")[1].strip(): r.split("|")[2].strip() for r in (out / "tables" / "clean.md").read_text()
            .splitlines() if r.startswith("| ")}
    assert rows["jad"] == "-" and rows["baseline"] == format_metric(doc["cells"][0]["clean"])
    assert len(list((tmp_path / "logs").glob("*_log.err"))) == 4  # baseline's training and cells, jad's cells twice


def test_plan_orders_trainings_generators_and_cells(synth_root, tmp_path):
    """Dependencies: an offline-AT model after its source, a DMR generator after its victim, the cells of a model
    after its training, the transfer source and the generator; ``cells_per_job`` splits a model's cells."""
    from advreid.experiments.bench import Bench
    from advreid.experiments.grid import cells, load_bench_config

    cfg = load_bench_config(_demo_grid(synth_root))
    cfg["models"]["at"] = {"config": "demo_cpu", "train_on": "synth", "source": "baseline",
                           "overrides": cfg["models"]["baseline"]["overrides"]}
    cfg["attacks"]["dmr"] = {"name": "dmr", "eps": "16px", "generator": {"model": "jad", "config": "dmr_tiny"}}
    cfg["grid"].append({"models": ["at"], "defenses": ["none"], "attacks": ["clean", "dmr"]})
    bench = Bench(cfg, tmp_path / "p", progress=False)
    nodes = plan(bench, cells(cfg), SubmititOptions(cells_per_job=3))
    deps = {k: n.deps for k, n in nodes.items()}
    assert deps["train:baseline"] == [] and deps["train:jad"] == [] and deps["train:at"] == ["train:baseline"]
    assert deps["generator:dmr"] == ["train:jad"]
    assert deps["cells:at:synth:0"] == ["generator:dmr", "train:at"]
    assert deps["cells:jad:synth:3"] == ["train:baseline", "train:jad"]  # lta_transfer is crafted on the baseline
    assert [len(n.cells) for k, n in nodes.items() if k.startswith("cells:jad")] == [3, 3]
    assert nodes["cells:jad:synth:3"].name == "cells of model 'jad' on 'synth' (part 2)"
    assert sum(len(n.cells) for n in nodes.values()) == len(cells(cfg))


def test_cluster_flags_need_the_submitit_executor(tmp_path, capsys):
    from advreid.cli import main

    out = tmp_path / "b"
    assert main(["bench", "demo", "--out", str(out), "--slurm-partition", "gpu"]) == 2
    assert "--slurm-partition needs --executor submitit" in capsys.readouterr().err
    assert main(["bench", "demo", "--out", str(out), "--executor", "submitit", "--slurm-param", "account"]) == 2
    assert "--slurm-param 'account': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["bench", "demo", "--out", str(out), "--executor", "submitit", "--max-tries", "0"]) == 2
    assert "max_tries=0: expected 1 or more" in capsys.readouterr().err
    assert main(["bench", "demo", "--out", str(out), "--executor", "submitit", "--submitit-cluster", "local",
                 "--slurm-param", "acount=proj"]) == 2  # submitit's own check of the names, before anything runs
    assert "Unknown argument 'acount' for executor 'slurm'" in capsys.readouterr().err
    assert not out.exists()


class _FakeCluster:
    """A stand-in for submitit's executor that fails every training of model ``bad`` (the scheduling logic alone:
    what is submitted when, retries, what a failure blocks); the real executor is tested above."""

    cluster = "slurm"

    def __init__(self, bad: str):
        import contextlib

        self.bad, self.log, self.running, self.most = bad, [], 0, 0
        self.batch = contextlib.nullcontext
        self.folder = "LOGS"

    def update_parameters(self, **kw):
        self.params = kw

    def submit(self, job):
        from types import SimpleNamespace

        from advreid.experiments.executors import TrainJob

        what = f"{type(job).__name__}:{getattr(job, 'key', '') or job.cells[0][0]}"
        self.log.append((what, self.params["tasks_per_node"]))
        self.running += 1
        self.most = max(self.most, self.running)
        err = "Job failed with trace:\n----\nTraceback ...\nRuntimeError: boom\n----\nlogs" \
            if isinstance(job, TrainJob) and job.key == self.bad else None

        def done():
            self.running -= 1
            return True
        return SimpleNamespace(done=done, exception=lambda: err and RuntimeError(err), job_id=str(len(self.log)),
                               paths=SimpleNamespace(stderr=f"LOGS/{len(self.log)}_0_log.err"))


def test_a_failed_training_blocks_only_what_needs_it(synth_root, tmp_path, capsys):
    from advreid.experiments.bench import Bench
    from advreid.experiments.executors import SubmititExecutor
    from advreid.experiments.grid import cells, load_bench_config

    cfg = load_bench_config(_demo_grid(synth_root))
    cfg["models"]["at"] = {"config": "demo_cpu", "train_on": "synth", "source": "baseline",
                           "overrides": cfg["models"]["baseline"]["overrides"]}
    cfg["grid"].append({"models": ["at"], "defenses": ["none"], "attacks": ["clean"]})
    fake = _FakeCluster("baseline")

    class Fake(SubmititExecutor):
        def _executor(self, out):
            return fake

    opts = SubmititOptions(gpus_per_job=2, max_tries=2, max_running=1, poll_s=0)
    failed = Fake(opts).run(Bench(cfg, tmp_path / "f", progress=False), cells(cfg), lambda c, d: None)
    assert fake.most == 1  # max_running
    assert fake.log == [("TrainJob:baseline", 2), ("TrainJob:jad", 2), ("TrainJob:baseline", 2)]
    assert failed == [
        "training of model 'baseline' failed after 2 tries: RuntimeError: boom (log: LOGS/3_0_log.err)",
        "training of model 'at': not run because the training of model 'baseline' failed",
        "cells of model 'baseline' on 'synth' (5 cells: baseline__synth__none__clean__clean, "
        "baseline__synth__none__ifgsm_seed__white_box, baseline__synth__cs__clean__clean, "
        "baseline__synth__cs__ifgsm_seed__non_adaptive, baseline__synth__cs__ifgsm_seed__adaptive): not run because "
        "the training of model 'baseline' failed",
        "cells of model 'jad' on 'synth' (6 cells: jad__synth__none__clean__clean, jad__synth__none__ifgsm_seed__"
        "white_box, jad__synth__cs__clean__clean, jad__synth__cs__ifgsm_seed__non_adaptive, jad__synth__cs__"
        "ifgsm_seed__adaptive, jad__synth__none__lta_transfer__transfer): not run because the training of model "
        "'baseline' failed",
        "cells of model 'at' on 'synth' (1 cell: at__synth__none__clean__clean): not run because the training of "
        "model 'at' was not run"]


def test_the_cluster_docs_commands_parse():
    """Every ``advreid bench`` command of docs/cluster.md is one the parser takes, with the options it names."""
    import re
    import shlex
    from pathlib import Path

    from advreid.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text(encoding="utf-8")
    commands = [c.replace("\\\n", " ") for c in re.findall(r"^\s*advreid bench .*?(?<!\\)$", text, flags=re.M | re.S)]
    assert len(commands) >= 4
    for cmd in commands:
        args, extra = build_parser().parse_known_args(shlex.split(cmd.split("#")[0].replace("$USER", "me"))[1:])
        assert all("=" in e and not e.startswith("-") for e in extra), cmd  # overrides after options, as main takes
        assert args.func.__name__ == "_cmd_bench" and args.config[0] in ("market_seed", "demo"), cmd
        if "--executor submitit" in cmd:
            assert args.executor == "submitit" and (args.slurm_partition or args.submitit_cluster == "local")
