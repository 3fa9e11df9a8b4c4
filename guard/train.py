"""The training loop: from scratch, fine-tuning, and last-layer transfer; plus evaluation.

Every module that trains a model (victims for attacks, repair defenses, the CLI) calls :func:`train` with a
frozen :class:`TrainConfig`, so there is one implementation of shuffling, augmentation, schedules,
checkpoints and resumption. Randomness comes only from the ``generator`` passed in: the shuffling order and
the augmentation draws are taken from it, in a fixed order, so a run is reproducible from its seed and a
resumed run continues exactly where the checkpoint left off.

Recipes (presets):

* :meth:`TrainConfig.scratch` — CIFAR-10 from scratch: SGD momentum 0.9, lr 0.1, weight decay 5e-4, cosine
  annealing over 120 epochs, batch 128 (pick_your_poison.txt Table 4; ALGORITHMS.md S2).
* :meth:`TrainConfig.finetune` — fine-tune every weight: SGD momentum 0.9, lr 1e-4, weight decay 1e-4, no
  schedule, 10 epochs (pick_your_poison.txt Table 4, ImageNet row).
* :meth:`TrainConfig.last_layer` — the transfer-learning threat model of ReScaler: only the final linear
  layer is trained, every other weight and every BatchNorm layer frozen; SGD lr 0.01 for 35 epochs
  (rescaler_appendix.txt §A; ALGORITHMS.md S1), momentum 0.9 and weight decay 2e-4 as in the benchmark it
  reuses (ALGORITHMS.md S5).

Example::

    from guard.train import TrainConfig, train, evaluate
    result = train(model, train_set, TrainConfig.scratch(epochs=30), eval_set=test_set,
                   generator=torch.Generator().manual_seed(0), checkpoint="run/model.pt")
    accuracy = evaluate(model, test_set)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._validation import is_int, is_number, resolve_generator
from .data import ImageTensorDataset, check_quality_range, random_crop_flip, random_jpeg
from .models import GuardModel, load_weights, save_weights

logger = logging.getLogger(__name__)

__all__ = ["MODES", "OPTIMIZERS", "SCHEDULES", "EpochStats", "TrainConfig", "TrainResult", "evaluate", "lr_factor",
           "predict", "train", "train_state_path"]

#: TrainConfig's allowed values (``guard train`` offers the same choices)
MODES = ("scratch", "finetune", "last-layer")
SCHEDULES = ("cosine", "multistep", "none")
OPTIMIZERS = ("sgd", "adam")
_STATE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (validated on construction, picklable).

    ``mode``: ``"scratch"`` and ``"finetune"`` train every parameter that requires grad with BatchNorm in
    training mode (they differ in where the weights start and in their presets); ``"last-layer"`` trains only
    ``model.classifier`` with the rest of the network, BatchNorm included, frozen in eval mode.
    ``schedule``: the learning rate per epoch, see :func:`lr_factor`. ``steps_per_epoch``: ``None`` makes an
    epoch one pass over the training set; an int makes it that many batches drawn from an endless reshuffled
    stream (the step-counted fine-tuning loop of ALGORITHMS.md P4). ``momentum`` and ``nesterov`` apply to
    SGD only. ``jpeg``: the probability that a training image is re-encoded as a JPEG at a quality drawn from
    ``jpeg_quality`` before the crop and flip (:func:`~guard.data.random_jpeg`; 0, the default, draws nothing), for
    a model that will be served images that travelled as JPEGs.
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    optimizer: str = "sgd"
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = True
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (50, 95)
    mode: str = "scratch"
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.epochs) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(self.nesterov).__name__}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(f"nesterov=True needs optimizer='sgd' and momentum > 0, got "
                             f"optimizer={self.optimizer!r}, momentum={self.momentum!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.milestones, (str, bytes)) or not all(is_int(m) for m in self.milestones):
            raise TypeError(f"milestones must be a sequence of ints (epochs), got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.schedule == "multistep":
            ms = self.milestones
            if not ms or any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] < 1 or ms[-1] >= self.epochs:
                raise ValueError(f"schedule='multistep' needs strictly increasing milestones in "
                                 f"[1, {self.epochs - 1}], got {ms!r}")
        elif self.milestones:
            raise ValueError(f"milestones apply to schedule='multistep' only, got schedule={self.schedule!r} "
                             f"with milestones={self.milestones!r}")
        if not is_number(self.gamma) or not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be a bool, got {type(self.augment).__name__}")
        if not is_number(self.jpeg) or not 0 <= self.jpeg <= 1:
            raise ValueError(f"jpeg must be a probability in [0, 1], got {self.jpeg!r}")
        object.__setattr__(self, "jpeg_quality", check_quality_range(self.jpeg_quality, "jpeg_quality"))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps_per_epoch is not None and (not is_int(self.steps_per_epoch) or self.steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be None or an int >= 1, got {self.steps_per_epoch!r}")

    @classmethod
    def scratch(cls, **overrides) -> "TrainConfig":
        """CIFAR-10 from scratch (pick_your_poison.txt Table 4): 120 epochs, SGD 0.9, lr 0.1, wd 5e-4, cosine."""
        return cls(**{"epochs": 120, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                      "schedule": "cosine", "mode": "scratch", **overrides})

    @classmethod
    def finetune(cls, **overrides) -> "TrainConfig":
        """Fine-tune every weight (pick_your_poison.txt Table 4): 10 epochs, SGD 0.9, lr 1e-4, wd 1e-4, constant."""
        return cls(**{"epochs": 10, "lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
                      "schedule": "none", "mode": "finetune", **overrides})

    @classmethod
    def trusted_steps(cls, steps: int, eval_every: int, **overrides) -> "TrainConfig":
        """The repairs' trusted-data loop (ALGORITHMS.md P4): ``steps`` SGD steps (momentum 0.9, no weight decay,
        constant lr) in rounds of ``eval_every`` steps, each round an "epoch" after which the caller's
        ``on_epoch_end`` measures the model; the repair passes ``lr``, ``batch_size``, ``augment``, …"""
        return cls(**{"epochs": math.ceil(steps / eval_every), "momentum": 0.9, "weight_decay": 0.0,
                      "schedule": "none", "mode": "finetune", "steps_per_epoch": eval_every, **overrides})

    @classmethod
    def last_layer(cls, **overrides) -> "TrainConfig":
        """Last-layer transfer (rescaler_appendix.txt §A): 35 epochs, SGD lr 0.01, BatchNorm frozen."""
        return cls(**{"epochs": 35, "lr": 0.01, "momentum": 0.9, "weight_decay": 2e-4, "batch_size": 128,
                      "schedule": "none", "mode": "last-layer", **overrides})


def lr_factor(config: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for 0-based ``epoch``: cosine annealing to 0 over ``epochs`` (T_max =
    epochs, as torch's ``CosineAnnealingLR`` stepped per epoch), ``gamma`` per passed milestone, or 1."""
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if config.schedule == "multistep":
        return config.gamma ** bisect_right(config.milestones, epoch)
    return 1.0


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: mean training loss/accuracy over its batches (on augmented inputs), the accuracy
    on ``eval_set`` after it (``None`` without one), the learning rate it used and its wall time."""

    epoch: int
    steps: int
    loss: float
    train_accuracy: float
    eval_accuracy: float | None
    lr: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """Per-epoch history of a run (including epochs restored from a checkpoint on resume)."""

    history: tuple[EpochStats, ...]
    stopped_early: bool = False

    @property
    def last(self) -> EpochStats:
        return self.history[-1]


def train_state_path(checkpoint: str | os.PathLike) -> Path:
    """Where :func:`train` keeps the optimizer/generator/epoch state next to the weights ``checkpoint``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".state")


