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

The trigger detector (:class:`TriggerDetector`, written by ``guard calibrate``) scores the features the served
pass computes anyway (:func:`guard.detect.layer_features`), and, calibrated with ``amplified=n``, the
consistency of n amplified copies of the model (:class:`guard.detect.Amplification`: n extra forward passes)::

    detector = TriggerDetector.calibrate(model, clean_images, false_positive_rate=0.01, amplified=1)
    detector.save("detector.safetensors")
    copies = detector.amplification.copies(model)                                   # once
    with layer_features(model, detector.layers) as captured:
        logits = model(images)
    labels = logits.argmax(1)
    trigger = detector.score({k: v[0] for k, v in captured.items()}, labels,
                             consistency(copies, images, labels))                   # .score, .flagged
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .._validation import check_images, is_number
from ..models import GuardModel, create
from .base import ScanReport, calibrate_threshold
from .inputs import (Amplification, LayerGaussian, feature_layers, fit_layer_gaussians, layer_features,
                     layered_score)

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
    """Per-image results of :meth:`TriggerDetector.score`, each ``(B,)``: ``score`` — guard's feature score (the
    sum over layers of the standardized log Mahalanobis distances to clean inputs of the predicted class; with an
    amplification, joined to the amplified copies' consistency, :meth:`guard.detect.Amplification.join`);
    ``flagged`` — above the calibrated threshold. ``threshold``: that threshold."""

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
    """guard's per-request trigger detector as the endpoint serves it: the feature score of the ``rescaler`` input
    detector (:class:`guard.detect.ReScalerScore`) — per layer (``layers``: residual stages and the penultimate
    features, :func:`guard.detect.feature_layers`) a :class:`~guard.detect.LayerGaussian` of the served model's
    features on clean images — with the threshold that flags ``false_positive_rate`` of clean inputs, calibrated
    out-of-fold on ``calibration_images`` clean images. Backdoored inputs sit away from the clean inputs of the
    target class (Lee et al., NeurIPS 2018). ``amplification`` (optional): the amplified copies whose consistency
    joins the feature score (:class:`guard.detect.Amplification`; the ``rescaler`` detector's ``amplified``).
    ``benchmarks/detect_cifar10.py`` measures it against STRIP, SCALE-UP, TeCo and IBD-PSC."""

    layers: tuple[str, ...]
    gaussians: tuple[LayerGaussian, ...]
    threshold: float
    false_positive_rate: float
    calibration_images: int
    amplification: Amplification | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "gaussians", tuple(self.gaussians))
        if not self.layers or len(self.layers) != len(self.gaussians) or not all(
                isinstance(n, str) and n for n in self.layers):
            raise ValueError(f"expected one LayerGaussian per named layer, got layers {self.layers!r} and "
                             f"{len(self.gaussians)} Gaussians")
        classes = {g.means.shape[0] for g in self.gaussians}
        for name, g in zip(self.layers, self.gaussians):
            if not isinstance(g, LayerGaussian):
                raise TypeError(f"layer {name}: expected a LayerGaussian, got {type(g).__name__}")
            for what in ("means", "precision"):
                value = getattr(g, what)
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point() \
                        or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"layer {name}: {what} must be a finite 2-D floating-point tensor")
            d = g.means.shape[1]
            if g.precision.shape != (d, d):
                raise ValueError(f"layer {name}: precision must be ({d}, {d}), got {tuple(g.precision.shape)}")
            if not (math.isfinite(g.log_mean) and math.isfinite(g.log_std) and g.log_std > 0):
                raise ValueError(f"layer {name}: log_mean and log_std must be finite with log_std > 0")
        if len(classes) != 1:
            raise ValueError(f"every layer must model the same classes, got {sorted(classes)}")
        if not is_number(self.threshold) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if not is_number(self.false_positive_rate) or not 0 <= self.false_positive_rate < 1:
            raise ValueError(f"false_positive_rate must be in [0, 1), got {self.false_positive_rate!r}")
        if isinstance(self.calibration_images, bool) or not isinstance(self.calibration_images, int) \
                or self.calibration_images < 1:
            raise ValueError(f"calibration_images must be an int >= 1, got {self.calibration_images!r}")
        if self.amplification is not None and not isinstance(self.amplification, Amplification):
            raise TypeError(f"amplification must be a guard.detect.Amplification or None, got "
                            f"{type(self.amplification).__name__}")

    @property
    def num_classes(self) -> int:
        return self.gaussians[0].means.shape[0]

    @property
    def feature_dims(self) -> dict[str, int]:
        return {name: g.means.shape[1] for name, g in zip(self.layers, self.gaussians)}

    @classmethod
    def calibrate(cls, model: GuardModel, clean: torch.Tensor, *, feature: str = "stages",
                  false_positive_rate: float = 0.01, amplified: int = 0, folds: int = 5, batch_size: int = 256,
                  generator: torch.Generator | None = None) -> "TriggerDetector":
        """Fit on ``clean`` ``(N, C, H, W)`` images in [0, 1] (held out from training) and calibrate the threshold.

        One forward pass of ``model`` gives every image's features (``feature``: ``"stages"`` or
        ``"penultimate"``, :func:`guard.detect.feature_layers`) and predicted label; :func:`fit_layer_gaussians`
        fits the layers and scores every image out of fold (``folds`` folds stratified by class), and the threshold
        is the ``(1 − false_positive_rate)`` quantile of those scores. ``amplified`` > 0 adds that many amplified
        copies (:meth:`guard.detect.Amplification.fit`), and the threshold is then set on the joined scores. Every
        class needs at least ``folds`` of the images predicted as it.
        """
        if not isinstance(model, GuardModel):
            raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
        clean = check_images(clean, model.spec.input_size, name="clean")
        if isinstance(amplified, bool) or not isinstance(amplified, int) or amplified < 0:
            raise ValueError(f"amplified must be an int >= 0, got {amplified!r}")
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        layers = feature_layers(model, feature)
        model = model.eval()
        device = next(model.parameters()).device
        with torch.no_grad(), layer_features(model, layers) as captured:
            labels = torch.cat([model(c.to(device)).argmax(1).cpu() for c in clean.split(batch_size)])
        features = {name: torch.cat(values).cpu() for name, values in captured.items()}
        gaussians, terms = fit_layer_gaussians(features, labels, model.num_classes, folds=folds, generator=generator)
        scores, amplification = terms.sum(0), None
        if amplified:
            clean, labels = clean.to(device), labels.to(device)
            amplification, _, clean_consistency = Amplification.fit(model, clean, labels, scores, copies=amplified,
                                                                    batch_size=batch_size)
            scores = amplification.join(scores, clean_consistency)
        return cls(layers, tuple(gaussians[n] for n in layers), calibrate_threshold(scores.cpu(), false_positive_rate),
                   false_positive_rate, len(labels), amplification)

    def check_model(self, model: GuardModel) -> None:
        """Raise ``ValueError`` unless ``model`` has the layers, widths and classes calibrated on (one forward pass
        of a blank image)."""
        try:
            with torch.no_grad(), layer_features(model, self.layers) as captured:
                device = next(model.parameters()).device
                model.eval()(torch.zeros(1, *model.spec.input_size, device=device))
        except AttributeError as exc:
            raise ValueError(f"the trigger detector reads layers {list(self.layers)}, but model {model.spec.name!r} "
                             f"lacks one ({exc}); calibrate it on this model") from exc
        dims = {name: values[0].shape[1] for name, values in captured.items()}
        if model.num_classes != self.num_classes or dims != self.feature_dims:
            raise ValueError(f"the trigger detector was calibrated for {self.num_classes} classes and features "
                             f"{self.feature_dims}, but model {model.spec.name!r} has {model.num_classes} classes and "
                             f"features {dims}; calibrate it on this model")

    def score(self, features: dict[str, torch.Tensor], labels: torch.Tensor,
              consistency_: torch.Tensor | None = None) -> TriggerScores:
        """Score the features ``{layer: (B, D)}`` (:func:`guard.detect.layer_features` of the served forward) of
        inputs the served model predicts as ``labels`` ``(B,)``; with an amplification, ``consistency_`` ``(B,)`` is
        :func:`guard.detect.consistency` of the same inputs under ``amplification.copies(model)``."""
        if not isinstance(features, dict) or set(features) != set(self.layers):
            got = sorted(features) if isinstance(features, dict) else type(features).__name__
            raise ValueError(f"features must be a dict of layers {list(self.layers)}, got {got}")
        batch = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() == 1 else None
        for name, dim in self.feature_dims.items():
            x = features[name]
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape != (batch, dim):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"features[{name!r}] must be ({batch}, {dim}) for {batch} labels, got {got}")
        score = layered_score(dict(zip(self.layers, self.gaussians)), features, labels)
        if self.amplification is not None:
            if not isinstance(consistency_, torch.Tensor) or consistency_.shape != (batch,):
                got = tuple(consistency_.shape) if isinstance(consistency_, torch.Tensor) else consistency_
                raise ValueError(f"this detector joins the amplified copies' consistency: expected a ({batch},) "
                                 f"tensor for {batch} labels, got {got!r}")
            score = self.amplification.join(score, consistency_)
        score = score.cpu()
        return TriggerScores(score, score > self.threshold, self.threshold)

    def to(self, device: str | torch.device) -> "TriggerDetector":
        """This detector with its tensors on ``device`` (the served model's), so scoring copies nothing per batch."""
        return replace(self, gaussians=tuple(
            replace(g, means=g.means.to(device), precision=g.precision.to(device)) for g in self.gaussians))

    def metadata(self) -> dict[str, object]:
        """Everything but the tensors, JSON-ready (what ``guard calibrate`` prints)."""
        return {"layers": list(self.layers), "threshold": self.threshold,
                "false_positive_rate": self.false_positive_rate, "calibration_images": self.calibration_images,
                "num_classes": self.num_classes, "feature_dims": self.feature_dims,
                "log_mean": [g.log_mean for g in self.gaussians], "log_std": [g.log_std for g in self.gaussians],
                "amplification": None if self.amplification is None else dataclasses.asdict(self.amplification)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file: each layer's means and precision, and the rest as its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": DETECTOR_FORMAT, "version": str(DETECTOR_VERSION),
                **{k: json.dumps(v) for k, v in self.metadata().items()}}
        tensors = {}
        for i, g in enumerate(self.gaussians):
            tensors[f"means.{i}"] = g.means.double().contiguous().cpu()
            tensors[f"precision.{i}"] = g.precision.double().contiguous().cpu()
        save_file(tensors, str(path), metadata=meta)
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
                             f"{meta.get('format')!r}, version {meta.get('version')!r}); "
                             "write it with `guard calibrate`")
        try:
            values = {k: json.loads(meta[k]) for k in ("layers", "threshold", "false_positive_rate",
                                                       "calibration_images", "log_mean", "log_std")}
            gaussians = tuple(LayerGaussian(tensors[f"means.{i}"], tensors[f"precision.{i}"], values["log_mean"][i],
                                            values["log_std"][i]) for i in range(len(values["layers"])))
            amplification = json.loads(meta.get("amplification", "null"))
            amplification = None if amplification is None else Amplification(**amplification)
        except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: missing or malformed tensors or metadata ({exc})") from exc
        if len(tensors) != 2 * len(gaussians):
            raise ValueError(f"{path}: expected {2 * len(gaussians)} tensors, got {sorted(tensors)}")
        return cls(tuple(values["layers"]), gaussians, values["threshold"], values["false_positive_rate"],
                   values["calibration_images"], amplification)
