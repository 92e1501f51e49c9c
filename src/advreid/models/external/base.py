"""Model specs ``KIND:NAME[@WEIGHTS]``: parsing, the model card, the kind registry, safe weight loading and the one
wrapper every external model becomes.

A kind is a loader ``load(name, weights, card) -> nn.Module | Built`` registered in :data:`MODEL_KINDS`; the module it
returns maps *normalised* images to an output from which the wrapper takes the feature. :class:`ExternalModel` owns
everything around it: [0,1] images in, resize to the card's input size, mean/std normalisation (out of place, so
attacks see [0,1] pixels), the feature choice (the eval-mode output, or ``feature_layer``'s output, globally average
pooled when spatial), and the description written into results. Its ``checkpoint_meta`` has the shape an advreid
checkpoint's has (input size, ``config.eval``), so the evaluation protocol reads both the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from advreid.models.pretrained import read_state_dict_file
from advreid.models.reidnet import IMAGENET_MEAN, IMAGENET_STD
from advreid.registry import Registry, did_you_mean
from advreid.utils.io import sha256_file

__all__ = [
    "MODEL_KINDS", "Built", "ExternalModel", "ModelCard", "ModelSpec", "card_beside", "is_model_spec",
    "load_model_spec", "load_state", "parse_spec", "read_weights", "register_model_kind",
]

#: kind name -> loader ``(name, weights: Path | None, card: ModelCard) -> nn.Module | Built``
MODEL_KINDS: Registry[Callable[..., Any]] = Registry("model kind")
NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_SPEC_RE = re.compile(r"^([A-Za-z][\w.-]*):(.+)$")
_METRICS = ("cosine", "euclidean", "sqeuclidean")


def register_model_kind(name: str, loader: Callable[..., Any] | None = None, *, overwrite: bool = False) -> Any:
    """Register a model kind (``loader(name, weights, card)`` returning an ``nn.Module`` or :class:`Built`); without
    ``loader`` it is a decorator. The kind is then usable as ``NAME:...`` wherever a run folder is accepted."""
    return MODEL_KINDS.register(name, loader, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ModelSpec:
    """``KIND:NAME[@WEIGHTS]`` split: NAME may hold ``:`` (``python:pkg.mod:factory``), WEIGHTS starts at the
    first ``@`` after the kind."""

    kind: str
    name: str
    weights: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" + (f"@{self.weights}" if self.weights else "")


def is_model_spec(source: object) -> bool:
    """A string ``KIND:...`` (KIND a word, no ``/``) that is not an existing path: a model spec, not a run folder."""
    if not isinstance(source, str) or not _SPEC_RE.match(source):
        return False
    return not Path(source).expanduser().exists()


def parse_spec(text: str) -> ModelSpec:
    """Parse ``KIND:NAME[@WEIGHTS]``; an unknown kind or an empty part is one line naming the spec."""
    m = _SPEC_RE.match(str(text))
    if not m:
        raise ValueError(f"model spec {text!r}: expected KIND:NAME[@WEIGHTS], e.g. torchvision:resnet18@weights.pth "
                         f"(kinds: {', '.join(MODEL_KINDS.names())})")
    kind, rest = m.group(1).lower(), m.group(2)
    if kind not in MODEL_KINDS:
        raise ValueError(f"model spec {text!r}: unknown kind {kind!r}{did_you_mean(kind, MODEL_KINDS.names())}; "
                         f"expected one of {', '.join(MODEL_KINDS.names())}")
    name, sep, weights = rest.partition("@")
    if not name or (sep and not weights):
        raise ValueError(f"model spec {text!r}: empty {'NAME' if not name else 'WEIGHTS'} (KIND:NAME[@WEIGHTS])")
    return ModelSpec(kind, name, weights or None)


# ----------------------------------------------------------------------------------------------------- card
def _size(v: Any, where: str) -> tuple[int, int]:
    if isinstance(v, str):
        parts = re.split(r"[x,]", v.strip().lower())
    else:
        parts = list(v) if isinstance(v, list | tuple) else [v]
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={v!r}: expected HEIGHTxWIDTH, e.g. 256x128") from None
    if h < 1 or w < 1:
        raise ValueError(f"{where}={v!r}: height and width must be positive")
    return h, w


def _triple(v: Any, where: str) -> tuple[float, float, float]:
    parts = v.split(",") if isinstance(v, str) else list(v) if isinstance(v, list | tuple) else [v]
    try:
        t = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        t = ()
    if len(t) != 3:
        raise ValueError(f"{where}={v!r}: expected 3 numbers (R,G,B), e.g. 0.485,0.456,0.406")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelCard:
    """What a model expects and how it is scored; None: not stated (the kind's default, else advreid's: 256x128,
    ImageNet mean/std, the eval-mode output, cosine on L2-normalised features, no flip). Written as a YAML file beside
    the weights (``<weights file>.yaml``), passed as ``--model-card FILE``, or given as flags (flags win)."""

    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    feature_layer: str | None = None
    metric: str | None = None
    flip: bool | None = None
    normalize: bool | None = None
    trained_on: str | None = None
    path: str | None = None  # the card file it came from

    KEYS = ("input_size", "norm", "mean", "std", "feature_layer", "metric", "flip", "normalize", "trained_on")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model card") -> ModelCard:
        """A card from a mapping (YAML card, bench model entry); unknown keys and bad values name ``where``."""
        bad = sorted(set(d) - set(cls.KEYS))
        if bad:
            raise ValueError(f"{where}: unknown key {bad[0]!r}{did_you_mean(bad[0], cls.KEYS)}; valid: "
                             f"{', '.join(cls.KEYS)}")
        kw: dict[str, Any] = {}
        if d.get("norm") is not None:
            if str(d["norm"]).lower() not in NORMS:
                raise ValueError(f"{where}: norm={d['norm']!r}; expected {' or '.join(NORMS)} (or mean/std)")
            kw["mean"], kw["std"] = NORMS[str(d["norm"]).lower()]
        for key in ("mean", "std"):
            if d.get(key) is not None:
                kw[key] = _triple(d[key], f"{where}: {key}")
        if kw.get("std") is not None and min(kw["std"]) <= 0:
            raise ValueError(f"{where}: std={list(kw['std'])}: must be positive")
        if d.get("input_size") is not None:
            kw["input_size"] = _size(d["input_size"], f"{where}: input_size")
        if d.get("metric") is not None:
            if d["metric"] not in _METRICS:
                raise ValueError(f"{where}: metric={d['metric']!r}; expected {', '.join(_METRICS)}")
            kw["metric"] = str(d["metric"])
        for key in ("flip", "normalize"):
            if d.get(key) is not None:
                if not isinstance(d[key], bool):
                    raise ValueError(f"{where}: {key}={d[key]!r}; expected true or false")
                kw[key] = d[key]
        for key in ("feature_layer", "trained_on"):
            if d.get(key) is not None:
                kw[key] = str(d[key])
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelCard:
        """Read a YAML model card (``input_size: 256x128``, ``norm: imagenet``, ``metric: cosine`` ...)."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"model card {str(p)!r} does not exist")
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"model card {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"model card {str(p)!r}: expected a mapping such as {{input_size: 256x128}}")
        return dataclasses.replace(cls.from_dict(doc, f"model card {p}"), path=str(p.resolve()))

    def merged(self, over: ModelCard | None) -> ModelCard:
        """This card with every field ``over`` states replacing it."""
        if over is None:
            return self
        return dataclasses.replace(self, **{f.name: getattr(over, f.name) for f in dataclasses.fields(self)
                                            if getattr(over, f.name) is not None})

    def stated(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None and f.name != "path"}


DEFAULT_CARD = ModelCard(input_size=(256, 128), mean=IMAGENET_MEAN, std=IMAGENET_STD, metric="cosine", flip=False,
                         normalize=True)


def card_beside(weights: str | Path | None) -> Path | None:
    """The model card that sits beside a weights file: ``<weights file>.yaml`` (None if there is none)."""
    if weights is None:
        return None
    p = Path(weights).expanduser()
    c = p.with_name(p.name + ".yaml")
    return c if p.is_file() and c.is_file() else None


# -------------------------------------------------------------------------------------------------- weights
def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """name -> tensor of a weights file (.safetensors, or a pickle read with ``weights_only=True``: a file that needs
    arbitrary code is refused in one line and its code never runs); training checkpoints are unwrapped."""
    return read_state_dict_file(Path(path).expanduser())


def _first(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor], source: str,
               droppable: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``net`` exactly (``module.`` prefixes stripped); keys under a ``droppable`` prefix (a
    classifier the data does not need) are dropped when unexpected or of another size. Returns the dropped keys;
    missing, unexpected or mis-shaped keys are one line listing the first few of each."""
    own = net.state_dict()
    fixed: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        fixed[k] = v
    dropped = [k for k, v in fixed.items() if k.startswith(droppable) and (k not in own or own[k].shape != v.shape)]
    for k in dropped:
        del fixed[k]
    missing = [k for k in own if k not in fixed and not k.endswith("num_batches_tracked")
               and not k.startswith(droppable)]
    unexpected = [k for k in fixed if k not in own]
    shaped = [f"{k} {tuple(fixed[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in fixed and fixed[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {label}: {_first(v)}" for label, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape (file vs model)", shaped))
                 if v]
        raise ValueError(f"weights {source!r} do not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(fixed, strict=False)
    return dropped


# -------------------------------------------------------------------------------------------------- wrapper
@dataclass
class Built:
    """What a kind's loader returns besides the module: the card values it knows (``defaults``, e.g. fast-reid's
    test size), the file its weights came from (hashed into the description), notes for the description, whether
    the module normalises inside (then ``mean``/``std`` cannot be set; ``notes["inside_normalization"]`` says how),
    and the Grad-CAM layer (None: the last
    top-level child holding a convolution; ``"skip: <reason>"``: no Grad-CAM)."""

    net: nn.Module
    defaults: ModelCard = field(default_factory=ModelCard)
    weights_file: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    owns_normalization: bool = False
    cam_layer: nn.Module | str | None = None


class ExternalModel(nn.Module):
    """[0,1] images (B,3,H,W) -> resize to the card's size -> (x - mean) / std -> ``net`` -> feature (the output, or
    ``feature_layer``'s, pooled when spatial). ``description`` is what results record; ``checkpoint_meta`` carries the
    card's input size and scoring settings in the shape the evaluation protocol reads."""

    def __init__(self, net: nn.Module, card: ModelCard, description: dict[str, Any],
                 cam_layer: nn.Module | str | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.card = card
        self.description = description
        self.input_size = tuple(card.input_size or DEFAULT_CARD.input_size)
        self.register_buffer("mean", torch.tensor(card.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(card.std).view(1, 3, 1, 1), persistent=False)
        self._layer = None
        if card.feature_layer:
            names = dict(net.named_modules())
            if card.feature_layer not in names:
                raise ValueError(f"feature_layer {card.feature_layer!r} is not a module of {description['spec']} "
                                 f"{did_you_mean(card.feature_layer, [n for n in names if n])}(top level: "
                                 f"{', '.join(n for n, _ in net.named_children())})")
            self._layer = names[card.feature_layer]
        self._cam = cam_layer
        self.checkpoint_meta = {
            "format": "external-model", "arch": description["kind"],
            "meta": {"input_size": list(self.input_size), "model_name": description["spec"],
                     "dataset": card.trained_on,
                     "config": {"eval": {"metric": card.metric, "flip": card.flip, "normalize": card.normalize}}},
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval feature (B, D) of [0,1] images (not L2-normalised: evaluation decides)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.description['spec']} expects float images (B,3,H,W) in [0,1], got {shape}")
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self._layer is None:
            return self._pick(self.net(x))
        seen: list[Any] = []
        handle = self._layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            self.net(x)
        finally:
            handle.remove()
        return self._pick(seen[-1])

    def _pick(self, out: Any) -> torch.Tensor:
        if isinstance(out, tuple | list) and out and all(isinstance(o, torch.Tensor) for o in out):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
            what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise ValueError(f"{self.description['spec']}: the model returned {what}; expected features (B, D) or "
                             "a feature map (B, C, H, W); choose another output with --feature-layer")
        return out.mean(dim=(2, 3)) if out.dim() == 4 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def train(self, mode: bool = True) -> ExternalModel:
        """The wrapped model is used for inference only: it stays in eval mode (its BN statistics, no dropout, and
        toolkits whose training forward returns logits), whatever the wrapper's mode."""
        super().train(mode)
        self.net.eval()
        return self

    def gradcam_layer(self) -> nn.Module:
        """The Grad-CAM layer: the kind's, else ``feature_layer``, else the module that finishes last among those
        giving a spatial map (found by one probe forward: ResNet ``layer4``, OSNet ``conv5``, a last conv's ReLU)."""
        if isinstance(self._cam, str):
            raise ValueError(f"{self.description['spec']}: no Grad-CAM ({self._cam.removeprefix('skip: ')})")
        if self._cam is not None:
            return self._cam
        if self._layer is not None:
            return self._layer
        spatial: list[nn.Module] = []

        def seen(m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
                spatial.append(m)

        hooks = [m.register_forward_hook(seen) for m in self.net.modules() if m is not self.net]
        try:
            with torch.no_grad():
                was = self.training
                self.eval()
                self.features(torch.zeros(1, 3, *self.input_size, device=self.mean.device))
                self.train(was)
        finally:
            for h in hooks:
                h.remove()
        if not spatial:
            raise ValueError(f"{self.description['spec']}: no module gives a spatial map for Grad-CAM; state one with "
                             "feature_layer")
        return spatial[-1]

    def extra_repr(self) -> str:
        return f"spec={self.description['spec']}, input_size={self.input_size}"


# -------------------------------------------------------------------------------------------------- loading
def load_model_spec(spec: str | ModelSpec, card: ModelCard | None = None) -> ExternalModel:
    """The :class:`ExternalModel` of a spec. Card values, weakest first: advreid's defaults, the kind's, the card file
    beside the weights (``<weights>.yaml``, unless ``card.path`` names one), then ``card``'s own fields."""
    s = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    weights = Path(s.weights).expanduser() if s.weights else None
    user = ModelCard()
    beside = card_beside(weights if weights is not None else Path(s.name).expanduser())  # torchscript: NAME is a file
    if card is not None and card.path:
        user = ModelCard.from_yaml(card.path)
    elif beside is not None:
        user = ModelCard.from_yaml(beside)
    user = user.merged(card)
    built = MODEL_KINDS.get(s.kind)(s.name, weights, user)
    if not isinstance(built, Built):
        built = Built(built, weights_file=weights if weights is not None and weights.is_file() else None)
    notes = dict(built.notes)
    inside = notes.pop("inside_normalization", "inside the model")
    if built.owns_normalization and {"mean", "std"} & user.stated():
        raise ValueError(f"{s}: this model normalises its input itself ({inside}); --norm/--mean/--std do not apply")
    final = DEFAULT_CARD.merged(built.defaults).merged(user)
    wf = built.weights_file
    description = {
        "source": "spec", "spec": str(s), "kind": s.kind, "name": s.name,
        "weights": str(wf.resolve()) if wf is not None else None,
        "weights_sha256": sha256_file(wf) if wf is not None else None,
        "input_size": list(final.input_size),
        "normalization": {"mean": list(final.mean), "std": list(final.std),
                          **({"inside_model": inside} if built.owns_normalization else {})},
        "feature_layer": final.feature_layer, "metric": final.metric, "flip": final.flip,
        "normalize_features": final.normalize, "card": user.path, **notes,
        # the keys a run folder's description has, so every reader finds them
        "run_dir": None, "checkpoint": None, "arch": str(s), "model_name": str(s), "trained_on": final.trained_on,
    }
    model = ExternalModel(built.net, final, description, built.cam_layer)
    model.requires_grad_(False)
    return model
