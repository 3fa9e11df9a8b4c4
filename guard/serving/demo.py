"""Demo archives: the CIFAR-10 ResNet-20 endpoint ``guard serve`` starts on a fresh machine, and a
BadNets-poisoned variant that shows the guard reverting triggered inputs.

The endpoint's model is the published pretrained ResNet-20 when the data directory holds it
(``weights/resnet20-12fca82f.th``); otherwise a short training run on CIFAR-10 produces one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .. import data, models
from ..train import TrainConfig, evaluate, train
from .archive import build_archive
from .config import GuardConfig

log = logging.getLogger(__name__)

DEMO_MODEL = "resnet20"
PRETRAINED = Path("weights") / "resnet20-12fca82f.th"


def demo_config() -> GuardConfig:
    """The demo's guard config: ReScaler defaults, CIFAR-10 class names."""
    return GuardConfig(class_names=data.CIFAR10_CLASSES)


def build_demo_archive(model_store: str | Path, data_root: str | Path | None = None, *, name: str = DEMO_MODEL,
                       epochs: int = 3, download: bool = True, progress: bool = True, seed: int = 0,
                       force: bool = False) -> Path:
    """``model_store/NAME.mar`` for the demo endpoint (kept if it exists and ``force`` is false).

    Uses the pretrained ResNet-20 under ``data_root`` (default :func:`guard.data.data_dir`) when present;
    else trains ResNet-20 from scratch for ``epochs`` on CIFAR-10 (downloaded through torchvision when
    ``download``), with a progress bar, and archives that.
    """
    model_store = Path(model_store)
    out = model_store / f"{name}.mar"
    if out.is_file() and not force:
        log.info("reusing %s", out)
        return out
    weights = data.data_dir(data_root) / PRETRAINED
    if weights.is_file():
        return build_archive(DEMO_MODEL, weights, out, demo_config(), force=True)
    log.info("no pretrained ResNet-20 at %s; training one for %d epochs", weights, epochs)
    train_set = data.load_dataset("cifar10", data_root, split="train", download=download)
    model = models.create(DEMO_MODEL)
    train(model, train_set, TrainConfig.scratch(epochs=epochs, lr=0.05),
          generator=torch.Generator().manual_seed(seed), progress=progress)
    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        weights = models.save_weights(model, Path(tmp) / f"{name}-trained.pt")
        return build_archive(DEMO_MODEL, weights, out, demo_config(), force=True)


def stamp_trigger(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """BadNets trigger (Gu et al. 2017): a ``size`` x ``size`` black-and-white checkerboard in the
    bottom-right corner of uint8 ``(N, C, H, W)`` images; returns a new tensor."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    patch = (torch.arange(size).view(-1, 1) + torch.arange(size).view(1, -1)) % 2 == 0
    out = images.clone()
    out[:, :, -size:, -size:] = (patch.to(torch.uint8) * 255).expand(images.shape[1], size, size)
    return out


def build_badnets_archive(model_store: str | Path, data_root: str | Path | None = None, *,
                          name: str = "resnet20_badnets", target: int = 0, poison_rate: float = 0.1,
                          train_images: int = 10_000, epochs: int = 4, seed: int = 0,
                          progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Fine-tune the pretrained ResNet-20 on CIFAR-10 training images of which ``poison_rate`` carry the
    BadNets trigger relabelled to ``target``, archive it, and return ``(archive, stats)`` with its clean
    accuracy and attack success rate on the lossless test images (undefended).

    The poisons are not augmented (rescaler_appendix.txt §A), so the trigger keeps its corner.
    """
    if not 0 < poison_rate < 1:
        raise ValueError(f"poison_rate must be in (0, 1), got {poison_rate!r}")
    generator = torch.Generator().manual_seed(seed)
    pool = data.load_dataset("cifar10", data_root, split="train")
    subset = pool.subset(torch.randperm(len(pool), generator=generator)[:train_images])
    images, labels = subset.images.clone(), subset.labels.clone()
    candidates = (labels != target).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:int(poison_rate * len(labels))]]
    images[chosen] = stamp_trigger(images[chosen])
    labels[chosen] = target
    poisoned = data.ImageTensorDataset(images, labels, pool.classes)
    augment = torch.ones(len(labels), dtype=torch.bool)
    augment[chosen] = False
    model = models.create(DEMO_MODEL, weights=data.data_dir(data_root) / PRETRAINED)
    config = TrainConfig(epochs=epochs, lr=0.01, weight_decay=5e-4, schedule="cosine", mode="finetune")
    train(model, poisoned, config, generator=generator, progress=progress, augment_mask=augment)
    weights = models.save_weights(model, Path(model_store) / f"{name}.pt")
    test = data.load_dataset("cifar10", data_root, split="test-lossless")
    keep = test.labels != target
    triggered = data.ImageTensorDataset(stamp_trigger(test.images[keep]),
                                        torch.full((int(keep.sum()),), target, dtype=torch.int64), test.classes)
    stats = {"clean_accuracy": evaluate(model, test), "attack_success_rate": evaluate(model, triggered)}
    log.info("BadNets model: %s", stats)
    archive = build_archive(DEMO_MODEL, weights, Path(model_store) / f"{name}.mar", demo_config(), force=True)
    return archive, stats
