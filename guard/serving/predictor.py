"""The guarded classifier a server worker runs: load an archive's model, adapt a batch, describe it.

``observe`` (``classify``) is the one call per server batch: ReScaler adapts the whole batch with one forward and
one backward pass (rescaler_main.txt §3, eq. 3) and returns defended and undefended logits together, plus the
features its first forward computed at the layers the trigger detector reads; ``score`` adds, when the
archive carries a repaired model, one batched forward of it for the per-request backdoor score
(:class:`guard.detect.RequestScorer`); ``detect`` scores the features with the archive's trigger detector
(:class:`guard.detect.TriggerDetector`, no extra pass); ``describe`` applies the endpoint policy of the guard
config and turns all of it into the per-request answers.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .. import models
from ..detect import RequestScorer, RequestScores, TriggerDetector, TriggerScores, consistency, layer_features
from ..rescaler import Adaptation, ReScaler
from .config import MANIFEST_NAME, REFUSED_STATUS, ArchiveManifest, GuardConfig
from .decode import BadRequest

log = logging.getLogger(__name__)


class WeightsMismatchError(RuntimeError):
    """The weights in an archive are not the ones it was built with; the server refuses to load them."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(model_dir: Path, name: str, expected: str, what: str) -> Path:
    """``model_dir / name`` after checking it exists and has the SHA-256 the manifest recorded."""
    path = model_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"archive is missing its {what} file {name!r}")
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsMismatchError(f"{what} {name} has SHA-256 {actual}, but the archive manifest expects "
                                   f"{expected}; refusing to load (rebuild the archive with `guard archive`)")
    return path


