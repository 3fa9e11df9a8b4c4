"""Sliding-window estimate of the attack success rate seen by a served model.

A poisoned model sends attacked inputs to the attacker's class; against the attacks ReScaler defends,
it puts most of those predictions back (rescaler_main.txt Table 1: put-back rates above 95 % for
feature-collision and bullseye poisons). So among the recent inputs the *undefended* model assigned to
class c, the share the guard reverted estimates how many were attacks that would have succeeded without
it: a clean class stays at the guard's false-revert rate, a class under such an attack rises above it.
The estimate is only as good as the guard's reverts: a patch backdoor the guard does not revert
(``benchmarks/badnets_serve.py``) leaves it at, or even below, the false-revert rate.

Each server worker keeps its own window; with several workers per model the exported gauge is the
window of whichever worker reported last.
"""

from __future__ import annotations

from collections import deque

import torch


class RevertMonitor:
    """Counts over the last ``window`` predictions: per original class, how many, and how many reverted."""

    def __init__(self, num_classes: int, window: int) -> None:
        for name, value in (("num_classes", num_classes), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_classes = num_classes
        self.window = window
        self._recent: deque[tuple[int, bool]] = deque()
        self._seen = [0] * num_classes
        self._reverted = [0] * num_classes

    def update(self, original_labels: torch.Tensor, reverted: torch.Tensor) -> None:
        """Record a batch: the undefended labels (B,) and whether the guard changed each prediction (B,)."""
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
        """Per class: reverted / predicted among the window's predictions of that class (0 if none)."""
        return [r / s if s else 0.0 for r, s in zip(self._reverted, self._seen)]

    def __len__(self) -> int:
        return len(self._recent)
