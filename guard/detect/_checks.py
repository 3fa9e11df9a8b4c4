"""Input checks every scan starts with (shared by the detectors)."""

from __future__ import annotations

import torch

from .._validation import resolve_generator
from ..data import ImageTensorDataset
from ..models import GuardModel


def check_dataset(dataset: object, name: str) -> ImageTensorDataset:
    if not isinstance(dataset, ImageTensorDataset):
        raise TypeError(f"{name} must be a guard.data.ImageTensorDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; expected at least one image")
    return dataset


def check_scan_inputs(model: object, generator: torch.Generator | None) -> torch.Generator:
    """The checks every scan starts with; returns the generator (a freshly seeded one, logged, if ``None``)."""
    if not isinstance(model, GuardModel):
        raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
    return resolve_generator(generator)


def check_classes(classes: object) -> tuple[int, ...] | None:
    """A config's ``classes`` field: ``None`` (all) or distinct non-negative class indices, as a tuple."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ValueError(f"classes must be None or distinct non-negative class indices, got {classes!r}")
    classes = tuple(classes)
    if not classes or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes) \
            or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be None or distinct non-negative class indices, got {classes!r}")
    return classes


def scanned_classes(classes: tuple[int, ...] | None, model: GuardModel, at_least: int = 1) -> tuple[int, ...]:
    """The classes a scan covers (all of the model's when ``None``), checked against the model."""
    k = model.num_classes
    chosen = classes if classes is not None else tuple(range(k))
    if max(chosen) >= k or len(chosen) < at_least:
        raise ValueError(f"classes must be at least {at_least} labels in [0, {k - 1}] for a {k}-class model, "
                         f"got {chosen}")
    return chosen
