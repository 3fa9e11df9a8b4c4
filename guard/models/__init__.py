"""Model zoo: ``create(name, num_classes=10, weights=None, generator=None)`` and ``list_models()``.

Every model takes images in [0, 1] and normalizes inside (:class:`GuardModel`). Register a new
architecture with :func:`register_model`; to make it work with ReScaler, its residual block class must
also be known to :func:`guard.rescaler.register_block`.
"""

from . import zoo as _zoo  # noqa: F401  (registers the architectures)
from ._init import init_defaults, init_he_normal
from ._registry import (GuardModel, ModelSpec, Normalize, create, get_spec, list_models, load_weights,
                        register_model, save_weights)

__all__ = ["GuardModel", "ModelSpec", "Normalize", "create", "get_spec", "init_defaults", "init_he_normal",
           "list_models", "load_weights", "register_model", "save_weights"]
