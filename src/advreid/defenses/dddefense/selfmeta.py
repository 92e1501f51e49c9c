"""Adversarially-enhanced self-meta step for DDDefense Phase II: a named, documented reconstruction (first-order MLDG).

DDDefense's "adversarially-enhanced self-meta mechanism" should generalise to unseen identities *and* unseen attack
types; its split rule, learning rates and weights are not public (spec 3.11). This reconstruction follows Meta
Invariance Defense (Zhang, Zhou et al., an attacker pool; meta-train on sampled attacks, meta-test on held-out ones)
and the first-order MLDG / M3L meta step. Choices and reasons:

1. **Split** (:func:`split_identities`): the identities of a PK batch are split at random into disjoint meta-train
   and meta-test sets (``ratio`` of identities to meta-train, at least one each side), so meta-test identities are
   unseen by the inner step: the "unseen identities" half of dual generalisation.
2. **Attacks** (:class:`AttackPool`): each step draws one attack from pool A for meta-train and one from a disjoint
   pool B for meta-test (defaults A = FNA, SMA; B = ODFA, LTA, MI-FGSM): the "unseen attack types" half. Both
   attacks are made with the current weights theta (not theta'), before the inner update: the meta-test task is fixed
   data, as in MLDG, and library attacks cannot run on functional weights; re-attacking at theta' would cost a third
   attack per step. Attacks run in eval mode (library convention) with in-batch guides (:class:`FNESAdversary`).
3. **Task loss**: :class:`FNESLoss` on the adversarial features with the clean features of the same images as the
   gallery (one train-mode forward of ``cat([adv, clean])``, so BatchNorm sees both), plus an optional feature
   consistency with a frozen clean teacher (MID's feature-level distillation): ``mse`` = mean squared difference of
   raw features, ``cosine`` = mean ``1 - cos`` between the student's features of the adversarial images and the
   teacher's of the clean ones. The teacher is a frozen copy of the model at construction unless one is given.
4. **First-order meta update** (:func:`first_order_meta_step`): ``theta' = theta - inner_lr * grad L_tr(theta)``
   computed functionally (``torch.func.functional_call``, the module's parameters untouched); ``L_te(theta')`` on
   meta-test; the parameters get ``grad = grad L_tr(theta) + meta_weight * grad L_te(theta')`` -- the outer gradient
   is taken w.r.t. theta' and applied to theta, no second-order terms -- then the optimizer steps once.
   Parameters unused by both losses (e.g. the classifier: no classifier term) keep ``grad=None`` and are skipped.
5. **Buffers** (BatchNorm running statistics): the inner forward at theta updates them with the meta-train batch;
   the outer forward at theta' by default updates them too with the meta-test batch, so every image is counted once
   per step as in plain training (theta' is one small step from theta). ``freeze_outer_buffers=True`` runs the outer
   forward on copies, so only the meta-train pass reaches the running statistics. Either way ``num_batches_tracked``
   counts forward passes (two per step by default). Batch statistics are per sub-batch (meta-train, meta-test).
6. Default rates: ``inner_lr=0.01``, ``meta_weight=1.0`` (MLDG's beta), split ratio 1/2; none is known for DDDefense.
   DataParallel/DDP wrappers are not supported (the functional call needs the bare module).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from advreid.attacks import Attack, build
from advreid.defenses.dddefense.fnes import PULL_MODES, FNESAdversary, FNESLoss, check_nonneg
from advreid.ops import batch_generator
from advreid.utils.misc import module_mode

__all__ = [
    "CONSISTENCY",
    "AttackPool",
    "SelfMetaConfig",
    "SelfMetaResult",
    "SelfMetaStep",
    "first_order_meta_step",
    "split_identities",
]

CONSISTENCY = ("mse", "cosine")
# a meta loss: gets a callable running the model's forward (at theta or theta'), returns loss or (loss, parts)
LossFn = Callable[[Callable[..., Any]], Any]


def split_identities(pids: torch.Tensor, ratio: float = 0.5,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch positions (sorted) of a random ``ratio`` of the identities (meta-train) and of the rest (meta-test).

    ``round(ratio * n_ids)`` identities go to meta-train, clamped to ``[1, n_ids - 1]``; the draw is a permutation
    from ``generator`` (CPU), so the same generator state gives the same split. Needs at least two identities.
    """
    if not isinstance(pids, torch.Tensor) or pids.dim() != 1 or pids.is_floating_point():
        raise ValueError(f"split_identities: pids must be a 1-D integer tensor, got "
                         f"{tuple(pids.shape) if isinstance(pids, torch.Tensor) else type(pids).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
        raise ValueError(f"split_identities: ratio must be in (0, 1), got {ratio!r}")
    ids = torch.unique(pids.cpu())
    if ids.numel() < 2:
        raise ValueError(f"split_identities: the batch needs at least 2 identities to split, got {ids.tolist()}")
    n_train = min(max(round(ratio * ids.numel()), 1), ids.numel() - 1)
    perm = torch.randperm(ids.numel(), generator=generator)
    chosen = torch.isin(pids.cpu(), ids[perm[:n_train]])
    return chosen.nonzero().flatten(), (~chosen).nonzero().flatten()


class AttackPool:
    """A named pool of attacks built once on ``model``; :meth:`draw` picks one uniformly from a torch.Generator."""

    def __init__(self, names: Sequence[str], model: nn.Module, *, eps: float | str = "5px",
                 alpha: float | str = "1px", steps: int | None = 7, seed: int = 0,
                 params: Mapping[str, Mapping[str, Any]] | None = None,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"AttackPool: names must be a non-empty sequence of attack names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"AttackPool: names must not repeat, got {list(names)}")
        params = dict(params or {})
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"AttackPool: params given for {unknown}, which are not in the pool {list(names)}")
        self.names = tuple(str(n) for n in names)
        base: dict[str, Any] = {"eps": eps, "alpha": alpha, "seed": seed}
        if steps is not None:
            base["steps"] = steps
        self.attacks: dict[str, Attack] = {n: build(n, model, **{**base, **params.get(n, {})}) for n in self.names}
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"AttackPool({list(self.names)})"

    def draw(self, generator: torch.Generator | None = None) -> Attack:
        """One attack, uniformly, from ``generator`` (default: the pool's own)."""
        g = self.generator if generator is None else generator
        return self.attacks[self.names[int(torch.randint(len(self.names), (1,), generator=g))]]


def _as_loss(out: Any, what: str) -> tuple[torch.Tensor, dict[str, float]]:
    loss, parts = (out[0], dict(out[1])) if isinstance(out, tuple) else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"{what} must return a scalar loss tensor (or (loss, parts)), got {type(loss).__name__}")
    return loss, parts


