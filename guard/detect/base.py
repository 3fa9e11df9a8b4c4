"""The detector interface and registry, the result of a scan, and the report it writes.

A detector is one class with a frozen, validated config and one verb, :meth:`Detector.scan`, with the same
signature for every detector; it returns a :class:`ScanResult` whose :class:`ScanReport` is what
``guard scan`` writes to ``report.json`` and the serving handler reads back. Detectors are addressed by
name (``create_detector("cnc", steps_per_class=5)``); the CLI, ``guard info``, archive manifests and the
metric labels take the names from :func:`list_detectors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._validation import is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..registry import Configured, Registry
from .inversion import TriggerForm

__all__ = ["Detector", "MADResult", "ScanReport", "ScanResult", "calibrate_threshold", "create_detector",
           "describe_detectors", "get_detector", "list_detectors", "mad_anomaly_index", "register_detector",
           "register_report_method", "report_methods", "save_trigger_png",
           "separation_index"]

#: a top class "stands out" when its score's MAD anomaly index among the class scores exceeds this (the
#: Neural Cleanse outlier threshold, ALGORITHMS.md D4)
SEPARATION_THRESHOLD = 2.0


@dataclass(frozen=True)
class ScanReport:
    """A model-level backdoor verdict with per-class anomaly scores.

    ``method``: the registered detector that wrote it. ``scores[c]``: CNC — the calibrated anomaly score
    S_c (higher ⇒ more suspicious); NC — the MAD anomaly index of class c's reversed-trigger L1 norm, signed
    so that a *small* norm is positive (higher ⇒ more suspicious in both). ``backdoored``: the model-level
    verdict against ``threshold``. ``separation``: how far the top class stands out from the others (its
    score's MAD anomaly index among the class scores; ``None`` with fewer than three classes).
    ``flagged_class``: the top class when the model is backdoored *and* that class stands out
    (separation > :data:`SEPARATION_THRESHOLD`), else ``None`` — a verdict without a class says the scan
    cannot tell which class is the target. ``caveat``: why the scores may not mean what they seem (e.g.
    CNC's repair changed nothing), said in :attr:`summary`. ``details``: method-specific numbers (JSON-ready).
    """

    method: str
    backdoored: bool
    flagged_class: int | None
    scores: dict[int, float]
    threshold: float
    details: dict = field(default_factory=dict)
    triggers: dict[int, str] = field(default_factory=dict)
    separation: float | None = None
    caveat: str | None = None

    def __post_init__(self) -> None:
        if self.method not in report_methods():
            raise ValueError(f"method must be a registered detector or cleanser ({', '.join(report_methods())}), "
                             f"got {self.method!r}")
        if not self.scores:
            raise ValueError("scores must hold at least one class")
        if self.flagged_class is not None and self.flagged_class not in self.scores:
            raise ValueError(f"flagged_class {self.flagged_class} is not among the scored classes "
                             f"{sorted(self.scores)}")
        if self.flagged_class is not None and not self.backdoored:
            raise ValueError(f"backdoored={self.backdoored} contradicts flagged_class={self.flagged_class}")
        if self.separation is not None and not is_number(self.separation):
            raise ValueError(f"separation must be None or a finite number, got {self.separation!r}")
        if self.caveat is not None and (not isinstance(self.caveat, str) or not self.caveat):
            raise ValueError(f"caveat must be None or a sentence, got {self.caveat!r}")

    @property
    def summary(self) -> str:
        """One line: the verdict, and whether a class stands out."""
        sep = "n/a" if self.separation is None else f"{self.separation:.2f}"
        if not self.backdoored:
            verdict = "no backdoor found"
        elif self.flagged_class is not None:
            verdict = f"backdoored: class {self.flagged_class} stands out (separation {sep})"
        else:
            verdict = (f"backdoored, but no class stands out (separation {sep} <= {SEPARATION_THRESHOLD:g}): "
                       f"the scan cannot tell which class is the target")
        return verdict if self.caveat is None else f"{verdict} — but {self.caveat}"

    @property
    def max_score(self) -> float:
        """The model-level score (ALGORITHMS.md D3 step 3 for CNC, the model anomaly index for NC)."""
        return max(self.scores.values())

    def to_dict(self) -> dict:
        return {"backdoored": self.backdoored, "flagged_class": self.flagged_class,
                "scores": {str(c): s for c, s in sorted(self.scores.items())}, "method": self.method,
                "max_score": self.max_score, "threshold": self.threshold, "separation": self.separation,
                "caveat": self.caveat,
                "summary": self.summary, "triggers": {str(c): p for c, p in sorted(self.triggers.items())},
                "details": self.details}

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
        separation = data.get("separation")
        return cls(method=data["method"], backdoored=bool(data["backdoored"]),
                   flagged_class=None if flagged is None else int(flagged), scores=scores,
                   threshold=float(data["threshold"]), details=dict(data.get("details", {})),
                   triggers={int(c): str(p) for c, p in dict(data.get("triggers", {})).items()},
                   separation=None if separation is None else float(separation),
                   caveat=data.get("caveat"))

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


def calibrate_threshold(clean_scores: list[float] | torch.Tensor, false_positive_rate: float = 0.05) -> float:
    """The threshold that flags at most ``false_positive_rate`` of the given clean scores (their ``(1 − fpr)``
    quantile; flag iff a score exceeds it): the max scores of clean models for a model-level detector, the
    scores of clean inputs for an input detector."""
    scores = torch.as_tensor(clean_scores, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("clean_scores is empty; expected the scores of clean models or clean inputs")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("clean_scores must be finite")
    if not is_number(false_positive_rate) or not 0 <= false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in [0, 1), got {false_positive_rate!r}")
    return torch.quantile(scores, 1 - false_positive_rate).item()


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


def mad_anomaly_index(values, threshold: float = 2.0) -> MADResult:
    """The MAD outlier test of Neural Cleanse on per-label values L — trigger L1 norms, small ones suspicious
    (ALGORITHMS.md D4 Detection)."""
    norms = torch.as_tensor(values, dtype=torch.float64).flatten()
    if norms.numel() < 3:
        raise ValueError(f"the MAD test needs the values of at least 3 labels, got {norms.numel()}")
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"values must be finite, got {norms.tolist()}")
    median = norms.quantile(0.5).item()  # numpy's median: the mean of the middle two for an even count
    mad = MAD_CONSTANT * (norms - median).abs().quantile(0.5).item()
    if mad == 0:
        mad = torch.finfo(torch.float64).eps
    indices = ((norms - median).abs() / mad).tolist()
    flagged = tuple(i for i, (n, a) in enumerate(zip(norms.tolist(), indices)) if n < median and a > threshold)
    return MADResult(tuple(indices), flagged, abs(norms.min().item() - median) / mad, median, mad)


def separation_index(scores: dict[int, float]) -> float | None:
    """The MAD anomaly index of the top score among all class scores (``None`` for fewer than 3 classes):
    how far the most suspicious class stands out (the test of :func:`mad_anomaly_index`, on the large side)."""
    if len(scores) < 3:
        return None
    return mad_anomaly_index([-s for s in scores.values()]).model_index


@dataclass(frozen=True)
class ScanResult:
    """What every detector's :meth:`Detector.scan` returns: the ``report``; the inverted trigger of every
    scanned class (``triggers[c]``, values of the trigger ``form``; classes where none was found are
    absent); the ``reference`` model the scan compared against (CNC's repaired model, else ``None``); the
    wall time."""

    report: ScanReport
    form: TriggerForm
    triggers: dict[int, dict[str, torch.Tensor]]
    reference: GuardModel | None
    seconds: float

    def trigger_image(self, c: int) -> torch.Tensor:
        """What class ``c``'s trigger paints, ``(C, H, W)``, for PNGs."""
        if c not in self.triggers:
            raise ValueError(f"no inverted trigger for class {c}; have {sorted(self.triggers)}")
        return self.form.image(self.triggers[c])

    def stamp(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Images ``x`` (float in [0, 1]) with class ``c``'s inverted trigger."""
        if c not in self.triggers:
            raise ValueError(f"no inverted trigger for class {c}; have {sorted(self.triggers)}")
        return self.form.stamp(x, {k: v.to(x.device, x.dtype) for k, v in self.triggers[c].items()})


class Detector(Configured, ABC):
    """Base of every model-level backdoor detector: a validated config of type ``config_class`` and
    :meth:`scan`. Construct with a config or with its fields as keyword options."""

    @abstractmethod
    def scan(self, model: GuardModel, trusted: ImageTensorDataset, heldout: ImageTensorDataset, *,
             reference: GuardModel | None = None, generator: torch.Generator | None = None,
             device: str | torch.device | None = None, progress: bool = False) -> ScanResult:
        """Score every candidate class of ``model``. ``trusted``: the defender's labelled clean images
        (D_trust); ``heldout``: held-out clean labelled images (scoring, budgets); ``reference``: a model to
        compare against, for detectors that use one (CNC: an already repaired copy, skipping the repair).
        The input model is not modified."""


DETECTORS: Registry[Detector] = Registry("detector", Detector)
register_detector = DETECTORS.register
list_detectors = DETECTORS.names
get_detector = DETECTORS.get
create_detector = DETECTORS.create  # create_detector("cnc", steps_per_class=5) -> a configured detector


#: methods whose verdicts a ScanReport carries besides the detectors (guard.cleanse registers its cleansers)
_VERDICT_SOURCES: set[str] = set()


def register_report_method(name: str) -> None:
    """Let :class:`ScanReport` carry the verdicts of ``name`` (a training-set cleanser, say) like a scan's."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a report method must be a non-empty string, got {name!r}")
    _VERDICT_SOURCES.add(name)


def report_methods() -> list[str]:
    """Every method a :class:`ScanReport` may name: the detectors and the registered verdict sources, sorted."""
    return sorted(set(DETECTORS) | _VERDICT_SOURCES)


def describe_detectors() -> dict[str, dict[str, Any]]:
    """Name -> description and default options of every registered detector (``guard info --json``)."""
    return {name: {"description": cls.description,
                   "options": json.loads(json.dumps(dataclasses.asdict(cls.config_class())))}
            for name, cls in DETECTORS.items()}
