"""guard — inference-time hardening of image classifiers against poisoning and backdoors.

Example::

    import guard
    model = guard.models.create("resnet20", weights="resnet20-12fca82f.th")
    rescaler = guard.ReScaler(model, eps=0.15, alpha=1.0)
    result = rescaler.adapt(images)          # images: float (B, 3, 32, 32) in [0, 1]
    result.logits, result.original_logits, result.scalars
"""

from . import models
from .rescaler import ReScaler, ReScalerConfig, register_block

__all__ = ["ReScaler", "ReScalerConfig", "models", "register_block"]
__version__ = "0.1.0"