class GuardedClassifier:
    """A registered model behind ReScaler (or bare, when ``config.enabled`` is false), with class names;
    ``scorer`` carries the archive's scan report and repaired model, ``detector`` its trigger detector, when it
    has them."""

    def __init__(self, model: models.GuardModel, config: GuardConfig, scorer: RequestScorer | None = None,
                 detector: TriggerDetector | None = None) -> None:
        if not isinstance(model, models.GuardModel):
            raise TypeError(f"expected a guard.models.GuardModel, got {type(model).__name__}")
        if scorer is not None and not isinstance(scorer, RequestScorer):
            raise TypeError(f"scorer must be a guard.detect.RequestScorer or None, got {type(scorer).__name__}")
        if detector is not None and not isinstance(detector, TriggerDetector):
            raise TypeError(f"detector must be a guard.detect.TriggerDetector or None, got {type(detector).__name__}")
        if detector is not None:
            detector.check_model(model)
        if config.answer == "repaired" and (scorer is None or scorer.repaired is None):
            raise ValueError("answer='repaired' needs a repaired model (a RequestScorer with one)")
        if config.on_trigger == "refuse" and detector is None:
            raise ValueError("on_trigger='refuse' needs a trigger detector")
        if model.spec.input_size[0] != 3:
            raise ValueError(f"serving decodes RGB images; model {model.spec.name!r} expects "
                             f"{model.spec.input_size[0]} channels")
        self.model = model.eval()
        self.config = config
        self.class_names = config.names_for(model.num_classes)
        self.rescaler = (ReScaler(model, config.rescaler.eps, config.rescaler.alpha, config.rescaler.steps)
                         if config.enabled else None)
        self.scorer = scorer
        # the trigger detector's amplified copies of the served model, built once (none without an amplification)
        self.amplified = ([] if detector is None or detector.amplification is None
                          else detector.amplification.copies(self.model))
        self.detector = detector

    @classmethod
    def from_archive_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu") -> "GuardedClassifier":
        """Load what ``guard archive`` packed, after checking the weights' SHA-256 against the manifest.

        Raises :class:`WeightsMismatchError` when the manifest (its guard config), the weights, the scan report,
        the repaired weights or the trigger detector were changed after archiving.
        """
        model_dir = Path(model_dir)
        manifest = ArchiveManifest.load(model_dir / MANIFEST_NAME)
        if manifest.version >= 3 and manifest.manifest_sha256 != manifest.digest():
            raise WeightsMismatchError(f"{MANIFEST_NAME} was changed after archiving: its content has SHA-256 "
                                       f"{manifest.digest()}, but it records {manifest.manifest_sha256}; refusing "
                                       f"to load (rebuild the archive with `guard archive`)")
        weights = _verified(model_dir, manifest.weights_file, manifest.weights_sha256, "weights")
        model = models.create(manifest.model, num_classes=manifest.num_classes, weights=weights)
        scorer = None
        if manifest.scan_file is not None or manifest.repaired_file is not None:
            scan = (None if manifest.scan_file is None else
                    _verified(model_dir, manifest.scan_file, manifest.scan_sha256, "scan report"))
            repaired = (None if manifest.repaired_file is None else
                        _verified(model_dir, manifest.repaired_file, manifest.repaired_sha256, "repaired weights"))
            scorer = RequestScorer.from_files(repaired, manifest.model, report=scan,
                                              num_classes=manifest.num_classes, device=device)
        detector = None
        if manifest.detector_file is not None:
            detector = TriggerDetector.load(_verified(model_dir, manifest.detector_file, manifest.detector_sha256,
                                                      "trigger detector")).to(device)
        log.info("loaded %s (%d classes, weights sha256 %s…) guard=%s scan=%s repaired=%s detector=%s policy=%s/%s",
                 manifest.model, manifest.num_classes, manifest.weights_sha256[:12],
                 "on" if manifest.guard.enabled else "off", manifest.scan_file is not None,
                 manifest.repaired_file is not None, detector is not None, manifest.guard.answer,
                 manifest.guard.on_trigger)
        return cls(model.to(device), manifest.guard, scorer, detector)

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) every request image is brought to."""
        _, height, width = self.model.spec.input_size
        return height, width

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def classify(self, images: torch.Tensor) -> Adaptation:
        """Defended and undefended logits for a batch ``(B, 3, H, W)`` in [0, 1] — one ReScaler pass."""
        return self.observe(images)[0]

    def observe(self, images: torch.Tensor) -> tuple[Adaptation, dict[str, torch.Tensor]]:
        """:meth:`classify`, and the features ``{layer: (B, D)}`` of the undefended forward that the archive's
        trigger detector reads (none without one), captured in the same pass (what :meth:`detect` scores)."""
        images = images.to(self.device)
        layers = () if self.detector is None else self.detector.layers
        with layer_features(self.model, layers) as captured:
            if self.rescaler is not None:
                result = self.rescaler.adapt(images)
            else:
                with torch.inference_mode():
                    logits = self.model(images).float()
                result = Adaptation(logits=logits, original_logits=logits, scalars=logits.new_zeros(logits.shape[0], 0))
        return result, {name: values[0] for name, values in captured.items()}

    def detect(self, result: Adaptation, features: dict[str, torch.Tensor], images: torch.Tensor
               ) -> TriggerScores | None:
        """The archive's trigger detector on :meth:`observe`'s features of ``images`` (classes: the undefended
        labels) — with an amplification, one more forward pass of ``images`` per amplified copy — or ``None`` when
        the archive has none."""
        if self.detector is None:
            return None
        if not self.amplified:
            return self.detector.score(features, result.original_labels)
        labels = result.original_labels
        return self.detector.score(features, labels, consistency(self.amplified, images.to(self.device), labels))

    def score(self, images: torch.Tensor, result: Adaptation) -> RequestScores | None:
        """Per-request backdoor scores of a classified batch against the archive's repaired model (one
        batched forward of it), or ``None`` when the archive has no repaired model."""
        if self.scorer is None or self.scorer.repaired is None:
            return None
        return self.scorer.score(images.to(self.device), result.original_logits)

    def describe(self, result: Adaptation, scores: RequestScores | None = None,
                 trigger: TriggerScores | None = None) -> list[dict[str, object] | BadRequest]:
        """One answer per input under the endpoint policy (:class:`GuardConfig` ``answer`` and ``on_trigger``):
        the answered label and class with its top-k probabilities, the undefended label, whether the answer
        differs from it, and the anomaly score; with ``scores`` (:meth:`score`) also ``backdoor_score``,
        ``repaired_label`` and ``disagree``; with ``trigger`` (:meth:`detect`) also ``trigger_score`` and
        ``flagged`` — or, for a flagged input under ``on_trigger="refuse"``, a :class:`BadRequest` with status
        :data:`~guard.serving.config.REFUSED_STATUS`, the score and the threshold, in place of the answer.

        ``anomaly_score`` is how much probability the undefended prediction lost under adaptation,
        ``p(y₀ | x) − p_w(y₀ | x)`` with y₀ the undefended label: near 0 for inputs ReScaler leaves alone,
        large for inputs whose prediction rests on the residual units it damps. ``backdoor_score`` is the
        total-variation distance between the served and the repaired model's probabilities
        (:class:`guard.detect.RequestScores`); ``trigger_score`` the sum over the detector's layers of the
        standardized log Mahalanobis distances of the input's features to clean inputs of its class
        (:class:`guard.detect.TriggerDetector`).
        """
        if self.config.answer == "repaired" and scores is None:
            raise ValueError("answer='repaired' needs the repaired model's scores (GuardedClassifier.score)")
        probs = result.logits.float().softmax(1).cpu()
        original_probs = result.original_logits.float().softmax(1).cpu()
        original = original_probs.argmax(1)
        rows = torch.arange(probs.shape[0])
        anomaly = (original_probs[rows, original] - probs[rows, original]).tolist()
        answered = scores.probabilities.float() if self.config.answer == "repaired" else probs
        labels = answered.argmax(1)
        k = min(self.config.top_k, answered.shape[1])
        top_p, top_i = answered.topk(k, dim=1)
        answers: list[dict[str, object] | BadRequest] = []
        for i in range(probs.shape[0]):
            label = int(labels[i])
            answers.append({
                "label": label,
                "class": self.class_names[label],
                "probabilities": {self.class_names[int(c)]: float(p) for p, c in zip(top_p[i], top_i[i])},
                "original_label": int(original[i]),
                "reverted": label != int(original[i]),
                "anomaly_score": float(anomaly[i]),
            })
        if scores is not None:
            for answer, extra in zip(answers, scores.to_list()):
                answer.update(extra)
        if trigger is not None:
            for i, extra in enumerate(trigger.to_list()):
                answers[i].update(extra)
                if extra["flagged"] and self.config.on_trigger == "refuse":
                    answers[i] = BadRequest(
                        REFUSED_STATUS, f"refused: the guard's trigger detector scores this input "
                                        f"{extra['trigger_score']:.4g}, above its threshold {trigger.threshold:.4g} "
                                        f"(calibrated to flag {self.detector.false_positive_rate:.2%} of clean inputs)",
                        kind="TriggerDetected",
                        details={"trigger_score": extra["trigger_score"], "threshold": trigger.threshold})
        return answers
