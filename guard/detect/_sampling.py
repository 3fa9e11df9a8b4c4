"""Batches of trusted images for trigger inversion (shared by CNC and Neural Cleanse)."""

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


class TrustedSampler:
    """Random batches (with replacement across batches) of float images in [0, 1], optionally leaving out
    one class and with a random horizontal flip per image — the sampling of the PyP inversion code
    (ALGORITHMS.md D3 step 2b, D4 Algorithm 6). All draws come from the ``generator``."""

    def __init__(self, dataset: ImageTensorDataset, device: torch.device) -> None:
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.device = device

    def pool(self, exclude: int | None) -> torch.Tensor:
        """Indices of the images whose label is not ``exclude`` (all when ``None``)."""
        if exclude is None:
            return torch.arange(len(self.labels))
        index = torch.nonzero(self.labels.cpu() != exclude).flatten()
        if index.numel() == 0:
            raise ValueError(f"the trusted set holds only images of class {exclude}; trigger inversion "
                             f"needs images of other classes")
        return index

    def batch(self, pool: torch.Tensor, size: int, generator: torch.Generator, *,
              flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pick = pool[torch.randint(0, pool.numel(), (min(size, pool.numel()),), generator=generator)]
        pick = pick.to(self.device)
        x = self.images[pick].float().div_(255)
        if flip:
            flips = (torch.rand(x.shape[0], generator=generator) < 0.5).to(self.device)
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        return x, self.labels[pick]
