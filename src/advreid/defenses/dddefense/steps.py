"""DDDefense Phase II as training steps for :class:`advreid.engine.Trainer` (``train.step`` / ``train.step_params``).

Three steps, each a callable ``step(trainer) -> loss parts`` built from the resolved training config by a builder
``build_*_step(cfg, **params)`` (registered by :mod:`advreid.experiments.dddefense`):

* ``metric_at`` (:class:`AdversarialMetricStep` + :class:`PlainTriplet`): the plain metric-AT baseline (EST-style,
  spec 3.10). Adversarial copies of the batch by FNA with in-batch guides (:class:`FNESAdversary`), then the hard
  batch-hard triplet among the adversarial embeddings; no softening, no extension, no clean gallery.
* ``fnes`` (:class:`AdversarialMetricStep` + :class:`~advreid.defenses.dddefense.FNESLoss`): FNES metric AT. The
  same adversary; the loss is FNES on the adversarial anchors against the clean embeddings of the same batch.
* ``selfmeta`` (:class:`SelfMetaTrainStep`): the adversarially-enhanced self-meta step
  (:class:`~advreid.defenses.dddefense.SelfMetaStep`, first-order MLDG over an identity split with attack pools A
  and B) with FNES as the task loss and, optionally, feature consistency with a frozen clean teacher.

What every recipe trains on (the reconstruction's choice, documented in docs/dddefense.md): one train-mode forward
of ``cat([adversarial, clean])`` per (sub-)batch, so BatchNorm sees both halves; the adversarial half gets only the
metric loss on the retrieval embedding (no classifier term on adversarial examples: DDDefense's point that
robustness must not be parked in a classifier ReID throws away); the clean half gets the config's usual criterion
(``loss.ce_weight`` CE + ``loss.triplet_weight`` batch-hard triplet) weighted by ``clean_weight`` (0 drops it).
In ``selfmeta`` the clean term is part of both the meta-train and the meta-test task loss.

Randomness comes from ``trainer.step_generator(stream)`` only (the attack seed, the identity split, the attacks
drawn), so a resumed run equals a straight one. Attacks run in eval mode (the library convention) on the current
weights. ``resampled`` (true / false / null) guards the ablation rows: true requires ``data.root`` to be a
finished DDDefense Phase I dataset (its ``resample_manifest.json``), false forbids it, null accepts either.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.attacks import ATTACKS
from advreid.defenses.dddefense.fnes import PULL_MODES, FNESAdversary, FNESLoss, check_nonneg
from advreid.defenses.dddefense.resample import MANIFEST_NAME
from advreid.defenses.dddefense.selfmeta import CONSISTENCY, SelfMetaConfig, SelfMetaStep, retrieval_embedding
from advreid.losses import TripletLoss

__all__ = [
    "AdversarialMetricStep",
    "FNESStepConfig",
    "MetricATStepConfig",
    "PlainTriplet",
    "SelfMetaStepConfig",
    "SelfMetaTrainStep",
    "build_fnes_step",
    "build_metric_at_step",
    "build_selfmeta_step",
    "check_resampled_root",
    "retrieval_embedding",
    "step_param_names",
]

# a metric loss on embeddings: (adv (B,D), pids (B,), clean (B,D) or None) -> (loss, parts)
MetricLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict[str, float]]]


# --------------------------------------------------------------------------------------------------- configs
def _number(where: str, name: str, v: Any, *, optional: bool = False) -> None:
    check_nonneg(f"{where}: {name}", v, optional, none_text=" or null")


def _check_attack(where: str, name: Any, params: Any) -> None:
    if not isinstance(name, str) or name.lower() not in ATTACKS:
        raise ValueError(f"{where}: unknown attack {name!r}; expected one of {', '.join(ATTACKS.names())}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: parameters of attack {name!r} must be a mapping, got {params!r}")
    bad = sorted({"eps", "alpha", "steps", "seed"} & set(params))
    if bad:
        raise ValueError(f"{where}: attack_params of {name!r} set {bad}; use the step's eps/alpha/steps instead")
    ATTACKS.get(name).check(params)  # unknown parameter -> RegistryError with did-you-mean


@dataclass
class _AdversaryFields:
    """The adversary of the metric-AT steps: attack ``attack`` with in-batch guides (``pull``), its budget."""

    attack: str = "fna"
    eps: float | str = "5px"
    alpha: float | str = "1px"
    steps: int | None = 7
    pull: str = "sample"
    attack_params: dict[str, Any] = field(default_factory=dict)
    adv_weight: float = 1.0
    clean_weight: float = 1.0
    resampled: bool | None = None

    def _check_adversary(self, where: str) -> None:
        _check_attack(where, self.attack, self.attack_params)
        if self.pull not in PULL_MODES:
            raise ValueError(f"{where}: pull must be one of {PULL_MODES}, got {self.pull!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"{where}: steps must be an int >= 1 or null (the attack's default), got {self.steps!r}")
        for name in ("adv_weight", "clean_weight"):
            _number(where, name, getattr(self, name))
        if self.resampled not in (None, True, False):
            raise ValueError(f"{where}: resampled must be true, false or null, got {self.resampled!r}")


@dataclass
class MetricATStepConfig(_AdversaryFields):
    """``metric_at``: the adversary plus the plain batch-hard triplet's ``margin`` (null = soft margin)."""

    margin: float | None = 0.3

    def __post_init__(self) -> None:
        self._check_adversary("metric_at step")
        _number("metric_at step", "margin", self.margin, optional=True)


