"""What the serving handler needs from the offline defenses: a scan report's per-class gauges, a per-request
score against a repaired model, and guard's calibrated per-request trigger detector.

The per-request score compares the served (pivot) model with the repaired model on the same inputs: a
triggered input is exactly where the two disagree (the repair erased the backdoor; clean inputs keep their
label, ALGORITHMS.md D2/D3). The handler already has the pivot's logits, so scoring costs one extra
forward of the repaired model per server batch, with no per-image loop.

Example (inside a handler)::

    scorer = RequestScorer.from_files("repaired.pt", "resnet20", report="report.json")
    gauges = scorer.class_gauges()                 # {class: anomaly score} for guard_scan_score
    scores = scorer.score(images, pivot_logits)    # RequestScores with .score, .disagree, .repaired_label

The trigger detector (:class:`TriggerDetector`, written by ``guard calibrate``) scores the penultimate features
the served pass computes anyway (:func:`guard.detect.penultimate_features`), so it costs no extra pass::

    detector = TriggerDetector.calibrate(model, clean_images, false_positive_rate=0.01)
    detector.save("detector.safetensors")
    trigger = detector.score(features, labels)     # TriggerScores with .score, .flagged
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._validation import check_images, is_number
from ..models import GuardModel, create
from .base import ScanReport, calibrate_threshold
from .inputs import class_gaussians, mahalanobis, penultimate_features

__all__ = ["RequestScorer", "RequestScores", "TriggerDetector", "TriggerScores"]


@dataclass(frozen=True)
class RequestScores:
    """Per-image results, each ``(B,)``: ``score`` — total-variation distance between the pivot's and the
    repaired model's softmax, in [0, 1] (0: identical beliefs, 1: disjoint); ``disagree`` — the top-1
    labels differ; ``repaired_label`` — the repaired model's top-1 label."""

    score: torch.Tensor
    disagree: torch.Tensor
    repaired_label: torch.Tensor
    probabilities: torch.Tensor = field(repr=False, default=None)  # (B, K) the repaired model's softmax

    def to_list(self) -> list[dict]:
        """One JSON-ready dict per image, for the response body."""
        return [{"backdoor_score": s, "disagree": d, "repaired_label": r}
                for s, d, r in zip(self.score.tolist(), self.disagree.tolist(), self.repaired_label.tolist())]


class RequestScorer:
    """Scores served requests against a repaired model; optionally carries the scan report for gauges."""

    def __init__(self, repaired: GuardModel | None, report: ScanReport | None = None) -> None:
        if repaired is not None and not isinstance(repaired, GuardModel):
            raise TypeError(f"repaired must be a guard.models.GuardModel or None, got {type(repaired).__name__}")
        if report is not None and not isinstance(report, ScanReport):
            raise TypeError(f"report must be a ScanReport or None, got {type(report).__name__}")
        self.repaired = repaired.eval() if repaired is not None else None
        self.report = report

    @classmethod
    def from_files(cls, repaired_weights: str | os.PathLike | None, model_name: str, *,
                   report: str | os.PathLike | None = None, num_classes: int = 10,
                   device: str | torch.device = "cpu") -> "RequestScorer":
        """Load the repaired weights (``guard repair --out``) into ``model_name`` and the ``report.json``
        (``guard scan --out``); either may be ``None`` when the archive lacks it."""
        repaired = None
        if repaired_weights is not None:
            repaired = create(model_name, num_classes=num_classes, weights=repaired_weights).to(device)
        return cls(repaired, ScanReport.load(report) if report is not None else None)

    def class_gauges(self) -> dict[int, float]:
        """Per-class anomaly scores of the scan (empty without a report)."""
        return dict(self.report.scores) if self.report is not None else {}

    @torch.inference_mode()
    def score(self, images: torch.Tensor, pivot_logits: torch.Tensor) -> RequestScores:
        """Score a batch: ``images`` ``(B, C, H, W)`` in [0, 1] and the served model's logits ``(B, K)`` on
        them. One batched forward of the repaired model."""
        if self.repaired is None:
            raise ValueError("no repaired model: per-request scores need `guard repair` output in the archive")
        check_images(images, self.repaired.spec.input_size)
        if not isinstance(pivot_logits, torch.Tensor) or pivot_logits.shape != (images.shape[0],
                                                                               self.repaired.num_classes):
            got = tuple(pivot_logits.shape) if isinstance(pivot_logits, torch.Tensor) else type(pivot_logits).__name__
            raise ValueError(f"pivot_logits must have shape ({images.shape[0]}, {self.repaired.num_classes}), "
                             f"got {got}")
        device = next(self.repaired.parameters()).device
        repaired_logits = self.repaired(images.to(device)).float()
        pivot_logits = pivot_logits.to(device).float()
        score = 0.5 * (pivot_logits.softmax(1) - repaired_logits.softmax(1)).abs().sum(1)
        repaired_label = repaired_logits.argmax(1)
        disagree = repaired_label != pivot_logits.argmax(1)
        return RequestScores(score.clamp(0, 1).cpu(), disagree.cpu(), repaired_label.cpu(),
                             repaired_logits.softmax(1).cpu())

    def to(self, device: str | torch.device) -> "RequestScorer":
        if self.repaired is not None:
            self.repaired.to(device)
        return self


