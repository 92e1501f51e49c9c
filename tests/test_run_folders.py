"""Runs that always resume: nothing in a run folder changes until the request is validated, a failed start can be
retried with the same command, a kill at any moment resumes, and a metrics row is never duplicated."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_overrides

from advreid.cli import main
from advreid.config import ConfigError
from advreid.engine import HookBase
from advreid.experiments import train
from advreid.models import CheckpointMismatchError


class _KillAt(HookBase):
    """Raises KeyboardInterrupt (a kill) at ``event`` of 0-based ``epoch``."""

    def __init__(self, event: str, epoch: int) -> None:
        self.event, self.epoch = event, epoch

    def _maybe(self, event: str) -> None:
        if event == self.event and self.trainer.epoch == self.epoch:
            raise KeyboardInterrupt(f"killed at {event} of epoch {self.epoch}")

    def before_step(self) -> None:
        self._maybe("before_step")

    def after_epoch(self) -> None:
        self._maybe("after_epoch")


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run) -> dict:
    return load_file(f"{run / 'checkpoints' / 'final'}.safetensors")


@pytest.fixture(scope="module")
def straight(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=2))
    return run


def test_failed_resume_leaves_the_run_untouched(synth_root, straight, tmp_path):
    run = tmp_path / "r"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1))
    before = (run / "config.yaml").read_text()
    with pytest.raises(CheckpointMismatchError, match="model.name=resnet18"):
        train(None, run, resume=True, overrides=["model.name=resnet18", "train.epochs=2"])
    assert (run / "config.yaml").read_text() == before  # not rewritten by the refused request
    res = train(None, run, resume=True, overrides=["train.epochs=2"])  # the plain resume still works
    assert res.epochs == 2 and [r["epoch"] for r in _rows(run)] == [1, 2]
    a, b = _final(run), _final(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_before_the_first_checkpoint_resumes(synth_root, straight, tmp_path):
    run = tmp_path / "k"
    ov = tiny_overrides(synth_root, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train("bot_r50", run, overrides=ov, hooks=[_KillAt("before_step", 0)])
    assert (run / "config.yaml").is_file() and not list((run / "checkpoints").glob("*.json"))
    train(None, run, resume=True)  # --resume with no checkpoint: starts from the beginning with the saved config
    a, b = _final(run), _final(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same command without --resume also continues a folder that never reached a checkpoint
    run2 = tmp_path / "k2"
    with pytest.raises(KeyboardInterrupt):
        train("bot_r50", run2, overrides=ov, hooks=[_KillAt("before_step", 0)])
    train("bot_r50", run2, overrides=ov)
    assert [r["epoch"] for r in _rows(run2)] == [1, 2]


def test_failed_start_leaves_no_folder_then_retry_works(synth_root, tmp_path):
    run = tmp_path / "f"
    for bad, err in ((["data.root=/no/such/data"], FileNotFoundError), (["model.name=cnn5"], KeyError),
                     (["train.epochs=0"], ConfigError), (["train.epochs=-1"], ConfigError),
                     (["model.pretrained=/no/such/weights.pth"], FileNotFoundError)):
        with pytest.raises(err):
            train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1) + bad)
        assert not run.exists(), bad
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1))
    assert (run / "checkpoints" / "final.json").is_file()


def test_resume_and_overwrite_together_are_refused(synth_root, tmp_path, capsys):
    run = tmp_path / "ro"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1))
    final = (run / "checkpoints" / "final.json").read_text()
    assert main(["train", "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert (run / "checkpoints" / "final.json").read_text() == final and not (tmp_path / "ro.old-1").exists()
    # resuming a finished run changes nothing (the final checkpoint keeps its metrics)
    train(None, run, resume=True)
    assert (run / "checkpoints" / "final.json").read_text() == final


def test_no_duplicate_metrics_row_after_a_kill(synth_root, straight, tmp_path, monkeypatch):
    """Killed after epoch 2's row was written but before its checkpoint: resume from epoch 1 rewrites row 2 once."""
    import advreid.engine.hooks as hooks

    run = tmp_path / "d"
    real = hooks.save_checkpoint

    def dying(stem, *a, **k):
        if stem.name == "epoch_002":
            raise KeyboardInterrupt("killed between the metrics row and the checkpoint")
        return real(stem, *a, **k)

    monkeypatch.setattr(hooks, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=2))
    assert [r["epoch"] for r in _rows(run)] == [1, 2]  # the row was written, the checkpoint was not
    monkeypatch.setattr(hooks, "save_checkpoint", real)
    train(None, run, resume=True)
    assert [r["epoch"] for r in _rows(run)] == [1, 2]
    assert [r["loss"] for r in _rows(run)] == [r["loss"] for r in _rows(straight)]


def test_disk_full_is_one_line_naming_the_path(synth_root, tmp_path, monkeypatch, capsys):
    import advreid.utils.io as io

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.tempfile, "mkstemp", full)
    run = tmp_path / "full"
    assert main(["train", "-c", "bot_r50", "--out", str(run), *tiny_overrides(synth_root, epochs=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(run / "config.yaml") in err[0], err
