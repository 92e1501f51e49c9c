"""Sharded ``advreid robust`` (``torchrun ... -m advreid robust``): rank 0 writes the single-process result exactly (per
query worst AP and winning member, worst-case and per-member metrics, APGD's loss-rise flags), under a randomised
defense too (the defense draws and the guide bank), and a killed sharded run resumes in one process, attacking only
the batches it had not finished.

The ranks are real gloo processes (``torchrun`` as a subprocess for the command line, ``torch.multiprocessing``
workers for the crash and the Python API), one thread each, as is the single-process reference.
"""

import json
import os

import pytest
import torch
from tests.conftest import untrained_cnn4_run
from tests.test_sharding import _crash_worker, _free_port, _one_thread, _torchrun

from advreid.cli import main

ARGS = ["--version", "quick", "--max-images", "10", "--batch-size", "4", "--device", "cpu", "--num-workers", "0"]
TIMING = ("seconds", "time_per_image_s", "cost", "finished", "shards", "num_resumed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained (seeded) cnn4 run folder at 64x32 whose eval batch size (5) splits the clean sets too."""
    return untrained_cnn4_run(tmp_path_factory.mktemp("robust_shard") / "run", eval_batch_size=5)


def _numbers(x):
    """A result (or part of one) without its timings and split: what must not depend on the ranks."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if k not in TIMING}
    return [_numbers(v) for v in x] if isinstance(x, list) else x


def _load(out) -> tuple[dict, dict]:
    doc = json.loads((out / "results.json").read_text())
    members = {p.stem: json.loads(p.read_text()) for p in sorted((out / "members").glob("*.json"))}
    return doc, members


@pytest.fixture(scope="module")
def single(run, synth_root, tmp_path_factory):
    """The single-process robust run (one thread): the reference every sharded run must equal exactly."""
    out = tmp_path_factory.mktemp("single") / "o"
    with _one_thread():
        assert main(["robust", str(run), "--data", str(synth_root), "--out", str(out), *ARGS]) == 0
    return _load(out)


def test_two_ranks_equal_one_process(run, synth_root, single, tmp_path):
    out = tmp_path / "o"
    proc = _torchrun(2, "robust", str(run), "--data", str(synth_root), "--out", str(out), *ARGS)
    (doc, members), (ref, ref_members) = _load(out), single
    assert ref["data"]["num_attacked"] == 10 and ref["shards"] == [{"rank": 0, "queries": 10}]
    assert doc["shards"] == [{"rank": 0, "queries": 6}, {"rank": 1, "queries": 4}]  # batches 0, 2 | 1 (of 4, 4, 2)
    assert doc["per_query"] == ref["per_query"]  # worst AP, first match and winning member of every query
    assert doc["worst_case"] == ref["worst_case"] and doc["clean"] == ref["clean"]
    assert _numbers(doc["members"]) == _numbers(ref["members"]) and doc["masking"] == ref["masking"]
    assert _numbers(doc) == _numbers(ref)
    assert _numbers(members) == _numbers(ref_members)  # per-query scores and APGD's loss-rise flags included
    assert len(ref_members["apgd"]["loss_rise"]) == 10 and ref_members["square"]["loss_rise"] is None
    assert set(ref["per_query"]["winner"]) >= {"apgd"} and ref["worst_case"]["mAP"] < ref["clean"]["mAP"]
    assert not (out / "shards").exists()  # complete: the finished batches are in the member files
    assert proc.stdout.count("saved to") == 1  # rank 0 alone prints


def test_killed_sharded_run_resumes_in_one_process(run, synth_root, single, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "o"
    argv = ["robust", str(run), "--data", str(synth_root), "--out", str(out), *ARGS]
    with pytest.raises(mp.ProcessExitedException):  # rank 0 dies before saving its second APGD batch (batch 2)
        mp.spawn(_crash_worker, args=(2, _free_port(), argv, 1), nprocs=2)
    files = sorted(p.name for p in (out / "shards" / "apgd").glob("batch_*.safetensors"))
    assert files[0] == "batch_000000.safetensors" and set(files) <= {"batch_000000.safetensors",
                                                                     "batch_000001.safetensors"}
    assert not (out / "members" / "apgd.json").exists() and not (out / "results.json").exists()
    with _one_thread():
        assert main([*argv, "--resume"]) == 0
    doc, members = _load(out)
    ref, ref_members = single
    assert members["apgd"]["num_resumed"] == 4 * len(files) and members["square"]["num_resumed"] == 0
    assert _numbers(doc) == _numbers(ref) and _numbers(members) == _numbers(ref_members)
    assert doc["shards"] == [{"rank": 0, "queries": 10}] and not (out / "shards").exists()


# --------------------------------------------------------------------- randomised defense, Python API
def _rand_job(run, root, out):
    """A tiny rand-style ensemble (EOT 2, 2 defense draws, a guided member) through RRP, adaptive."""
    from advreid.evaluation import RunOptions
    from advreid.experiments.runs import load_run
    from advreid.robust import RobustJob
    from advreid.robust.ensemble import Ensemble, Member

    ens = Ensemble("rand-test", "linf", (Member("apgd", "apgd", 2), Member("rank", "rank", 2, 1 / 8, {"top_k": 3}),
                                         Member("square", "square", 3, None, {"p_init": 0.05}, gradient_free=True)),
                   eot=2, draws=2)
    model, info = load_run(run)
    return RobustJob(model, info, str(root), str(out), defense="rrp", adaptive=True, max_images=6, ensemble=ens,
                     options=RunOptions(batch_size=2, device="cpu", num_workers=0))


def _rand_worker(rank: int, world: int, port: int, run, root, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from advreid.robust import run_robust

    doc, _ = run_robust(_rand_job(run, root, out))
    assert bool(doc) == (rank == 0)  # rank 0 alone returns (and writes) the result


def test_randomised_defense_two_ranks_equal_one_process(run, synth_root, tmp_path):
    import torch.multiprocessing as mp

    from advreid.robust import run_robust

    mp.spawn(_rand_worker, args=(2, _free_port(), run, synth_root, tmp_path / "two"), nprocs=2)
    doc, members = _load(tmp_path / "two")
    with _one_thread():
        ref, _ = run_robust(_rand_job(run, synth_root, tmp_path / "one"))
    _, ref_members = _load(tmp_path / "one")
    assert ref["clean"]["draws"] == 2 and ref["threat"]["defense"]["randomized"]
    assert doc["shards"] == [{"rank": 0, "queries": 4}, {"rank": 1, "queries": 2}]
    assert doc["per_query"] == ref["per_query"] and doc["worst_case"] == ref["worst_case"]
    assert _numbers(doc) == _numbers(ref) and _numbers(members) == _numbers(ref_members)
    ap = ref_members["rank"]["scores"]["AP"]
    assert any(row[0] != row[1] for row in ap)  # the two defense draws differ
