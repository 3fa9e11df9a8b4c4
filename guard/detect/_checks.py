"""Input checks every scan starts with (shared by the detectors)."""

from __future__ import annotations

import logging

import torch

from ..data import ImageTensorDataset
from ..models import GuardModel

logger = logging.getLogger(__name__)


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
    if generator is None:
        generator = torch.Generator()
        logger.info("no generator given; seeded a fresh one with %d", generator.seed())
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
    return generator