def first_order_meta_step(model: nn.Module, loss_train_fn: LossFn, loss_test_fn: LossFn, inner_lr: float,
                          meta_weight: float, optimizer: torch.optim.Optimizer, *,
                          freeze_outer_buffers: bool = False) -> dict[str, float]:
    """One first-order meta update (MLDG): ``grad = g_tr(theta) + meta_weight * g_te(theta')``, then one step.

    ``loss_train_fn(forward)`` / ``loss_test_fn(forward)`` get a callable running the model's forward at theta
    (the module itself) / at ``theta' = theta - inner_lr * g_tr`` (functional, the module untouched) and return a
    scalar loss or ``(loss, parts)``. Returns ``meta_train``, ``meta_test``, ``total`` and the parts, prefixed.
    """
    for name, v in (("inner_lr", inner_lr), ("meta_weight", meta_weight)):
        check_nonneg(f"first_order_meta_step: {name}", v)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("first_order_meta_step: the model has no parameter with requires_grad=True")
    params = [p for _, p in named]
    optimizer.zero_grad(set_to_none=True)
    l_tr, parts_tr = _as_loss(loss_train_fn(model), "loss_train_fn")
    g_tr = torch.autograd.grad(l_tr, params, allow_unused=True)
    fast = {n: (p.detach() if g is None else p.detach() - inner_lr * g).requires_grad_(True)
            for (n, p), g in zip(named, g_tr, strict=True)}
    state: dict[str, torch.Tensor] = dict(fast)
    if freeze_outer_buffers:
        state.update({n: b.clone() for n, b in model.named_buffers()})

    def forward_fast(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, state, args, kwargs)

    l_te, parts_te = _as_loss(loss_test_fn(forward_fast), "loss_test_fn")
    g_te = torch.autograd.grad(l_te, list(fast.values()), allow_unused=True)
    for p, gt, ge in zip(params, g_tr, g_te, strict=True):
        if gt is None and ge is None:
            continue
        g = torch.zeros_like(p) if gt is None else gt.detach().clone()
        if ge is not None:
            g.add_(ge, alpha=float(meta_weight))
        p.grad = g
    optimizer.step()
    out = {"meta_train": float(l_tr.detach()), "meta_test": float(l_te.detach()),
           "total": float(l_tr.detach()) + float(meta_weight) * float(l_te.detach())}
    out.update({f"train/{k}": float(v) for k, v in parts_tr.items()})
    out.update({f"test/{k}": float(v) for k, v in parts_te.items()})
    return out


