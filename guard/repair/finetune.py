"""The trusted-data fine-tuning protocol every repair defense shares, its settings, and the defender's
trusted split.

:func:`trusted_finetune` — ALGORITHMS.md P4, M10: :func:`guard.train.train` in step-counted epochs of
``eval_every`` steps, (CDA, ASR) recorded after each, stop as soon as CDA ≤ CDA_0 − Δ, and keep the best
admissible point. Every defense runs on it. :class:`TrustedTuningConfig` holds the settings of that loop
that the Pick-your-Poison repairs share (Table 5's SGD columns); each of them extends it with its own.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..train import TrainConfig, evaluate, train
from .base import AsrProbe, RepairPoint, RepairResult

logger = logging.getLogger(__name__)

__all__ = ["TrustedTuningConfig", "choose_on_curve", "measure_point", "split_trusted", "trusted_finetune"]


@dataclass(frozen=True)
class TrustedTuningConfig:
    """The trusted-data loop's settings (ALGORITHMS.md P4; pick_your_poison.txt Table 5, CIFAR-10): ``steps``
    SGD steps (momentum 0.9, Nesterov, constant ``lr``, coupled L2 ``weight_decay``) on batches of
    ``batch_size`` trusted images, (CDA, ASR) every ``eval_every`` steps, stop as soon as CDA ≤ CDA_0 −
    ``max_cda_drop``. ``augment``: random crop + flip on the trusted data (ALGORITHMS.md §7 item 9); ``jpeg``: the
    probability that a trusted image is re-encoded as a JPEG at a quality drawn from ``jpeg_quality`` first
    (:class:`guard.train.TrainConfig`), for a model that will answer images that travelled as JPEGs.
    Defaults: the plain fine-tuning baseline (D16: 1,000 steps at lr 1e-3); each repair overrides its own.
    """

    steps: int = 1000
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    batch_size: int = 128
    eval_every: int = 50
    max_cda_drop: float = 0.02
    augment: bool = True
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (50, 95)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.steps % self.eval_every:
            raise ValueError(f"steps must be a multiple of eval_every, got steps={self.steps}, "
                             f"eval_every={self.eval_every}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not is_number(self.max_cda_drop) or not 0 <= self.max_cda_drop < 1:
            raise ValueError(f"max_cda_drop must be a fraction in [0, 1) (0.02 = 2 points), "
                             f"got {self.max_cda_drop!r}")
        for name in ("nesterov", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        # TrainConfig checks the momentum / Nesterov consistency, the JPEG probability and the quality range
        object.__setattr__(self, "jpeg_quality", self.train_config().jpeg_quality)

    def train_config(self) -> TrainConfig:
        """The :class:`guard.train.TrainConfig` of the run: constant lr, epochs of ``eval_every`` steps."""
        return TrainConfig.trusted_steps(self.steps, self.eval_every, lr=self.lr, momentum=self.momentum,
                                         nesterov=self.nesterov, weight_decay=self.weight_decay,
                                         batch_size=self.batch_size, augment=self.augment, jpeg=self.jpeg,
                                         jpeg_quality=self.jpeg_quality)

    def run(self, model: GuardModel, trusted: torch.utils.data.Dataset, *, eval_set: torch.utils.data.Dataset,
            asr: AsrProbe | None, generator: torch.Generator, device: torch.device, progress: bool,
            **loss_options) -> RepairResult:
        """:func:`trusted_finetune` of ``model`` on ``trusted`` with these settings (``extra_loss``, ``transform``
        and ``keep_last`` pass through)."""
        return trusted_finetune(model, trusted, self.train_config(), eval_set=eval_set, eval_every=self.eval_every,
                                max_cda_drop=self.max_cda_drop, asr=asr, generator=generator, device=device,
                                progress=progress, **loss_options)


def split_trusted(dataset: ImageTensorDataset, fraction: float, generator: torch.Generator
                  ) -> ImageTensorDataset:
    """A class-stratified random ``fraction`` of ``dataset`` (the defender's trusted set D_trust, r images;
    ALGORITHMS.md S2). Every class keeps ``round(fraction · n_class)`` images, at least one."""
    if not isinstance(dataset, ImageTensorDataset):
        raise TypeError(f"dataset must be a guard.data.ImageTensorDataset, got {type(dataset).__name__}")
    if not is_number(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    picked = []
    for c in range(dataset.num_classes):
        members = torch.nonzero(dataset.labels == c).flatten()
        if members.numel() == 0:
            continue
        n = max(1, round(fraction * members.numel()))
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:n]])
    index = torch.cat(picked).sort().values
    return dataset.subset(index)


def trusted_finetune(model: GuardModel, train_set: torch.utils.data.Dataset, config: TrainConfig, *,
                     eval_set: torch.utils.data.Dataset, eval_every: int, max_cda_drop: float | None = 0.02,
                     asr: AsrProbe | None = None, keep_last: bool = False,
                     extra_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     generator: torch.Generator | None = None, device: str | torch.device | None = None,
                     progress: bool = False) -> RepairResult:
    """Fine-tune ``model`` in place on ``train_set`` with :func:`guard.train.train` (ALGORITHMS.md P4).

    ``config.epochs · eval_every`` steps in epochs of ``eval_every`` steps (``config.steps_per_epoch`` must
    equal ``eval_every``); after step 0 and every epoch, CDA on ``eval_set`` and (with ``asr``) the attack
    success rate are recorded; the run stops as soon as CDA ≤ CDA_0 − ``max_cda_drop`` (``None``: no budget).
    The model is left holding the weights of the chosen point (see :class:`RepairResult`); ``keep_last``
    chooses the last admissible point even when ASR is measured (a hardening defense keeps its final model;
    ASR is only recorded). ``extra_loss`` and ``transform`` go to :func:`guard.train.train`.
    """
    if not isinstance(model, GuardModel):
        raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
    if not is_int(eval_every) or eval_every < 1 or config.steps_per_epoch != eval_every:
        raise ValueError(f"eval_every must be an int >= 1 equal to config.steps_per_epoch, got eval_every="
                         f"{eval_every!r}, steps_per_epoch={config.steps_per_epoch!r}")
    if max_cda_drop is not None and (not is_number(max_cda_drop) or not 0 <= max_cda_drop < 1):
        raise ValueError(f"max_cda_drop must be None or a number in [0, 1) (a fraction: 0.02 = 2 points), "
                         f"got {max_cda_drop!r}")
    if asr is not None and not callable(asr):
        raise TypeError(f"asr must be a callable model -> attack success rate, got {type(asr).__name__}")

    started = time.perf_counter()

    def measure(step: int) -> RepairPoint:
        return measure_point(model, eval_set, asr, step, device)

    def better(p: RepairPoint, q: RepairPoint) -> bool:
        return keep_last or p.asr is None or (p.asr, -p.cda) <= (q.asr, -q.cda)

    first = measure(0)
    history = [first]
    chosen, chosen_state = first, _snapshot(model)
    floor = -math.inf if max_cda_drop is None else first.cda - max_cda_drop

    def on_epoch(stats) -> bool:
        nonlocal chosen, chosen_state
        point = measure(stats.epoch * eval_every)
        history.append(point)
        logger.info("repair step %d: CDA %.4f, ASR %s", point.step, point.cda,
                    "n/a" if point.asr is None else f"{point.asr:.4f}")
        if point.cda <= floor:
            return True
        if better(point, chosen):
            chosen, chosen_state = point, _snapshot(model)
        return False

    train(model, train_set, config, generator=generator, device=device, progress=progress,
          callback=on_epoch, extra_loss=extra_loss, transform=transform)
    model.load_state_dict(chosen_state)
    model.eval()
    stopped = history[-1].cda <= floor
    logger.info("repair chose step %d (CDA %.4f, ASR %s) of %d evaluated points%s", chosen.step, chosen.cda,
                chosen.asr, len(history), "; stopped by the CDA budget" if stopped else "")
    return RepairResult(model, tuple(history), chosen, first.cda, max_cda_drop, stopped,
                        time.perf_counter() - started)


def measure_point(model: nn.Module, eval_set: torch.utils.data.Dataset, asr: AsrProbe | None, step: int,
                  device: str | torch.device | None = None) -> RepairPoint:
    """The model's CDA on ``eval_set`` and, with ``asr``, its attack success rate, as the point ``step``."""
    return RepairPoint(step, evaluate(model, eval_set, device=device), None if asr is None else float(asr(model)))


def choose_on_curve(first: RepairPoint, curve: list[tuple[Any, RepairPoint]], max_cda_drop: float,
                    default: Callable[[list[tuple[Any, RepairPoint]]], tuple[Any, RepairPoint]]
                    ) -> tuple[Any, RepairPoint]:
    """The point a one-shot defense keeps of its ``curve`` of (setting, point) — ANP's pruning thresholds, MCR's
    positions on the path: among those with CDA > ``first.cda − max_cda_drop`` (M10) the lowest ASR when ASR was
    measured, else ``default(admissible)``; ``(None, first)`` (the input model) when none is admissible."""
    admissible = [(key, p) for key, p in curve if p.cda > first.cda - max_cda_drop]
    if not admissible:
        return None, first
    if first.asr is not None:
        return min(admissible, key=lambda kp: (kp[1].asr, -kp[1].cda))
    return default(admissible)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


