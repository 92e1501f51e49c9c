"""Typed protocol objects: what an evaluation measures (:class:`EvalProtocol`), which attack runs
(:class:`AttackSpec`), what the attacker knows (:class:`ThreatModel`) and how it is executed (:class:`RunOptions`),
plus the documented JSON form of the results (TypedDicts).

:meth:`ThreatModel.models` is the one place where a threat model becomes feature functions: the model that is
evaluated (``model`` behind the passive defense) and the one the attack differentiates (the bare model for a
non-adaptive attacker, ``defense ∘ model`` for an adaptive one, the source model for transfer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import nn

from advreid.evaluation.distance import METRICS
from advreid.evaluation.rank import AP_MODES
from advreid.ops import eps_label, finalize, parse_eps, parse_number
from advreid.utils.misc import jsonable

SIDES = ("query", "gallery")
AUTO = "auto"  # ThreatModel(defense="auto"): the passive defense the model's training config names
DEFAULT_EOT = 10

__all__ = [
    "AUTO", "SIDES", "AttackResult", "AttackSpec", "CleanResult", "EpsResult", "EvalProtocol", "Metrics",
    "RunOptions", "ThreatModel",
]


# ------------------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class EvalProtocol:
    """How features are extracted and ranked: ``metric`` (cosine, euclidean, sqeuclidean), L2 ``normalize``,
    flip-averaged features (``flip``), k-reciprocal ``rerank`` (reported beside the plain scores), the AP rule
    (``ap``: standard or official), the test input size, the extraction batch size, and ``max_images``: an evenly
    spaced subset of the attacked side (None: all), scored for clean and attacked rows alike."""

    metric: str = "cosine"
    normalize: bool = True
    flip: bool = False
    ap: str = "standard"
    rerank: bool = False
    height: int = 256
    width: int = 128
    batch_size: int = 128
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}; expected cosine, euclidean or sqeuclidean")
        if self.ap not in AP_MODES:
            raise ValueError(f"ap={self.ap!r}; expected standard or official")
        if self.max_images is not None and (isinstance(self.max_images, bool) or self.max_images < 1):
            raise ValueError(f"max_images={self.max_images!r}: expected a positive number of images (or None)")

    @classmethod
    def of_model(cls, model: nn.Module, **overrides: Any) -> EvalProtocol:
        """The protocol a checkpoint was trained with (its config's ``eval`` section and input size)."""
        meta = getattr(model, "checkpoint_meta", {}).get("meta", {})
        ecfg = meta.get("config", {}).get("eval", {})
        h, w = meta.get("input_size", [256, 128])
        base = {"metric": ecfg.get("metric", "cosine"), "normalize": bool(ecfg.get("normalize", True)),
                "flip": bool(ecfg.get("flip", False)), "ap": ecfg.get("ap", "standard"),
                "batch_size": int(ecfg.get("batch_size", 128)), "height": int(h), "width": int(w)}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def replace(self, **changes: Any) -> EvalProtocol:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -------------------------------------------------------------------------------------------------- attack
@dataclass(frozen=True)
class AttackSpec:
    """An attack as a registry name and its settings: ``eps`` ([0,1] units; "5px" strings are parsed), ``alpha``
    and ``steps`` (None: the attack's own, e.g. 5px, or 16px for DMR), other constructor ``params``, the attacked
    ``side`` (None: the attack's own, query except gallery presets), ``guide_source`` (None: the attack's set for
    the side), the output quantisation (``quantize``: None/round/floor; ``reencode``: None/png/jpeg:Q, applied
    before scoring) and the ``seed`` of the per-sample random streams. Invalid names and parameters fail at
    construction."""

    name: str
    eps: float | str | None = None
    alpha: float | str | None = None
    steps: int | str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    side: str | None = None
    guide_source: str | None = None
    quantize: str | None = None
    reencode: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from advreid.attacks import ATTACKS

        preset = ATTACKS.get(self.name)  # unknown name: RegistryError with did-you-mean
        object.__setattr__(self, "params", dict(self.params or {}))
        parse = parse_number if self.params.get("norm") == "l2" else parse_eps  # an L2 radius may exceed 1
        if self.eps is not None:
            object.__setattr__(self, "eps", parse(self.eps, "eps"))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", parse(self.alpha, "alpha"))
        for reserved in ("side", "eps", "alpha", "steps", "seed"):
            if reserved in self.params:
                raise ValueError(f"attack {self.name!r}: pass {reserved} as AttackSpec.{reserved}, not in params")
        preset.check(self.params)
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side={self.side!r}; expected one of {', '.join(SIDES)}")
        if self.guide_source is not None and self.guide_source not in ("query", "gallery", "train"):
            raise ValueError(f"guide_source={self.guide_source!r}; expected query, gallery or train")
        try:
            finalize(torch.zeros(1, 3, 2, 2), quantize=self.quantize, reencode=self.reencode)
        except ValueError as e:
            raise ValueError(" ".join(str(e).split())) from None

    def build(self, model: nn.Module, *, eps: float | None = None, **extra: Any) -> Any:
        """The :class:`~advreid.attacks.Attack` on ``model`` (``eps`` overrides the spec's, for sweeps)."""
        from advreid.attacks import build

        kw: dict[str, Any] = {"seed": self.seed}
        e = self.eps if eps is None else eps
        if e is not None:
            kw["eps"] = float(e)
        if self.alpha is not None:
            kw["alpha"] = self.alpha
        if self.steps is not None:
            kw["steps"] = self.steps
        if self.side is not None:
            kw["side"] = self.side
        return build(self.name, model, **{**kw, **extra, **self.params})  # explicit params win

    @property
    def finalize_kw(self) -> dict[str, str | None]:
        return {"quantize": self.quantize, "reencode": self.reencode}

    def replace(self, **changes: Any) -> AttackSpec:
        return dataclasses.replace(self, **changes)

    def label(self) -> str:
        """What ran, in one line: ``lta(eps=5px, alpha=1px, steps=15, quantize=floor, reencode=jpeg:75)``."""
        l2 = self.params.get("norm") == "l2"  # an L2 radius over the whole image, not a per-pixel budget
        fmt = (lambda v: f"{float(v):.4g}") if l2 else (lambda v: eps_label(float(v)))
        parts = ["eps=default" if self.eps is None else f"eps={fmt(self.eps)}"]
        if self.alpha is not None:
            parts.append(f"alpha={fmt(self.alpha)}")
        if self.steps is not None:
            parts.append(f"steps={self.steps}")
        parts += [f"{k}={v}" for k, v in sorted(self.params.items())]
        parts += [f"{k}={v}" for k, v in self.finalize_kw.items() if v is not None]
        return f"{self.name}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


# -------------------------------------------------------------------------------------------------- threat
@dataclass(frozen=True)
class ThreatModel:
    """What the attacker knows. ``defense``: a passive defense applied to every evaluated image (a
    :class:`~advreid.defenses.Preprocess`, a registry name with ``defense_params``, None for the bare model, or
    ``"auto"``: the one the model's training config names). ``adaptive``: the attacker differentiates through the
    defense (BPDA for non-differentiable steps, EOT with ``eot_samples`` draws -- default 10 -- when it is random);
    otherwise it attacks the bare model, the seed paper's setting. ``source_model``: black-box transfer, the images
    are crafted on another model (``source_info`` describes it in results; ``source_info`` alone marks an attack
    made elsewhere without a model to differentiate, e.g. a DMR generator trained against another model)."""

    defense: Any = None
    defense_params: Mapping[str, Any] | None = None
    adaptive: bool = False
    eot_samples: int | None = None
    source_model: nn.Module | None = None
    source_info: Mapping[str, Any] | None = None

    def resolve(self, model: nn.Module) -> ThreatModel:
        """A copy whose ``defense`` is a built module (or None): names and "auto" are looked up."""
        from advreid.defenses import build_passive

        d, params = self.defense, self.defense_params
        if isinstance(d, str) and d == AUTO:
            dcfg = getattr(model, "checkpoint_meta", {}).get("meta", {}).get("config", {}).get("defense", {}) or {}
            d, params = dcfg.get("passive"), dcfg.get("passive_params") if params is None else params
        if d is None or isinstance(d, nn.Module):
            mod = d
        else:
            mod = build_passive(str(d), dict(params) if params else None)
        if self.adaptive and mod is None:
            raise ValueError("adaptive=True needs a defense: an adaptive attacker differentiates through the defense")
        return dataclasses.replace(self, defense=mod, defense_params=None)

    @property
    def kind(self) -> str:
        """white_box, non_adaptive, adaptive, transfer or transfer_adaptive (a resolved threat model)."""
        if self.source_model is not None or self.source_info is not None:
            return "transfer" + ("_adaptive" if self.adaptive else "")
        if self.defense is None:
            return "white_box"
        return "adaptive" if self.adaptive else "non_adaptive"

    def models(self, model: nn.Module) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
        """(evaluated model, attacked feature function, extra attack parameters) of a resolved threat model."""
        from advreid.defenses import DefendedModel

        attacker = model if self.source_model is None else self.source_model
        if self.defense is None:
            return model, attacker, {}
        defense = self.defense.to(_device_of(model)).eval()
        extra: dict[str, Any] = {}
        if self.adaptive:
            attacker = DefendedModel(attacker, defense)
            if getattr(defense, "randomized", False):  # EOT only where there is randomness to average over
                extra["eot_samples"] = DEFAULT_EOT if self.eot_samples is None else int(self.eot_samples)
        return DefendedModel(model, defense), attacker, extra

    def defense_info(self) -> dict[str, Any] | None:
        """JSON description of the (resolved) defense: registry name, class, parameters, randomized, key."""
        d = self.defense
        if d is None:
            return None
        import json

        params = jsonable(d.params()) if hasattr(d, "params") else {}
        name = getattr(d, "name", None) or type(d).__name__
        return {"name": name, "class": type(d).__name__, "params": params,
                "randomized": bool(getattr(d, "randomized", False)),
                "differentiable": bool(getattr(d, "differentiable", True)),
                "key": f"{name}:{json.dumps(params, sort_keys=True)}"}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "adaptive": self.adaptive, "eot_samples": self.eot_samples,
                "defense": self.defense_info(), "source": jsonable(self.source_info)}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------- execution
