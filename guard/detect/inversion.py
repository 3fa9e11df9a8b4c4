"""Trigger inversion, written once and batched: the optimisation loop behind every defense that
reverse-engineers triggers.

Neural Cleanse (ALGORITHMS.md D4), MOTH and its class distance (D9, M12) search a mask and a pattern (P1.2,
tanh re-parameterisation P2, cost schedule P3); CNC (D3) searches an additive trigger (P1.4); Xiang et al.'s
cleansing defense (D14, reverse_engineering_cleansing.txt eq. 9) searches an additive pattern for every
*ordered class pair* with a log surrogate. Each is "find, for a set of images, a trigger of a given form
that sends them to a class"; they differ in the trigger's form, the loss, how batches are drawn and when to
stop — the four pluggable parts below. Many inversions run in one forward/backward pass: the triggered
images of all tasks are stacked into one batch (the models run in eval mode and each task's loss depends on
its own trigger only, so tasks never interact), the way :class:`guard.ReScaler` batches per-input scalars.
A task's result does not depend on which tasks share its batch: its random draws come from its own seed
and its optimiser state and step count are its own (tested: batched == one at a time).

Public API
----------
``InversionTask(images, target, labels=None, removal=None, seed=0, init=None, source=None)``
    One trigger to find: the ``images`` ``(N, C, H, W)`` (uint8, or float in [0, 1]) it is stamped on, the
    ``target`` class, their true ``labels`` (objectives that need them: CNC), ``removal`` images the
    trigger is *subtracted* from (additive triggers; Xiang's D_t), the task's ``seed``, an ``init`` trigger
    to start from (values as :meth:`TriggerForm.sample` returns them) and its ``source`` class (pair
    tasks s → t; ``None`` for a universal trigger). :func:`pair_tasks` builds every ordered pair of a
    labelled set, :func:`class_tasks` one universal task per target class.
Trigger forms — :class:`AdditiveTrigger` (``{"delta"}``, ``clip(x ± δ)``) and :class:`MaskPatternTrigger`
    (``{"mask", "pattern"}``, ``(1 − m)⊙x + m⊙Δ`` with tanh-bounded variables); frozen, picklable; each has
    ``sample``, ``stamp(x, values)``, ``size(values)`` (what the cost term penalises and the result reports)
    and ``image(values)`` (what a PNG shows).
Objectives — callables ``objective(batch) -> (per-image loss, per-image success)`` on a
    :class:`TriggeredBatch`, holding the models they use in ``models`` (the engine freezes them):
    :class:`TargetCrossEntropy` (NC, MOTH, class distance), :class:`LogSurrogate` (Xiang eq. 9); CNC's
    pivot/repaired objective lives in :mod:`guard.detect.cnc`. A task's loss is the mean over its images
    (plus the mean over its removal images) plus ``cost · size``.
Schedules — per-task cost and stopping: :class:`FixedSteps` (no size term, the last trigger is the
    result; CNC), :class:`CostSchedule` (P3: NC with early stop, MOTH with restarts), :class:`UntilSuccess`
    (stop once the success rate reaches a bound; Xiang).
``InversionConfig(trigger, schedule, steps, batch_size, sampling, ...)`` then
``invert(tasks, objective, config) -> InversionResult`` (per task: the trigger, its size, success rate,
    whether one was found, steps run, and per-image losses of the first and the recorded step).

Example — every ordered pair's smallest mask (the class distance of ALGORITHMS.md M12)::

    tasks = pair_tasks(images, labels, num_classes=10, max_images=100, generator=torch.Generator().manual_seed(0))
    config = InversionConfig(MaskPatternTrigger(), CostSchedule(attack_threshold=0.9, patience=10,
                             multiplier=1.5, start_at_zero=False, restart_noise=0.01), steps=1000)
    result = invert(tasks, TargetCrossEntropy(model), config)
    result.size, result.found, result.triggers[0]["mask"]

Xiang's pair inversion (D14 step 1)::

    tasks = pair_tasks(images, labels, num_classes=10, removal=True, generator=g)
    config = InversionConfig(AdditiveTrigger(init_high=0.0, norm="l2"), UntilSuccess(0.95, measure="full"),
                             steps=10_000, batch_size=256, sampling="random", optimizer="sgd", lr=1e-4)
    result = invert(tasks, LogSurrogate(model, weight=1.0), config)
    r = torch.where(result.found, 1 / result.size, torch.zeros_like(result.size))   # r_st; 0 where ρ never reached π

Removal images count as images of the task's target class (their ``label`` in a batch is the target). With
``measure="full"`` the success rate after each step is taken over all of a task's images (ρ over D_s).
``chunk_size`` bounds the images of one forward/backward pass: 90 pair tasks of 256 + 256 images run in
chunks, accumulated before each update, with the same result. Its default depends on the device: a CPU runs
a ResNet-20 forward/backward 1.8× faster in passes of ~128 images, which stay in its caches, than in passes
of 2,048 (``benchmarks/moth_cifar10.py --part distance`` times them); an accelerator wants the large passes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._validation import check_betas, is_int, is_number

logger = logging.getLogger(__name__)

__all__ = ["AdditiveTrigger", "CostSchedule", "FixedSteps", "InversionConfig", "InversionResult", "InversionTask",
           "LogSurrogate", "MaskPatternTrigger", "Objective", "TargetCrossEntropy", "TriggerForm",
           "TriggeredBatch", "UntilSuccess", "apply_mask_pattern", "class_tasks", "default_chunk_size", "frozen",
           "invert", "pair_tasks", "tanh_bounded"]

#: ε_t of the tanh re-parameterisation (Keras ``K.epsilon()`` in the NC and MOTH code; ALGORITHMS.md P2)
TANH_EPSILON = 1e-7


def tanh_bounded(raw: torch.Tensor) -> torch.Tensor:
    """``tanh(raw)/(2 − ε_t) + 0.5`` ∈ (0, 1) (ALGORITHMS.md P2); clamped to [0, 1] because in float32
    ``2 − ε_t`` rounds to 2 and a saturated tanh would land a rounding error outside."""
    return (torch.tanh(raw) / (2 - TANH_EPSILON) + 0.5).clamp(0, 1)


def _tanh_inverse(value: torch.Tensor) -> torch.Tensor:
    # values of exactly 0 or 1 (a restart from a saturated mask) map to a large finite variable, not ±inf
    return torch.atanh(((value - 0.5) * (2 - TANH_EPSILON)).clamp(-1 + 1e-6, 1 - 1e-6))


def apply_mask_pattern(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 − m)⊙x + m⊙Δ`` with an ``(H, W)`` mask shared by all channels (ALGORITHMS.md P1.2); a leading
    batch dimension on ``mask`` ``(B, H, W)`` and ``pattern`` ``(B, C, H, W)`` gives every image its own."""
    mask = mask.unsqueeze(-3)
    return (1 - mask) * x + mask * pattern


