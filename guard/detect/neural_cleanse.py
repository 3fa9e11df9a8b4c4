"""Neural Cleanse (Wang et al., S&P 2019): trigger reverse-engineering, MAD outlier test, unlearning.

ALGORITHMS.md D4 (original formulation), with the primitives P1.2 (mask–pattern blend), P2 (tanh
re-parameterisation) and P3 (dynamic cost schedule). For every candidate label c the smallest mask m (and a
pattern Δ) that sends clean images to c is searched:
``min_{m,Δ} E_x CE(f((1−m)⊙x + m⊙Δ), c) + λ·‖m‖_1``. A backdoor target needs a much smaller mask than the
other labels, which the median-absolute-deviation test picks out (anomaly index > 2 on the small side).
Repair (:meth:`NeuralCleanse.repair`) fine-tunes on trusted data where a share of the images carry the
reversed trigger with their *true* labels (unlearning), through :func:`guard.repair.trusted_finetune`.

Example::

    nc = NeuralCleanse(NeuralCleanseConfig(steps=50))
    scan = nc.scan(model, trusted, generator=torch.Generator().manual_seed(0))
    scan.report.flagged_class, scan.l1_norms
    repaired = nc.repair(model, trusted, scan, eval_set=heldout).model
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..repair import AsrProbe, RepairResult, trusted_finetune
from ..train import TrainConfig
from ._checks import check_dataset, check_scan_inputs
from .inversion import (CostSchedule, InversionConfig, MaskPatternTrigger, TargetCrossEntropy, apply_mask_pattern,
                        class_tasks, invert)
from .report import ScanReport

logger = logging.getLogger(__name__)

__all__ = ["MADResult", "NCResult", "NeuralCleanse", "NeuralCleanseConfig", "mad_anomaly_index"]

#: consistency constant of the MAD for a normal population
MAD_CONSTANT = 1.4826


@dataclass(frozen=True)
class MADResult:
    """Per-label anomaly indices ``|L_c − med| / MAD``, the labels flagged (``L_c < med`` and index >
    ``threshold``) and the model's index ``|min L − med| / MAD`` (NC-code ``mad_outlier_detection.py``)."""

    indices: tuple[float, ...]
    flagged: tuple[int, ...]
    model_index: float
    median: float
    mad: float


