"""Trainer hooks (in the spirit of fast-reid's ``HookBase``): behaviour is added to the training loop by hooks, never
by editing the loop. The trainer calls every hook's ``before_train``, ``before_epoch``, ``before_step``,
``after_step``, ``after_epoch`` and ``after_train`` in registration order; a hook reaches the trainer's state through
``self.trainer`` (``model``, ``batch``, ``epoch``, ``step``, ``record``, ``step_generator(stream)``...).

The hooks here are the generic ones: progress bar, console log, periodic evaluation (a function handed in, so the
engine never imports the evaluation package), and the checkpointer, which writes the epoch's metrics row and its
checkpoint together so that a kill at any moment leaves a run that resumes without duplicate rows.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advreid.models import checkpoint_paths, save_checkpoint
from advreid.utils.io import append_jsonl, atomic_write_text

if TYPE_CHECKING:
    from advreid.engine.trainer import Trainer


class HookBase:
    """Base class of trainer hooks: override any of the six methods; ``self.trainer`` is set on registration."""

    trainer: Trainer

    def before_train(self) -> None:
        """Once, before the first epoch (after a resume has restored the state)."""

    def after_train(self) -> None:
        """Once, after the last epoch (not called when training raised)."""

    def before_epoch(self) -> None:
        """Before each epoch (``trainer.epoch`` is 0-based)."""

    def after_epoch(self) -> None:
        """After each epoch, with ``trainer.record`` holding the epoch's metrics row (hooks may add keys)."""

    def before_step(self) -> None:
        """Before each step, with ``trainer.batch`` loaded on the device (hooks may replace ``batch.images``)."""

    def after_step(self) -> None:
        """After each step, with ``trainer.step_parts`` holding the step's loss parts."""


class ProgressBar(HookBase):
    """A tqdm bar per epoch (rank 0 only) showing the running loss and images per second."""

    def __init__(self) -> None:
        self.bar: Any = None

    def before_epoch(self) -> None:
        t = self.trainer
        if t.rank != 0:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=t.steps_per_epoch, desc=f"epoch {t.epoch + 1}/{t.options.epochs}", leave=False,
                        dynamic_ncols=True, disable=None)

    def after_step(self) -> None:
        if self.bar is None:
            return
        t = self.trainer
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{t.sums['loss'] / max(t.images_seen, 1):.3f}",
                             img_s=f"{t.images_seen * t.world / max(time.perf_counter() - t.epoch_start, 1e-9):.0f}")

    def after_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleLogger(HookBase):
    """One line per epoch on rank 0: losses, accuracy, throughput, and the evaluation when there is one."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log

    def after_epoch(self) -> None:
        t = self.trainer
        if t.rank != 0:
            return
        rec = t.record
        msg = (f"epoch {rec['epoch']}/{t.options.epochs}  loss {rec['loss']:.4f}  ce {rec['ce']:.4f}  "
               f"tri {rec['triplet']:.4f}  acc {rec['acc']:.3f}  {rec['images_per_s']:.0f} img/s")
        if "eval" in rec:
            msg += f"  R1 {rec['eval']['rank1']:.3f} mAP {rec['eval']['mAP']:.3f}"
        self.log(msg)


class PeriodicEval(HookBase):
    """Every ``every`` epochs (not after the last one: the final evaluation is the caller's), rank 0 calls
    ``evaluate(model)`` and stores the result under ``record["eval"]``; the model's train mode is restored.
    Register it before the :class:`Checkpointer` so the row and the checkpoint carry the evaluation."""

    def __init__(self, evaluate: Callable[[Any], dict], every: int) -> None:
        if every < 1:
            raise ValueError(f"PeriodicEval: every={every!r} must be >= 1")
        self.evaluate, self.every = evaluate, int(every)

    def after_epoch(self) -> None:
        t = self.trainer
        done = t.epoch + 1
        if t.rank == 0 and done % self.every == 0 and done < t.options.epochs:
            try:
                t.record["eval"] = self.evaluate(t.model)
            except (OSError, ValueError, RuntimeError) as e:  # e.g. a test image gone bad: keep the finished epoch
                t.record["eval_error"] = " ".join(str(e).split())
                print(f"advreid: warning: the evaluation after epoch {done} failed ({t.record['eval_error']}); "
                      "training continues", file=sys.stderr, flush=True)
            finally:
                t.model.train()


class Checkpointer(HookBase):
    """After each epoch (rank 0): append the metrics row, then save ``checkpoints/epoch_NNN`` with the training
    state (optimizer, scheduler, scaler, RNG), then drop the previous epoch checkpoint unless ``keep_every`` keeps
    it; after training, ``checkpoints/final``. A kill between the row and the checkpoint leaves one row too many,
    which :meth:`truncate_metrics` removes on resume (rows after the resumed epoch are recomputed identically)."""

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], *, keep_every: int = 0,
                 last: Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)
        self.keep_every = int(keep_every or 0)
        self.last = last  # the checkpoint a resume started from (rotated away by the next epoch)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def after_epoch(self) -> None:
        t = self.trainer
        if t.rank != 0:
            return
        append_jsonl(self.metrics_path, t.record)
        stem = self.run_dir / "checkpoints" / f"epoch_{t.epoch + 1:03d}"
        save_checkpoint(stem, t.model, meta={**self.meta, "epoch": t.epoch + 1, "metrics": t.record},
                        train_state=t.train_state())
        if self.last is not None and self.last != stem:
            prev_epoch = int(self.last.name.split("_")[1])
            if not (self.keep_every and prev_epoch % self.keep_every == 0):
                for f in reversed(checkpoint_paths(self.last)):  # json first: a stem without json is ignored
                    f.unlink(missing_ok=True)
        self.last = stem

    def after_train(self) -> None:
        t = self.trainer
        final = self.run_dir / "checkpoints" / "final"
        if t.rank != 0 or t.options.epochs <= 0:
            return
        if not t.history and (final.with_suffix(".json")).is_file():
            return  # a resumed run that had nothing left to do keeps its final checkpoint as it was
        save_checkpoint(final, t.model, meta={**self.meta, "epoch": t.options.epochs,
                                              "metrics": t.history[-1] if t.history else {}})

    @staticmethod
    def truncate_metrics(path: str | Path, epoch: int) -> list[dict]:
        """Keep the rows of epochs ``<= epoch`` (first occurrence of each) and rewrite the file atomically; return
        them. Called on resume from the checkpoint of ``epoch``."""
        path = Path(path)
        if not path.is_file():
            return []
        rows, seen = [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line from a kill mid-write
            e = row.get("epoch")
            if isinstance(e, int) and e <= epoch and e not in seen:
                seen.add(e)
                rows.append(row)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows
