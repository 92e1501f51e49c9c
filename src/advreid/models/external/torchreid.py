"""``torchreid:<arch>@checkpoint``: a torchreid (deep-person-reid) architecture built by its own
``torchreid.models.build_model`` (``pretrained=False``: nothing is downloaded) with the weights of a torchreid
checkpoint (``torchreid.utils.save_checkpoint``'s ``model.pth.tar-N``: a dict with ``state_dict``, possibly
``module.``-prefixed). The classifier is built for one class and the checkpoint's (any size) is dropped: retrieval
uses the eval-mode output, never the logits. Scoring defaults are torchreid's own test settings (euclidean distance on
unnormalised features, no flip), so advreid reproduces the numbers torchreid prints. torchreid itself pins old
dependencies: install it with ``pip install --no-deps torchreid``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advreid.models.external.base import Built, ModelCard, load_state, read_weights, register_model_kind
from advreid.registry import did_you_mean


def import_torchreid() -> Any:
    """The torchreid package, or one line saying how to install it."""
    try:
        import torchreid
    except ImportError as e:
        raise ValueError(f"torchreid: specs need the torchreid package ({e}); install it with "
                         "pip install --no-deps torchreid==0.2.5 (plus gdown, tensorboard)") from None
    return torchreid


@register_model_kind("torchreid")
def load_torchreid(name: str, weights: Path | None, card: ModelCard) -> Built:
    """``torchreid.models.build_model(name, 1 class)`` with the checkpoint's weights (its classifier dropped)."""
    models = import_torchreid().models
    factory = getattr(models, "__model_factory", {})
    if factory and name not in factory:
        raise ValueError(f"torchreid:{name}: unknown architecture{did_you_mean(name, factory)}")
    if weights is None:
        raise ValueError(f"torchreid:{name}: give the checkpoint, torchreid:{name}@PATH (a torchreid "
                         "model.pth.tar-N or state dict)")
    state = read_weights(weights)
    net = models.build_model(name=name, num_classes=1, loss="softmax", pretrained=False, use_gpu=False)
    dropped = load_state(net, state, str(weights), droppable=("classifier",))
    return Built(net.eval(), defaults=ModelCard(metric="euclidean", normalize=False, flip=False),
                 weights_file=weights, notes={"dropped_keys": dropped})