@dataclass
class RunOptions:
    """How an evaluation is executed (none of it changes a number): attack batch size, device, loader workers,
    progress bars, a ``cache`` dict reused across calls on the same model, data and protocol (clean features,
    guide banks), where to save the adversarial images, what to keep in memory, and a ``batch_store``
    (:class:`advreid.evaluation.sharding.BatchStore`) where finished attack batches are saved and read back on
    resume."""

    batch_size: int = 32
    device: torch.device | str | None = None
    num_workers: int = 0
    progress: bool = False
    cache: dict | None = None
    save_dir: Any = None
    keep_images: bool | frozenset[int] | set[int] | list[int] = False  # True: all; a collection: those indices
    keep_features: bool = False
    on_eps: Callable[[dict], None] | None = None
    batch_store: Any = None


# ------------------------------------------------------------------------------------------- result JSON
class Metrics(TypedDict, total=False):
    """Scores as fractions in [0,1]: rank1/5/10, mAP, mINP, num_valid_queries; ``rr_*`` the re-ranked ones;
    ``<metric>_ci``: [lo, hi] percentile-bootstrap 95% intervals over queries."""

    rank1: float
    rank5: float
    rank10: float
    mAP: float
    mINP: float
    num_valid_queries: int


class CleanResult(TypedDict):
    """:func:`~advreid.evaluation.evaluate_clean`: ``{"attack": None, "side", "defense", "threat": "clean",
    "clean": Metrics, "protocol": {...EvalProtocol, "num_query", "num_gallery"}}``."""

    attack: None
    side: str
    defense: dict | None
    threat: str
    clean: Metrics
    protocol: dict


class EpsResult(TypedDict, total=False):
    """One budget of an attack: eps ([0,1]) and eps_px, the attack's ``params()``, ``clean`` and ``attacked``
    Metrics, num_attacked, linf_mean/max (and _px), l2_mean, seconds, time_per_image_s, saved_to."""

    eps: float
    eps_px: float
    params: dict
    clean: Metrics
    attacked: Metrics


class AttackResult(TypedDict, total=False):
    """:func:`~advreid.evaluation.evaluate_attack`: attack name, side, guides (source set, count, model), transfer,
    defense, threat (white_box/non_adaptive/adaptive/transfer...), finalize (quantize, reencode), seed, protocol,
    runs (one :class:`EpsResult` per eps)."""

    attack: str
    side: str
    guides: dict | None
    transfer: bool
    defense: dict | None
    threat: str
    finalize: dict
    seed: int
    protocol: dict
    runs: list[EpsResult]