# ------------------------------------------------------------------------------------------------ the step


@dataclass
class SelfMetaConfig:
    """Settings of :class:`SelfMetaStep` (see the module docstring for the reasons behind each default)."""

    inner_lr: float = 0.01
    meta_weight: float = 1.0
    split_ratio: float = 0.5
    pool_train: tuple[str, ...] = ("fna", "sma")
    pool_test: tuple[str, ...] = ("odfa", "lta", "mifgsm")
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    eps: float | str = "5px"
    alpha: float | str = "1px"
    steps: int | None = 7
    pull: str = "sample"
    use_clean: bool = True
    consistency_weight: float = 0.0
    consistency: str = "mse"
    freeze_outer_buffers: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("inner_lr", "meta_weight", "consistency_weight"):
            check_nonneg(f"SelfMetaConfig: {name}", getattr(self, name))
        if isinstance(self.split_ratio, bool) or not isinstance(self.split_ratio, int | float) \
                or not 0 < self.split_ratio < 1:
            raise ValueError(f"SelfMetaConfig: split_ratio must be in (0, 1), got {self.split_ratio!r}")
        self.pool_train, self.pool_test = tuple(self.pool_train), tuple(self.pool_test)
        if set(self.pool_train) & set(self.pool_test):
            raise ValueError(f"SelfMetaConfig: pool_train {list(self.pool_train)} and pool_test "
                             f"{list(self.pool_test)} must be disjoint (meta-test attacks are the unseen ones)")
        if self.pull not in PULL_MODES:
            raise ValueError(f"SelfMetaConfig: pull must be one of {PULL_MODES}, got {self.pull!r}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"SelfMetaConfig: consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SelfMetaConfig: seed must be an int >= 0, got {self.seed!r}")


@dataclass
class SelfMetaResult:
    """What one :class:`SelfMetaStep` call did: loss parts, the attacks drawn, and the batch split."""

    parts: dict[str, float]
    attacks: tuple[str, str]
    train_index: torch.Tensor
    test_index: torch.Tensor


def retrieval_embedding(out: Any, model: nn.Module) -> torch.Tensor:
    """The retrieval embedding (B,D) of a forward output: a tensor, or ReIDNet's training dict (``neck_feat``)."""
    if isinstance(out, torch.Tensor):
        return out.flatten(1)
    if isinstance(out, Mapping):
        key = "feat_before_bn" if getattr(model, "neck_feat", "after") == "before" else "feat_after_bn"
        if out.get(key) is None:
            raise ValueError(f"the model's training output has no {key!r}")
        return out[key].flatten(1)
    raise TypeError(f"the model's forward returned {type(out).__name__}, expected a tensor or a dict")


class SelfMetaStep:
    """One adversarially-enhanced self-meta training step on a PK batch (reconstruction; see the module docstring).

    ``step(images, pids, index=..., generator=...)``: split identities, draw attack A (meta-train) and B (meta-test),
    make adversarial anchors, then :func:`first_order_meta_step` with FNES (+ teacher consistency) as both losses.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: SelfMetaConfig | None = None, *,
                 loss: FNESLoss | None = None, teacher: nn.Module | None = None) -> None:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            raise TypeError("SelfMetaStep needs the bare model (functional_call), not a DataParallel/DDP wrapper")
        self.model, self.optimizer = model, optimizer
        self.config = cfg = config if config is not None else SelfMetaConfig()
        self.loss = loss if loss is not None else FNESLoss()
        kw: dict[str, Any] = {"eps": cfg.eps, "alpha": cfg.alpha, "steps": cfg.steps, "seed": cfg.seed}
        self.pool_train = AttackPool(cfg.pool_train, model, **kw,
                                     params={n: p for n, p in cfg.attack_params.items() if n in cfg.pool_train})
        self.pool_test = AttackPool(cfg.pool_test, model, **kw,
                                    params={n: p for n, p in cfg.attack_params.items() if n in cfg.pool_test})
        extra = sorted(set(cfg.attack_params) - set(cfg.pool_train) - set(cfg.pool_test))
        if extra:
            raise ValueError(f"SelfMetaConfig: attack_params for {extra}, which are in neither pool")
        self.teacher: nn.Module | None = None
        if cfg.consistency_weight > 0:
            self.teacher = copy.deepcopy(model) if teacher is None else teacher
            self.teacher.eval().requires_grad_(False)
        self.step_count = 0

    def teacher_features(self, clean: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's embeddings of clean images (eval mode, no grad)."""
        assert self.teacher is not None
        with torch.no_grad():
            return getattr(self.teacher, "features", self.teacher)(clean).flatten(1)

    def task_loss(self, forward: Callable[[torch.Tensor], Any], adv: torch.Tensor, clean: torch.Tensor,
                  pids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """FNES on ``forward``'s features of ``adv`` (gallery: those of ``clean``) + teacher consistency."""
        n = adv.shape[0]
        if self.config.use_clean:
            feats = retrieval_embedding(forward(torch.cat([adv, clean])), self.model)
            f_adv, f_clean = feats[:n], feats[n:]
        else:
            f_adv, f_clean = retrieval_embedding(forward(adv), self.model), None
        loss, parts = self.loss(f_adv, pids, f_clean)
        if self.teacher is not None:
            t = self.teacher_features(clean).to(f_adv.dtype)
            cons = F.mse_loss(f_adv, t) if self.config.consistency == "mse" else \
                (1 - F.cosine_similarity(f_adv, t, dim=1)).mean()
            loss = loss + self.config.consistency_weight * cons
            parts = {**parts, "consistency": float(cons.detach()), "total": float(loss.detach())}
        return loss, parts

    def __call__(self, images: torch.Tensor, pids: torch.Tensor, *, index: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> SelfMetaResult:
        """One meta step on a batch; ``index`` (B,) names samples' attack streams (default arange), ``generator``
        drives the split, the attack draws and the attacks' seed (default: from (seed, step count))."""
        cfg = self.config
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("SelfMetaStep: images must be a float (B,3,H,W) tensor in [0,1]")
        pids = torch.as_tensor(pids).to(images.device).long()
        idx = torch.arange(images.shape[0]) if index is None else torch.as_tensor(index).cpu().long()
        if pids.shape != (images.shape[0],) or idx.shape != pids.shape:
            raise ValueError(f"SelfMetaStep: pids and index must have shape ({images.shape[0]},)")
        g = generator if generator is not None else batch_generator(cfg.seed, 0, self.step_count, 0, "selfmeta")
        tr, te = split_identities(pids, cfg.split_ratio, g)
        attacks = (self.pool_train.draw(g), self.pool_test.draw(g))
        attack_seed = int(torch.randint(2**31 - 1, (1,), generator=g))
        x0 = images.detach()
        advs = [FNESAdversary(a, pull=cfg.pull)(x0[i.to(x0.device)], pids[i.to(pids.device)], index=idx[i],
                                                 seed=attack_seed) for a, i in zip(attacks, (tr, te), strict=True)]
        tr_d, te_d = tr.to(x0.device), te.to(x0.device)
        with module_mode(self.model, True):
            parts = first_order_meta_step(
                self.model,
                lambda fwd: self.task_loss(fwd, advs[0], x0[tr_d], pids[tr_d]),
                lambda fwd: self.task_loss(fwd, advs[1], x0[te_d], pids[te_d]),
                cfg.inner_lr, cfg.meta_weight, self.optimizer, freeze_outer_buffers=cfg.freeze_outer_buffers)
        self.step_count += 1
        return SelfMetaResult(parts, (attacks[0].name, attacks[1].name), tr, te)

    step = __call__
