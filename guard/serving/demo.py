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
from ..attacks import create_attack
from ..metrics import nontarget_asr
from ..train import TrainConfig, evaluate, predict, train
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
    ``download``), with a progress bar, and archives that. Without either, :class:`guard.data.DataNotFoundError`
    names both places it looked.
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
    try:
        train_set = data.load_dataset("cifar10", data_root, split="train", download=download)
    except data.DataNotFoundError as exc:
        raise data.DataNotFoundError(f"the demo model needs the pretrained ResNet-20 at {weights} or CIFAR-10 "
                                     f"to train one; {exc}") from exc
    generator = torch.Generator().manual_seed(seed)
    model = models.create(DEMO_MODEL, generator=generator)
    train(model, train_set, TrainConfig.scratch(epochs=epochs, lr=0.05), generator=generator, progress=progress)
    with tempfile.TemporaryDirectory(prefix="guard-demo-") as tmp:
        weights = models.save_weights(model, Path(tmp) / f"{name}-trained.pt")
        return build_archive(DEMO_MODEL, weights, out, demo_config(), force=True)


def build_badnets_archive(model_store: str | Path, data_root: str | Path | None = None, *,
                          name: str = "resnet20_badnets", target: int = 0, poison_rate: float = 0.1,
                          train_images: int = 10_000, epochs: int = 4, seed: int = 0,
                          progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Fine-tune the pretrained ResNet-20 on CIFAR-10 training images of which ``poison_rate`` carry the
    BadNets trigger relabelled to ``target``, archive it, and return ``(archive, stats)`` with its clean
    accuracy and attack success rate on the lossless test images (undefended).

    The poisons are not augmented (rescaler_appendix.txt §A), so the trigger keeps its corner.
    """
    attack = create_attack("badnets", target=target, budget=poison_rate)
    generator = torch.Generator().manual_seed(seed)
    pool = data.load_dataset("cifar10", data_root, split="train")
    subset = pool.subset(torch.randperm(len(pool), generator=generator)[:train_images])
    poisoned = attack.poison(subset, generator=generator)
    model = models.create(DEMO_MODEL, weights=data.data_dir(data_root) / PRETRAINED)
    config = TrainConfig(epochs=epochs, lr=0.01, weight_decay=5e-4, schedule="cosine", mode="finetune")
    train(model, poisoned.dataset, config, generator=generator, progress=progress,
          augment_mask=~poisoned.poison_mask)
    weights = models.save_weights(model, Path(model_store) / f"{name}.pt")
    test = data.load_dataset("cifar10", data_root, split="test-lossless")
    stats = {"clean_accuracy": evaluate(model, test),
             "attack_success_rate": nontarget_asr(predict(model, attack.triggered(test)), test.labels, target)}
    log.info("BadNets model: %s", stats)
    archive = build_archive(DEMO_MODEL, weights, Path(model_store) / f"{name}.mar", demo_config(), force=True)
    return archive, stats