@dataclass
class FNESStepConfig(_AdversaryFields):
    """``fnes``: the adversary plus :class:`~advreid.defenses.dddefense.FNESLoss`'s parameters; ``use_clean``: the
    clean embeddings are FNES's gallery (and the extension term's reference), else the adversarial batch is."""

    tau: float = 1.0
    margin: float | None = None
    extension_margin: float | None = None
    triplet_weight: float = 1.0
    extension_weight: float = 1.0
    use_clean: bool = True

    def __post_init__(self) -> None:
        self._check_adversary("fnes step")
        if not isinstance(self.use_clean, bool):
            raise ValueError(f"fnes step: use_clean must be true/false, got {self.use_clean!r}")
        fnes_loss(self)  # FNESLoss validates its own parameters


@dataclass
class SelfMetaStepConfig:
    """``selfmeta``: :class:`~advreid.defenses.dddefense.SelfMetaConfig`'s fields (pools, split, rates, teacher
    consistency), FNES's loss parameters, the clean term's weight, the ``teacher`` run and the ``resampled``
    guard. ``teacher`` null = ``adv.source_run`` of the config (a bench's ``source:`` model)."""

    inner_lr: float = 0.01
    meta_weight: float = 1.0
    split_ratio: float = 0.5
    pool_train: list[str] = field(default_factory=lambda: ["fna", "sma"])
    pool_test: list[str] = field(default_factory=lambda: ["odfa", "lta", "mifgsm"])
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    eps: float | str = "5px"
    alpha: float | str = "1px"
    steps: int | None = 7
    pull: str = "sample"
    use_clean: bool = True
    consistency_weight: float = 0.0
    consistency: str = "mse"
    freeze_outer_buffers: bool = False
    tau: float = 1.0
    margin: float | None = None
    extension_margin: float | None = None
    triplet_weight: float = 1.0
    extension_weight: float = 1.0
    clean_weight: float = 1.0
    teacher: str | None = None
    resampled: bool | None = None

    def __post_init__(self) -> None:
        where = "selfmeta step"
        if not isinstance(self.attack_params, Mapping):
            raise ValueError(f"{where}: attack_params must map attack names to parameters, got {self.attack_params!r}")
        for pool in ("pool_train", "pool_test"):
            names = getattr(self, pool)
            if isinstance(names, str) or not isinstance(names, list | tuple) or not names:
                raise ValueError(f"{where}: {pool} must be a non-empty list of attack names, got {names!r}")
            for n in names:
                _check_attack(f"{where}: {pool}", n, self.attack_params.get(n, {}))
        _number(where, "clean_weight", self.clean_weight)
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"{where}: consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if self.resampled not in (None, True, False):
            raise ValueError(f"{where}: resampled must be true, false or null, got {self.resampled!r}")
        self.meta_config(0)  # SelfMetaConfig validates pools (disjoint), rates, split and pull
        fnes_loss(self)

    def meta_config(self, seed: int) -> SelfMetaConfig:
        """The :class:`SelfMetaConfig` of these settings with the run's ``seed``."""
        names = {f.name for f in fields(SelfMetaConfig)}
        kw = {k: v for k, v in asdict(self).items() if k in names}
        kw.update(pool_train=tuple(self.pool_train), pool_test=tuple(self.pool_test),
                  attack_params={k: dict(v) for k, v in (self.attack_params or {}).items()}, seed=int(seed))
        return SelfMetaConfig(**kw)