class _IndexStream:
    """Shuffled sample indices: a fresh permutation from the generator each time the previous one is used up.

    Batches never straddle two permutations, so with ``steps_per_epoch=None`` an epoch is exactly one pass.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.perm = torch.arange(n)
        self.pos = n

    def take(self, batch_size: int) -> torch.Tensor:
        if self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        batch = self.perm[self.pos:self.pos + batch_size]
        self.pos += batch.numel()
        return batch


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def _loader(dataset: torch.utils.data.Dataset, device: torch.device, **kwargs) -> torch.utils.data.DataLoader:
    # A private generator keeps DataLoader from drawing its worker seed from the global RNG.
    return torch.utils.data.DataLoader(dataset, pin_memory=device.type == "cuda",
                                       generator=torch.Generator(), **kwargs)


def _train_channels_last(model: nn.Module, device: torch.device, choice: bool | None) -> bool:
    """Whether :func:`train` switches ``model`` to channels-last memory format for the run: ``choice`` when given,
    else on a CPU for a model with 4-D (convolution) weights that are not channels-last already. A CIFAR ResNet-20
    trains 1.3x faster that way on 2 CPU cores (benchmarks/train_throughput.py); the GPU's layout is left as it
    is (not measured there)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    if not weights or all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                          for p in weights):
        return False
    return device.type == "cpu" if choice is None else choice


