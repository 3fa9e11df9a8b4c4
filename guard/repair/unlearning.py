"""Neural Cleanse unlearning (Wang et al., S&P 2019; ALGORITHMS.md D4 "Mitigation by unlearning"), registered
as the defense ``nc``.

The detector ``nc`` (:class:`guard.detect.NeuralCleanse`) reverse-engineers a trigger per label; this repair
fine-tunes a copy of the model on the trusted images, a share of which carry the smallest (or the flagged)
reversed trigger with their *true* labels, so the model unlearns the trigger — through the shared protocol
:func:`guard.repair.trusted_finetune` (CDA budget, (CDA, ASR) records).

Example::

    result = create_defense("nc", steps=1000).defend(model, trusted, eval_set=heldout,
                                                     generator=torch.Generator().manual_seed(0))
    result.model, result.details["scan"]["flagged_class"], result.details["unlearned_class"]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..detect.neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from ..models import GuardModel
from ..train import TrainConfig
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import trusted_finetune

logger = logging.getLogger(__name__)

__all__ = ["NeuralCleanseUnlearning", "UnlearningConfig"]


@dataclass(frozen=True)
class UnlearningConfig:
    """``scan``: the Neural Cleanse reverse engineering (:class:`~guard.detect.NeuralCleanseConfig`);
    ``fraction`` 0.2 of the trusted images stamped with the reversed trigger, true labels kept (ALGORITHMS.md
    D4, §7 item 29); ``steps`` 1000 steps of SGD (momentum 0.9) at ``lr`` 0.001 with ``batch_size`` 128
    (Table 5's NC column), (CDA, ASR) every ``eval_every`` steps, stop at CDA_0 − ``max_cda_drop``;
    ``augment``: random crop + flip (ALGORITHMS.md §7 item 9)."""

    scan: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    fraction: float = 0.2
    steps: int = 1000
    lr: float = 0.001
    batch_size: int = 128
    eval_every: int = 50
    max_cda_drop: float = 0.02
    augment: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.scan, NeuralCleanseConfig):
            raise TypeError(f"scan must be a NeuralCleanseConfig, got {type(self.scan).__name__}")
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.steps % self.eval_every:
            raise ValueError(f"steps must be a multiple of eval_every, got steps={self.steps}, "
                             f"eval_every={self.eval_every}")
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.max_cda_drop) or not 0 <= self.max_cda_drop < 1:
            raise ValueError(f"max_cda_drop must be a fraction in [0, 1), got {self.max_cda_drop!r}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be a bool, got {type(self.augment).__name__}")

    def train_config(self) -> TrainConfig:
        return TrainConfig.trusted_steps(self.steps, self.eval_every, lr=self.lr, batch_size=self.batch_size,
                                         augment=self.augment)


@register_defense
class NeuralCleanseUnlearning(Defense):
    """Scan with Neural Cleanse, then unlearn the flagged label's reversed trigger (the smallest one when no
    label is flagged). ``details``: the scan report and the unlearned class."""

    name = "nc"
    config_class = UnlearningConfig
    kind = "repair"
    description = "Neural Cleanse unlearning: fine-tune with the reversed trigger stamped on true-labelled images (D4)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        scan = NeuralCleanse(cfg.scan).scan(model, trusted, eval_set, generator=generator, device=device,
                                            progress=progress)
        norms = {int(c): n for c, n in scan.report.details["l1_norms"].items() if n is not None}
        if not norms:
            raise ValueError("the scan reversed no trigger (no label reached the ASR threshold); nothing to "
                             "unlearn — raise the scan's steps")
        c = scan.report.flagged_class if scan.report.flagged_class is not None else min(norms, key=norms.get)
        n = len(trusted)
        stamped = torch.randperm(n, generator=generator)[:max(1, round(cfg.fraction * n))]
        images = trusted.images.clone()
        x = scan.stamp(images[stamped].float().div(255), c)
        images[stamped] = (x * 255).round().clamp(0, 255).to(torch.uint8)
        logger.info("NC unlearning with the reversed trigger of class %d on %d of %d trusted images",
                    c, stamped.numel(), n)
        result = trusted_finetune(model, ImageTensorDataset(images, trusted.labels.clone(), trusted.classes),
                                  cfg.train_config(), eval_set=eval_set, eval_every=cfg.eval_every,
                                  max_cda_drop=cfg.max_cda_drop, asr=asr, generator=generator, device=device,
                                  progress=progress)
        details = {"scan": scan.report.to_dict(), "unlearned_class": c,
                   "unlearned_l1": norms[c] if math.isfinite(norms[c]) else None}
        return RepairResult(result.model, result.history, result.chosen, result.cda0, result.max_cda_drop,
                            result.stopped_early, result.seconds, details=details)