def mad_anomaly_index(l1_norms, threshold: float = 2.0) -> MADResult:
    """The MAD outlier test of Neural Cleanse on per-label trigger L1 norms (ALGORITHMS.md D4 Detection)."""
    norms = torch.as_tensor(l1_norms, dtype=torch.float64).flatten()
    if norms.numel() < 3:
        raise ValueError(f"the MAD test needs the norms of at least 3 labels, got {norms.numel()}")
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"l1_norms must be finite, got {norms.tolist()}")
    median = norms.quantile(0.5).item()  # numpy's median: the mean of the middle two for an even count
    mad = MAD_CONSTANT * (norms - median).abs().quantile(0.5).item()
    if mad == 0:
        mad = torch.finfo(torch.float64).eps
    indices = ((norms - median).abs() / mad).tolist()
    flagged = tuple(i for i, (n, a) in enumerate(zip(norms.tolist(), indices)) if n < median and a > threshold)
    return MADResult(tuple(indices), flagged, abs(norms.min().item() - median) / mad, median, mad)


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """NC hyper-parameters (ALGORITHMS.md D4; NC-code GTSRB example).

    Reverse engineering: Adam (``lr`` 0.1, betas (0.5, 0.9)), ``batch_size`` 32; one step = one pass over
    ``samples_per_step`` trusted images (1000, or the whole trusted set when smaller); at most ``steps``
    steps per label; ``init_cost`` 1e-3; ASR threshold ``attack_threshold`` 0.99; cost schedule with
    ``patience`` 5 and ``cost_multiplier`` 2 (down by its 1.5 power); early stop after
    ``early_stop_patience`` (default 5·patience) steps without a smaller best mask once the cost has gone
    both up and down. ``anomaly_threshold`` 2 for the MAD test.

    Unlearning: ``unlearn_fraction`` 0.2 of the trusted images stamped with the reversed trigger, true
    labels kept (ALGORITHMS.md D4, §7 item 29); ``unlearn_steps`` 1000 steps of SGD at ``unlearn_lr`` 0.001
    with batch 128 (Table 5's NC column), (CDA, ASR) every ``eval_every`` steps, stop at CDA_0 − Δ;
    ``augment``: random crop + flip during unlearning (ALGORITHMS.md §7 item 9).
    """

    steps: int = 1000
    samples_per_step: int = 1000
    batch_size: int = 32
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    attack_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop_patience: int | None = None
    anomaly_threshold: float = 2.0
    classes: tuple[int, ...] | None = None
    unlearn_fraction: float = 0.2
    unlearn_steps: int = 1000
    unlearn_lr: float = 0.001
    unlearn_batch_size: int = 128
    eval_every: int = 50
    max_cda_drop: float = 0.02
    augment: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "samples_per_step", "batch_size", "patience", "unlearn_steps",
                     "unlearn_batch_size", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.unlearn_steps % self.eval_every:
            raise ValueError(f"unlearn_steps must be a multiple of eval_every, got unlearn_steps="
                             f"{self.unlearn_steps}, eval_every={self.eval_every}")
        if self.early_stop_patience is not None and (not is_int(self.early_stop_patience)
                                                     or self.early_stop_patience < 1):
            raise ValueError(f"early_stop_patience must be None or an int >= 1, got {self.early_stop_patience!r}")
        for name in ("lr", "init_cost", "unlearn_lr"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else self.betas
        if not isinstance(betas, tuple) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        if not is_number(self.attack_threshold) or not 0 < self.attack_threshold <= 1:
            raise ValueError(f"attack_threshold must be in (0, 1], got {self.attack_threshold!r}")
        if not is_number(self.cost_multiplier) or self.cost_multiplier <= 1:
            raise ValueError(f"cost_multiplier must be a number > 1, got {self.cost_multiplier!r}")
        if not is_number(self.anomaly_threshold) or self.anomaly_threshold <= 0:
            raise ValueError(f"anomaly_threshold must be a number > 0, got {self.anomaly_threshold!r}")
        if not is_number(self.unlearn_fraction) or not 0 < self.unlearn_fraction <= 1:
            raise ValueError(f"unlearn_fraction must be in (0, 1], got {self.unlearn_fraction!r}")
        if not is_number(self.max_cda_drop) or not 0 <= self.max_cda_drop < 1:
            raise ValueError(f"max_cda_drop must be a fraction in [0, 1), got {self.max_cda_drop!r}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be a bool, got {type(self.augment).__name__}")
        if self.classes is not None:
            if isinstance(self.classes, (str, bytes)) or not tuple(self.classes) \
                    or not all(is_int(c) and c >= 0 for c in self.classes) \
                    or len(set(self.classes)) != len(tuple(self.classes)):
                raise ValueError(f"classes must be None or distinct non-negative class indices, "
                                 f"got {self.classes!r}")
            object.__setattr__(self, "classes", tuple(self.classes))


@dataclass(frozen=True)
class NCResult:
    """The report (scores = signed MAD indices, small norms positive), per-label reversed masks ``(H, W)``
    and patterns ``(C, H, W)`` (``None`` for a label where no mask reached the ASR threshold), their L1 norms
    (``inf`` when none was found) and the MAD test."""

    report: ScanReport
    masks: dict[int, torch.Tensor | None]
    patterns: dict[int, torch.Tensor | None]
    l1_norms: dict[int, float]
    mad: MADResult
    seconds: float

    def trigger_image(self, c: int) -> torch.Tensor:
        """``m⊙Δ`` of label ``c`` — what the reversed trigger paints, for PNGs."""
        if self.masks.get(c) is None:
            raise ValueError(f"no reversed trigger for class {c}")
        return self.masks[c] * self.patterns[c]


class NeuralCleanse:
    """Neural Cleanse: :meth:`scan` reverse-engineers a trigger per label and runs the MAD test;
    :meth:`repair` unlearns the smallest reversed trigger."""

    def __init__(self, config: NeuralCleanseConfig | None = None) -> None:
        config = NeuralCleanseConfig() if config is None else config
        if not isinstance(config, NeuralCleanseConfig):
            raise TypeError(f"config must be a NeuralCleanseConfig, got {type(config).__name__}")
        self.config = config

    def scan(self, model: GuardModel, trusted: ImageTensorDataset, *, generator: torch.Generator | None = None,
             device: str | torch.device | None = None) -> NCResult:
        cfg = self.config
        generator = check_scan_inputs(model, generator)
        check_dataset(trusted, "trusted")
        k = model.num_classes
        classes = cfg.classes if cfg.classes is not None else tuple(range(k))
        if max(classes) >= k or len(classes) < 3:
            raise ValueError(f"classes must be at least 3 labels in [0, {k - 1}] (the MAD test compares "
                             f"them), got {classes}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model = model.to(device)
        started = time.perf_counter()
        # every label's mask and pattern in one batched inversion
        tasks = class_tasks(trusted.images, trusted.labels, classes, generator=generator, exclude_target=False)
        inversion = invert(tasks, TargetCrossEntropy(model), self.inversion_config(len(trusted)), device=device)
        masks, patterns, norms = {}, {}, {}
        for c, trigger, size in zip(classes, inversion.triggers, inversion.size.tolist()):
            masks[c] = None if trigger is None else trigger["mask"]
            patterns[c] = None if trigger is None else trigger["pattern"]
            norms[c] = size
            logger.info("NC class %d: best mask L1 %.2f", c, norms[c])
        finite = [n for n in norms.values() if math.isfinite(n)]
        cap = 2 * max(finite) if finite else 1.0  # a label with no successful mask is the least suspicious
        values = [norms[c] if math.isfinite(norms[c]) else cap for c in classes]
        mad = mad_anomaly_index(values, cfg.anomaly_threshold)
        scores = {c: (idx if v < mad.median else -idx) for c, v, idx in zip(classes, values, mad.indices)}
        flagged = [classes[i] for i in mad.flagged]
        top = min(flagged, key=lambda c: norms[c]) if flagged else None
        details = {"l1_norms": {str(c): (norms[c] if math.isfinite(norms[c]) else None) for c in classes},
                   "model_anomaly_index": mad.model_index, "median": mad.median, "mad": mad.mad,
                   "flagged_classes": flagged, "trusted_images": len(trusted)}
        report = ScanReport("nc", top is not None, top, scores, cfg.anomaly_threshold, details)
        return NCResult(report, masks, patterns, norms, mad, time.perf_counter() - started)

    def inversion_config(self, trusted_images: int) -> InversionConfig:
        """The engine settings of the reverse engineering: mask and pattern from U[0.01, 0.99], Adam, one step
        = ``samples_per_step`` random trusted images in batches, the NC cost schedule (P3) with early stop."""
        cfg = self.config
        per_step = min(cfg.samples_per_step, trusted_images)
        schedule = CostSchedule(cfg.attack_threshold, cfg.init_cost, cfg.patience, cfg.cost_multiplier,
                                start_at_zero=True,
                                early_stop_patience=cfg.early_stop_patience or 5 * cfg.patience)
        return InversionConfig(MaskPatternTrigger(), schedule, steps=cfg.steps, batch_size=cfg.batch_size,
                               sampling="random", batches_per_step=max(1, math.ceil(per_step / cfg.batch_size)),
                               lr=cfg.lr, betas=cfg.betas)

    def repair(self, model: GuardModel, trusted: ImageTensorDataset, scan: NCResult, *,
               eval_set: torch.utils.data.Dataset, asr: AsrProbe | None = None,
               generator: torch.Generator | None = None,
               device: str | torch.device | None = None, progress: bool = False) -> RepairResult:
        """Unlearning: fine-tune a copy of ``model`` on ``trusted`` where ``unlearn_fraction`` of the images
        carry the smallest-norm reversed trigger (the flagged label's when one is flagged) with their true
        labels. The input model is not modified; ``eval_set`` and ``asr`` as in
        :meth:`guard.repair.PivotalTuning.repair`."""
        cfg = self.config
        if not isinstance(model, GuardModel):
            raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
        check_dataset(trusted, "trusted")
        if not isinstance(scan, NCResult):
            raise TypeError(f"scan must be the NCResult of NeuralCleanse.scan, got {type(scan).__name__}")
        found = {c: n for c, n in scan.l1_norms.items() if math.isfinite(n)}
        if not found:
            raise ValueError("the scan reversed no trigger (no label reached the ASR threshold); nothing to "
                             "unlearn — raise NeuralCleanseConfig.steps")
        c = scan.report.flagged_class if scan.report.flagged_class is not None else min(found, key=found.get)
        if generator is None:
            generator = torch.Generator()
            logger.info("no generator given; seeded a fresh one with %d", generator.seed())
        n = len(trusted)
        stamped = torch.randperm(n, generator=generator)[:max(1, round(cfg.unlearn_fraction * n))]
        images = trusted.images.clone()
        x = images[stamped].float().div(255)
        x = apply_mask_pattern(x, scan.masks[c], scan.patterns[c])
        images[stamped] = (x * 255).round().clamp(0, 255).to(torch.uint8)
        unlearn_set = ImageTensorDataset(images, trusted.labels.clone(), trusted.classes)
        logger.info("NC unlearning with the reversed trigger of class %d on %d of %d trusted images",
                    c, stamped.numel(), n)
        config = TrainConfig(epochs=cfg.unlearn_steps // cfg.eval_every, lr=cfg.unlearn_lr, momentum=0.9,
                             weight_decay=0.0, batch_size=cfg.unlearn_batch_size, schedule="none",
                             augment=cfg.augment, mode="finetune", steps_per_epoch=cfg.eval_every)
        repaired = copy.deepcopy(model)
        return trusted_finetune(repaired, unlearn_set, config, eval_set=eval_set, eval_every=cfg.eval_every,
                                max_cda_drop=cfg.max_cda_drop, asr=asr,
                                generator=generator, device=device, progress=progress)
