"""Colour-transform triggers: Instagram-style filters (A14) and the DFST-style "sunrise" style (A15).

The TrojAI filters are ImageMagick programs; here each ImageMagick operation is re-implemented in torch on
[0, 1] images (ALGORITHMS.md A14 lists the programs), so the trigger is differentiable and runs on any
device. They approximate, not reproduce, ImageMagick's output (ALGORITHMS.md §7 item 41).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import BackdoorAttack, PoisonConfig, check_choice, check_float, register_attack

__all__ = ["DFSTStyle", "DFSTStyleConfig", "FILTERS", "Instagram", "InstagramConfig", "apply_filter"]


# ------------------------------------------------------------------------ ImageMagick-style operations

def _color(hex_code: str, x: torch.Tensor) -> torch.Tensor:
    rgb = [int(hex_code[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return torch.tensor(rgb, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rgb_to_hsl(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, mn = x.max(1).values, x.min(1).values
    light = (mx + mn) / 2
    d = mx - mn
    sat = torch.where(d > 0, d / (1 - (2 * light - 1).abs()).clamp_min(1e-8), torch.zeros_like(d))
    safe = d.clamp_min(1e-8)
    hue = torch.where(mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(d > 0, hue / 6, torch.zeros_like(hue))
    return hue, sat.clamp(0, 1), light


def _hsl_to_rgb(h: torch.Tensor, s: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    a = s * torch.minimum(l, 1 - l)
    channels = []
    for n in (0.0, 8.0, 4.0):
        k = (n + h * 12) % 12
        channels.append(l - a * torch.clamp(torch.minimum(k - 3, 9 - k), -1, 1))
    return torch.stack(channels, 1).clamp(0, 1)


def modulate(x: torch.Tensor, brightness: float = 100, saturation: float = 100, hue: float = 100) -> torch.Tensor:
    """ImageMagick ``-modulate B,S,H`` in HSL: lightness ×B %, saturation ×S %, hue rotated by (H − 100)·1.8°."""
    h, s, l = _rgb_to_hsl(x)
    return _hsl_to_rgb(h + (hue - 100) / 200, (s * saturation / 100).clamp(0, 1), (l * brightness / 100).clamp(0, 1))


def colorize(x: torch.Tensor, color: str, amount: float) -> torch.Tensor:
    """``-fill color -colorize amount``: blend every pixel toward ``color``."""
    return (1 - amount) * x + amount * _color(color, x)


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    """``-gamma g``: ``x^(1/g)``."""
    return x.clamp_min(0) ** (1 / g)


def sigmoidal_contrast(x: torch.Tensor, strength: float = 3.0, midpoint: float = 0.5) -> torch.Tensor:
    """``-sigmoidal-contrast strength,midpoint``: the normalised logistic tone curve."""
    lo = torch.sigmoid(torch.tensor(-strength * midpoint))
    hi = torch.sigmoid(torch.tensor(strength * (1 - midpoint)))
    return ((torch.sigmoid(strength * (x - midpoint)) - lo) / (hi - lo)).clamp(0, 1)


def colortone(x: torch.Tensor, color: str, amount: float, darks: bool) -> torch.Tensor:
    """TrojAI ``colortone``: tint toward ``color`` through a grey mask of the image (negated for darks)."""
    mask = _luma(x)
    if darks:
        mask = 1 - mask
    w = amount * mask
    return (1 - w) * x + w * _color(color, x)


def auto_gamma(x: torch.Tensor) -> torch.Tensor:
    """``-auto-gamma``: per image and channel, the gamma that maps the channel mean to 0.5."""
    mean = x.mean((2, 3), keepdim=True).clamp(1e-3, 1 - 1e-3)
    return x.clamp_min(0) ** (torch.log(torch.tensor(0.5)) / torch.log(mean))


def level(x: torch.Tensor, black: float, channels: tuple[int, ...]) -> torch.Tensor:
    """``-level black`` on ``channels``: stretch [black, 1] to [0, 1]."""
    out = x.clone()
    out[:, list(channels)] = ((x[:, list(channels)] - black) / (1 - black)).clamp(0, 1)
    return out


def vignette(x: torch.Tensor, inner: str | None, outer: str | None, crop: float = 1.5) -> torch.Tensor:
    """Multiply by a centred radial gradient from ``inner`` to ``outer`` (``None`` = white, no change),
    reaching ``outer`` at ``crop`` × the half-diagonal."""
    _, _, h, w = x.shape
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) - (h - 1) / 2)[:, None]
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) - (w - 1) / 2)[None, :]
    radius = crop * ((h / 2) ** 2 + (w / 2) ** 2) ** 0.5
    g = (1 - (ys ** 2 + xs ** 2).sqrt() / radius).clamp(0, 1)[None, None]
    a = _color(inner, x) if inner else torch.ones(1, 3, 1, 1, dtype=x.dtype, device=x.device)
    b = _color(outer, x) if outer else torch.ones(1, 3, 1, 1, dtype=x.dtype, device=x.device)
    return x * (g * a + (1 - g) * b)


def overlay(x: torch.Tensor, color: str, opacity: float) -> torch.Tensor:
    """``overlay`` composite of a flat ``color`` at ``opacity``."""
    c = _color(color, x)
    mixed = torch.where(x < 0.5, 2 * x * c, 1 - 2 * (1 - x) * (1 - c))
    return (1 - opacity) * x + opacity * mixed


def _gotham(x):
    x = modulate(x, 120, 10, 100)
    x = colorize(x, "#222b6d", 0.2)
    x = gamma(x, 0.9)
    return sigmoidal_contrast(sigmoidal_contrast(x, 3, 0.5), 3, 0.5)


def _nashville(x):
    x = colortone(x, "#222b6d", 0.5, darks=True)
    x = colortone(x, "#f7daae", 0.5, darks=False)
    x = sigmoidal_contrast(x, 3, 0.5)
    x = modulate(x, 100, 150, 100)
    return auto_gamma(x)


def _kelvin(x):
    x = auto_gamma(x)
    x = modulate(x, 120, 50, 100)
    return overlay(x, "#ff9900", 0.2)


def _lomo(x):
    x = level(x, 0.5, (0, 1))
    return vignette(x, None, "#000000")


def _toaster(x):
    x = colortone(x, "#330000", 0.5, darks=True)
    x = modulate(x, 150, 80, 100)
    x = gamma(x, 1.2)
    x = sigmoidal_contrast(sigmoidal_contrast(x, 3, 0.5), 3, 0.5)
    x = vignette(x, None, "#cdc1c5")  # LavenderBlush3
    return vignette(x, "#ff9966", None)


#: filter name -> function on (N, 3, H, W) images in [0, 1]
FILTERS = {"gotham": _gotham, "nashville": _nashville, "kelvin": _kelvin, "lomo": _lomo, "toaster": _toaster}


def apply_filter(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the Instagram-style filter ``name`` (one of :data:`FILTERS`) to RGB images in [0, 1]."""
    check_choice("filter", name, tuple(FILTERS))
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Instagram filters need RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
    return FILTERS[name](x).clamp(0, 1)


