"""Bring your own model: ``KIND:NAME[@WEIGHTS]`` specs accepted wherever a run folder is.

Kinds (one module each, peer toolkits imported only inside their own module, when used): ``torchreid``,
``fastreid``, ``torchvision``, ``torchscript``, ``python``. Each loader returns a module; :func:`load_model_spec`
wraps it in :class:`ExternalModel` ([0,1] images, resize, normalisation, feature choice, description). A new kind is
one function registered with :func:`register_model_kind` (docs/extending.md).
"""

from advreid.models.external import fastreid, python, torchreid, torchscript, torchvision  # noqa: F401 -- the kinds
from advreid.models.external.base import (
    DEFAULT_CARD,
    MODEL_KINDS,
    NORMS,
    Built,
    ExternalModel,
    ModelCard,
    ModelSpec,
    card_beside,
    is_model_spec,
    load_model_spec,
    load_state,
    parse_spec,
    read_weights,
    register_model_kind,
)

__all__ = [
    "DEFAULT_CARD", "MODEL_KINDS", "NORMS", "Built", "ExternalModel", "ModelCard", "ModelSpec", "card_beside",
    "is_model_spec", "load_model_spec", "load_state", "parse_spec", "read_weights", "register_model_kind",
]
