"""The guarded classifier a server worker runs: load an archive's model, adapt a batch, describe it.

``classify`` is the one call per server batch: ReScaler adapts the whole batch with one forward and one
backward pass (rescaler_main.txt §3, eq. 3) and returns defended and undefended logits together;
``describe`` turns them into the per-request JSON answer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .. import models
from ..rescaler import Adaptation, ReScaler
from .config import MANIFEST_NAME, ArchiveManifest, GuardConfig

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


class GuardedClassifier:
    """A registered model behind ReScaler (or bare, when ``config.enabled`` is false), with class names."""

    def __init__(self, model: models.GuardModel, config: GuardConfig) -> None:
        if not isinstance(model, models.GuardModel):
            raise TypeError(f"expected a guard.models.GuardModel, got {type(model).__name__}")
        if model.spec.input_size[0] != 3:
            raise ValueError(f"serving decodes RGB images; model {model.spec.name!r} expects "
                             f"{model.spec.input_size[0]} channels")
        self.model = model.eval()
        self.config = config
        self.class_names = config.names_for(model.num_classes)
        self.rescaler = (ReScaler(model, config.rescaler.eps, config.rescaler.alpha, config.rescaler.steps)
                         if config.enabled else None)

    @classmethod
    def from_archive_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu") -> "GuardedClassifier":
        """Load what ``guard archive`` packed, after checking the weights' SHA-256 against the manifest.

        Raises :class:`WeightsMismatchError` when the weights were changed after archiving.
        """
        model_dir = Path(model_dir)
        manifest = ArchiveManifest.load(model_dir / MANIFEST_NAME)
        weights = model_dir / manifest.weights_file
        if not weights.is_file():
            raise FileNotFoundError(f"archive is missing its weights file {manifest.weights_file!r}")
        actual = sha256_file(weights)
        if actual != manifest.weights_sha256:
            raise WeightsMismatchError(f"weights {manifest.weights_file} have SHA-256 {actual}, but the archive "
                                       f"manifest expects {manifest.weights_sha256}; refusing to load "
                                       f"(rebuild the archive with `guard archive`)")
        model = models.create(manifest.model, num_classes=manifest.num_classes, weights=weights)
        log.info("loaded %s (%d classes, weights sha256 %s…) guard=%s", manifest.model, manifest.num_classes,
                 actual[:12], "on" if manifest.guard.enabled else "off")
        return cls(model.to(device), manifest.guard)

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
        images = images.to(self.device)
        if self.rescaler is not None:
            return self.rescaler.adapt(images)
        with torch.inference_mode():
            logits = self.model(images).float()
        return Adaptation(logits=logits, original_logits=logits,
                          scalars=logits.new_zeros(logits.shape[0], 0))

    def describe(self, result: Adaptation) -> list[dict[str, object]]:
        """One answer per input: defended label and class, top-k probabilities, the undefended label,
        whether the guard changed the prediction, and the anomaly score.

        ``anomaly_score`` is how much probability the undefended prediction lost under adaptation,
        ``p(y₀ | x) − p_w(y₀ | x)`` with y₀ the undefended label: near 0 for inputs ReScaler leaves alone,
        large for inputs whose prediction rests on the residual units it damps (triggered inputs).
        """
        probs = result.logits.float().softmax(1).cpu()
        original_probs = result.original_logits.float().softmax(1).cpu()
        labels = probs.argmax(1)
        original = original_probs.argmax(1)
        k = min(self.config.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        rows = torch.arange(probs.shape[0])
        scores = (original_probs[rows, original] - probs[rows, original]).tolist()
        answers = []
        for i in range(probs.shape[0]):
            label = int(labels[i])
            answers.append({
                "label": label,
                "class": self.class_names[label],
                "probabilities": {self.class_names[int(c)]: float(p) for p, c in zip(top_p[i], top_i[i])},
                "original_label": int(original[i]),
                "reverted": label != int(original[i]),
                "anomaly_score": float(scores[i]),
            })
        return answers
