"""The result of a model scan, as written to ``report.json`` and read back by the serving handler."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["ScanReport", "save_trigger_png"]

#: model scans (guard.detect), then training-set cleansing verdicts (guard.cleanse: CleanseResult.scan_report)
_METHODS = ("cnc", "nc", "re", "ac", "ci")


@dataclass(frozen=True)
class ScanReport:
    """A model-level backdoor verdict with per-class anomaly scores.

    ``scores[c]``: CNC — the calibrated anomaly score S_c (higher ⇒ more suspicious); NC — the MAD anomaly
    index of class c's reversed-trigger L1 norm, signed so that a *small* norm is positive (higher ⇒ more
    suspicious in both); a cleansing verdict (``re``, ``ac``, ``ci``) carries the cleanser's per-class scores
    (see :class:`guard.cleanse.CleanseResult`). ``backdoored`` is ``max(scores) > threshold``; ``flagged_class``
    the arg-max when backdoored, else ``None``. ``details`` holds method-specific per-class numbers (JSON-ready).
    """

    method: str
    backdoored: bool
    flagged_class: int | None
    scores: dict[int, float]
    threshold: float
    details: dict = field(default_factory=dict)
    triggers: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if not self.scores:
            raise ValueError("scores must hold at least one class")
        if self.flagged_class is not None and self.flagged_class not in self.scores:
            raise ValueError(f"flagged_class {self.flagged_class} is not among the scored classes "
                             f"{sorted(self.scores)}")
        if self.backdoored != (self.flagged_class is not None):
            raise ValueError(f"backdoored={self.backdoored} contradicts flagged_class={self.flagged_class}")

    @property
    def max_score(self) -> float:
        """The model-level score (ALGORITHMS.md D3 step 3 for CNC, the model anomaly index for NC)."""
        return max(self.scores.values())

    def to_dict(self) -> dict:
        return {"backdoored": self.backdoored, "flagged_class": self.flagged_class,
                "scores": {str(c): s for c, s in sorted(self.scores.items())}, "method": self.method,
                "max_score": self.max_score, "threshold": self.threshold,
                "triggers": {str(c): p for c, p in sorted(self.triggers.items())}, "details": self.details}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "ScanReport":
        if not isinstance(data, dict):
            raise ValueError(f"a scan report must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("backdoored", "flagged_class", "scores", "method", "threshold") if k not in data]
        if missing:
            raise ValueError(f"scan report lacks the keys {missing}; expected the output of `guard scan`")
        try:
            scores = {int(c): float(s) for c, s in data["scores"].items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"scan report 'scores' must map class indices to numbers, got "
                             f"{data['scores']!r}") from exc
        if not all(math.isfinite(s) for s in scores.values()):
            raise ValueError("scan report scores must be finite numbers")
        flagged = data["flagged_class"]
        return cls(method=data["method"], backdoored=bool(data["backdoored"]),
                   flagged_class=None if flagged is None else int(flagged), scores=scores,
                   threshold=float(data["threshold"]), details=dict(data.get("details", {})),
                   triggers={int(c): str(p) for c, p in dict(data.get("triggers", {})).items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScanReport":
        """Read a ``report.json`` written by :meth:`save` (``guard scan --out``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scan report not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def save_trigger_png(trigger: torch.Tensor, path: str | os.PathLike, *, scale: int = 4) -> Path:
    """Write an image-shaped trigger ``(C, H, W)`` as a PNG, min–max stretched to the full 8-bit range
    (additive triggers are small and signed) and enlarged ``scale``× with nearest-neighbour pixels."""
    if not isinstance(trigger, torch.Tensor) or trigger.dim() != 3 or trigger.shape[0] not in (1, 3):
        got = tuple(trigger.shape) if isinstance(trigger, torch.Tensor) else type(trigger).__name__
        raise ValueError(f"trigger must be a (1 or 3, H, W) tensor, got {got}")
    t = trigger.detach().float().cpu()
    lo, hi = float(t.min()), float(t.max())
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    array = (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