# ------------------------------------------------------------------------------------- trigger forms
class TriggerForm(ABC):
    """How a trigger is parameterised and stamped. Values are the trigger itself (what :meth:`sample`
    draws, :meth:`stamp` applies and a result holds); raw variables are what the optimiser moves."""

    #: names of the value tensors, in the order :meth:`sample` draws them
    names: tuple[str, ...] = ()

    @abstractmethod
    def sample(self, shape: tuple[int, int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Initial values for images of ``shape`` (C, H, W), drawn from ``generator``."""

    @abstractmethod
    def to_raw(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconstrained variables that map to ``values``."""

    @abstractmethod
    def from_raw(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Values (differentiable) of raw variables."""

    @abstractmethod
    def stamp(self, x: torch.Tensor, values: dict[str, torch.Tensor], sign: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Triggered images; ``values`` unbatched (one trigger for all) or with a leading batch dimension;
        ``sign`` (B,) of ±1 subtracts the trigger where −1 (forms that support removal)."""

    @abstractmethod
    def size(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trigger's size per leading index (what the cost term penalises)."""

    @abstractmethod
    def image(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """A ``(C, H, W)`` picture of one trigger."""

    def restart(self, values: dict[str, torch.Tensor], noise: float, generator: torch.Generator
                ) -> dict[str, torch.Tensor]:
        """``values`` plus U(−noise, noise) per element, clipped to the valid range (MOTH's restart at a new
        best to leave a local minimum, ALGORITHMS.md P3)."""
        out = {}
        for name in self.names:
            v = values[name]
            u = (torch.rand(v.shape, generator=generator, dtype=torch.float64) * 2 - 1) * noise
            out[name] = self._clip(name, v + u.to(v.dtype))
        return out

    def _clip(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value


@dataclass(frozen=True)
class AdditiveTrigger(TriggerForm):
    """An image-shaped additive trigger δ: ``clip(x + δ)`` (ALGORITHMS.md P1.4; PyP's ``x ⊕ T``, Xiang eq. 1),
    or ``clip(x − δ)`` on removal images. Initialised U[``init_low``, ``init_high``) per element (CNC
    code: U[0, 0.01); Xiang: 0). ``size``: the ``norm`` ("l1" or "l2") of δ."""

    init_low: float = 0.0
    init_high: float = 0.01
    norm: str = "l1"
    names = ("delta",)

    def __post_init__(self) -> None:
        for name in ("init_low", "init_high"):
            if not is_number(getattr(self, name)) or not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a number in [-1, 1], got {getattr(self, name)!r}")
        if self.init_high < self.init_low:
            raise ValueError(f"init_high must be >= init_low, got init_low={self.init_low}, "
                             f"init_high={self.init_high}")
        if self.norm not in ("l1", "l2"):
            raise ValueError(f"norm must be 'l1' or 'l2', got {self.norm!r}")

    def sample(self, shape, generator):
        u = torch.rand(shape, generator=generator)
        return {"delta": self.init_low + (self.init_high - self.init_low) * u}

    def to_raw(self, values):
        return {"delta": values["delta"]}

    def from_raw(self, raw):
        return {"delta": raw["delta"]}

    def stamp(self, x, values, sign=None):
        delta = values["delta"]
        if sign is not None:
            delta = delta * sign.to(x.dtype).view(-1, 1, 1, 1)
        return (x + delta).clamp(0, 1)

    def size(self, values):
        delta = values["delta"]
        dims = tuple(range(delta.dim() - 3, delta.dim()))
        return torch.linalg.vector_norm(delta, ord=1 if self.norm == "l1" else 2, dim=dims)

    def image(self, values):
        return values["delta"]

    def _clip(self, name, value):
        return value.clamp(-1, 1)


@dataclass(frozen=True)
class MaskPatternTrigger(TriggerForm):
    """A mask m ∈ [0, 1]^{H×W} shared by the channels and a pattern Δ ∈ [0, 1]^{C×H×W}, both through the
    tanh re-parameterisation (ALGORITHMS.md P1.2, P2); initialised U[0, 1) clipped to [``init_clip``,
    1 − ``init_clip``] (mask first, then pattern). ``size``: the L1 norm of the H×W mask (the channel-replicated
    L1 of the MOTH code is C times it, ALGORITHMS.md M12)."""

    init_clip: float = 0.01
    names = ("mask", "pattern")

    def __post_init__(self) -> None:
        if not is_number(self.init_clip) or not 0 < self.init_clip < 0.5:
            raise ValueError(f"init_clip must be a number in (0, 0.5), got {self.init_clip!r}")

    def sample(self, shape, generator):
        c, h, w = shape
        mask = torch.rand(h, w, generator=generator).clamp(self.init_clip, 1 - self.init_clip)
        pattern = torch.rand(c, h, w, generator=generator).clamp(self.init_clip, 1 - self.init_clip)
        return {"mask": mask, "pattern": pattern}

    def to_raw(self, values):
        return {name: _tanh_inverse(values[name]) for name in self.names}

    def from_raw(self, raw):
        return {name: tanh_bounded(raw[name]) for name in self.names}

    def stamp(self, x, values, sign=None):
        if sign is not None and bool((sign < 0).any()):
            raise ValueError("a mask-pattern trigger cannot be removed from an image; removal images need "
                             "an AdditiveTrigger")
        return apply_mask_pattern(x, values["mask"], values["pattern"])

    def size(self, values):
        mask = values["mask"]
        return mask.sum((mask.dim() - 2, mask.dim() - 1))

    def image(self, values):
        return values["mask"] * values["pattern"]

    def _clip(self, name, value):
        return value.clamp(0, 1)


# ------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True, eq=False)
class InversionTask:
    """One trigger to invert (see the module docstring). Tensors are kept as given (tasks of one class
    share its image tensor), moved to the device batch by batch."""

    images: torch.Tensor
    target: int
    labels: torch.Tensor | None = None
    removal: torch.Tensor | None = None
    seed: int = 0
    init: dict[str, torch.Tensor] | None = None
    source: int | None = None

    def __post_init__(self) -> None:
        _check_image_set(self.images, "images")
        if self.removal is not None:
            _check_image_set(self.removal, "removal")
            if self.removal.shape[1:] != self.images.shape[1:]:
                raise ValueError(f"removal images must have the shape of the images {tuple(self.images.shape[1:])}, "
                                 f"got {tuple(self.removal.shape[1:])}")
        if not is_int(self.target) or self.target < 0:
            raise ValueError(f"target must be a class index >= 0, got {self.target!r}")
        if self.source is not None and (not is_int(self.source) or self.source < 0):
            raise ValueError(f"source must be None or a class index >= 0, got {self.source!r}")
        if self.labels is not None and (not isinstance(self.labels, torch.Tensor)
                                        or self.labels.shape != (self.images.shape[0],)):
            got = tuple(self.labels.shape) if isinstance(self.labels, torch.Tensor) else type(self.labels).__name__
            raise ValueError(f"labels must be a ({self.images.shape[0]},) tensor, got {got}")
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.init is not None and not isinstance(self.init, dict):
            raise TypeError(f"init must be None or a dict of trigger tensors, got {type(self.init).__name__}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def _check_image_set(images: object, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be an (N, C, H, W) tensor, got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty; a trigger needs at least one image to be inverted on")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{name} must be uint8 or float in [0, 1], got {images.dtype}")


def _task_seeds(count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, 2 ** 62, (count,), generator=generator).tolist()


def class_tasks(images: torch.Tensor, labels: torch.Tensor, targets: Sequence[int], *,
                generator: torch.Generator, exclude_target: bool = True) -> list[InversionTask]:
    """One universal task per target class: all images (those not of the target when ``exclude_target``),
    with their labels; task seeds drawn from ``generator`` in target order."""
    seeds = _task_seeds(len(targets), generator)
    tasks = []
    for t, seed in zip(targets, seeds):
        keep = labels != t if exclude_target else torch.ones_like(labels, dtype=torch.bool)
        if not bool(keep.any()):
            raise ValueError(f"every image is of class {t}; a trigger to class {t} needs images of other classes")
        tasks.append(InversionTask(images[keep], int(t), labels[keep], seed=seed))
    return tasks


def pair_tasks(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, generator: torch.Generator,
               max_images: int | None = None, removal: bool = False,
               pairs: Sequence[tuple[int, int]] | None = None) -> list[InversionTask]:
    """A task for every ordered class pair (s → t), s ≠ t (or the given ``pairs``), in row-major order: the
    images of class s (a random ``max_images`` of them when there are more, as MOTH's ``Trigger``), target
    t; with ``removal=True`` the images of class t are the task's removal images (Xiang's D_t). Tasks of one
    class share its image tensor when no subset is drawn. Seeds and subsets come from ``generator``."""
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if max_images is not None and (not is_int(max_images) or max_images < 1):
        raise ValueError(f"max_images must be None or an int >= 1, got {max_images!r}")
    if pairs is None:
        pairs = [(s, t) for s in range(num_classes) for t in range(num_classes) if s != t]
    pairs = [(int(s), int(t)) for s, t in pairs]
    for s, t in pairs:
        if s == t or not (0 <= s < num_classes and 0 <= t < num_classes):
            raise ValueError(f"pairs must be (source, target) of distinct classes in [0, {num_classes - 1}], "
                             f"got {(s, t)}")
    by_class = {}
    for c in sorted({c for pair in pairs for c in pair}):
        members = images[labels == c]
        if members.shape[0] == 0:
            raise ValueError(f"class {c} has no images; every class of a pair needs some "
                             f"(classes present: {sorted(set(labels.tolist()))})")
        by_class[c] = members
    seeds = _task_seeds(len(pairs), generator)
    tasks = []
    for (s, t), seed in zip(pairs, seeds):
        source = by_class[s]
        if max_images is not None and source.shape[0] > max_images:
            source = source[torch.randperm(source.shape[0], generator=generator)[:max_images]]
        tasks.append(InversionTask(source, t, torch.full((source.shape[0],), s), by_class[t] if removal else None,
                                   seed=seed, source=s))
    return tasks


# -------------------------------------------------------------------------------------- objectives
@dataclass(frozen=True)
class TriggeredBatch:
    """What an objective sees: the ``triggered`` images of several tasks stacked, the ``clean`` ones, and
    per image its task's ``target``, its true ``label`` (−1 when the task has none), the index of its
    ``task`` in the run and whether it is a ``removal`` image (the trigger was subtracted)."""

    triggered: torch.Tensor
    clean: torch.Tensor
    target: torch.Tensor
    label: torch.Tensor
    task: torch.Tensor
    removal: torch.Tensor


class Objective(ABC):
    """``objective(batch) -> (loss (B,), success (B,) bool)``: per-image loss to minimise and whether the
    image counts as sent to the target. ``models``: every module it runs (frozen by :func:`invert`)."""

    models: tuple[nn.Module, ...] = ()

    @abstractmethod
    def __call__(self, batch: TriggeredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class TargetCrossEntropy(Objective):
    """``CE(f(A(x)), t) + l1_weight · ‖A(x) − x‖₁``; success: ``argmax f(A(x)) = t`` (Neural Cleanse, MOTH,
    class distance: no perturbation term; Pick your Poison's Neural Cleanse, Algorithm 6: the L1 norm of each
    image's actual change, ``l1_weight`` = λ_N)."""

    def __init__(self, model: nn.Module, l1_weight: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not is_number(l1_weight) or l1_weight < 0:
            raise ValueError(f"l1_weight must be a finite number >= 0, got {l1_weight!r}")
        self.models = (model,)
        self.l1_weight = l1_weight

    def __call__(self, batch):
        if bool(batch.removal.any()):
            raise ValueError("TargetCrossEntropy has no term for removal images; use LogSurrogate")
        logits = self.models[0](batch.triggered)
        loss = F.cross_entropy(logits, batch.target, reduction="none")
        if self.l1_weight:
            loss = loss + self.l1_weight * (batch.triggered - batch.clean).abs().flatten(1).sum(1)
        return loss, logits.argmax(1) == batch.target


class LogSurrogate(Objective):
    """Xiang et al.'s pair objective, reverse_engineering_cleansing.txt eq. 9 (ALGORITHMS.md D14), as a loss:
    ``−log(1 − p_t([x − v]_c))`` on removal images (class t) and ``−weight · log p_t([x + v]_c)`` on the
    source images, so the task loss is ``−J_st`` (means of both terms) and minimising it is the paper's
    ascent. Success: ``argmax = t`` on source images."""

    def __init__(self, model: nn.Module, weight: float = 1.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not is_number(weight) or weight <= 0:
            raise ValueError(f"weight must be a finite number > 0 (λ of eq. 9), got {weight!r}")
        self.models = (model,)
        self.weight = float(weight)

    def __call__(self, batch):
        logits = self.models[0](batch.triggered)
        total = logits.logsumexp(1)
        is_target = F.one_hot(batch.target, logits.shape[1]).bool()
        log_p = logits.gather(1, batch.target[:, None])[:, 0] - total
        # log(1 − p_t) as the log-mass of the other classes: exact and with a gradient even where p_t ≈ 1
        log_not_p = logits.masked_fill(is_target, -math.inf).logsumexp(1) - total
        loss = torch.where(batch.removal, -log_not_p, -self.weight * log_p)
        return loss, logits.argmax(1) == batch.target


# --------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class FixedSteps:
    """No size term; every task runs ``config.steps`` steps and its last trigger is the result (CNC)."""


@dataclass(frozen=True)
class UntilSuccess:
    """No size term; a task stops as soon as its success rate reaches ``threshold`` (found) or after
    ``config.steps`` steps (not found); its last trigger is the result. ``measure``: ``"batches"`` — the rate
    over the step's batches before each update; ``"full"`` — after the step, over all of the task's images
    (Xiang's ρ over D_s, D14 step 1)."""

    threshold: float = 0.95
    measure: str = "batches"

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if self.measure not in ("batches", "full"):
            raise ValueError(f"measure must be 'batches' or 'full', got {self.measure!r}")


@dataclass(frozen=True)
class CostSchedule:
    """The dynamic cost of the size term (ALGORITHMS.md P3), per task.

    After each step, with ASR the success rate over the step's batches: ASR ≥ ``attack_threshold`` counts
    up, else down; ``patience`` in a row multiply the cost by ``multiplier`` (from 0 it jumps to
    ``init_cost``) or divide it by ``multiplier``^1.5. The result is the trigger of the step with the smallest
    mean size among those with ASR ≥ the threshold. ``start_at_zero``: NC starts at cost 0, MOTH at
    ``init_cost``. ``early_stop_patience``: NC stops a task that has not improved its best for that many
    steps once the cost has gone both up and down (``None``: never, MOTH). ``restart_noise``: MOTH restarts
    the variables at each new best plus U(±noise) (0: never, NC).
    """

    attack_threshold: float = 0.99
    init_cost: float = 1e-3
    patience: int = 5
    multiplier: float = 2.0
    start_at_zero: bool = True
    early_stop_patience: int | None = None
    restart_noise: float = 0.0

    def __post_init__(self) -> None:
        if not is_number(self.attack_threshold) or not 0 < self.attack_threshold <= 1:
            raise ValueError(f"attack_threshold must be in (0, 1], got {self.attack_threshold!r}")
        if not is_number(self.init_cost) or self.init_cost <= 0:
            raise ValueError(f"init_cost must be a finite number > 0, got {self.init_cost!r}")
        if not is_int(self.patience) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if not is_number(self.multiplier) or self.multiplier <= 1:
            raise ValueError(f"multiplier must be a number > 1, got {self.multiplier!r}")
        if not isinstance(self.start_at_zero, bool):
            raise TypeError(f"start_at_zero must be a bool, got {type(self.start_at_zero).__name__}")
        if self.early_stop_patience is not None and (not is_int(self.early_stop_patience)
                                                     or self.early_stop_patience < 1):
            raise ValueError(f"early_stop_patience must be None or an int >= 1, got {self.early_stop_patience!r}")
        if not is_number(self.restart_noise) or not 0 <= self.restart_noise < 1:
            raise ValueError(f"restart_noise must be a number in [0, 1), got {self.restart_noise!r}")


Schedule = FixedSteps | UntilSuccess | CostSchedule


class _CostState:
    """Per-task bookkeeping of :class:`CostSchedule` (the counters of the NC and MOTH code)."""

    def __init__(self, schedule: CostSchedule) -> None:
        self.s = schedule
        self.cost = 0.0 if schedule.start_at_zero else schedule.init_cost
        self.up = self.down = 0
        self.went_up = self.went_down = False
        self.best = math.inf
        self.stale, self.early_best = 0, math.inf

    def update(self, asr: float, size: float) -> tuple[bool, bool]:
        """(record this step's trigger as the best, stop the task)."""
        s = self.s
        record = asr >= s.attack_threshold and size < self.best
        if record:
            self.best = size
        if s.early_stop_patience is not None and self.best < math.inf:
            self.stale = self.stale + 1 if self.best >= self.early_best else 0
            self.early_best = min(self.early_best, self.best)
            if self.went_up and self.went_down and self.stale >= s.early_stop_patience:
                return record, True
        if asr >= s.attack_threshold:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up >= s.patience:
            self.up = 0
            self.cost = s.init_cost if self.cost == 0 else self.cost * s.multiplier
            self.went_up = True
        elif self.down >= s.patience:
            self.down = 0
            self.cost = self.cost / s.multiplier ** 1.5
            self.went_down = True
        return record, False


# ------------------------------------------------------------------------------------------ config
_SAMPLING = ("epoch", "random")
_OPTIMIZERS = ("adam", "sgd", "normalized")


@dataclass(frozen=True)
class InversionConfig:
    """How to invert: the ``trigger`` form, the ``schedule``, at most ``steps`` steps per task.

    A step is, with ``sampling="epoch"``, one shuffled pass over the task's images in batches of
    ``batch_size`` (MOTH's ``Trigger``); with ``"random"``, ``batches_per_step`` batches of ``batch_size``
    random images each (drawn with replacement across batches; the trusted-set sampling of NC and CNC), and
    as many removal images per batch. ``flip``: a random horizontal flip per image (CNC code). Every batch
    is one optimiser update: Adam (``lr``, ``betas``; NC/MOTH/CNC code), plain gradient descent (``sgd``:
    Xiang's ascent with step δ) or ``normalized`` gradient descent — a step of ℓ2 length ``lr`` along each
    task's gradient (over all its variables): the same path as ``sgd``'s gradient flow, walked at a speed
    that does not depend on the gradient's scale, so a stopping rule on the path is met in a bounded number
    of steps. ``chunk_size``: most images per forward/backward pass (whole tasks are
    never split; tasks of one batch are accumulated before the update); ``None``: :func:`default_chunk_size`
    of the device the inversion runs on.
    """

    trigger: TriggerForm = field(default_factory=MaskPatternTrigger)
    schedule: Schedule = field(default_factory=FixedSteps)
    steps: int = 100
    batch_size: int = 32
    sampling: str = "epoch"
    batches_per_step: int = 1
    flip: bool = False
    optimizer: str = "adam"
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trigger, TriggerForm):
            raise TypeError(f"trigger must be an AdditiveTrigger or a MaskPatternTrigger, got "
                            f"{type(self.trigger).__name__}")
        if not isinstance(self.schedule, (FixedSteps, UntilSuccess, CostSchedule)):
            raise TypeError(f"schedule must be a FixedSteps, UntilSuccess or CostSchedule, got "
                            f"{type(self.schedule).__name__}")
        for name in ("steps", "batch_size", "batches_per_step"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        if self.sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        if self.sampling == "epoch" and self.batches_per_step != 1:
            raise ValueError(f"batches_per_step applies to sampling='random' only, got {self.batches_per_step}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {type(self.flip).__name__}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        object.__setattr__(self, "betas", check_betas(self.betas))


#: images per forward/backward pass when ``InversionConfig.chunk_size`` is None: CPU caches favour small passes
#: (ResNet-20 on 2 cores: 491 images/s at 128, 274 at 2,048; moth_cifar10.py's pass_size), accelerators large ones
CPU_CHUNK_SIZE, ACCELERATOR_CHUNK_SIZE = 128, 4096


def default_chunk_size(device: torch.device) -> int:
    """The pass size an inversion on ``device`` uses unless its config sets one."""
    return CPU_CHUNK_SIZE if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_SIZE


@dataclass(frozen=True)
class InversionResult:
    """Per task (in the order given): ``triggers[i]`` — the recorded trigger's values on the CPU (under a
    cost schedule the best one, ``None`` when none reached the threshold; otherwise the last one);
    ``size`` — its mean size over its step's batches (``inf`` when none was found); ``success`` — the
    success rate of that step (NaN when none); ``found``; ``steps`` — steps run; ``first_loss`` /
    ``best_loss`` — each image's objective loss in the first step and in the recorded step (NaN for images
    not drawn in it; MOTH's warm-up loss decrease)."""

    tasks: tuple[InversionTask, ...]
    triggers: tuple[dict[str, torch.Tensor] | None, ...]
    size: torch.Tensor
    success: torch.Tensor
    found: torch.Tensor
    steps: torch.Tensor
    first_loss: tuple[torch.Tensor, ...]
    best_loss: tuple[torch.Tensor, ...]
    seconds: float


# ------------------------------------------------------------------------------------------ engine
@contextlib.contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; modes and flags restored on exit, also on
    error (so an interrupted inversion leaves every model as it found it)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    try:
        for model in models:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, mode in modes:
            m.training = mode


class _TaskOptimizer:
    """Adam (torch's update rule), plain or ℓ2-normalized gradient descent on stacked ``(T, ...)`` variables,
    updating only the rows of the tasks that took part in a batch, each with its own step count — so a task's
    trajectory is the same whether or not other tasks share its batches."""

    def __init__(self, params: list[torch.Tensor], config: InversionConfig, tasks: int) -> None:
        self.params, self.config = params, config
        self.count = torch.zeros(tasks, dtype=torch.int64, device=params[0].device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, rows: torch.Tensor) -> None:
        cfg = self.config
        if cfg.optimizer == "sgd":
            for p in self.params:
                p[rows] -= cfg.lr * p.grad[rows]
            return
        if cfg.optimizer == "normalized":
            grads = [p.grad[rows] for p in self.params]
            norm = sum(g.flatten(1).square().sum(1) for g in grads).sqrt()
            scale = cfg.lr / norm.clamp_min(torch.finfo(norm.dtype).tiny)
            for p, g in zip(self.params, grads):
                p[rows] -= scale.view((-1,) + (1,) * (p.dim() - 1)) * g
            return
        beta1, beta2 = cfg.betas
        self.count[rows] += 1
        t = self.count[rows].to(torch.float64)
        bc1 = (1 - beta1 ** t)
        bc2_sqrt = (1 - beta2 ** t).sqrt()
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad[rows]
            shape = (-1,) + (1,) * (p.dim() - 1)
            m_rows = m[rows].lerp_(g, 1 - beta1)
            v_rows = v[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m[rows], v[rows] = m_rows, v_rows
            denom = (v_rows.sqrt() / bc2_sqrt.to(p.dtype).view(shape)).add_(1e-8)
            p[rows] -= (cfg.lr / bc1).to(p.dtype).view(shape) * m_rows / denom


class _Plan:
    """One task's draws for one step: image indices and flips per batch (and removal ones)."""

    def __init__(self, batches: list[torch.Tensor], flips: list[torch.Tensor | None],
                 removal: list[torch.Tensor], removal_flips: list[torch.Tensor | None]) -> None:
        self.batches, self.flips, self.removal, self.removal_flips = batches, flips, removal, removal_flips


def _plan(task: InversionTask, config: InversionConfig, generator: torch.Generator) -> _Plan:
    n = task.images.shape[0]
    if config.sampling == "epoch":
        batches = list(torch.randperm(n, generator=generator).split(config.batch_size))
        count = len(batches)
    else:
        count = config.batches_per_step
        batches = []
    flips, removal, removal_flips = [], [], []
    for b in range(count):
        if config.sampling == "random":
            batches.append(torch.randint(0, n, (min(config.batch_size, n),), generator=generator))
        flips.append(torch.rand(batches[b].numel(), generator=generator) < 0.5 if config.flip else None)
        if task.removal is not None:
            m = task.removal.shape[0]
            removal.append(torch.randint(0, m, (min(config.batch_size, m),), generator=generator))
            removal_flips.append(torch.rand(removal[b].numel(), generator=generator) < 0.5 if config.flip else None)
    return _Plan(batches, flips, removal, removal_flips)


def _load(images: torch.Tensor, index: torch.Tensor, flips: torch.Tensor | None, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    x = images[index].to(device)
    x = x.to(dtype).div_(255) if x.dtype == torch.uint8 else x.to(dtype)
    if flips is not None:
        x = torch.where(flips.to(device)[:, None, None, None], x.flip(3), x)
    return x


def invert(tasks: Sequence[InversionTask], objective: Objective, config: InversionConfig, *,
           device: str | torch.device | None = None, progress: bool = False) -> InversionResult:
    """Invert every task's trigger, batched (see the module docstring).

    The objective's models are put in eval mode with frozen parameters for the run and restored afterwards
    (also on error). ``device`` defaults to where the first model's parameters are; variables take their
    dtype.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a guard.detect.inversion.Objective, got {type(objective).__name__}")
    if not isinstance(config, InversionConfig):
        raise TypeError(f"config must be an InversionConfig, got {type(config).__name__}")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks is empty; expected at least one InversionTask")
    for task in tasks:
        if not isinstance(task, InversionTask):
            raise TypeError(f"tasks must hold InversionTask objects, got {type(task).__name__}")
    shape = tasks[0].shape
    if any(t.shape != shape for t in tasks):
        raise ValueError(f"all tasks need images of one shape, got {sorted({t.shape for t in tasks})}")
    has_removal = any(t.removal is not None for t in tasks)
    if has_removal and config.sampling != "random":
        raise ValueError("removal images need sampling='random' (a batch of each per update)")
    if has_removal and isinstance(config.trigger, MaskPatternTrigger):
        raise ValueError("removal images need an AdditiveTrigger; a mask-pattern trigger cannot be subtracted")
    first = next((p for m in objective.models for p in m.parameters()), None)
    device = torch.device(device) if device is not None else (first.device if first is not None
                                                                else torch.device("cpu"))
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    started = time.perf_counter()
    with frozen(*objective.models):
        result = _Run(tasks, objective, config, device, dtype).run(progress)
    return InversionResult(tasks, *result, seconds=time.perf_counter() - started)


class _Run:
    def __init__(self, tasks, objective, config, device, dtype) -> None:
        self.tasks, self.objective, self.config = tasks, objective, config
        self.device, self.dtype = device, dtype
        self.chunk_size = config.chunk_size or default_chunk_size(device)
        form = config.trigger
        self.generators = [torch.Generator().manual_seed(t.seed) for t in tasks]
        initial = []
        for task, g in zip(tasks, self.generators):
            values = form.sample(task.shape, g) if task.init is None else task.init
            missing = set(form.names) - set(values)
            if missing:
                raise ValueError(f"task init lacks {sorted(missing)}; a {type(form).__name__} needs {form.names}")
            initial.append(form.to_raw({k: values[k].detach().to(torch.float64) for k in form.names}))
        self.raw = {k: torch.stack([r[k] for r in initial]).to(device, dtype).requires_grad_(True)
                    for k in form.names}
        self.optimizer = _TaskOptimizer(list(self.raw.values()), config, len(tasks))
        schedule = config.schedule
        self.states = [_CostState(schedule) for _ in tasks] if isinstance(schedule, CostSchedule) else None

    def cost(self) -> torch.Tensor:
        if self.states is None:
            return torch.zeros(len(self.tasks), dtype=self.dtype, device=self.device)
        return torch.tensor([s.cost for s in self.states], dtype=self.dtype, device=self.device)

    def values(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raw = self.raw if rows is None else {k: v[rows] for k, v in self.raw.items()}
        return self.config.trigger.from_raw(raw)

    def run(self, progress: bool):
        cfg, tasks, schedule = self.config, self.tasks, self.config.schedule
        n_tasks = len(tasks)
        active = [True] * n_tasks
        steps_run = [0] * n_tasks
        triggers: list[dict | None] = [None] * n_tasks
        size = torch.full((n_tasks,), math.inf, dtype=torch.float64)
        success = torch.full((n_tasks,), math.nan, dtype=torch.float64)
        found = torch.zeros(n_tasks, dtype=torch.bool)
        first_loss = [torch.full((t.images.shape[0],), math.nan, dtype=torch.float64) for t in tasks]
        best_loss = [f.clone() for f in first_loss]
        for step in tqdm(range(cfg.steps), desc="inversion", unit="step", disable=not progress):
            live = [i for i in range(n_tasks) if active[i]]
            if not live:
                break
            asr, mean_size, step_loss = self.step(live)
            if isinstance(schedule, UntilSuccess) and schedule.measure == "full":
                asr = self.full_success(live)
            for i in live:
                steps_run[i] = step + 1
                if step == 0:
                    first_loss[i] = step_loss[i].clone()
                if isinstance(schedule, CostSchedule):
                    record, done = self.states[i].update(asr[i], mean_size[i])
                elif isinstance(schedule, UntilSuccess):
                    done = asr[i] >= schedule.threshold
                    record = True
                    found[i] = done
                else:
                    record, done = True, False
                    found[i] = True
                if record:
                    current = {k: v[0].detach().cpu() for k, v in self.values(torch.tensor([i])).items()}
                    triggers[i] = current
                    size[i], success[i] = mean_size[i], asr[i]
                    best_loss[i] = step_loss[i].clone()
                    if isinstance(schedule, CostSchedule):
                        found[i] = True
                        if schedule.restart_noise:
                            self.restart(i, current, schedule.restart_noise)
                if done:
                    active[i] = False
            logger.debug("inversion step %d: %d of %d tasks active", step, sum(active), n_tasks)
        if isinstance(schedule, UntilSuccess):
            size[~found] = math.inf
        return (tuple(triggers), size, success, found, torch.tensor(steps_run), tuple(first_loss),
                tuple(best_loss))

    @torch.no_grad()
    def restart(self, i: int, values: dict[str, torch.Tensor], noise: float) -> None:
        moved = self.config.trigger.restart({k: v.to(torch.float64) for k, v in values.items()}, noise,
                                            self.generators[i])
        raw = self.config.trigger.to_raw(moved)
        for k, v in self.raw.items():
            v[i] = raw[k].to(v.dtype)

    def step(self, live: list[int]):
        """One step of every live task: its batches, one update each. Returns the per-task success rate
        and mean size over the step's batches (before each update) and the per-image losses."""
        cfg, tasks = self.config, self.tasks
        plans = {i: _plan(tasks[i], cfg, self.generators[i]) for i in live}
        hits = {i: 0 for i in live}
        seen = {i: 0 for i in live}
        size_sum = {i: 0.0 for i in live}
        step_loss = {i: torch.full((tasks[i].images.shape[0],), math.nan, dtype=torch.float64) for i in live}
        for b in range(max(len(p.batches) for p in plans.values())):
            members = [i for i in live if b < len(plans[i].batches)]
            for raw in self.raw.values():
                raw.grad = None
            cost = self.cost()
            for chunk in self._chunks(members, plans, b):
                batch, counts = self._batch(chunk, plans, b)
                loss, hit = self.objective(batch)
                if loss.shape != (batch.task.numel(),) or hit.shape != loss.shape:
                    raise ValueError(f"objective must return a per-image loss and success of shape "
                                     f"({batch.task.numel()},), got {tuple(loss.shape)} and {tuple(hit.shape)}")
                rows = torch.tensor(chunk, device=self.device)
                sizes = self.config.trigger.size(self.values(rows))
                total = (loss / counts).sum()
                if self.states is not None:  # only a cost schedule has a size term
                    total = total + (cost[rows] * sizes).sum()
                total.backward()
                self._tally(chunk, plans, b, batch, loss.detach(), hit.detach(), sizes.detach(),
                            hits, seen, size_sum, step_loss)
            self.optimizer.step(torch.tensor(members, device=self.device))
        asr = {i: hits[i] / seen[i] for i in live}
        mean_size = {i: size_sum[i] / seen[i] for i in live}
        return asr, mean_size, step_loss

    def _chunks(self, members: list[int], plans: dict[int, _Plan], b: int) -> Iterator[list[int]]:
        chunk, count = [], 0
        for i in members:
            n = plans[i].batches[b].numel() + (plans[i].removal[b].numel() if plans[i].removal else 0)
            if chunk and count + n > self.chunk_size:
                yield chunk
                chunk, count = [], 0
            chunk.append(i)
            count += n
        if chunk:
            yield chunk

    def _batch(self, chunk: list[int], plans: dict[int, _Plan], b: int):
        """The stacked batch of ``chunk`` and, per image, the size of its (task, removal) group, so that
        summing ``loss / count`` gives each task's mean over its images plus the mean over its removal ones."""
        xs, targets, labels, task_index, removal, counts = [], [], [], [], [], []
        for i in chunk:
            task, plan = self.tasks[i], plans[i]
            parts = [(task.images, plan.batches[b], plan.flips[b], False)]
            if task.removal is not None:
                parts.append((task.removal, plan.removal[b], plan.removal_flips[b], True))
            for images, index, flips, is_removal in parts:
                n = index.numel()
                xs.append(_load(images, index, flips, self.device, self.dtype))
                targets.append(torch.full((n,), task.target))
                if task.labels is not None and not is_removal:
                    labels.append(task.labels[index].to(torch.int64))
                else:
                    labels.append(torch.full((n,), task.target if is_removal else -1))
                task_index.append(torch.full((n,), i))
                removal.append(torch.full((n,), is_removal))
                counts.append(torch.full((n,), float(n)))
        clean = torch.cat(xs)
        task = torch.cat(task_index).to(self.device)
        sign = torch.cat(removal).to(self.device)
        rows = {k: v[task] for k, v in self.values().items()}
        triggered = self.config.trigger.stamp(clean, rows, torch.where(sign, -1.0, 1.0) if sign.any() else None)
        batch = TriggeredBatch(triggered, clean, torch.cat(targets).to(self.device),
                               torch.cat(labels).to(self.device), task, sign)
        return batch, torch.cat(counts).to(self.device, self.dtype)

    def _tally(self, chunk, plans, b, batch, loss, hit, sizes, hits, seen, size_sum, step_loss) -> None:
        keep = ~batch.removal
        for j, i in enumerate(chunk):
            own = (batch.task == i) & keep
            n = int(own.sum())
            hits[i] += int(hit[own].sum())
            seen[i] += n
            size_sum[i] += float(sizes[j]) * n
            step_loss[i][plans[i].batches[b]] = loss[own].to(torch.float64).cpu()

    @torch.no_grad()
    def full_success(self, live: list[int]) -> dict[int, float]:
        """Success rate of each live task's current trigger over all of its images."""
        values = self.values()
        rates = {}
        for i in live:
            task = self.tasks[i]
            hits = 0
            for start in range(0, task.images.shape[0], self.chunk_size):
                index = torch.arange(start, min(start + self.chunk_size, task.images.shape[0]))
                clean = _load(task.images, index, None, self.device, self.dtype)
                n = clean.shape[0]
                row = {k: v[i] for k, v in values.items()}
                labels = task.labels[index] if task.labels is not None else torch.full((n,), -1)
                batch = TriggeredBatch(self.config.trigger.stamp(clean, row), clean,
                                       torch.full((n,), task.target, device=self.device), labels.to(self.device),
                                       torch.full((n,), i, device=self.device),
                                       torch.zeros(n, dtype=torch.bool, device=self.device))
                hits += int(self.objective(batch)[1].sum())
            rates[i] = hits / task.images.shape[0]
        return rates