def _check_dataset(dataset: object, name: str) -> None:
    if not isinstance(dataset, torch.utils.data.Dataset):
        raise TypeError(f"{name} must be a torch Dataset (e.g. guard.data.ImageTensorDataset), "
                        f"got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty; expected at least one image")


def _trainable(model: nn.Module, config: TrainConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters to optimize, parameters to freeze for the run)."""
    if config.mode != "last-layer":
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameters with requires_grad=True to train")
        return params, []
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"mode='last-layer' needs a model whose .classifier is the final nn.Linear "
                        f"(a guard.models.GuardModel), got {type(model).__name__} with classifier "
                        f"{type(head).__name__}")
    params = list(head.parameters())
    own = {id(p) for p in params}
    return params, [p for p in model.parameters() if id(p) not in own and p.requires_grad]


def _make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def _save(model: GuardModel, checkpoint: Path, state: dict) -> None:
    """Weights (``save_weights`` format) and training state, each written to a temporary file and renamed,
    so an interruption never leaves a half-written checkpoint."""
    tmp = checkpoint.with_name(f".{checkpoint.stem}.tmp{checkpoint.suffix}")
    save_weights(model, tmp)
    os.replace(tmp, checkpoint)
    state_path = train_state_path(checkpoint)
    tmp_state = state_path.with_name(f".{state_path.name}.tmp")
    torch.save(state, tmp_state)
    os.replace(tmp_state, state_path)


def _load_state(checkpoint: Path, config: TrainConfig) -> dict:
    state_path = train_state_path(checkpoint)
    for path in (checkpoint, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} does not exist (a run writes it at the end of "
                                    f"each epoch); start without resume")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError(f"{state_path} is not a training state of version {_STATE_VERSION}")
    saved = state["config"]
    current = dataclasses.asdict(config)
    # a field added since the checkpoint was written compares as its default
    saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **saved}
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {checkpoint} with a different config ({detail})")
    return state


def train(model: nn.Module, train_set: torch.utils.data.Dataset, config: TrainConfig, *,
          eval_set: torch.utils.data.Dataset | None = None, generator: torch.Generator | None = None,
          device: str | torch.device | None = None, checkpoint: str | os.PathLike | None = None,
          resume: bool = False, progress: bool = True,
          callback: Callable[[EpochStats], bool | None] | None = None,
          augment_mask: torch.Tensor | None = None,
          extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          channels_last: bool | None = None,
          ) -> TrainResult:
    """Train ``model`` on ``train_set`` with cross-entropy, in place, and return the per-epoch history.

    ``train_set`` yields float images in [0, 1]; an :class:`~guard.data.ImageTensorDataset` takes a fast
    path (whole uint8 batches indexed at once, augmentation on the device), any other dataset goes through
    a ``DataLoader``. Augmentation is :func:`~guard.data.random_crop_flip` (``config.augment``) after
    :func:`~guard.data.random_jpeg` (``config.jpeg``);
    ``augment_mask`` (bool, one per training sample) leaves the samples marked ``False`` un-augmented, as
    the poisons in rescaler_appendix.txt §A. ``generator`` (a CPU ``torch.Generator``; a freshly seeded one
    when ``None``) drives shuffling and augmentation; the global RNG is never touched.

    ``checkpoint`` (a path; needs a :class:`~guard.models.GuardModel`) receives the weights at the end of
    every epoch, loadable by ``guard.models.create(name, weights=checkpoint)``, and
    :func:`train_state_path` the optimizer/generator/epoch state; ``resume=True`` loads both and continues
    exactly (same config required). ``callback(stats)`` runs after each epoch; returning ``True`` stops.
    ``extra_loss(x, y, logits)`` (a scalar tensor) is added to the cross-entropy of every batch, on the
    augmented inputs — the regularisers of repair defenses (Pivotal Tuning's SLOL and parameter distance,
    ALGORITHMS.md D2) ride on this loop instead of a second one. ``transform(x, y)`` returns the images the
    model trains on in place of every (augmented, float) batch ``x`` — MOTH stamps inverted triggers on part
    of each batch, labels unchanged (ALGORITHMS.md D9); it may run the model itself (in eval mode, restoring
    the training mode).
    ``channels_last``: run the model in channels-last memory format (``None``: on a CPU, where a CIFAR ResNet
    trains about 1.3x faster that way); the parameters return to the standard layout at the end, so the
    weights and everything else about the model are as with the standard layout, up to float rounding.
    The model is moved to ``device`` (default: where its parameters are) and left in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if extra_loss is not None and not callable(extra_loss):
        raise TypeError(f"extra_loss must be a callable (x, y, logits) -> scalar tensor, "
                        f"got {type(extra_loss).__name__}")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be a callable (x, y) -> images, got {type(transform).__name__}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be None or a bool, got {type(channels_last).__name__}")
    _check_dataset(train_set, "train_set")
    if eval_set is not None:
        _check_dataset(eval_set, "eval_set")
    generator = resolve_generator(generator)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not isinstance(model, GuardModel):
            raise TypeError(f"checkpoint needs a guard.models.GuardModel (weights are saved for "
                            f"guard.models.create), got {type(model).__name__}")
    elif resume:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    n = len(train_set)
    if augment_mask is not None:
        if not isinstance(augment_mask, torch.Tensor) or augment_mask.dtype != torch.bool \
                or augment_mask.shape != (n,):
            got = (f"{augment_mask.dtype} {tuple(augment_mask.shape)}" if isinstance(augment_mask, torch.Tensor)
                   else type(augment_mask).__name__)
            raise ValueError(f"augment_mask must be a bool tensor of shape ({n},), got {got}")
        augment_mask = augment_mask.cpu()

    device = _resolve_device(model, device)
    model.to(device)
    layout = torch.channels_last if _train_channels_last(model, device, channels_last) else None
    params, frozen = _trainable(model, config)
    optimizer = _make_optimizer(params, config)
    stream = _IndexStream(n, generator)
    steps = config.steps_per_epoch or math.ceil(n / config.batch_size)
    fast = isinstance(train_set, ImageTensorDataset)
    history: list[EpochStats] = []
    if resume:
        state = _load_state(checkpoint, config)
        load_weights(model, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        stream.perm, stream.pos = state["stream_perm"], state["stream_pos"]
        history = [EpochStats(**h) for h in state["history"]]
        logger.info("resuming %s after epoch %d of %d", checkpoint, len(history), config.epochs)

    stopped = False
    epochs = tqdm(range(len(history), config.epochs), desc="train", unit="epoch", disable=not progress,
                  initial=len(history), total=config.epochs)
    try:
        if layout is not None:
            model.to(memory_format=layout)
        for p in frozen:
            p.requires_grad_(False)
        for epoch in epochs:
            lr = config.lr * lr_factor(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train(config.mode != "last-layer")
            started = time.perf_counter()
            batches = [stream.take(config.batch_size) for _ in range(steps)]
            if fast:
                source = ((train_set.images[i], train_set.labels[i]) for i in batches)
            else:
                source = iter(_loader(train_set, device, batch_sampler=[i.tolist() for i in batches]))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            bar = tqdm(zip(batches, source), total=steps, desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="batch", leave=False, disable=not progress)
            for step, (index, (x, y)) in enumerate(bar):
                x, y = _to_device(x, device), _to_device(y, device)
                if config.augment or config.jpeg:
                    augmented = random_jpeg(x, generator, config.jpeg, config.jpeg_quality) if config.jpeg else x
                    if config.augment:
                        augmented = random_crop_flip(augmented, generator)
                    if augment_mask is not None:
                        keep = augment_mask[index].to(device)[:, None, None, None]
                        augmented = torch.where(keep, augmented, x)
                    x = augmented
                if x.dtype == torch.uint8:
                    x = x.float().div_(255)
                if transform is not None:
                    x = transform(x, y)
                if layout is not None:
                    x = x.contiguous(memory_format=layout)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if extra_loss is not None:
                    loss = loss + extra_loss(x, y, logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                if progress and step % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
            epoch_loss = loss_sum.item() / seen
            if not math.isfinite(epoch_loss):
                raise FloatingPointError(f"training diverged: mean loss is {epoch_loss} in epoch {epoch + 1} "
                                         f"(lr {lr:g}); lower the learning rate")
            eval_acc = evaluate(model, eval_set, device=device) if eval_set is not None else None
            stats = EpochStats(epoch + 1, steps, epoch_loss, correct.item() / seen, eval_acc, lr,
                               time.perf_counter() - started)
            history.append(stats)
            logger.info("epoch %d/%d: loss %.4f, train acc %.4f%s, lr %.3g, %.1fs", stats.epoch, config.epochs,
                        stats.loss, stats.train_accuracy,
                        "" if eval_acc is None else f", eval acc {eval_acc:.4f}", lr, stats.seconds)
            epochs.set_postfix(loss=f"{stats.loss:.4f}", acc=f"{stats.train_accuracy:.3f}",
                               **({} if eval_acc is None else {"eval": f"{eval_acc:.3f}"}))
            if checkpoint is not None:
                _save(model, checkpoint, {
                    "version": _STATE_VERSION, "model": model.spec.name, "config": dataclasses.asdict(config),
                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                    "stream_perm": stream.perm, "stream_pos": stream.pos,
                    "history": [dataclasses.asdict(h) for h in history],
                })
            if callback is not None and callback(stats):
                stopped = epoch + 1 < config.epochs
                break
    finally:
        epochs.close()
        for p in frozen:
            p.requires_grad_(True)
        if layout is not None:
            model.to(memory_format=torch.contiguous_format)
        model.eval()
    return TrainResult(tuple(history), stopped)


def _eval_batches(dataset: torch.utils.data.Dataset, batch_size: int, device: torch.device):
    """(float images on ``device``, labels on CPU) in dataset order."""
    if isinstance(dataset, ImageTensorDataset):
        for start in range(0, len(dataset), batch_size):
            x = _to_device(dataset.images[start:start + batch_size], device).float().div_(255)
            yield x, dataset.labels[start:start + batch_size]
    else:
        for x, y in _loader(dataset, device, batch_size=batch_size, shuffle=False):
            yield _to_device(x, device), torch.as_tensor(y)


def _predict(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int,
             device: str | torch.device | None,
             defense: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_dataset(dataset, "dataset")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if defense is not None and not callable(defense):
        raise TypeError(f"defense must be a callable mapping images to logits, got {type(defense).__name__}")
    device = _resolve_device(model, device)
    model.to(device).eval()
    preds, labels = [], []
    for x, y in _eval_batches(dataset, batch_size, device):
        if defense is None:
            with torch.inference_mode():
                logits = model(x)
        else:
            with torch.enable_grad():
                logits = defense(x)
        preds.append(logits.argmax(1).cpu())
        labels.append(y.cpu())
    return torch.cat(preds), torch.cat(labels)


def predict(model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int = 256,
            device: str | torch.device | None = None,
            defense: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels (int64, CPU) for every image of ``dataset``, in order.

    Without ``defense`` the model runs under ``torch.inference_mode``; ``defense`` (a callable from images to
    logits, e.g. a :class:`guard.ReScaler` around ``model``) is used instead of the model, with gradients
    enabled. The model is put in eval mode and left there.
    """
    return _predict(model, dataset, batch_size, device, defense)[0]


def evaluate(model: nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int = 256,
             device: str | torch.device | None = None,
             defense: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy of ``model`` (or of ``defense``) on ``dataset``; see :func:`predict`."""
    preds, labels = _predict(model, dataset, batch_size, device, defense)
    return (preds == labels).double().mean().item()

