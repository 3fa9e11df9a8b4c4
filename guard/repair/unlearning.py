"""Neural Cleanse unlearning (Wang et al., S&P 2019; ALGORITHMS.md D4 "Mitigation by unlearning"), registered
as the defense ``nc``, and the variant Pick your Poison compares against (its Algorithm 6), ``nc-pyp``.

The detector ``nc`` (:class:`guard.detect.NeuralCleanse`) reverse-engineers a trigger per label; this repair
fine-tunes a copy of the model on the trusted images, a share of which carry the smallest (or the flagged)
reversed trigger with their *true* labels, so the model unlearns the trigger — through the shared protocol
:func:`guard.repair.trusted_finetune` (CDA budget, (CDA, ASR) records).

Example::

    result = create_defense("nc", steps=1000).defend(model, trusted, eval_set=heldout,
                                                     generator=torch.Generator().manual_seed(0))
    result.model, result.details["scan"]["flagged_class"], result.details["unlearned_class"]

``nc-pyp`` reverses a mask-free additive trigger per class through the one inversion engine
(:func:`guard.detect.inversion.invert`, :class:`~guard.detect.inversion.TargetCrossEntropy` with the L1 term of
each image's change) and unlearns the smallest one, stamped on every other batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..detect.inversion import (AdditiveTrigger, FixedSteps, InversionConfig, TargetCrossEntropy, class_tasks,
                                invert)
from ..detect.neural_cleanse import NeuralCleanse, NeuralCleanseConfig
from ..models import GuardModel
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig

logger = logging.getLogger(__name__)

__all__ = ["NeuralCleanseUnlearning", "PypUnlearning", "PypUnlearningConfig", "UnlearningConfig"]


@dataclass(frozen=True)
class UnlearningConfig(TrustedTuningConfig):
    """``scan``: the Neural Cleanse reverse engineering (:class:`~guard.detect.NeuralCleanseConfig`);
    ``fraction`` 0.2 of the trusted images stamped with the reversed trigger, true labels kept (ALGORITHMS.md
    D4, §7 item 29); 1000 steps of SGD (momentum 0.9, no Nesterov) at lr 0.001 with batches of 128 (Table 5's
    NC column) — the loop's settings: :class:`~guard.repair.TrustedTuningConfig`."""

    nesterov: bool = False
    scan: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.scan, NeuralCleanseConfig):
            raise TypeError(f"scan must be a NeuralCleanseConfig, got {type(self.scan).__name__}")
        if not is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")


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
        result = cfg.run(model, ImageTensorDataset(images, trusted.labels.clone(), trusted.classes),
                         eval_set=eval_set, asr=asr, generator=generator, device=device, progress=progress)
        details = {"scan": scan.report.to_dict(), "unlearned_class": c,
                   "unlearned_l1": norms[c] if math.isfinite(norms[c]) else None}
        return dataclasses.replace(result, details=details)


# ------------------------------------------------------------------------------- Pick your Poison's NC repair

@dataclass(frozen=True)
class PypUnlearningConfig(TrustedTuningConfig):
    """Neural Cleanse as Pick your Poison runs it (pick_your_poison.txt Algorithm 6, Table 5's CIFAR-10 column;
    ALGORITHMS.md D4 "PyP variant"): per class an additive, mask-free trigger initialised U(−0.005, 0.005),
    ``inversion_steps`` N1 = 100 Adam steps (``inversion_lr`` 0.01, betas (0.5, 0.9)) of batches of
    ``batch_size`` trusted images not of that class (random horizontal flip) on ``CE(f(clip(x + T)), c) +
    l1_weight · ‖clip(x + T) − x‖₁`` (λ_N = 0.02); then 1,000 repair steps of SGD at lr 1e-3, alternating
    clean batches and batches stamped with the smallest-norm trigger (true labels kept)."""

    inversion_steps: int = 100
    inversion_lr: float = 0.01
    l1_weight: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.inversion_steps) or self.inversion_steps < 1:
            raise ValueError(f"inversion_steps must be an int >= 1, got {self.inversion_steps!r}")
        if not is_number(self.inversion_lr) or self.inversion_lr <= 0:
            raise ValueError(f"inversion_lr must be a finite number > 0, got {self.inversion_lr!r}")
        if not is_number(self.l1_weight) or self.l1_weight < 0:
            raise ValueError(f"l1_weight must be a finite number >= 0, got {self.l1_weight!r}")

    def inversion(self) -> InversionConfig:
        return InversionConfig(AdditiveTrigger(init_low=-0.005, init_high=0.005, norm="l1"), FixedSteps(),
                               steps=self.inversion_steps, batch_size=self.batch_size, sampling="random",
                               flip=True, optimizer="adam", lr=self.inversion_lr, betas=(0.5, 0.9))


@register_defense
class PypUnlearning(Defense):
    """Reverse an additive trigger per class, then unlearn the smallest one on alternate batches
    (pick_your_poison.txt Algorithm 6). ``details``: every class's trigger L1 norm, the unlearned class."""

    name = "nc-pyp"
    config_class = PypUnlearningConfig
    kind = "repair"
    needs_all_classes = True
    description = ("Neural Cleanse as Pick your Poison runs it: additive triggers, unlearning on alternate batches "
                   "(Alg. 6)")

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        classes = list(range(model.num_classes))
        tasks = class_tasks(trusted.images, trusted.labels, classes, generator=generator)
        inverted = invert(tasks, TargetCrossEntropy(model, l1_weight=cfg.l1_weight), cfg.inversion(),
                          device=device, progress=progress)
        norms = inverted.size.tolist()
        c = int(torch.argmin(inverted.size))
        delta = inverted.triggers[c]["delta"].to(device)
        logger.info("NC (PyP): smallest trigger to class %d (L1 %.1f); unlearning it on alternate batches", c,
                    norms[c])
        batches = 0

        def alternate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal batches
            batches += 1
            return x if batches % 2 else (x + delta.to(x.dtype)).clamp(0, 1)

        result = cfg.run(model, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                         progress=progress, transform=alternate)
        details = {"l1_norms": dict(zip(classes, norms)), "unlearned_class": c,
                   "success": dict(zip(classes, inverted.success.tolist()))}
        return dataclasses.replace(result, details=details)
