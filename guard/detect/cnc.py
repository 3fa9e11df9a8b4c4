"""Calibrated Trigger Inversion ("CNC"), pick_your_poison.txt §4.2, Algorithm 4; ALGORITHMS.md D3; registered as
the detector ``cnc``.

Neural Cleanse scores a class by how *small* a trigger flips the model to it, and so is fooled by universal
adversarial perturbations that work for every class. CNC first repairs the model (Pivotal Tuning), then
optimises, for every class c, an additive trigger T that flips the *pivot* (the suspect model) to c while the
*repaired* model keeps the true label — all classes in one batched run of the inversion engine. A real
backdoor is a trigger the pivot obeys and the repair erased, so the anomaly score — how much better T works
on the pivot than on the repaired model — is high for the target class only; generic adversarial
perturbations transfer to the (highly similar) repaired model and score low.

Score form. The paper writes ``S_c = Acc(pivot says c) − Acc(repaired says y)`` (ALGORITHMS.md D3 step 2d
makes it the default) and the authors' code ``S_c = Acc(pivot says c) − Acc(repaired says c)``, on triggered
held-out images not of class c. The default here is the code form because it separates clean from
backdoored models better: over 10 clean and 10 BadNets CIFAR-10 ResNet-20s
(``benchmarks/results/scan_repair_cifar10.json``, ``detect.summary``) its detection ROC AUC was 1.00 at
N = 5 and at N = 15 inversion steps per class, the paper form's 0.95 and 0.67. The paper form is also high
when a trigger pushes the repaired model to any wrong class, which a clean model's universal perturbations
readily do. ``score_variant="paper"`` selects it; both rates are in every report.

Budget and threshold. The defaults are the benchmark's short budget — N = 5 inversion steps of 64 images
per class after 100 Pivotal Tuning steps evaluated every 10 — which ranked the target first on 9 of 10 BadNets
models (all 9 standing out; the tenth flagged class 1, the target second) and scans a CIFAR ResNet-20 in about
2 min on one CPU core (Table 5's budgets, N = 100 per class, took 7–12 min on two cores and lost the
separation: all ten scores between 0.81 and 0.93, the target second). The repair is evaluated every 10 steps,
not PyP's 50, because a strongly backdoored model (fine-tuned on the full poisoned set) loses the 2-point CDA
budget within its first 50 steps: P4 then keeps the model itself, and the scan compares the model with itself
(the report's ``caveat`` says so). The verdict threshold is calibrated on clean models at that budget: the 90th
percentile of the max score of the 10 clean models (:func:`calibrate_threshold` at a 10 % false-positive
rate), which flagged 10 of 10 BadNets models; the config keeps its value and source (``threshold``,
``threshold_source``). Change the budget and recalibrate with the benchmark. A model above the threshold whose
top class does not stand out from the others (see :class:`~guard.detect.ScanReport`) is reported as
backdoored *without* a flagged class.

Example::

    scan = create_detector("cnc").scan(model, trusted, heldout, generator=torch.Generator().manual_seed(0))
    scan.report.backdoored, scan.report.flagged_class, scan.report.scores, scan.trigger_image(c)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_betas, is_int, is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..repair.pivotal import PivotalTuning, PivotalTuningConfig
from ._checks import check_classes, check_dataset, check_scan_inputs, scanned_classes
from .base import SEPARATION_THRESHOLD, Detector, ScanReport, ScanResult, register_detector, separation_index
from .inversion import (AdditiveTrigger, FixedSteps, InversionConfig, Objective, TriggeredBatch, class_tasks,
                        frozen, invert)

logger = logging.getLogger(__name__)

__all__ = ["CNCConfig", "CalibratedTriggerInversion"]

_SCORE_VARIANTS = ("paper", "code")
#: the default verdict threshold and where it comes from (see the module docstring)
CALIBRATED_THRESHOLD = 0.2809364548494983
CALIBRATED_THRESHOLD_SOURCE = (
    "benchmarks/results/scan_repair_cifar10.json detect.summary.cnc_threshold_fpr10_steps5: 90th percentile "
    "of the max code-form score of 10 clean CIFAR-10 ResNet-20s (pretrained, fine-tuned 2 epochs on 5000 "
    "images) at steps_per_class=5, batch_size=64, 100 Pivotal Tuning steps evaluated every 10, 500 trusted and "
    "1000 lossless held-out test images")


@dataclass(frozen=True)
class CNCConfig:
    """CNC hyper-parameters (ALGORITHMS.md D3, §7 item 10).

    ``steps_per_class`` N inversion steps per class (default 5, the calibrated short budget; Table 5 / the
    authors' code: 100), each one Adam step (``lr`` 0.01, betas (0.5, 0.9)) on ``batch_size`` (64) random
    trusted images not of the candidate class, randomly flipped; trigger initialised U[0, ``init_scale``).
    ``repaired_weight`` weighs the repaired model's CE (paper 1.0, code 0.5). ``score_variant``,
    ``threshold`` and ``threshold_source``: see the module docstring. ``repair`` configures the Pivotal
    Tuning that produces the repaired model (default 100 steps evaluated every 10; Table 5: 2,000 every 50).
    ``classes``: the candidate classes to scan (``None``: all). :meth:`table5` gives the paper's budgets.
    """

    steps_per_class: int = 5
    lr: float = 0.01
    betas: tuple[float, float] = (0.5, 0.9)
    batch_size: int = 64
    init_scale: float = 0.01
    repaired_weight: float = 1.0
    score_variant: str = "code"
    threshold: float = CALIBRATED_THRESHOLD
    threshold_source: str = CALIBRATED_THRESHOLD_SOURCE
    flip: bool = True
    classes: tuple[int, ...] | None = None
    repair: PivotalTuningConfig = field(default_factory=lambda: PivotalTuningConfig(steps=100, eval_every=10))

    @classmethod
    def table5(cls, **overrides) -> "CNCConfig":
        """pick_your_poison.txt Table 5 budgets (N = 100, batch 128, 2,000 repair steps); the threshold is not
        calibrated for them."""
        return cls(**{"steps_per_class": 100, "batch_size": 128, "repair": PivotalTuningConfig(),
                      "threshold_source": "not calibrated for the Table 5 budget", **overrides})

    def __post_init__(self) -> None:
        for name in ("steps_per_class", "batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        object.__setattr__(self, "betas", check_betas(self.betas))
        if not is_number(self.init_scale) or self.init_scale < 0:
            raise ValueError(f"init_scale must be a finite number >= 0, got {self.init_scale!r}")
        if not is_number(self.repaired_weight) or self.repaired_weight < 0:
            raise ValueError(f"repaired_weight must be a finite number >= 0, got {self.repaired_weight!r}")
        if self.score_variant not in _SCORE_VARIANTS:
            raise ValueError(f"score_variant must be one of {_SCORE_VARIANTS}, got {self.score_variant!r}")
        if not is_number(self.threshold) or not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1] (scores are differences of rates), "
                             f"got {self.threshold!r}")
        if not isinstance(self.threshold_source, str) or not self.threshold_source:
            raise ValueError(f"threshold_source must say where the threshold comes from, got {self.threshold_source!r}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {type(self.flip).__name__}")
        object.__setattr__(self, "classes", check_classes(self.classes))
        if not isinstance(self.repair, PivotalTuningConfig):
            raise TypeError(f"repair must be a PivotalTuningConfig, got {type(self.repair).__name__}")


class CalibratedObjective(Objective):
    """CNC's inversion loss (ALGORITHMS.md D3 step 2b): ``CE(pivot(x ⊕ T), c) + w·CE(repaired(x ⊕ T), y)``;
    success: the pivot says c."""

    def __init__(self, pivot: nn.Module, repaired: nn.Module, repaired_weight: float) -> None:
        self.models = (pivot, repaired)
        self.repaired_weight = repaired_weight

    def __call__(self, batch: TriggeredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        pivot, repaired = self.models
        logits = pivot(batch.triggered)
        loss = F.cross_entropy(logits, batch.target, reduction="none")
        if self.repaired_weight:
            loss = loss + self.repaired_weight * F.cross_entropy(repaired(batch.triggered), batch.label,
                                                                 reduction="none")
        return loss, logits.argmax(1) == batch.target


@register_detector
class CalibratedTriggerInversion(Detector):
    """Model-level backdoor detector of pick_your_poison.txt Algorithm 4.

    ``report.details``: per class the pivot's success rate, the repaired model's accuracy and success rate
    on the triggered held-out images, the score form, the threshold's source and the repair's record;
    ``ScanResult.reference``: the repaired model the scan calibrated against.
    """

    name = "cnc"
    config_class = CNCConfig
    description = "Calibrated Trigger Inversion: additive triggers against the model and its Pivotal Tuning repair (D3)"

    def scan(self, model: GuardModel, trusted: ImageTensorDataset, heldout: ImageTensorDataset, *,
             reference: GuardModel | None = None, generator: torch.Generator | None = None,
             device: str | torch.device | None = None, progress: bool = False) -> ScanResult:
        cfg = self.config
        generator = check_scan_inputs(model, generator)
        check_dataset(trusted, "trusted")
        check_dataset(heldout, "heldout")
        classes = scanned_classes(cfg.classes, model)
        k = model.num_classes
        device = torch.device(device) if device is not None else next(model.parameters()).device
        started = time.perf_counter()
        details: dict = {}
        if reference is None:
            repair = PivotalTuning(cfg.repair).defend(model, trusted, eval_set=heldout, generator=generator,
                                                      device=device, progress=progress)
            reference = repair.model
            details["repair"] = repair.to_dict()
        elif not isinstance(reference, GuardModel) or reference.num_classes != k:
            raise TypeError(f"reference must be a GuardModel with {k} classes (the repaired model), got "
                            f"{type(reference).__name__}")
        pivot = model.to(device)
        repaired = reference.to(device)
        # every class's trigger in one batched inversion (ALGORITHMS.md D3 step 2a-b)
        tasks = class_tasks(trusted.images, trusted.labels, classes, generator=generator)
        config = self.inversion_config()
        inversion = invert(tasks, CalibratedObjective(pivot, repaired, cfg.repaired_weight), config,
                           device=device, progress=progress)
        scores: dict[int, float] = {}
        rates = {"pivot_success": {}, "repaired_accuracy": {}, "repaired_success": {}}
        with frozen(pivot, repaired):
            for c, trigger in zip(classes, inversion.triggers):
                pivot_success, repaired_acc, repaired_success = self._rates(
                    pivot, repaired, trigger["delta"].to(device), heldout, c, device)
                second = repaired_acc if cfg.score_variant == "paper" else repaired_success
                scores[c] = pivot_success - second
                for key, value in zip(rates, (pivot_success, repaired_acc, repaired_success)):
                    rates[key][str(c)] = value
                logger.info("CNC class %d: score %.4f (pivot success %.3f, repaired accuracy %.3f)",
                            c, scores[c], pivot_success, repaired_acc)
        top = max(scores, key=scores.get)
        backdoored = scores[top] > cfg.threshold
        separation = separation_index(scores)
        stands_out = separation is None or separation > SEPARATION_THRESHOLD
        details.update(rates)
        details.update({"score_variant": cfg.score_variant, "steps_per_class": cfg.steps_per_class,
                        "threshold_source": cfg.threshold_source, "top_class": top,
                        "trusted_images": len(trusted), "heldout_images": len(heldout)})
        caveat = None
        if "repair" in details and details["repair"]["chosen"]["step"] == 0:
            caveat = ("the repair kept the original model (its first evaluation already broke the CDA budget), so "
                      "the scores compare the model with itself and detect nothing; lower repair.lr or "
                      "repair.eval_every")
            logger.warning("CNC: %s", caveat)
        report = ScanReport(self.name, backdoored, top if backdoored and stands_out else None, scores,
                            cfg.threshold, details, separation=separation, caveat=caveat)
        triggers = {c: t for c, t in zip(classes, inversion.triggers)}
        return ScanResult(report, config.trigger, triggers, repaired, time.perf_counter() - started)

    def inversion_config(self) -> InversionConfig:
        """The engine settings of step 2b: an additive trigger from U[0, init_scale), N Adam steps of one
        random (flipped) trusted batch each, no size term."""
        cfg = self.config
        return InversionConfig(AdditiveTrigger(0.0, cfg.init_scale), FixedSteps(), steps=cfg.steps_per_class,
                               batch_size=cfg.batch_size, sampling="random", flip=cfg.flip, lr=cfg.lr,
                               betas=cfg.betas)

    @staticmethod
    @torch.no_grad()
    def _rates(pivot, repaired, trigger, heldout, c: int, device, batch_size: int = 512):
        """(pivot success, repaired accuracy, repaired success) of ``trigger`` on held-out images not of c."""
        keep = heldout.labels != c
        xs, ys = heldout.images[keep], heldout.labels[keep].to(device)
        if ys.numel() == 0:
            raise ValueError(f"heldout holds only images of class {c}; scoring needs other classes")
        hits = torch.zeros(3, dtype=torch.float64, device=device)
        for start in range(0, ys.numel(), batch_size):
            x = (xs[start:start + batch_size].to(device).float().div(255) + trigger).clamp(0, 1)
            y = ys[start:start + batch_size]
            p = pivot(x).argmax(1)
            r = repaired(x).argmax(1)
            hits += torch.stack([(p == c).sum(), (r == y).sum(), (r == c).sum()]).double()
        rates = (hits / ys.numel()).tolist()
        return rates[0], rates[1], rates[2]
