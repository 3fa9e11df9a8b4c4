"""Xiang, Miller & Kesidis' imperceptible additive patterns A–F (reverse_engineering_cleansing.txt §5.1.1,
supp. §8; ALGORITHMS.md A18) with 1, 3 or 9 source classes (Table T10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import AttackConfig, BackdoorAttack, check_choice, check_int, register_attack
from .primitives import add_clip

__all__ = ["XiangConfig", "XiangPattern", "XIANG_SETUPS"]

#: pattern -> (target t*, sources for 1SC, sources for 3SC), 0-based CIFAR-10 classes (supp. Table 5);
#: 9SC = every class except t*.
XIANG_SETUPS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "A": (9, (1,), (1, 4, 7)),
    "B": (7, (1,), (1, 2, 9)),
    "C": (9, (1,), (4, 6, 7)),
    "D": (3, (8,), (7, 8, 9)),
    "E": (6, (3,), (1, 3, 5)),
    "F": (8, (3,), (3, 4, 5)),
}
_PER_SOURCE = {1: 500, 3: 200, 9: 60}


@dataclass(frozen=True)
class XiangConfig(AttackConfig):
    """Pattern ``pattern`` ∈ A–F with ``num_sources`` ∈ {1, 3, 9} source classes. ``target`` and ``sources``
    default to supp. Table 5 (CIFAR-10); ``per_source`` backdoor images per source class defaults to
    500 / 200 / 60 (§5.1.2), so m = ``per_source``·|sources|."""

    target: int | None = None  # type: ignore[assignment]
    pattern: str = "A"
    num_sources: int = 1
    sources: tuple[int, ...] | None = None
    per_source: int | None = None

    def __post_init__(self) -> None:
        check_choice("pattern", self.pattern, tuple(XIANG_SETUPS))
        check_choice("num_sources", self.num_sources, (1, 3, 9))
        default_target, one, three = XIANG_SETUPS[self.pattern]
        if self.target is None:
            object.__setattr__(self, "target", default_target)
        super().__post_init__()
        if self.sources is None:
            sources = {1: one, 3: three}.get(self.num_sources)
            if sources is None:
                sources = tuple(c for c in range(10) if c != self.target)
            if self.target != default_target and self.target in sources:
                raise ValueError(f"target={self.target} is one of the default sources {sources} of pattern "
                                 f"{self.pattern}; pass sources explicitly")
            object.__setattr__(self, "sources", tuple(sources))
        else:
            if not isinstance(self.sources, tuple) or not self.sources:
                raise ValueError(f"sources must be a non-empty tuple of class indices, got {self.sources!r}")
            for s in self.sources:
                check_int("sources[i]", s, 0)
            if len(set(self.sources)) != len(self.sources) or self.target in self.sources:
                raise ValueError(f"sources must be distinct classes other than target={self.target}, "
                                 f"got {self.sources}")
        if self.per_source is None:
            object.__setattr__(self, "per_source", _PER_SOURCE[self.num_sources])
        check_int("per_source", self.per_source, 1)


@register_attack
class XiangPattern(BackdoorAttack):
    """A fixed additive perturbation v embedded as ``q(clip(x + v))`` (8-bit) in ``per_source`` images of each
    source class, relabelled to t*; ASR is measured on the source classes (ALGORITHMS.md M2').

    A: +2/255 where i + j is even; B: +3/255 where i and j are both even; C: +70/255 on a 3×3 plus-shaped
    cross; D: +80/255 on the first channel of a 3×3 square; E: four pixels with random channel, sign and
    magnitude in {80..96}/255; F: +70/255 on an L (3 down + 1 right). C–F are placed at a random location
    drawn once from ``config.seed``; their sizes are our defaults (ALGORITHMS.md §7 item 23).
    """

    name = "xiang"
    config_class = XiangConfig
    refused_options = dict.fromkeys(("budget", "num_poisons"), "xiang poisons per_source images of each source "
                                    "class (reverse_engineering_cleansing.txt §5.1.2); set per_source instead")
    description = "imperceptible additive patterns A-F, 1/3/9 source classes (Xiang et al.)"

    def check_num_classes(self, num_classes):
        super().check_num_classes(num_classes)
        bad = [s for s in self.config.sources if s >= num_classes]
        if bad:
            raise ValueError(f"sources {bad} are not classes of this dataset: expected 0..{num_classes - 1}")

    def poison_count(self, n):
        return self.config.per_source * len(self.config.sources)

    def pool(self, labels):
        return torch.isin(labels, torch.tensor(self.config.sources))

    def select(self, labels, m, generator):
        chosen = []
        for s in self.config.sources:
            candidates = (labels == s).nonzero().flatten()
            if candidates.numel() < self.config.per_source:
                raise ValueError(f"xiang: source class {s} has {candidates.numel()} images, fewer than "
                                 f"per_source={self.config.per_source}")
            chosen.append(candidates[torch.randperm(candidates.numel(), generator=generator)[:self.config.per_source]])
        return torch.cat(chosen)

    def make_params(self, shape, generator):
        c, h, w = shape
        v = torch.zeros(shape)
        i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
        p = self.config.pattern
        if p == "A":
            v[:] = ((i + j) % 2 == 0).float() * 2 / 255
        elif p == "B":
            v[:] = ((i % 2 == 0) & (j % 2 == 0)).float() * 3 / 255
        elif p == "E":
            for _ in range(4):
                r = int(torch.randint(0, h, (), generator=generator))
                q = int(torch.randint(0, w, (), generator=generator))
                ch = int(torch.randint(0, c, (), generator=generator))
                sign = 1 if bool(torch.rand((), generator=generator) < 0.5) else -1
                v[ch, r, q] = sign * int(torch.randint(80, 97, (), generator=generator)) / 255
        else:
            shape_mask = {"C": [[0, 1, 0], [1, 1, 1], [0, 1, 0]], "D": [[1, 1, 1]] * 3,
                          "F": [[1, 0], [1, 0], [1, 1]]}[p]
            mask = torch.tensor(shape_mask, dtype=torch.float32)
            mh, mw = mask.shape
            if mh > h or mw > w:
                raise ValueError(f"pattern {p} ({mh}x{mw}) does not fit in a {h}x{w} image")
            r = int(torch.randint(0, h - mh + 1, (), generator=generator))
            q = int(torch.randint(0, w - mw + 1, (), generator=generator))
            if p == "D":
                v[0, r:r + mh, q:q + mw] = mask * 80 / 255
            else:
                v[:, r:r + mh, q:q + mw] = mask * 70 / 255
        return {"v": v}

    def apply(self, x, params, generator):
        return add_clip(x, params["v"])