@dataclass(frozen=True)
class TriggerScores:
    """Per-image results of :meth:`TriggerDetector.score`, each ``(B,)``: ``score`` — the squared Mahalanobis
    distance of the input's features to the clean inputs of its predicted class; ``flagged`` — above the
    calibrated threshold. ``threshold``: that threshold."""

    score: torch.Tensor
    flagged: torch.Tensor
    threshold: float

    def to_list(self) -> list[dict]:
        """One JSON-ready dict per image, for the response body."""
        return [{"trigger_score": s, "flagged": f} for s, f in zip(self.score.tolist(), self.flagged.tolist())]


#: what ``TriggerDetector.save`` writes into the safetensors metadata, to recognise the file
DETECTOR_FORMAT, DETECTOR_VERSION = "guard-trigger-detector", 1


@dataclass(frozen=True)
class TriggerDetector:
    """guard's per-request trigger detector as the endpoint serves it: the ``rescaler`` input detector's feature
    score (:class:`guard.detect.ReScalerScore`) — class means ``(K, D)`` and a tied Ledoit–Wolf precision ``(D, D)``
    of the served model's penultimate features on clean images — with the threshold that flags
    ``false_positive_rate`` of clean inputs, calibrated out-of-fold on ``calibration_images`` clean images.
    Backdoored inputs cluster away from the clean inputs of the target class (Lee et al., NeurIPS 2018;
    ``benchmarks/detect_cifar10.py`` measures it against STRIP, SCALE-UP, TeCo and IBD-PSC)."""

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float
    false_positive_rate: float
    calibration_images: int

    def __post_init__(self) -> None:
        for name in ("means", "precision"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a 2-D floating-point tensor, got {got}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite")
        d = self.means.shape[1]
        if self.precision.shape != (d, d):
            raise ValueError(f"precision must be ({d}, {d}) for {d}-dimensional means, got {tuple(self.precision.shape)}")
        if not is_number(self.threshold) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if not is_number(self.false_positive_rate) or not 0 <= self.false_positive_rate < 1:
            raise ValueError(f"false_positive_rate must be in [0, 1), got {self.false_positive_rate!r}")
        if isinstance(self.calibration_images, bool) or not isinstance(self.calibration_images, int) \
                or self.calibration_images < 1:
            raise ValueError(f"calibration_images must be an int >= 1, got {self.calibration_images!r}")

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def calibrate(cls, model: GuardModel, clean: torch.Tensor, *, false_positive_rate: float = 0.01,
                  folds: int = 5, batch_size: int = 256, generator: torch.Generator | None = None
                  ) -> "TriggerDetector":
        """Fit on ``clean`` ``(N, C, H, W)`` images in [0, 1] (held out from training) and calibrate the threshold.

        One forward pass of ``model`` gives every image's features and predicted label. The threshold is the
        ``(1 − false_positive_rate)`` quantile of out-of-fold scores (``folds`` folds stratified by predicted
        class: each image is scored by the Gaussians fitted without it, as an unseen clean request would be);
        the served means and precision are then fitted on all the images. Every class needs at least
        ``folds`` of the images predicted as it.
        """
        if not isinstance(model, GuardModel):
            raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        clean = check_images(clean, model.spec.input_size, name="clean")
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        model = model.eval()
        device = next(model.parameters()).device
        with torch.no_grad(), penultimate_features(model) as captured:
            labels = torch.cat([model(c.to(device)).argmax(1).cpu() for c in clean.split(batch_size)])
        features = torch.cat(captured).cpu()
        k = model.num_classes
        counts = torch.bincount(labels, minlength=k)
        short = [c for c in range(k) if counts[c] < folds]
        if short:
            raise ValueError(f"calibration needs at least {folds} clean images predicted as each class; classes "
                             f"{short} have {counts[short].tolist()} among {len(clean)} images (give more images)")
        fold = torch.empty(len(labels), dtype=torch.long)
        for c in range(k):
            members = torch.nonzero(labels == c)[:, 0]
            members = members[torch.randperm(len(members), generator=generator)]
            fold[members] = torch.arange(len(members)) % folds
        scores = torch.empty(len(labels), dtype=torch.float64)
        for f in range(folds):
            held = fold == f
            means, precision = class_gaussians(features[~held], labels[~held], k)
            scores[held] = mahalanobis(features[held], labels[held], means, precision)
        means, precision = class_gaussians(features, labels, k)
        return cls(means, precision, calibrate_threshold(scores, false_positive_rate), false_positive_rate,
                   len(labels))

    def check_model(self, model: GuardModel) -> None:
        """Raise ``ValueError`` unless ``model``'s classes and penultimate width are the ones calibrated on."""
        classifier = model.classifier
        if (model.num_classes, classifier.in_features) != (self.num_classes, self.feature_dim):
            raise ValueError(f"the trigger detector was calibrated for {self.num_classes} classes of "
                             f"{self.feature_dim}-dimensional features, but model {model.spec.name!r} has "
                             f"{model.num_classes} classes of {classifier.in_features}; calibrate it on this model")

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> TriggerScores:
        """Score ``features`` ``(B, D)`` (:func:`guard.detect.penultimate_features` of the served forward) of inputs
        the served model predicts as ``labels`` ``(B,)``."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.feature_dim:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be (B, {self.feature_dim}), got {got}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be ({features.shape[0]},), got {got}")
        score = mahalanobis(features, labels, self.means, self.precision).cpu()
        return TriggerScores(score, score > self.threshold, self.threshold)

    def metadata(self) -> dict[str, object]:
        """Everything but the tensors, JSON-ready (what ``guard calibrate`` prints)."""
        return {"threshold": self.threshold, "false_positive_rate": self.false_positive_rate,
                "calibration_images": self.calibration_images, "num_classes": self.num_classes,
                "feature_dim": self.feature_dim}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file: the two tensors, and the rest as its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": DETECTOR_FORMAT, "version": str(DETECTOR_VERSION),
                **{k: json.dumps(v) for k, v in self.metadata().items()}}
        save_file({"means": self.means.double().contiguous().cpu(),
                   "precision": self.precision.double().contiguous().cpu()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TriggerDetector":
        """Read what :meth:`save` wrote; anything else is refused with a ``ValueError``."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trigger detector file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
        if meta.get("format") != DETECTOR_FORMAT or meta.get("version") != str(DETECTOR_VERSION):
            raise ValueError(f"{path} is not a guard trigger detector version {DETECTOR_VERSION} (format "
                             f"{meta.get('format')!r}, version {meta.get('version')!r}); write it with `guard calibrate`")
        if set(tensors) != {"means", "precision"}:
            raise ValueError(f"{path}: expected tensors means and precision, got {sorted(tensors)}")
        try:
            values = {k: json.loads(meta[k]) for k in ("threshold", "false_positive_rate", "calibration_images")}
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: missing or malformed metadata ({exc})") from exc
        return cls(tensors["means"], tensors["precision"], **values)
