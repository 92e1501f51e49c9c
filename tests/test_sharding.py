"""Sharded attacks and evaluation (``torchrun ... -m advreid attack|eval``): the one result rank 0 writes is identical
to the single-process run, bit for bit (same hardware, one thread each), and a killed sharded run resumes with
another number of ranks, attacking only the batches it had not finished.

The ranks are real processes on the gloo backend: ``torchrun`` as a subprocess for the command line, and
``torch.multiprocessing`` workers for the crash and the Python API (float64 model).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from tests.conftest import tiny_overrides

from advreid.cli import main

ATTACK = ["--attack", "pgd", "--sweep-eps", "2px,4px", "--steps", "2", "--seed", "3", "--batch-size", "4",
          "--device", "cpu", "--num-workers", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _torchrun(n: int, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "advreid", *argv]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


class _one_thread:
    """The reference runs in this process with one thread, as each rank does."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


def _load(out) -> tuple[dict, dict]:
    return json.loads((out / "results.json").read_text()), json.loads((out / "per_query.json").read_text())


def _scores(doc: dict) -> list:
    """Every score of an attack result (clean and attacked rows of each eps), timings left out."""
    return [(r["eps"], r["clean"], r["attacked"], r["num_attacked"], r["linf_max"], r["l2_mean"]) for r in doc["runs"]]


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard") / "run"
    assert main(["train", "--config", "bot_r50", "--out", str(out), *tiny_overrides(synth_root, epochs=1)]) == 0
    return out


