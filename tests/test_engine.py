import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_overrides

from advreid.experiments import train
from advreid.models import find_checkpoint, load_checkpoint


def _weights(stem):
    return load_file(f"{stem}.safetensors")


def test_train_writes_run_dir_and_refuses_reuse(synth_root, tmp_path):
    run = tmp_path / "run"
    res = train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=2))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in lines)
    # warm-up from 0.01x then the milestone at epoch 1 -> lr after epoch 1 = 0.1 * base
    assert lines[0]["lr"][0] == pytest.approx(0.001 * 0.1)
    assert (run / "config.yaml").is_file()
    assert res.checkpoint == run / "checkpoints" / "final"
    model = load_checkpoint(res.checkpoint)
    assert model.checkpoint_meta["meta"]["epoch"] == 2
    assert model.checkpoint_meta["meta"]["num_classes"] == 12
    # only the latest epoch checkpoint is kept (plus final)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json")) == ["epoch_002.json", "final.json"]
    with pytest.raises(FileExistsError, match="--resume"):
        train("bot_r50", run, overrides=tiny_overrides(synth_root))
    # --overwrite keeps the old run aside
    train("bot_r50", run, overwrite=True, overrides=tiny_overrides(synth_root, epochs=1))
    assert (tmp_path / "run.old-1" / "metrics.jsonl").is_file()


def test_resume_continues_exactly(synth_root, tmp_path):
    """1 epoch + resume for 1 more == 2 epochs straight, bit for bit (optimizer, scheduler, sampler, RNG)."""
    ov = tiny_overrides(synth_root, epochs=2) + ["transforms.random_erasing_p=0.5", "model.name=cnn4"]
    train("bot_r50", tmp_path / "a", overrides=ov)
    train("bot_r50", tmp_path / "b", overrides=ov[:-1] + ["train.epochs=1"])
    train(None, tmp_path / "b", resume=True, overrides=["train.epochs=2"])
    assert "epochs: 2" in (tmp_path / "b/config.yaml").read_text()  # the resumed run records its override
    wa, wb = _weights(tmp_path / "a/checkpoints/final"), _weights(tmp_path / "b/checkpoints/final")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    la = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]


def test_resume_without_run_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        train(None, tmp_path / "nothing", resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path)


def test_missing_data_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="data.root is not set"):
        train("bot_r50", tmp_path / "r", overrides=["model.pretrained=false"])


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(synth_root, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}",
           "-m", "advreid", "train", "--config", "bot_r50", "--out", str(run),
           *tiny_overrides(synth_root, epochs=1)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    rec = json.loads(lines[0])
    model = load_checkpoint(run / "checkpoints" / "final")
    assert model.checkpoint_meta["meta"]["epoch"] == 1
    assert rec["images_per_s"] > 0
    # only rank 0 prints the summary line
    assert p.stdout.count("done: 1 epochs") == 1
