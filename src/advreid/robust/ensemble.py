"""The versioned attack ensembles of ``advreid robust``: a frozen table per (version, norm), no knob for the user.

A member is a registered attack with fixed parameters; its step size is a fraction of the budget, so one table
serves every ``--eps``. ``standard`` is the full ensemble; ``rand`` (for randomised defenses) is the same members with
EOT in each (``eot`` gradient/loss draws per step) and the final metrics averaged over ``draws`` draws of the
defense; ``quick`` is APGD and the random search at small budgets (a smoke test, documented as weaker). Changing a
number here changes results: bump ``ENSEMBLE_REVISION`` (it is written into every results file and the leaderboard
never ranks different revisions together).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from advreid.evaluation import AttackSpec

__all__ = ["ENSEMBLE_REVISION", "NORMS", "VERSIONS", "Ensemble", "Member", "get_ensemble"]

ENSEMBLE_REVISION = 1
VERSIONS = ("standard", "rand", "quick")
NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 1.0}


@dataclass(frozen=True)
class Member:
    """One attack of an ensemble: ``attack`` (registry name), ``steps``, the step size as a fraction of eps
    (``alpha_frac``; None: the attack's own rule, e.g. APGD's 2 eps), fixed constructor ``params`` and whether it
    uses no gradient (the masking check compares it with the gradient members)."""

    name: str
    attack: str
    steps: int
    alpha_frac: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    gradient_free: bool = False

    def spec(self, eps: float, seed: int) -> AttackSpec:
        """The :class:`~advreid.evaluation.AttackSpec` of this member at budget ``eps``."""
        alpha = None if self.alpha_frac is None else self.alpha_frac * eps
        return AttackSpec(self.attack, eps=eps, alpha=alpha, steps=self.steps, params=dict(self.params), seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "attack": self.attack, "steps": self.steps, "alpha_frac": self.alpha_frac,
                "params": dict(self.params), "gradient_free": self.gradient_free}


@dataclass(frozen=True)
class Ensemble:
    """A versioned ensemble: its members, the EOT draws per step for a randomised defense (``eot``; None: the
    threat model's default) and the number of defense draws the metrics are averaged over (``draws``)."""

    version: str
    norm: str
    members: tuple[Member, ...]
    eot: int | None = None
    draws: int = 1
    revision: int = ENSEMBLE_REVISION

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"an ensemble needs members with distinct names, got {names}")
        if not any(m.gradient_free for m in self.members) or all(m.gradient_free for m in self.members):
            raise ValueError("an ensemble needs gradient members and a gradient-free one (the masking check "
                             "compares them)")
        if self.draws < 1:
            raise ValueError(f"draws={self.draws} must be >= 1")

    @property
    def label(self) -> str:
        """``standard-linf-r1``: what leaderboards group by."""
        return f"{self.version}-{self.norm}-r{self.revision}"

    def scaled(self, factor: float) -> Ensemble:
        """The same ensemble with every member's steps multiplied by ``factor`` (at least 1): for tests only; a
        scaled ensemble is labelled as such and never ranked with the real one."""
        members = tuple(replace(m, steps=max(1, round(m.steps * factor))) for m in self.members)
        return replace(self, members=members, version=f"{self.version}-x{factor:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "norm": self.norm, "revision": self.revision, "label": self.label,
                "eot": self.eot, "draws": self.draws, "members": [m.to_dict() for m in self.members]}


def _linf(steps: float, square: int) -> tuple[Member, ...]:
    """The L-inf members with iteration counts scaled by ``steps`` (1 = standard) and ``square`` queries."""
    n = lambda t: max(1, round(t * steps))  # noqa: E731
    return (
        Member("apgd", "apgd", n(100), None, {"restarts": 2}),
        Member("fna", "fna", n(50), 1 / 8),
        Member("odfa", "odfa", n(50), 1 / 8),
        Member("lta", "lta", n(50), 1 / 8),
        Member("rank", "rank", n(50), 1 / 8, {"top_k": 5}),
        Member("square", "square", square, None, {"p_init": 0.05}, gradient_free=True),
    )


def _l2(steps: float, square: int) -> tuple[Member, ...]:
    """The L2 members: those with an L2 geometry (FNA, ODFA and LTA are L-inf attacks)."""
    n = lambda t: max(1, round(t * steps))  # noqa: E731
    return (
        Member("apgd", "apgd", n(100), None, {"restarts": 2, "norm": "l2"}),
        Member("pgd_guided", "pgd", n(50), 1 / 8, {"objective": "guided", "norm": "l2", "restarts": 1}),
        Member("square", "square", square, None, {"p_init": 0.05, "norm": "l2"}, gradient_free=True),
    )


_TABLE: Mapping[tuple[str, str], Ensemble] = MappingProxyType({
    ("standard", "linf"): Ensemble("standard", "linf", _linf(1.0, 1000)),
    ("standard", "l2"): Ensemble("standard", "l2", _l2(1.0, 1000)),
    ("rand", "linf"): Ensemble("rand", "linf", _linf(0.5, 500), eot=8, draws=5),
    ("rand", "l2"): Ensemble("rand", "l2", _l2(0.5, 500), eot=8, draws=5),
    ("quick", "linf"): Ensemble("quick", "linf", (Member("apgd", "apgd", 20),
                                                  Member("square", "square", 40, None, {"p_init": 0.05},
                                                         gradient_free=True))),
    ("quick", "l2"): Ensemble("quick", "l2", (Member("apgd", "apgd", 20, None, {"norm": "l2"}),
                                              Member("square", "square", 40, None, {"p_init": 0.05, "norm": "l2"},
                                                     gradient_free=True))),
})


def get_ensemble(version: str, norm: str = "linf") -> Ensemble:
    """The frozen ensemble of ``version`` (standard, rand, quick) for ``norm`` (linf, l2)."""
    if version not in VERSIONS:
        raise ValueError(f"--version {version!r}: expected one of {', '.join(VERSIONS)}")
    if norm not in NORMS:
        raise ValueError(f"--norm {norm!r}: expected one of {', '.join(NORMS)}")
    return _TABLE[(version, norm)]