@pytest.fixture(scope="module")
def single(run, synth_root, tmp_path_factory):
    """The single-process attack (one thread): the reference every sharded run must equal exactly."""
    out = tmp_path_factory.mktemp("single") / "o"
    with _one_thread():
        assert main(["attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK]) == 0
    return _load(out)


def test_two_ranks_equal_one_process(run, synth_root, single, tmp_path):
    out = tmp_path / "o"
    proc = _torchrun(2, "attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK)
    doc, per_query = _load(out)
    ref, ref_pq = single
    n = ref["runs"][0]["num_attacked"]
    assert n >= 10 and doc["runs"][0]["num_attacked"] == n
    # batches of 4 dealt round-robin: rank 0 takes batches 0, 2, 4 ..., rank 1 batches 1, 3, 5 ...
    batches = [len(range(i, min(i + 4, n))) for i in range(0, n, 4)]
    assert doc["shards"] == [{"rank": 0, "queries": sum(batches[0::2])}, {"rank": 1, "queries": sum(batches[1::2])}]
    assert ref["shards"] == [{"rank": 0, "queries": n}]
    assert _scores(doc) == _scores(ref)  # metrics, intervals, norms: exactly equal
    assert per_query == ref_pq  # per-query first-match rank, AP, INP of every query, clean and attacked
    assert ref_pq["attacked"][0]["per_query"] != ref_pq["clean"]["per_query"]  # the attack changed something
    assert not (out / "shards").exists()  # complete: progress files removed
    assert proc.stdout.count("saved to") == 1  # rank 0 alone prints the table


def _crash_worker(rank: int, world: int, port: int, argv: list, saves: int) -> None:
    """A rank of a 2-process run that dies (``os._exit``, no clean-up) when it is about to save its batch number
    ``saves + 1``: a killed job."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from advreid.evaluation import sharding

    real, done = sharding.BatchStore.save, [0]

    def save(self, *a, **k):
        if done[0] == saves:
            os._exit(3)
        done[0] += 1
        return real(self, *a, **k)

    sharding.BatchStore.save = save
    main(argv)


def test_killed_sharded_run_resumes_in_one_process(run, synth_root, single, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "o"
    argv = ["attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK]
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_crash_worker, args=(2, _free_port(), argv, 1), nprocs=2)
    files = sorted((out / "shards" / "eps_2px").glob("batch_*.safetensors"))
    assert 1 <= len(files) <= 2 and not (out / "shards" / "eps_4px").exists()
    from safetensors import safe_open

    finished = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            finished += fh.get_slice("pids").get_shape()[0]
    # without --resume the folder is refused; with it one process finishes the job
    assert main(["attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK]) == 2
    with _one_thread():
        assert main(["attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK, "--resume"]) == 0
    doc, per_query = _load(out)
    ref, ref_pq = single
    assert [r["num_resumed"] for r in doc["runs"]] == [finished, 0]  # only the missing batches were attacked
    assert _scores(doc) == _scores(ref) and per_query == ref_pq
    assert doc["shards"] == [{"rank": 0, "queries": ref["runs"][0]["num_attacked"]}]
    assert not (out / "shards").exists()


def test_resume_refuses_another_request(run, synth_root, tmp_path, capsys):
    out = tmp_path / "o"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "request.json").write_text(json.dumps({"attack": "another"}))
    argv = ["attack", str(run), "--data", str(synth_root), "--out", str(out), *ATTACK, "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "started with another request" in err and "attack" in err and "--overwrite" in err
    assert main(argv[:-1] + ["--overwrite", "--resume"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text(json.dumps({"complete": True, "runs": []}))
    assert main(["attack", str(run), "--data", str(synth_root), "--out", str(done), *ATTACK, "--resume"]) == 2
    assert "complete result, there is nothing to resume" in capsys.readouterr().err
    assert json.loads((done / "results.json").read_text()) == {"complete": True, "runs": []}


# ------------------------------------------------------------------------------------ Python API, float64
class _Float64(torch.nn.Module):
    """The run's network computing in float64 (images come in as float32 and are cast at its input)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net.double()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x.double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _api_result(run, root) -> dict:
    """A guided attack (gallery guide bank) and a clean evaluation through the Python API, float64 network."""
    from advreid.data import build_dataset
    from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, evaluate_attack, evaluate_model
    from advreid.models import load_checkpoint

    base = load_checkpoint(run / "checkpoints" / "final")
    proto = EvalProtocol.of_model(base).replace(batch_size=5)
    model = _Float64(base).eval()
    ds = build_dataset("market1501", root)
    res = evaluate_attack(model, ds.query, ds.gallery, AttackSpec("ifgsm", eps=4 / 255, steps=2, seed=1),
                          protocol=proto, options=RunOptions(batch_size=3, device="cpu", keep_images=True,
                                                             keep_features=True))
    ev = evaluate_model(model, ds.query, ds.gallery, proto, device="cpu")
    return {"images": res["images"][0], "features": res["features"][0][0], "runs": res["runs"], "eval": ev,
            "shards": res["shards"]}


def _eval_argv(run, root) -> list[str]:
    return ["eval", str(run), "--data", str(root), "--device", "cpu", "--num-workers", "0"]


def _api_worker(rank: int, world: int, port: int, run, root, dest) -> None:
    """A rank of a 2-process group opened by the caller (as an embedding program would): the Python API, then
    ``advreid eval`` inside the same group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    res = _api_result(run, root)
    if rank == 0:
        torch.save(res, dest)
    else:
        assert res["eval"] == {} and res["runs"][0]["attacked"] is None  # rank 0 alone scores
    assert main(_eval_argv(run, root)) == 0
    dist.destroy_process_group()


def _numbers(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("seconds", "time_per_image_s", "extract_s", "score_s")}


def test_float64_api_and_eval_two_ranks_equal_one_process(run, synth_root, tmp_path):
    import torch.multiprocessing as mp

    dest = tmp_path / "sharded.pt"
    mp.spawn(_api_worker, args=(2, _free_port(), run, synth_root, dest), nprocs=2)
    got = torch.load(dest, weights_only=False)
    with _one_thread():
        ref = _api_result(run, synth_root)
        assert main(_eval_argv(run, synth_root)) == 0
    assert ref["images"].dtype == torch.float32 and ref["images"].shape[0] == ref["runs"][0]["num_attacked"]
    assert torch.equal(got["images"], ref["images"]) and torch.equal(got["features"], ref["features"])
    assert [_numbers(r) for r in got["runs"]] == [_numbers(r) for r in ref["runs"]]
    assert _numbers(got["eval"]) == _numbers(ref["eval"]) and "per_query" in ref["eval"]
    assert sum(s["queries"] for s in got["shards"]) == ref["runs"][0]["num_attacked"]
    # advreid eval: the sharded evaluation (written by rank 0), then the one-process one
    two, one = json.loads((run / "results.json").read_text())["evaluations"][-2:]
    assert one["shards"] == [{"rank": 0, "queries": one["protocol"]["num_query"],
                              "gallery": one["protocol"]["num_gallery"]}]
    assert len(two["shards"]) == 2 and sum(s["gallery"] for s in two["shards"]) == one["protocol"]["num_gallery"]
    assert _numbers({**two, "shards": None}) == _numbers({**one, "shards": None})
