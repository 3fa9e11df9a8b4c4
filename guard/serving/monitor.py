"""Sliding-window estimate of the attack success rate seen by a served model.

Among the recent requests the *undefended* model assigned to class c, the monitor counts those that show an
attack, and estimates the share of class-c predictions that are attacks succeeding on the undefended model.

- **With a trigger detector in the archive** (``guard calibrate``), an attack shows as a flagged request. The
  detector flags a share ``f`` of clean inputs (its calibrated false-positive rate), so a class whose share ``q``
  of requests carries a trigger is flagged at ``q·t + (1 − q)·f`` (``t``: the detection rate); the gauge
  inverts that with ``t = 1``: ``(flagged share − f) / (1 − f)``, clipped at 0 — exact when the detector catches
  every trigger, an underestimate by the factor ``t`` otherwise (``benchmarks/guard_end_to_end.py`` measures
  it).
- **Without one**, an attack shows as a prediction ReScaler reverted (rescaler_main.txt Table 1: put-back
  rates above 95 % for feature-collision and bullseye poisons). A patch backdoor the guard does not revert
  (``benchmarks/badnets_serve.py``) leaves this estimate at or even below the false-revert rate; calibrate a
  detector for those.

Each server worker keeps its own window; with several workers per model the exported gauge is the
window of whichever worker reported last.
"""

from __future__ import annotations

from collections import deque

import torch


class RevertMonitor:
    """Counts over the last ``window`` predictions: per original class, how many, and how many showed an attack
    (reverted, or flagged); ``base_rate``: the share of clean requests that show one anyway (the detector's
    calibrated false-positive rate; 0 for reverts)."""

    def __init__(self, num_classes: int, window: int, base_rate: float = 0.0) -> None:
        for name, value in (("num_classes", num_classes), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(base_rate, bool) or not isinstance(base_rate, (int, float)) or not 0 <= base_rate < 1:
            raise ValueError(f"base_rate must be a number in [0, 1), got {base_rate!r}")
        self.num_classes = num_classes
        self.base_rate = float(base_rate)
        self.window = window
        self._recent: deque[tuple[int, bool]] = deque()
        self._seen = [0] * num_classes
        self._reverted = [0] * num_classes

    def update(self, original_labels: torch.Tensor, reverted: torch.Tensor) -> None:
        """Record a batch: the undefended labels (B,) and whether each request showed an attack (B,)."""
        if original_labels.shape != reverted.shape or original_labels.dim() != 1:
            raise ValueError(f"expected two (B,) tensors, got shapes {tuple(original_labels.shape)} "
                             f"and {tuple(reverted.shape)}")
        for label, flipped in zip(original_labels.tolist(), reverted.tolist()):
            if not 0 <= label < self.num_classes:
                raise ValueError(f"label {label} out of range for {self.num_classes} classes")
            self._recent.append((label, bool(flipped)))
            self._seen[label] += 1
            self._reverted[label] += bool(flipped)
            if len(self._recent) > self.window:
                old, old_flipped = self._recent.popleft()
                self._seen[old] -= 1
                self._reverted[old] -= old_flipped

    def estimated_asr(self) -> list[float]:
        """Per class, among the window's predictions of that class (0 if none): the share that showed an attack,
        corrected for the base rate, ``max(0, (shown − base) / (1 − base))``."""
        base = self.base_rate
        return [max(0.0, (r / s - base) / (1 - base)) if s else 0.0 for r, s in zip(self._reverted, self._seen)]

    def __len__(self) -> int:
        return len(self._recent)
