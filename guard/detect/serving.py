"""What the serving handler needs from a scan: the report's per-class gauges and a per-request score.

The per-request score compares the served (pivot) model with the repaired model on the same inputs: a
triggered input is exactly where the two disagree (the repair erased the backdoor; clean inputs keep their
label, ALGORITHMS.md D2/D3). The handler already has the pivot's logits, so scoring costs one extra
forward of the repaired model per server batch, with no per-image loop.

Example (inside a handler)::

    scorer = RequestScorer.from_files("repaired.pt", "resnet20", report="report.json")
    gauges = scorer.class_gauges()                 # {class: anomaly score} for guard_scan_score
    scores = scorer.score(images, pivot_logits)    # RequestScores with .score, .disagree, .repaired_label
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .._validation import check_images
from ..models import GuardModel, create
from .base import ScanReport

__all__ = ["RequestScorer", "RequestScores"]


@dataclass(frozen=True)
class RequestScores:
    """Per-image results, each ``(B,)``: ``score`` — total-variation distance between the pivot's and the
    repaired model's softmax, in [0, 1] (0: identical beliefs, 1: disjoint); ``disagree`` — the top-1
    labels differ; ``repaired_label`` — the repaired model's top-1 label."""

    score: torch.Tensor
    disagree: torch.Tensor
    repaired_label: torch.Tensor

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
        return RequestScores(score.clamp(0, 1).cpu(), disagree.cpu(), repaired_label.cpu())

    def to(self, device: str | torch.device) -> "RequestScorer":
        if self.repaired is not None:
            self.repaired.to(device)
        return self
