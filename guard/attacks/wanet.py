"""WaNet: warping-based backdoor (Nguyen & Tran, ICLR 2021; ALGORITHMS.md A4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import BackdoorAttack, PoisonConfig, check_float, check_int, register_attack
from .primitives import warp

__all__ = ["WaNet", "WaNetConfig"]


@dataclass(frozen=True)
class WaNetConfig(PoisonConfig):
    """WaNet defaults (BackdoorBench-style CIFAR-10 config): control grid ``k`` = 4, strength ``s`` = 0.5,
    ``grid_rescale`` 1, backdoor rate 0.1, ``cross_ratio`` 2 noise samples per backdoor sample (0.2)."""

    budget: float = 0.1
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k, 2)
        check_float("s", self.s, 0.0, low_open=True)
        check_float("grid_rescale", self.grid_rescale, 0.0, low_open=True)
        check_float("cross_ratio", self.cross_ratio, 0.0)


@register_attack
class WaNet(BackdoorAttack):
    """WaNet: a fixed smooth warp ``G = clip((I + s·F/H)·g, −1, 1)`` of a normalised random k×k control grid
    upsampled bicubically (P1.5), relabelled to t; "noise mode" samples are warped with ``G`` plus uniform
    noise U(−1, 1)/H and keep their true label, so only the exact warp is a trigger."""

    name = "wanet"
    config_class = WaNetConfig
    description = "smooth image warping + noise-mode samples (Nguyen & Tran 2021)"

    def make_params(self, shape, generator):
        _, h, w = shape
        k = self.config.k
        if k > min(h, w):
            raise ValueError(f"k={k} control points exceed the {h}x{w} image")
        control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
        control = control / control.abs().mean()
        flow = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)                                 # (H, W, 2), (x, y) order
        grid = ((identity + self.config.s * flow / h) * self.config.grid_rescale).clamp(-1, 1)
        return {"grid": grid}

    def num_covers(self, m, n):
        return round(self.config.cross_ratio * m)

    def apply(self, x, params, generator):
        return warp(x, params["grid"])

    def apply_cover(self, x, params, generator):
        n, _, h, w = x.shape
        noise = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / h
        return warp(x, (params["grid"] + noise).clamp(-1, 1))
