"""Patch-trigger backdoors: BadNets and C-BadNets (A1), Adaptive-Patch (A6), Trigger Scattering (A16)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (AttackConfig, BackdoorAttack, PoisonConfig, Trigger, check_choice, check_float, check_int,
                   check_location, register_attack)
from .primitives import checkerboard, patch_box, random_pattern, stamp

__all__ = ["AdaptivePatch", "AdaptivePatchConfig", "BadNets", "BadNetsConfig", "CleanLabelBadNets", "PatchConfig",
           "PatchTrigger", "TSB", "TSBConfig"]

_PATTERNS = ("checkerboard", "random")


@dataclass(frozen=True)
class PatchConfig(AttackConfig):
    """An opaque ``patch_size``² patch at ``location``. ``pattern``: a 0/1 checkerboard (ANP/NAD) or a seeded
    random RGB patch (the substitute for PyP's apple asset, ALGORITHMS.md A20)."""

    patch_size: int = 3
    location: str | tuple[int, int] = "bottom-right"
    pattern: str = "checkerboard"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("patch_size", self.patch_size, 1)
        check_location("location", self.location)
        check_choice("pattern", self.pattern, _PATTERNS)


@dataclass(frozen=True)
class BadNetsConfig(PatchConfig, PoisonConfig):
    """BadNets: the patch of :class:`PatchConfig`; m = 50 on CIFAR-10 (pick_your_poison.txt Table 2) is
    ``budget=0.001``."""

    budget: float = 0.001


def _patch(pattern: str, size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    return checkerboard(size, channels) if pattern == "checkerboard" else random_pattern((channels, size, size),
                                                                                          generator)


class PatchTrigger(Trigger):
    """The BadNets trigger (P1.1, a = 1) for any attack with a :class:`PatchConfig`: the patch stamped at its
    location."""

    def make_params(self, shape, generator):
        c, h, w = shape
        s = self.config.patch_size
        r, col = patch_box((h, w), (s, s), self.config.location)
        return {"patch": _patch(self.config.pattern, s, c, generator), "row": torch.tensor(r),
                "col": torch.tensor(col)}

    def apply(self, x, params, generator):
        return stamp(x, params["patch"], params["row"], params["col"])


@register_attack
class BadNets(PatchTrigger, BackdoorAttack):
    """BadNets (Gu et al. 2017; ALGORITHMS.md A1): stamp a patch (P1.1, a = 1) on m non-target training
    images and relabel them to t; at test time the same patch is the trigger."""

    name = "badnets"
    config_class = BadNetsConfig
    description = "patch trigger, poison-label (Gu et al. 2017)"


@register_attack
class CleanLabelBadNets(BadNets):
    """C-BadNets (pick_your_poison.txt §5.4.1): the BadNets patch stamped on target-class images only,
    labels unchanged."""

    name = "c-badnets"
    clean_label = True
    description = "patch trigger on target-class images, labels unchanged (PyP C-BadNets)"


@dataclass(frozen=True)
class AdaptivePatchConfig(BadNetsConfig):
    """Adaptive-Patch, PyP variant (ALGORITHMS.md A6): the BadNets patch split into ``grid``×``grid`` squares,
    each occluded with probability ``mask_rate`` at poisoning time only; a ``conservatism`` fraction of the
    trigger-carrying samples keep their true label (regularisation samples). ``budget`` counts the
    relabelled (payload) samples."""

    pattern: str = "random"
    patch_size: int = 3
    grid: int = 2
    mask_rate: float = 0.5
    conservatism: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("grid", self.grid, 1)
        if self.grid > self.patch_size:
            raise ValueError(f"grid={self.grid} must not exceed patch_size={self.patch_size}")
        check_float("mask_rate", self.mask_rate, 0.0, 1.0)
        check_float("conservatism", self.conservatism, 0.0, 1.0)
        if self.conservatism == 1.0:
            raise ValueError("conservatism must be < 1 (1 leaves no relabelled payload samples)")


def _cover_count(m: int, conservatism: float) -> int:
    """Covers so that covers / (covers + m) = conservatism."""
    return round(m * conservatism / (1 - conservatism))


def _grid_cells(h: int, w: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell row/col index of every pixel of an ``h``×``w`` area split into ``grid``×``grid`` squares."""
    return (torch.arange(h) * grid // h), (torch.arange(w) * grid // w)


def _occlusion_masks(n: int, h: int, w: int, grid: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(n, h, w) masks: each of the grid×grid squares kept (1) or occluded (0) with probability ``rate``."""
    keep = (torch.rand(n, grid, grid, generator=generator) >= rate).float()
    rows, cols = _grid_cells(h, w, grid)
    return keep[:, rows][:, :, cols]


@register_attack
class AdaptivePatch(BadNets):
    """Adaptive-Patch (Qi et al., ICLR 2023; pick_your_poison.txt A.2): randomly occluded patch at poisoning
    time, full patch at test time, plus label-keeping regularisation samples."""

    name = "adaptive-patch"
    config_class = AdaptivePatchConfig
    description = "occluded patch + regularisation samples (Qi et al. 2023)"

    def num_covers(self, m, n):
        return _cover_count(m, self.config.conservatism)

    def apply_poison(self, x, params, generator):
        s = self.config.patch_size
        mask = _occlusion_masks(x.shape[0], s, s, self.config.grid, self.config.mask_rate, generator)
        return stamp(x, params["patch"], params["row"], params["col"], mask=mask)


@dataclass(frozen=True)
class TSBConfig(PoisonConfig):
    """TSB (pick_your_poison.txt Alg. 7): ``num_triggers`` k = 8 uniform-noise patches of ``patch_size``²;
    m = 1000 on CIFAR-10 is ``budget=0.02``."""

    budget: float = 0.02
    num_triggers: int = 8
    patch_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_triggers", self.num_triggers, 1)
        check_int("patch_size", self.patch_size, 1)


@register_attack
class TSB(BackdoorAttack):
    """Trigger-Scattering Backdoor (pick_your_poison.txt Alg. 7; ALGORITHMS.md A16): each poison carries
    one of k secret triggers at a uniformly random place; the test-time trigger pastes all k, each at a
    random place."""

    name = "tsb"
    config_class = TSBConfig
    description = "k scattered noise triggers (PyP Alg. 7)"

    def make_params(self, shape, generator):
        c, h, w = shape
        s = self.config.patch_size
        patch_box((h, w), (s, s), "top-left")  # fails clearly when the patch does not fit
        return {"patches": random_pattern((self.config.num_triggers, c, s, s), generator)}

    def _stamp_random(self, x, patch, generator):
        n, _, h, w = x.shape
        s = self.config.patch_size
        rows = torch.randint(0, h - s + 1, (n,), generator=generator)
        cols = torch.randint(0, w - s + 1, (n,), generator=generator)
        return stamp(x, patch, rows, cols)

    def apply_poison(self, x, params, generator):
        which = torch.randint(0, self.config.num_triggers, (x.shape[0],), generator=generator)
        out = x
        for k in range(self.config.num_triggers):
            chosen = (which == k).nonzero().flatten()
            if chosen.numel():
                out = out.clone() if out is x else out
                out[chosen] = self._stamp_random(out[chosen], params["patches"][k], generator)
        return out

    def apply(self, x, params, generator):
        for patch in params["patches"]:
            x = self._stamp_random(x, patch, generator)
        return x
