"""Neural Cleanse (Wang et al., S&P 2019): trigger reverse-engineering and the MAD outlier test, registered as
the detector ``nc``.

ALGORITHMS.md D4 (original formulation), with the primitives P1.2 (mask–pattern blend), P2 (tanh
re-parameterisation) and P3 (dynamic cost schedule). For every candidate label c the smallest mask m (and a
pattern Δ) that sends clean images to c is searched:
``min_{m,Δ} E_x CE(f((1−m)⊙x + m⊙Δ), c) + λ·‖m‖_1`` — all labels in one batched run of the inversion
engine.
A backdoor target needs a much smaller mask than the other labels, which the median-absolute-deviation
test picks out (anomaly index > 2 on the small side). The repair that unlearns the reversed trigger is the
defense ``nc`` of :mod:`guard.repair`.

Example::

    scan = create_detector("nc", steps=50).scan(model, trusted, heldout, generator=torch.Generator().manual_seed(0))
    scan.report.flagged_class, scan.report.details["l1_norms"], scan.triggers[c]["mask"]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ._checks import check_classes, check_dataset, check_scan_inputs, scanned_classes
from .base import Detector, ScanReport, ScanResult, mad_anomaly_index, register_detector
from .inversion import (CostSchedule, InversionConfig, MaskPatternTrigger, TargetCrossEntropy, class_tasks, frozen,
                        invert)

logger = logging.getLogger(__name__)

__all__ = ["NeuralCleanse", "NeuralCleanseConfig"]


@dataclass(frozen=True)
class NeuralCleanseConfig:
    """NC hyper-parameters (ALGORITHMS.md D4; NC-code GTSRB example).

    Adam (``lr`` 0.1, betas (0.5, 0.9)), ``batch_size`` 32; one step = one pass over ``samples_per_step``
    trusted images (1000, or the whole trusted set when smaller); at most ``steps`` steps per label;
    ``init_cost`` 1e-3; ASR threshold ``attack_threshold`` 0.99; cost schedule with ``patience`` 5 and
    ``cost_multiplier`` 2 (down by its 1.5 power); early stop after ``early_stop_patience`` (default
    5·patience) steps without a smaller best mask once the cost has gone both up and down.
    ``anomaly_threshold`` 2 for the MAD test. ``classes``: the candidate labels (``None``: all; at least 3).
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

    def __post_init__(self) -> None:
        for name in ("steps", "samples_per_step", "batch_size", "patience"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.early_stop_patience is not None and (not is_int(self.early_stop_patience)
                                                     or self.early_stop_patience < 1):
            raise ValueError(f"early_stop_patience must be None or an int >= 1, got {self.early_stop_patience!r}")
        for name in ("lr", "init_cost"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not is_number(self.attack_threshold) or not 0 < self.attack_threshold <= 1:
            raise ValueError(f"attack_threshold must be in (0, 1], got {self.attack_threshold!r}")
        if not is_number(self.cost_multiplier) or self.cost_multiplier <= 1:
            raise ValueError(f"cost_multiplier must be a number > 1, got {self.cost_multiplier!r}")
        if not is_number(self.anomaly_threshold) or self.anomaly_threshold <= 0:
            raise ValueError(f"anomaly_threshold must be a number > 0, got {self.anomaly_threshold!r}")
        object.__setattr__(self, "classes", check_classes(self.classes))
        object.__setattr__(self, "betas", self.inversion_config(self.samples_per_step).betas)

    def inversion_config(self, trusted_images: int) -> InversionConfig:
        """The engine settings: mask and pattern from U[0.01, 0.99], Adam, one step = ``samples_per_step``
        random trusted images in batches, the NC cost schedule (P3) with early stop."""
        per_step = min(self.samples_per_step, trusted_images)
        schedule = CostSchedule(self.attack_threshold, self.init_cost, self.patience, self.cost_multiplier,
                                start_at_zero=True, early_stop_patience=self.early_stop_patience or 5 * self.patience)
        return InversionConfig(MaskPatternTrigger(), schedule, steps=self.steps, batch_size=self.batch_size,
                               sampling="random", batches_per_step=max(1, math.ceil(per_step / self.batch_size)),
                               lr=self.lr, betas=self.betas)


@register_detector
class NeuralCleanse(Detector):
    """Neural Cleanse: a reversed trigger per label and the MAD test on their mask norms.

    ``report.scores``: signed MAD indices (small norms positive); ``details``: the L1 norms (``None`` where no
    mask reached the ASR threshold — such a label counts as the least suspicious), the success rate of each
    reversed trigger on held-out images of other classes, and the MAD statistics.
    """

    name = "nc"
    config_class = NeuralCleanseConfig
    description = "Neural Cleanse: smallest mask/pattern trigger per label, MAD outlier test (D4)"

    def scan(self, model: GuardModel, trusted: ImageTensorDataset, heldout: ImageTensorDataset, *,
             reference: GuardModel | None = None, generator: torch.Generator | None = None,
             device: str | torch.device | None = None, progress: bool = False) -> ScanResult:
        cfg = self.config
        generator = check_scan_inputs(model, generator)
        check_dataset(trusted, "trusted")
        check_dataset(heldout, "heldout")
        if reference is not None:
            raise ValueError("nc compares no reference model; pass reference=None")
        classes = scanned_classes(cfg.classes, model, at_least=3)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model = model.to(device)
        started = time.perf_counter()
        tasks = class_tasks(trusted.images, trusted.labels, classes, generator=generator, exclude_target=False)
        config = cfg.inversion_config(len(trusted))
        inversion = invert(tasks, TargetCrossEntropy(model), config, device=device, progress=progress)
        norms = dict(zip(classes, inversion.size.tolist()))
        triggers = {c: t for c, t in zip(classes, inversion.triggers) if t is not None}
        finite = [n for n in norms.values() if math.isfinite(n)]
        cap = 2 * max(finite) if finite else 1.0  # a label with no successful mask is the least suspicious
        values = [norms[c] if math.isfinite(norms[c]) else cap for c in classes]
        mad = mad_anomaly_index(values, cfg.anomaly_threshold)
        scores = {c: (idx if v < mad.median else -idx) for c, v, idx in zip(classes, values, mad.indices)}
        flagged = [classes[i] for i in mad.flagged]
        top = min(flagged, key=lambda c: norms[c]) if flagged else None
        success = self._heldout_success(model, heldout, triggers, config.trigger, device)
        details = {"l1_norms": {str(c): (norms[c] if math.isfinite(norms[c]) else None) for c in classes},
                   "heldout_success": {str(c): s for c, s in success.items()},
                   "model_anomaly_index": mad.model_index, "median": mad.median, "mad": mad.mad,
                   "flagged_classes": flagged, "steps": cfg.steps, "trusted_images": len(trusted)}
        for c in classes:
            logger.info("NC class %d: best mask L1 %.2f", c, norms[c])
        report = ScanReport(self.name, top is not None, top, scores, cfg.anomaly_threshold, details,
                            separation=mad.model_index)
        return ScanResult(report, config.trigger, triggers, None, time.perf_counter() - started)

    @staticmethod
    @torch.no_grad()
    def _heldout_success(model, heldout, triggers, form, device, batch_size: int = 512) -> dict[int, float | None]:
        """Share of held-out images not of class c that class c's reversed trigger sends to c."""
        out = {}
        with frozen(model):
            for c, values in triggers.items():
                images = heldout.images[heldout.labels != c]
                values = {k: v.to(device) for k, v in values.items()}
                hits = sum(int((model(form.stamp(chunk.to(device).float().div(255), values)).argmax(1) == c).sum())
                           for chunk in images.split(batch_size))
                out[c] = hits / images.shape[0] if images.shape[0] else None
        return out
