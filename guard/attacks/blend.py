"""Full-image triggers: Blend (A2), Adaptive-Blend (A5), SIG (A3), Refool (A12)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import BackdoorAttack, PoisonConfig, check_float, check_int, register_attack
from .patch import _cover_count, _occlusion_masks
from .primitives import add_clip, blend, random_pattern

__all__ = ["AdaptiveBlend", "AdaptiveBlendConfig", "Blend", "BlendConfig", "Refool", "RefoolConfig", "SIG",
           "SIGConfig"]


@dataclass(frozen=True)
class BlendConfig(PoisonConfig):
    """Blend: key = seeded uniform-random image (moth_supplementary.txt §1.3 "random pattern"), ``alpha``
    0.2 at training and test time; 5 % poison rate (ANP)."""

    budget: float = 0.05
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0, 1.0, low_open=True)


@register_attack
class Blend(BackdoorAttack):
    """Blend (Chen et al. 2017; ALGORITHMS.md A2): ``x' = (1 − α)·x + α·k`` (P1.3), relabelled to t."""

    name = "blend"
    config_class = BlendConfig
    description = "global blend with a random key image (Chen et al. 2017)"

    def make_params(self, shape, generator):
        return {"key": random_pattern(shape, generator)}

    def apply(self, x, params, generator):
        return blend(x, params["key"], self.config.alpha)


@dataclass(frozen=True)
class AdaptiveBlendConfig(BlendConfig):
    """Adaptive-Blend (Adap-code defaults): α = 0.2, the image split into ``grid``×``grid`` = 4×4 pieces of
    which ``mask_rate`` = 50 % are masked per poison, 150 payload + 150 regularisation samples on CIFAR-10
    (``budget`` 0.003, ``conservatism`` 0.5); ``test_alpha`` (default α) for the full test-time trigger."""

    budget: float = 0.003
    grid: int = 4
    mask_rate: float = 0.5
    conservatism: float = 0.5
    test_alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("grid", self.grid, 1)
        check_float("mask_rate", self.mask_rate, 0.0, 1.0)
        check_float("conservatism", self.conservatism, 0.0, 1.0)
        if self.conservatism == 1.0:
            raise ValueError("conservatism must be < 1 (1 leaves no relabelled payload samples)")
        if self.test_alpha is not None:
            check_float("test_alpha", self.test_alpha, 0.0, 1.0, low_open=True)


@register_attack
class AdaptiveBlend(Blend):
    """Adaptive-Blend (Qi et al., ICLR 2023; ALGORITHMS.md A5): ``x + α·mask⊙(k − x)`` with half of the
    grid pieces masked out at poisoning time, full blend at test time, plus label-keeping cover samples."""

    name = "adaptive-blend"
    config_class = AdaptiveBlendConfig
    description = "piece-wise masked blend + regularisation samples (Qi et al. 2023)"

    def num_covers(self, m, n):
        return _cover_count(m, self.config.conservatism)

    def apply_poison(self, x, params, generator):
        n, _, h, w = x.shape
        if self.config.grid > min(h, w):
            raise ValueError(f"grid={self.config.grid} exceeds the {h}x{w} image")
        mask = _occlusion_masks(n, h, w, self.config.grid, self.config.mask_rate, generator)[:, None]
        return x + self.config.alpha * mask * (params["key"].to(x) - x)

    def apply(self, x, params, generator):
        alpha = self.config.test_alpha if self.config.test_alpha is not None else self.config.alpha
        return blend(x, params["key"], alpha)


@dataclass(frozen=True)
class SIGConfig(PoisonConfig):
    """SIG: ``delta`` Δ = 20 (on the 0–255 scale), ``frequency`` f = 6, on 8 % of the target class
    (``budget`` 0.008 of a balanced 10-class set; moth_supplementary.txt §1.3, whose sentence also reads as 8 % of
    the training set, ``budget`` 0.08, the reading Table 8's victim accuracy fits); ``test_delta`` defaults to Δ."""

    budget: float = 0.008
    delta: float = 20.0
    frequency: float = 6.0
    test_delta: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("delta", self.delta, 0.0, 255.0, low_open=True)
        check_float("frequency", self.frequency, 0.0, low_open=True)
        if self.test_delta is not None:
            check_float("test_delta", self.test_delta, 0.0, 255.0, low_open=True)


@register_attack
class SIG(BackdoorAttack):
    """SIG (Barni et al. 2019; ALGORITHMS.md A3), clean-label: ``x' = clip(x + v/255)`` with
    ``v(i, j) = Δ·sin(2π·j·f / W)`` on every row and channel, added to target-class training images."""

    name = "sig"
    config_class = SIGConfig
    clean_label = True
    refused_options = {"seed": "the sig trigger is a fixed sinusoid: nothing is drawn at random"}
    description = "sinusoidal signal on target-class images, clean-label (Barni et al. 2019)"

    def make_params(self, shape, generator):
        c, h, w = shape
        wave = torch.sin(2 * math.pi * torch.arange(w) * self.config.frequency / w) / 255
        return {"wave": wave.expand(c, h, w).clone()}

    def apply_poison(self, x, params, generator):
        return add_clip(x, self.config.delta * params["wave"])

    def apply(self, x, params, generator):
        delta = self.config.test_delta if self.config.test_delta is not None else self.config.delta
        return add_clip(x, delta * params["wave"])


@dataclass(frozen=True)
class RefoolConfig(PoisonConfig):
    """Refool, PyP implementation: ghost offset ``offset`` δ (default ⌊3/32·W⌋), ghost weight ``ghost`` g = 0.5,
    reflection strength ``alpha`` = 1 (pure ghosted image); 500 target-class poisons = ``budget`` 0.01."""

    budget: float = 0.01
    alpha: float = 1.0
    ghost: float = 0.5
    offset: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0, 1.0, low_open=True)
        check_float("ghost", self.ghost, 0.0, 1.0)
        if self.offset is not None:
            check_int("offset", self.offset, 1)


def _shift(x: torch.Tensor, d: int) -> torch.Tensor:
    """Shift images by ``d`` pixels down-right (``d`` > 0) or up-left (``d`` < 0), replicating the border."""
    p = abs(d)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    h, w = x.shape[-2:]
    start = p - d
    return padded[..., start:start + h, start:start + w]


@register_attack
class Refool(BackdoorAttack):
    """Refool (Liu et al. 2020) as implemented in PyP (ALGORITHMS.md A12), clean-label: a ghost reflection of
    the image itself — linearise (x^2.2), ``ghost = g·shift(x, +δ) + (1 − g)·shift(x, −δ)``, blend
    ``((1 − o)·ghost + o·x)^(1/2.2)`` with o = 1 − α — on target-class training images."""

    name = "refool"
    config_class = RefoolConfig
    clean_label = True
    description = "ghost-reflection trigger on target-class images (Liu et al. 2020, PyP variant)"

    def make_params(self, shape, generator):
        _, h, w = shape
        d = self.config.offset if self.config.offset is not None else (3 * w) // 32
        if d == 0:
            d = int(torch.randint(3, 9, (), generator=generator))
        if d >= min(h, w):
            raise ValueError(f"ghost offset {d} must be smaller than the {h}x{w} image")
        return {"offset": torch.tensor(d)}

    def apply(self, x, params, generator):
        d, g, o = int(params["offset"]), self.config.ghost, 1 - self.config.alpha
        lin = x.clamp(0, 1) ** 2.2
        ghost = g * _shift(lin, d) + (1 - g) * _shift(lin, -d)
        return ((1 - o) * ghost + o * lin).clamp(0, 1) ** (1 / 2.2)