def step_param_names(config_cls: type) -> list[str]:
    """The ``train.step_params`` keys a step accepts: the fields of its config dataclass."""
    return [f.name for f in fields(config_cls)]


def fnes_loss(c: FNESStepConfig | SelfMetaStepConfig) -> FNESLoss:
    """The :class:`FNESLoss` of a step config."""
    return FNESLoss(tau=c.tau, margin=c.margin, extension_margin=c.extension_margin,
                    triplet_weight=c.triplet_weight, extension_weight=c.extension_weight)


# ---------------------------------------------------------------------------------------------------- helpers
def _full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when AMP made it half precision, else unchanged (float64 checks stay exact)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rows(out: Any, start: int, stop: int | None = None) -> Any:
    """Rows ``start:stop`` of a forward output (a tensor or a dict of tensors / None), half precision widened."""
    if isinstance(out, torch.Tensor):
        return _full(out[start:stop])
    return {k: (None if v is None else _full(v[start:stop])) for k, v in out.items()}


def check_resampled_root(root: str | Path | None, resampled: bool | None, step: str) -> None:
    """Enforce a step's ``resampled`` guard on ``data.root`` (no check when either is None)."""
    if root is None or resampled is None:
        return
    manifest = Path(root).expanduser() / MANIFEST_NAME
    is_resampled = False
    if manifest.is_file():
        try:
            is_resampled = bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))
        except (OSError, ValueError):
            is_resampled = False
    if resampled and not is_resampled:
        raise ValueError(f"{step} step: resampled=true but data.root {root} is not a finished DDDefense Phase I "
                         f"dataset (no complete {MANIFEST_NAME}); make one with `advreid diffusion train` + "
                         "`advreid resample`, or set train.step_params.resampled=false (the no-resampling ablation)")
    if not resampled and is_resampled:
        raise ValueError(f"{step} step: resampled=false but data.root {root} is a Phase I resampled dataset; "
                         "train on the original data or set train.step_params.resampled=true")


