"""Parameter initialisation drawn from an explicit ``torch.Generator``.

torch's layers initialise themselves from the global RNG when constructed. :func:`guard.models.create` builds a
network on the meta device instead (no random draws) and then initialises every tensor with the functions here,
so a model is a function of its generator's seed and the global RNG is never touched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_defaults", "init_he_normal"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def init_defaults(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """torch's default initialisation of every layer of ``module``, drawn from ``generator`` (``None``: the
    global RNG): convolutions and linear layers ``kaiming_uniform_(a=√5)`` with biases ``U(±1/√fan_in)``,
    normalisation layers ones / zeros with fresh running statistics.

    A layer of another type that holds its own parameters or buffers raises ``TypeError``: its initialisation
    is unknown here, so the architecture must initialise it (``init`` of :func:`register_model`).
    """
    for name, m in module.named_modules():
        if isinstance(m, _WEIGHTED):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, _NORMS):
            m.reset_parameters()  # deterministic
        elif next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
            raise TypeError(f"cannot initialise layer {name!r} ({type(m).__name__}) from a generator: only "
                            f"convolutions, linear and normalisation layers have a known default; register the "
                            f"architecture with an init function that covers it")


def init_he_normal(module: nn.Module, generator: torch.Generator | None = None, *, mode: str = "fan_in",
                   layers: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)) -> None:
    """torch's defaults, then He-normal weights (He et al. 2015, eq. 10; ``kaiming_normal_`` with ReLU gain)
    for the ``layers`` of ``module``, as the ResNet papers initialise them."""
    init_defaults(module, generator)
    for m in module.modules():
        if isinstance(m, layers):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu", generator=generator)