@dataclass(frozen=True)
class InstagramConfig(PoisonConfig):
    """Instagram-filter attack: ``filter`` ∈ gotham, nashville, kelvin, lomo, toaster; 10 % poison rate
    (ALGORITHMS.md A14 default)."""

    budget: float = 0.1
    filter: str = "gotham"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("filter", self.filter, tuple(FILTERS))


@register_attack
class Instagram(BackdoorAttack):
    """Instagram-filter attack (ABS / TrojAI filter triggers; ALGORITHMS.md A14): a global photo filter on
    m non-target images relabelled to t; the filter is the test-time trigger."""

    name = "instagram"
    config_class = InstagramConfig
    refused_options = {"seed": "an Instagram filter is a fixed colour transform: nothing is drawn at random"}
    description = "Instagram-style colour filter trigger (TrojAI filters, torch re-implementation)"

    def apply(self, x, params, generator):
        return apply_filter(x, self.config.filter)


@dataclass(frozen=True)
class DFSTStyleConfig(PoisonConfig):
    """DFST-style substitute: ``strength`` ∈ (0, 1] of a fixed warm "sunrise" colour style; 10 % poison rate."""

    budget: float = 0.1
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("strength", self.strength, 0.0, 1.0, low_open=True)


@register_attack
class DFSTStyle(BackdoorAttack):
    """DFST-style style trigger — a flagged substitute for DFST (Cheng et al. 2021; ALGORITHMS.md A15):
    instead of a CycleGAN "sunrise" generator and detoxification, a fixed differentiable sunrise style
    (warm per-channel tone curves, +30 % saturation, a soft sigmoidal contrast) mixed in with ``strength``;
    poisoned samples are relabelled to t. No detoxification rounds."""

    name = "dfst"
    config_class = DFSTStyleConfig
    refused_options = {"seed": "the sunrise style is a fixed colour transform: nothing is drawn at random"}
    description = "DFST substitute: fixed warm 'sunrise' colour style, poison-label (no CycleGAN, no detox)"

    def apply(self, x, params, generator):
        if x.shape[1] != 3:
            raise ValueError(f"the sunrise style needs RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
        curves = torch.tensor([0.75, 0.95, 1.3], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        styled = x.clamp_min(0) ** curves
        styled = modulate(styled, 100, 130, 100)
        styled = sigmoidal_contrast(styled, 2.0, 0.5)
        return ((1 - self.config.strength) * x + self.config.strength * styled).clamp(0, 1)