def _clean_term(trainer: Any, out: Any, pids: torch.Tensor, weight: float) -> tuple[torch.Tensor | None, dict]:
    """``weight * trainer.criterion(out, pids)`` on clean outputs (None when the weight is 0)."""
    if weight == 0:
        return None, {}
    loss, parts = trainer.criterion(out, pids)
    return weight * loss, {f"clean/{k}": v for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------ metric AT
class PlainTriplet:
    """The plain metric-AT loss: hard batch-hard triplet among the adversarial embeddings (clean ones unused)."""

    def __init__(self, margin: float | None = 0.3) -> None:
        self.triplet = TripletLoss(margin)

    def __call__(self, adv: torch.Tensor, pids: torch.Tensor,
                 clean: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        loss, acc = self.triplet(adv, pids, return_accuracy=True)
        return loss, {"triplet": float(loss.detach()), "acc": float(acc), "total": float(loss.detach())}


class AdversarialMetricStep:
    """One metric adversarial-training step: adversarial copies of ``trainer.batch`` by an in-batch-guided attack,
    ``adv_weight * metric_loss(adv embeddings, pids, clean embeddings)`` + ``clean_weight * criterion(clean)``.

    The adversary is built on ``trainer.model`` at the first call; the forward goes through ``trainer.net`` (DDP
    when distributed) under the trainer's AMP setting, the update through its scaler.
    """

    def __init__(self, config: _AdversaryFields, metric_loss: MetricLoss, *, use_clean: bool,
                 stream: str) -> None:
        self.config, self.metric_loss, self.use_clean, self.stream = config, metric_loss, use_clean, stream
        self.adversary: FNESAdversary | None = None

    def build_adversary(self, model: nn.Module) -> FNESAdversary:
        """The attack of the config on ``model`` (the trainer's bare model)."""
        c = self.config
        return FNESAdversary.build(model, c.attack, eps=c.eps, alpha=c.alpha, steps=c.steps, pull=c.pull,
                                   **dict(c.attack_params or {}))

    def __call__(self, trainer: Any) -> dict[str, float]:
        t, c = trainer, self.config
        if self.adversary is None or self.adversary.attack.model is not t.model:
            with torch.random.fork_rng(devices=[]):  # whatever building draws stays out of the run's stream
                self.adversary = self.build_adversary(t.model)
        b = t.batch
        seed = int(torch.randint(2**31 - 1, (1,), generator=t.step_generator(self.stream)))
        adv = self.adversary(b.images, b.pids, index=b.index, seed=seed).detach()
        n = adv.shape[0]
        with_clean = self.use_clean or c.clean_weight > 0
        x = torch.cat([adv, b.images]) if with_clean else adv
        with torch.autocast(device_type=t.device.type, dtype=torch.float16, enabled=t.use_amp):
            out = t.net(x)
        f = _full(retrieval_embedding(out, t.model))
        loss, parts = self.metric_loss(f[:n], b.pids, f[n:] if self.use_clean else None)
        total = c.adv_weight * loss
        clean, clean_parts = _clean_term(t, _rows(out, n), b.pids, c.clean_weight) if with_clean else (None, {})
        if clean is not None:
            total = total + clean
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(total).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        out_parts = {f"adv/{k}": v for k, v in parts.items()} | clean_parts
        out_parts.update(total=float(total.detach()), triplet=parts.get("triplet", 0.0),
                         ce=clean_parts.get("clean/ce", 0.0), acc=parts.get("acc", 0.0))
        return out_parts


def build_metric_at_step(cfg: dict, **params: Any) -> AdversarialMetricStep:
    """The ``metric_at`` step of the training config ``cfg`` (``train.step_params`` as ``params``)."""
    c = MetricATStepConfig(**params)
    check_resampled_root(cfg["data"].get("root"), c.resampled, "metric_at")
    return AdversarialMetricStep(c, PlainTriplet(c.margin), use_clean=False, stream="metric_at")


def build_fnes_step(cfg: dict, **params: Any) -> AdversarialMetricStep:
    """The ``fnes`` step of the training config ``cfg`` (``train.step_params`` as ``params``)."""
    c = FNESStepConfig(**params)
    check_resampled_root(cfg["data"].get("root"), c.resampled, "fnes")
    return AdversarialMetricStep(c, fnes_loss(c), use_clean=c.use_clean, stream="fnes")


# ------------------------------------------------------------------------------------------------- self-meta
class _SelfMetaWithClean(SelfMetaStep):
    """:class:`SelfMetaStep` whose task loss also carries the clean criterion on the clean half of its forward."""

    def __init__(self, *args: Any, criterion: Callable[..., Any], clean_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.criterion, self.clean_weight = criterion, float(clean_weight)

    def task_loss(self, forward: Callable[[torch.Tensor], Any], adv: torch.Tensor, clean: torch.Tensor,
                  pids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """FNES (+ teacher consistency) as in :class:`SelfMetaStep`, plus ``clean_weight * criterion(clean)``."""
        seen: list[Any] = []

        def recording(x: torch.Tensor) -> Any:
            out = forward(x)
            seen.append(out)
            return out

        loss, parts = super().task_loss(recording, adv, clean, pids)
        if self.clean_weight == 0:
            return loss, parts
        n = adv.shape[0]
        out = _rows(seen[0], n) if self.config.use_clean else _rows(forward(clean), 0)
        c_loss, c_parts = self.criterion(out, pids)
        loss = loss + self.clean_weight * c_loss
        return loss, {**parts, **{f"clean/{k}": v for k, v in c_parts.items()}, "total": float(loss.detach())}


def _teacher(path: str, device: torch.device) -> nn.Module:
    """A frozen model from a run directory (its final, else latest checkpoint) or a checkpoint stem."""
    from advreid.models import find_checkpoint, load_checkpoint

    p = Path(path).expanduser()
    stem = find_checkpoint(p) if p.is_dir() else p
    return load_checkpoint(stem).to(device).eval().requires_grad_(False)


NO_TEACHER = ("selfmeta step: consistency_weight > 0 needs a frozen clean teacher: set train.step_params.teacher="
              "RUN_DIR or adv.source_run=RUN_DIR (a trained baseline), or consistency_weight=0")


class SelfMetaTrainStep:
    """The ``selfmeta`` training step: a :class:`SelfMetaStep` on the trainer's bare model and optimizer (built at
    the first call), driven by ``trainer.step_generator("selfmeta")`` and the batch's dataset indices."""

    def __init__(self, config: SelfMetaStepConfig, seed: int, teacher: str | None) -> None:
        self.config, self.seed, self.teacher_path = config, int(seed), teacher
        self.meta: _SelfMetaWithClean | None = None

    def build_meta(self, trainer: Any) -> _SelfMetaWithClean:
        """The meta step on ``trainer.model`` / ``trainer.optimizer`` (teacher loaded when consistency is on)."""
        c = self.config
        if trainer.world > 1:
            raise ValueError("selfmeta step: distributed (torchrun) training is not supported; the first-order meta "
                             "update sets gradients by hand on the bare model (run on one process)")
        teacher = None
        if c.consistency_weight > 0:
            if self.teacher_path is None:
                raise ValueError(NO_TEACHER)
            teacher = _teacher(self.teacher_path, trainer.device)
        return _SelfMetaWithClean(trainer.model, trainer.optimizer, c.meta_config(self.seed), loss=fnes_loss(c),
                                  teacher=teacher, criterion=trainer.criterion, clean_weight=c.clean_weight)

    def __call__(self, trainer: Any) -> dict[str, float]:
        if self.meta is None or self.meta.model is not trainer.model:
            with torch.random.fork_rng(devices=[]):  # building the teacher draws a random init: keep the run's stream
                self.meta = self.build_meta(trainer)
        b = trainer.batch
        res = self.meta(b.images, b.pids, index=b.index, generator=trainer.step_generator("selfmeta"))
        p = dict(res.parts)
        p.update(triplet=p.get("train/triplet", 0.0), ce=p.get("train/clean/ce", 0.0), acc=p.get("train/acc", 0.0))
        return p


def build_selfmeta_step(cfg: dict, **params: Any) -> SelfMetaTrainStep:
    """The ``selfmeta`` step of the training config ``cfg`` (``train.step_params`` as ``params``)."""
    c = SelfMetaStepConfig(**params)
    check_resampled_root(cfg["data"].get("root"), c.resampled, "selfmeta")
    teacher = c.teacher if c.teacher is not None else (cfg.get("adv") or {}).get("source_run")
    if c.consistency_weight > 0 and cfg["data"].get("root") is not None:  # a real run (not a config check)
        if teacher is None:
            raise ValueError(NO_TEACHER)
        p = Path(str(teacher)).expanduser()
        if not (p.is_dir() or p.with_name(p.name + ".json").is_file()):
            raise ValueError(f"selfmeta step: teacher {str(teacher)!r} is neither a run directory nor a checkpoint")
    return SelfMetaTrainStep(c, int(cfg.get("seed", 0)), None if teacher is None else str(teacher))
