"""MOTH — model orthogonalization by class-distance hardening (Tao et al., S&P 2022; moth_supplementary.txt;
ALGORITHMS.md D9), registered as the defense ``moth``.

A backdoor is a short cut between classes: a small trigger that sends class s to t. MOTH hardens a model
before it is served by enlarging the *class distance* of every pair (:mod:`guard.detect.distance`): during
fine-tuning on clean data it keeps inverting small triggers between classes and stamps them on training
images with their *true* labels, so the model learns to ignore them. The schedule of the MOTH code:

1. Warm-up, one training step per class t: a universal trigger to t from a few images of every other class
   (τ = 0.99); stamped on half of the batch's non-t images when smaller than a quarter of the image. How much
   it lowered each source class's loss is the first estimate of how fast that pair's distance grows (U;
   :func:`loss_decrease`, bounded where the random start already reaches the target).
2. Orthogonalization, in periods of three steps: a pair {s, t} — at random with probability 0.3, else the one
   whose distance grew fastest recently (D, blended in from U); per step two triggers inverted jointly on the
   batch (s → t on its class-s images, t → s on its class-t images, τ = 0.9, from the pair's stored
   triggers; long inversions at a period's start or after a failure, short ones otherwise) and each stamped
   on 10 % of its source side; after the period the pair's distance improvement is recorded.

Training runs on the one training loop (:func:`guard.train.train` through :func:`guard.repair.trusted_finetune`,
whose ``transform`` hook stamps the batch), inversions on the batched engine (:mod:`guard.detect.inversion`),
with the model in eval mode and frozen while it is inverted. The defended copy is the final model; (CDA, ASR)
are recorded every ``eval_every`` steps and the pair bookkeeping goes into ``details``.

Example::

    result = create_defense("moth").defend(model, trusted, eval_set=heldout, generator=torch.Generator().manual_seed(0))
    before = ClassDistance().measure(model, heldout); after = ClassDistance().measure(result.model, heldout)
    after.enlargement(before)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..detect.inversion import (CostSchedule, InversionConfig, InversionTask, MaskPatternTrigger, TargetCrossEntropy,
                                invert)
from ..models import GuardModel
from ..train import TrainConfig
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import trusted_finetune

logger = logging.getLogger(__name__)

__all__ = ["Moth", "MothConfig", "loss_decrease"]


@dataclass(frozen=True)
class MothConfig:
    """MOTH hyper-parameters (ALGORITHMS.md D9; MOTH code ``moth()``); defaults are a CPU budget,
    :meth:`reference` the MOTH code's.

    Training: ``epochs`` over the trusted set plus one warm-up step per class (rounded up to a multiple of
    ``eval_every``) in batches of ``batch_size``,
    SGD (momentum 0.9, Nesterov, no weight decay) at ``lr`` (the PyTorch code 1e-4, the Keras code 1e-3,
    ALGORITHMS.md §7 item 21; default 1e-2, ``benchmarks/moth_cifar10.py``: at this budget on a fine-tuned Blend
    ResNet-20, 1e-3 left ASR 0.971 and 1e-2 0.114 at 2.8 points of CDA, and on a clean one 1e-2 cost 1.8 points
    where 1e-3 cost none; at the code's 800 steps 1e-4 left 0.996, 1e-3 0.307 and 1e-2 0.070), ``augment``
    (random crop + flip); (CDA, ASR) every ``eval_every`` steps; ``max_cda_drop`` stops the run at that CDA
    loss (``None``: never, as the MOTH code).
    Warm-up: ``samples_per_class`` trusted images per class form the inversion set; ``warmup_steps`` passes
    (code 500) with success bound ``warmup_threshold`` 0.99; stamped on ``warm_ratio`` 0.5 of the batch's
    non-target images.
    Orthogonalization: a new pair every ``period`` 3 steps, at random with probability ``random_pair`` 0.3;
    ``pair_steps`` passes (code 200) at a period's start or after a failed inversion, else ``quick_steps``
    (code 50) from ``quick_cost`` 1e-2; success bound ``pair_threshold`` 0.9; stamped on ``portion`` 0.1 of
    min(n_s, n_t) images of each side.
    Inversion (P3): Adam at ``inversion_lr`` 0.1 in batches of ``inversion_batch`` 32, cost from ``init_cost``
    1e-3, ``patience`` 10, ``multiplier`` 1.5, restarts with U(±``restart_noise`` 0.01); a trigger is used only
    when its channel-replicated mask L1 is below ``size_bound`` × H·W·C (a quarter).
    """

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-2
    augment: bool = True
    eval_every: int = 20
    max_cda_drop: float | None = None
    samples_per_class: int = 10
    warmup_steps: int = 100
    warmup_threshold: float = 0.99
    warm_ratio: float = 0.5
    period: int = 3
    random_pair: float = 0.3
    pair_steps: int = 100
    quick_steps: int = 25
    quick_cost: float = 1e-2
    pair_threshold: float = 0.9
    portion: float = 0.1
    inversion_lr: float = 0.1
    inversion_batch: int = 32
    init_cost: float = 1e-3
    patience: int = 10
    multiplier: float = 1.5
    restart_noise: float = 0.01
    size_bound: float = 0.25

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "samples_per_class", "warmup_steps", "period",
                     "pair_steps", "quick_steps", "inversion_batch", "patience"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("lr", "inversion_lr", "init_cost", "quick_cost"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("warmup_threshold", "warm_ratio", "pair_threshold", "portion", "size_bound"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        if not is_number(self.random_pair) or not 0 <= self.random_pair <= 1:
            raise ValueError(f"random_pair must be a probability in [0, 1], got {self.random_pair!r}")
        if not is_number(self.multiplier) or self.multiplier <= 1:
            raise ValueError(f"multiplier must be a number > 1, got {self.multiplier!r}")
        if not is_number(self.restart_noise) or not 0 <= self.restart_noise < 1:
            raise ValueError(f"restart_noise must be a number in [0, 1), got {self.restart_noise!r}")
        if self.max_cda_drop is not None and (not is_number(self.max_cda_drop) or not 0 <= self.max_cda_drop < 1):
            raise ValueError(f"max_cda_drop must be None or a fraction in [0, 1), got {self.max_cda_drop!r}")
        if not isinstance(self.augment, bool):
            raise TypeError(f"augment must be a bool, got {type(self.augment).__name__}")

    @classmethod
    def reference(cls, **overrides) -> "MothConfig":
        """The MOTH PyTorch code's budget: lr 1e-4, 500 warm-up passes, 200 / 50 pair passes (a GPU budget)."""
        return cls(**{"lr": 1e-4, "warmup_steps": 500, "pair_steps": 200, "quick_steps": 50, **overrides})

    def inversion(self, steps: int, threshold: float, cost: float) -> InversionConfig:
        schedule = CostSchedule(threshold, cost, self.patience, self.multiplier, start_at_zero=False,
                                restart_noise=self.restart_noise)
        return InversionConfig(MaskPatternTrigger(), schedule, steps=steps, batch_size=self.inversion_batch,
                               sampling="epoch", lr=self.inversion_lr)

    def train_config(self, total_steps: int) -> TrainConfig:
        return TrainConfig.trusted_steps(total_steps, self.eval_every, lr=self.lr, nesterov=True,
                                         batch_size=self.batch_size, augment=self.augment)


def loss_decrease(first: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Per image, the relative loss decrease of a warm-up inversion, (first − best) / first, the MOTH code's
    estimate of how fast a pair's distance grows (U). An image whose loss at the random starting trigger is
    already no higher than at the recorded one needs no search — the random start sends it to the target, as
    any trigger covering a Blend victim's pattern does — and counts as 1, the largest decrease, instead of the
    ratio's unbounded negative value near first = 0 (measured: −1.4e5 on a CIFAR-10 Blend victim, which kept
    MOTH from ever choosing a pair of the backdoor's target class). NaN (an image not drawn) stays NaN."""
    ratio = (first - best) / first.clamp_min(torch.finfo(first.dtype).tiny)
    return torch.where(first > best, ratio, torch.where(first <= best, 1.0, math.nan).to(first.dtype))


class _Hardening:
    """The per-step state of MOTH: the ``transform`` of every training batch (ALGORITHMS.md D9 steps 1-5)."""

    def __init__(self, model: GuardModel, config: MothConfig, warmup: ImageTensorDataset,
                 generator: torch.Generator, device: torch.device) -> None:
        self.model, self.cfg, self.generator, self.device = model, config, generator, device
        k = model.num_classes
        self.k = k
        self.warmup = warmup
        channels, h, w = warmup.images.shape[1:]
        self.channels = channels
        self.bound = config.size_bound * h * w * channels  # on the channel-replicated L1, as the code
        self.univ = torch.zeros(k, k, dtype=torch.float64)   # U: warm-up loss decrease (mat_univ)
        self.size = torch.zeros(k, k, dtype=torch.float64)   # recorded trigger size (mat_size)
        self.diff = torch.zeros(k, k, dtype=torch.float64)   # distance improvement (mat_diff)
        self.count = torch.zeros(k, k, dtype=torch.int64)    # times a pair was chosen
        self.largest: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # the pair's stored trigger (mask_dict)
        self.step = 0
        self.stamped = 0
        self.pair = (0, 1)
        self.current: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.failures = [0, 0]
        self.period_sizes: list[tuple[float, float]] = []
        self.pair_log: list[dict] = []

    def _rand(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _choice(self, index: torch.Tensor, count: int) -> torch.Tensor:
        return index[torch.randperm(index.numel(), generator=self.generator)[:count].to(index.device)]

    def _seed(self) -> int:
        return int(torch.randint(0, 2 ** 62, (), generator=self.generator))

    def _invert(self, tasks: list[InversionTask], steps: int, threshold: float, cost: float):
        return invert(tasks, TargetCrossEntropy(self.model), self.cfg.inversion(steps, threshold, cost),
                      device=self.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if self.step < self.k:
            self._warm_step(x, y, self.step)
        else:
            if self.step == self.k and self.diff.max() > 0:
                self.diff /= self.diff.max()
            self._pair_step(x, y, self.step - self.k)
        self.step += 1
        return x

    def _stamp(self, x: torch.Tensor, index: torch.Tensor, trigger: dict[str, torch.Tensor]) -> None:
        values = {k: v.to(x.device, x.dtype) for k, v in trigger.items()}
        x[index] = MaskPatternTrigger().stamp(x[index], values).clamp(0, 1)
        self.stamped += index.numel()

    def _warm_step(self, x: torch.Tensor, y: torch.Tensor, t: int) -> None:
        """Step 1: a universal trigger to class t, its per-source loss decrease, stamping."""
        cfg = self.cfg
        keep = self.warmup.labels != t
        sources = self.warmup.labels[keep]
        task = InversionTask(self.warmup.images[keep], t, sources, seed=self._seed())
        result = self._invert([task], cfg.warmup_steps, cfg.warmup_threshold, cfg.init_cost)
        if not bool(result.found[0]):
            logger.info("MOTH warm-up: no universal trigger to class %d", t)
            return
        trigger, size = result.triggers[0], self.channels * result.size[0].item()
        if size < self.bound:
            others = torch.nonzero(y != t).flatten()
            self._stamp(x, self._choice(others, int(others.numel() * cfg.warm_ratio)), trigger)
        speed = loss_decrease(result.first_loss[0], result.best_loss[0])
        for s in range(self.k):
            if s == t:
                continue
            self.univ[s, t] = speed[sources == s].nan_to_num(0.0).mean().item()
            self.largest.setdefault((s, t), trigger)
            self.size[s, t] = self.diff[s, t] = size

    def _choose_pair(self, step: int) -> tuple[int, int]:
        """Step 2: a random pair with probability ``random_pair``, else the fastest-growing one."""
        if self._rand() < self.cfg.random_pair:
            s, t = torch.randperm(self.k, generator=self.generator)[:2].tolist()
            return s, t
        a = min(0.1 * step / 100, 1.0)
        score = (1 - a) * (self.univ + self.univ.T) + a * (self.diff + self.diff.T)
        score.fill_diagonal_(-math.inf)
        s, t = divmod(int(score.flatten().argmax()), self.k)
        return s, t

    def _pair_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """Steps 2-5: the period's pair, two joint inversions, stamping, distance bookkeeping."""
        cfg = self.cfg
        start = step % cfg.period == 0
        if start:
            self.pair = self._choose_pair(step)
            s, t = self.pair
            self.count[s, t] += 1
            self.count[t, s] += 1
            self.current = {d: self.largest[d] for d in ((s, t), (t, s)) if d in self.largest}
            self.failures = [0, 0]
            self.period_sizes = []
        s, t = self.pair
        if start or any(self.failures):
            steps, cost = cfg.pair_steps, cfg.init_cost
            self.failures = [0, 0]
        else:
            steps, cost = cfg.quick_steps, cfg.quick_cost
        idx_s, idx_t = torch.nonzero(y == s).flatten(), torch.nonzero(y == t).flatten()
        length = int(min(idx_s.numel(), idx_t.numel()) * cfg.portion)
        if length > 0:
            directions = (((s, t), idx_s), ((t, s), idx_t))
            tasks = [InversionTask(x[index], target, seed=self._seed(), init=self.current.get((source, target)),
                                   source=source) for (source, target), index in directions]
            result = self._invert(tasks, steps, cfg.pair_threshold, cost)
            for cb, ((source, target), index) in enumerate(directions):
                if not bool(result.found[cb]):
                    self.failures[cb] += 1
                    continue
                trigger = result.triggers[cb]
                if self.channels * result.size[cb].item() < self.bound:
                    self._stamp(x, self._choice(index, length), trigger)
                self.current[(source, target)] = trigger
                stored = self.largest.get((source, target))
                if stored is None or trigger["mask"].sum() > stored["mask"].sum():
                    self.largest[(source, target)] = trigger
            self.period_sizes.append(tuple(self.channels * self.current[d]["mask"].sum().item()
                                           if d in self.current else 0.0 for d in ((s, t), (t, s))))
        if step % cfg.period == cfg.period - 1 and self.period_sizes:
            self._record(s, t)

    def _record(self, s: int, t: int) -> None:
        """Step 5: the period's mean trigger size per direction and the pair's distance improvement."""
        mean = torch.tensor(self.period_sizes, dtype=torch.float64).mean(0).tolist()
        for (a, b), new in zip(((s, t), (t, s)), mean):
            old = self.size[a, b].item()
            if old > 0 and new > 0:
                self.diff[a, b] = (self.diff[a, b] + (new - old) / old) / 2
            self.size[a, b] = new
        self.pair_log.append({"step": self.step, "pair": [s, t], "size": mean})

    def details(self) -> dict:
        return {"pair_counts": self.count.tolist(), "trigger_size": self.size.tolist(),
                "distance_improvement": self.diff.tolist(), "warmup_loss_decrease": self.univ.tolist(),
                "periods": self.pair_log, "stamped_images": self.stamped, "hardening_steps": self.step}


@register_defense
class Moth(Defense):
    """MOTH class-distance hardening (ALGORITHMS.md D9); the defended copy is the final model."""

    name = "moth"
    config_class = MothConfig
    kind = "hardening"
    description = "MOTH: enlarge every class distance by stamping inverted pair triggers with true labels (D9)"
    needs_all_classes = True

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        warmup = self._warmup_set(trusted, model.num_classes, generator)
        hardening = _Hardening(model, cfg, warmup, generator, device)
        total = model.num_classes + cfg.epochs * math.ceil(len(trusted) / cfg.batch_size)
        result = trusted_finetune(model, trusted, cfg.train_config(total), eval_set=eval_set,
                                  eval_every=cfg.eval_every, max_cda_drop=cfg.max_cda_drop, asr=asr, keep_last=True,
                                  transform=hardening, generator=generator, device=device, progress=progress)
        logger.info("MOTH: %d steps, %d images stamped", hardening.step, hardening.stamped)
        return RepairResult(result.model, result.history, result.chosen, result.cda0, result.max_cda_drop,
                            result.stopped_early, result.seconds, details=hardening.details())

    def _warmup_set(self, trusted: ImageTensorDataset, k: int, generator: torch.Generator) -> ImageTensorDataset:
        """``samples_per_class`` random trusted images of every class (as many as the rarest class has)."""
        members = [torch.nonzero(trusted.labels == c).flatten() for c in range(k)]
        n = min(self.config.samples_per_class, min(m.numel() for m in members))
        picks = torch.cat([m[torch.randperm(m.numel(), generator=generator)[:n]] for m in members])
        return trusted.subset(picks)
