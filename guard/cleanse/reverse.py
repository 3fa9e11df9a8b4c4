"""Xiang, Miller & Kesidis' reverse-engineering defense (RE): detection, target inference, pattern estimation and
training-set cleansing for imperceptible additive backdoors (reverse_engineering_cleansing.txt §4, Algorithm 1;
ALGORITHMS.md D14).

A backdoor makes one class pair (s, t*) special: a *small* common perturbation v sends most images of s to
t*, and subtracting it from the images labelled t* changes the label of the poisoned ones. So:

1. **Pattern estimation** (eq. 9): for every ordered pair (s, t), gradient ascent from v = 0 on
   ``J_st(v) = mean_{D_t} log(1 − p_t([x − v]_c)) + λ·mean_{D_s} log p_t([x + v]_c)``, stopped as soon as a
   fraction π of D_s is classified t; the reciprocal ``r_st = 1/‖v̂_st‖₂`` is large for a backdoor pair. All
   K(K−1) pairs run together on the shared inversion engine (:mod:`guard.detect.inversion`: the images of
   many pairs in one forward/backward pass, each pair with its own random draws, so batched == one pair at
   a time).
2. **Detection** (eqs. 10–11): for each putative target c, a Gamma density fitted by maximum likelihood to
   the (K−1)² reciprocals with t ≠ c gives the order-statistic p-value of the largest reciprocal into c,
   ``pv_c = 1 − G(r_c,max)^(K−1)``; then ``pv = 1 − (1 − min_c pv_c)^K``; poisoned iff pv < θ = 0.05, with
   t̂ = argmin pv_c, ŝ = argmax_s r_st̂ and v̂ = v̂_ŝt̂.
3. **Cleansing** (eq. 12): remove every image labelled t̂ whose label changes when v̂ is subtracted
   (:func:`subtraction_removal`). The default removes instead the images from which the subtraction takes the
   most target margin, and lets eq. 12 decide where that margin shows no poison mode (:func:`margin_removal`; the
   "Margin rule" below).

Step 0 — the model must be trained on the suspect set *without augmentation*, so that it learns the exact
pattern (§5.2.1): train it with :func:`guard.train.train` and ``TrainConfig(..., augment=False)`` (or
``guard cleanse --fit-epochs``).

Steps. The paper ascends along δ·∇J with δ = 1e-4 and batches of 256, checking ρ on all of D_s after every
step (``step="plain"``, ``step_size=1e-4``, ``batch_size_per_class=256``, ``measure="full"``): ≈ 46 minutes
per CIFAR-10 attack on two GPUs. The default walks the same gradient path in steps of fixed ℓ2 length
(``step="normalized"``, ``step_size`` 0.2) with batches of 32 and ρ over each step's batch of D_s, which
finishes a CIFAR-10 ResNet-20 on two CPU cores (``benchmarks/cleanse_cifar10.py`` measures both the time and
the detection). A pair that never reaches π within ``max_steps`` gets r = 0 (ALGORITHMS.md D14 default) and
is left out of the Gamma fits. Those coarse steps rank the pairs; the pattern that cleanses (eq. 12) is then
re-estimated for the detected pair alone in finer steps (``refine_step_size`` 0.02 with
``refine_batch_size_per_class`` 64; ``None`` keeps the coarse one): on a CIFAR-10 ResNet-20 with pattern A the
coarse 0.2-steps pattern removed 39 % of the poisons, the refined one 85 % (benchmarks/cleanse_cifar10.py).

Removal margin. The estimate stops at the first pattern that sends π of D_s to t̂, so it is the *smallest*
such pattern and undershoots the planted one; subtracting it leaves the poisons that the planted pattern pushed
furthest past the boundary. On a CIFAR-10 ResNet-20 with pattern A (benchmarks/cleanse_cifar10.py, 30-epoch
Step 0) the estimate had ℓ2 norm 0.17 against the planted 0.31 and eq. 12 as stated removed 88.4 % of the
poisons at 3.0 % FPR. The step rule is not the cause: the paper's own (plain δ = 1e-4 steps, 256 images, ρ over
all of D_s) stopped that pair at norm 0.152 (79.6 % at 1.6 %). So the removal subtracts k·v̂, k ≥ 1 the smallest
multiple that sends ``removal_pi`` (default 0.995) of *all* of D_ŝ to t̂ (:func:`removal_scale`): a pattern as
strong on the source class as the planted one, which moves nearly all of it. ``subtract_scale`` fixes k instead
(1: eq. 12 as stated). A fixed factor does not carry over from one pattern to another: ×1.25 gave 94.2 % at 6.6 %
on pattern A but 85.4 % at 2.6 % on pattern C (whose estimate moves under 0.95 of D_ŝ at k = 1); removal_pi
0.995 gave k = 1.13, 92.6 % at 4.9 % on A and k = 1.77, 98.0 % at 8.1 % on C (0.99: 90.2 / 3.9 and 97.2 / 5.9;
0.995 was chosen on these two rows). On an independent row, A with three source classes, 0.995 gave k = 1.29,
98.7 % at 11.7 % (as stated: 96.5 % at 4.9 %) and a retrained ASR of 0.4 %. 0.999 is too strict for C: its ray
moves at most 0.998 of D_ŝ, and a search that ended at the cap ×4 removed 38 % of the clean target images. The rate
need not rise along the ray (on another C3 Step 0 it peaked at ×1.5 and fell to 0.46 at ×4), so the search scans it
and, where no multiple reaches ``removal_pi``, keeps the one with the highest rate (:func:`removal_scale`).

Removal rule. Eq. 12 removes an image of t̂ whose label changes to *any* class. The poisons change back to their
source; a clean image of t̂ that the subtraction pushes over a boundary goes to whichever class lies nearest.
``removal_to="sources"`` removes only the images whose new label is an inferred source class
(:func:`source_classes`: ŝ and every class whose pair into t̂ stands out among the pairs into t̂). On pattern D
(one source, ship → cat; benchmarks/cleanse_cifar10.py, 30-epoch Step 0) the multiple k = 1.40 moved 498 of the
500 poisons, 484 of them to the ship, and 2,250 of the 5,000 clean cats to every other class (632 to the ship,
471 to the deer, 471 to the truck, …): eq. 12 removed 99.6 % at 45.0 % FPR, the source rule 96.8 % at 12.6 %
(the seed: 98.8 % at 12.2 %). On pattern A with three sources (row A3) the rule found the three and one more
class; the clean images that moved went mostly to a source class (359 of 586), and the poisons 8 % elsewhere: 90.7 %
at 8.4 % against eq. 12's 98.7 % at 11.7 %, retrained ASR 1.1 % against 0.4 %; on A1 90.8 % at 5.0 % against
95.2 % at 9.4 %. The default stays ``"any"``: it keeps more poisons out of the retrained model.

Margin rule. A label change is a threshold at zero on the target margin ``m_t = logit_t − max_{c≠t} logit_c``
after the subtraction, and that threshold does not tell an image that the subtraction barely moved over a nearby
boundary from one that the pattern had carried far past it. The poisons lose much more margin than the clean
images: their margin came from the pattern. ``removal="margin"`` scores each image of t̂ by its drop
``m_t(x) − m_t([x − k·v̂]_c)`` (:func:`margin_drops`), fits a two-component Gaussian mixture to the drops (scikit-
learn) and removes the images whose posterior for the higher-drop component exceeds ``removal_posterior``
(:func:`margin_removal`). No label has to change. On the CIFAR-10 rows above, at the same k and with the default
posterior 0.1 chosen on A1 and A3: A1 95.4 % at 6.4 % (eq. 12: 95.2 / 9.4), A3 99.8 % at 3.8 % (98.7 / 11.7),
and on the held-out row C1 97.6 % at 3.7 % (98.0 / 8.1).
The rule needs the poisons' drops to form a mode of their own, and they do not always. On the held-out row D1 (pattern
D, a patch) the subtracted estimate takes as much margin from a quarter of the clean images (mixture weights 0.25 / 0.75
with 9 % poisons): the split removes 98.0 % at 42.8 % against eq. 12's 99.2 / 46.0. On one of eight seeds of the tests'
tiny model (component means 4.7 and 3.5) it removed 32 % of the clean images where eq. 12 removed none. In both the
fitted density has a single mode, a skewed spread of drops that the mixture splits anyway, while on A1, A3, C1 and the
other seven seeds it has two. On D1 the multiple is the cause: at k = 1 the drops have two modes (weights 0.13 / 0.87)
and the split removes 96.0 % at 10.0 %, where the stronger k = 1.54 takes margin from the clean images too (k = 1.25:
one mode already). On A1 and C1 the split at k = 1 is worse than at the multiple (94.4 / 7.3 against 95.4 / 6.4, 87.8 /
5.4 against 97.6 / 3.7; A3 and C3 about the same). So the multiple comes first; an untrusted split at k > 1 is
fitted again at k = 1, and where the density has one mode there too (the tiny seed), eq. 12 decides at k
(:func:`margin_removal`'s ``fallback``; the report's ``details.removal_rule`` and ``margin_mixture.scale``). The rule
also needs the poisons to be the smaller component. On one of eight seeds of the tiny set behind ``guard cleanse``'s
test RE named a wrong source (class 2, whose pair into the target was shorter than the planted one's), and its pattern
took 4.9 of margin from the clean images and 0.2 from the poisons: the split removed every clean image and no poison,
where eq. 12 removed the 80 poisons and nothing else. A high component that holds half of the target's images or more is
not the poisons': the split is retried at k = 1 and eq. 12 decides where that fails too. So the rule is the default:
where the drops have two modes and the high one is a minority it keeps eq. 12's TPR at a lower FPR (A1 9.4 → 6.4 %, A3
11.7 → 3.8 %, C1 8.1 → 3.7 %, C3 21.7 → 5.6 %, and D1, at k = 1, 45.2 → 10.0 %; high components of weight 0.10–0.13),
elsewhere it is eq. 12, and on A1, where eq. 12's retrained ASR had medians of 5.6 % and 4.5 % over three trainings (the
seed's bound: 4.9 %), it gave 2.2, 3.4 and 3.4 %. ``removal="flip"`` is eq. 12 alone (the paper's rule, and the one
``removal_to`` applies to).
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from tqdm.auto import tqdm

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..detect.base import SEPARATION_THRESHOLD, mad_anomaly_index
from ..detect.inversion import AdditiveTrigger, InversionConfig, LogSurrogate, UntilSuccess, invert, pair_tasks
from .base import (CleanseConfig, CleanseResult, Cleanser, _device_of, check_finite_outputs, check_fraction,
                   check_training_set, register_cleanser, sklearn_seed)

logger = logging.getLogger(__name__)

__all__ = ["REMOVALS", "REMOVAL_TARGETS", "PairPatterns", "ReverseEngineering", "ReverseEngineeringConfig",
           "margin_drops", "margin_removal", "order_statistic_test", "removal_scale", "source_classes",
           "subtracted_labels", "subtraction_removal"]

_STEPS = {"normalized": "normalized", "plain": "sgd"}
#: the smallest positive double: a p-value below it underflows to 0 and is reported as this bound
_TINY = 5e-324
#: removal_scale's search: multiples of v̂ in [1, _MAX_REMOVAL_SCALE], scanned in steps of _REMOVAL_SCALE_STEP,
#: the first step that reaches the fraction bisected to within _REMOVAL_SCALE_TOLERANCE
_MAX_REMOVAL_SCALE = 4.0
_REMOVAL_SCALE_STEP = 0.25
_REMOVAL_SCALE_TOLERANCE = 0.01
#: eq. 12's removal: a label change to any class, or to an inferred source class only
REMOVAL_TARGETS = ("any", "sources")
#: what eq. 12 removes: the images whose label changes, or the high component of the margin drops
REMOVALS = ("flip", "margin")
#: the margin rule's threshold is searched on this many points between the mixture's two means
_MARGIN_GRID = 10_001
#: the poisons are a minority of the target class: a high-drop component of at least this weight is not theirs
_MAX_POISON_WEIGHT = 0.5


@dataclass(frozen=True)
class ReverseEngineeringConfig(CleanseConfig):
    """RE settings (ALGORITHMS.md D14; defaults π = 0.95, λ = 1, θ = 0.05, ℓ2 norm, Gamma null).

    ``step``/``step_size``: ``"normalized"`` moves v by ``step_size`` in ℓ2 along ∇J each step (default 0.2);
    ``"plain"`` is the paper's ``v ← v + δ·∇J`` with δ = ``step_size`` (paper: 1e-4). ``batch_size_per_class``:
    images drawn from D_s and from D_t for each step (paper 256). ``measure``: ρ over the step's D_s batch
    (``"batches"``) or over all of D_s after the step (``"full"``, the paper). ``max_images``: at most that many
    images of each source class take part (``None``: all). ``max_steps``: cap per pair (ALGORITHMS.md D14:
    10,000; a pair that does not reach π gets r = 0). ``chunk_size``: most images in one forward/backward
    pass — the images of many pairs share it (``None``: the engine's default for the device,
    :func:`guard.detect.inversion.default_chunk_size`). ``refine_step_size``/``refine_batch_size_per_class``:
    the same step rule, finer, for the detected pair's pattern that eq. 12 subtracts (``None``: the coarse
    pattern). ``removal_pi``: the removal subtracts the smallest multiple k ≥ 1 of v̂ that sends this fraction of all
    of D_ŝ to t̂ (:func:`removal_scale`; see the module's "Removal margin"). ``subtract_scale``: a fixed multiple
    instead (1.0: eq. 12 as the paper states it); when set, ``removal_pi`` is not used. ``removal_to``: ``"any"``
    removes an image of t̂ whose label changes to any class (eq. 12); ``"sources"`` only one whose label changes to
    an inferred source class (:func:`source_classes`; see the module's "Removal rule"). ``removal``: ``"margin"``
    (default) removes the images whose margin drop under the subtraction belongs, with posterior above
    ``removal_posterior``, to the higher of a two-component Gaussian mixture; where the drops have one mode or the
    higher component holds half the class it splits them at the estimate itself (k = 1), and where that split is not
    trusted either eq. 12 decides (:func:`margin_removal`; see the module's "Margin rule"; ``removal_to`` must stay
    ``"any"``); ``"flip"`` removes by the label change (eq. 12, with ``removal_to``).
    """

    pi: float = 0.95
    weight: float = 1.0
    theta: float = 0.05
    step: str = "normalized"
    step_size: float = 0.2
    batch_size_per_class: int = 32
    measure: str = "batches"
    max_images: int | None = None
    max_steps: int = 10_000
    chunk_size: int | None = None
    refine_step_size: float | None = 0.02
    refine_batch_size_per_class: int = 64
    removal_pi: float = 0.995
    subtract_scale: float | None = None
    removal_to: str = "any"
    removal: str = "margin"
    removal_posterior: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("pi", self.pi)
        check_fraction("theta", self.theta, high_open=True)
        if not is_number(self.weight) or self.weight <= 0:
            raise ValueError(f"weight must be a number > 0 (λ of eq. 9), got {self.weight!r}")
        if self.step not in _STEPS:
            raise ValueError(f"step must be one of {tuple(_STEPS)}, got {self.step!r}")
        if not is_number(self.step_size) or self.step_size <= 0:
            raise ValueError(f"step_size must be a number > 0, got {self.step_size!r}")
        if self.measure not in ("batches", "full"):
            raise ValueError(f"measure must be 'batches' or 'full', got {self.measure!r}")
        if self.refine_step_size is not None and (not is_number(self.refine_step_size) or self.refine_step_size <= 0):
            raise ValueError(f"refine_step_size must be None or a number > 0, got {self.refine_step_size!r}")
        check_fraction("removal_pi", self.removal_pi)
        if self.subtract_scale is not None and (not is_number(self.subtract_scale) or self.subtract_scale <= 0):
            raise ValueError(f"subtract_scale must be None (the multiple of v̂ set by removal_pi) or a number > 0 "
                             f"(a fixed factor on v̂ in eq. 12), got {self.subtract_scale!r}")
        if self.removal_to not in REMOVAL_TARGETS:
            raise ValueError(f"removal_to must be one of {REMOVAL_TARGETS}, got {self.removal_to!r}")
        if self.removal not in REMOVALS:
            raise ValueError(f"removal must be one of {REMOVALS}, got {self.removal!r}")
        check_fraction("removal_posterior", self.removal_posterior, high_open=True)
        if self.removal == "margin" and self.removal_to != "any":
            raise ValueError(f"removal_to applies to removal='flip' (a label change and where it goes; pass "
                             f"removal='flip' with it); removal='margin' needs removal_to='any', got "
                             f"{self.removal_to!r}")
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        for name in ("batch_size_per_class", "max_steps", "refine_batch_size_per_class"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_images is not None and (not is_int(self.max_images) or self.max_images < 1):
            raise ValueError(f"max_images must be None or an int >= 1, got {self.max_images!r}")

    def inversion(self, refine: bool = False) -> InversionConfig:
        """The engine configuration of the pair estimation (Algorithm 1 lines 3–8); ``refine``: the finer steps
        that re-estimate the detected pair's pattern."""
        step_size, batch = ((self.refine_step_size, self.refine_batch_size_per_class) if refine
                            else (self.step_size, self.batch_size_per_class))
        return InversionConfig(AdditiveTrigger(init_low=0.0, init_high=0.0, norm="l2"),
                               UntilSuccess(self.pi, measure=self.measure), steps=self.max_steps,
                               batch_size=batch, sampling="random",
                               optimizer=_STEPS[self.step], lr=step_size, chunk_size=self.chunk_size)


@dataclass(frozen=True)
class PairPatterns:
    """Step 1's outcome: ``norms[s, t]`` = ‖v̂_st‖₂ (``inf`` where π was never reached, NaN on the diagonal),
    ``patterns[(s, t)]`` the estimated ``(C, H, W)`` patterns, ``steps[s, t]`` the steps each pair ran."""

    norms: torch.Tensor
    patterns: dict[tuple[int, int], torch.Tensor]
    steps: torch.Tensor
    seconds: float

    @property
    def reciprocals(self) -> torch.Tensor:
        """``r_st = 1/‖v̂_st‖₂``, 0 for pairs that never reached π and on the diagonal."""
        r = 1.0 / self.norms
        return torch.where(torch.isfinite(r), r, torch.zeros_like(r)).fill_diagonal_(0.0)


def _gamma_fit(values: np.ndarray) -> tuple[float, float, str]:
    """(shape, scale, how) of a Gamma with location 0: maximum likelihood (scipy), method of moments when the
    fit fails (ALGORITHMS.md D14 default)."""
    mean, var = float(values.mean()), float(values.var())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            shape, _, scale = stats.gamma.fit(values, floc=0)
        if math.isfinite(shape) and math.isfinite(scale) and shape > 0 and scale > 0:
            return float(shape), float(scale), "mle"
    except (ValueError, RuntimeError, FloatingPointError):
        pass
    if var <= 0:
        return math.inf, 0.0, "degenerate"
    return mean * mean / var, var / mean, "moments"


def order_statistic_test(reciprocals: torch.Tensor | np.ndarray, theta: float = 0.05) -> dict:
    """Xiang's detection inference (eqs. 10–11) on a K×K matrix of reciprocals ``r[s, t]`` (diagonal ignored;
    0 = a pair that never reached π, left out of the fits).

    Returns ``pv_class`` (pv_c, eq. 10), ``pv`` (eq. 11), ``target`` (argmin pv_c), ``source``
    (argmax_s r_s,target), ``detected`` (pv < θ) and per-class ``gamma`` fits (shape, scale, method). Tail
    probabilities come from the survival function (``1 − G^(K−1)`` as ``−expm1((K−1)·log1p(−S))``), so tiny
    p-values keep their digits; one below the smallest double is reported as 0.
    """
    r = np.asarray(reciprocals, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 3:
        raise ValueError(f"reciprocals must be a K×K matrix with K >= 3 classes, got shape {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError("reciprocals must be finite and >= 0 (0 marks a pair that never reached π)")
    k = r.shape[0]
    off = ~np.eye(k, dtype=bool)
    pv_class, fits = [], []
    for c in range(k):
        null_mask = off.copy()
        null_mask[:, c] = False
        null = r[null_mask]
        null = null[null > 0]
        into_c = r[off[:, c], c]
        r_max = float(into_c.max())
        if null.size < 2 or r_max == 0:
            pv_class.append(1.0)
            fits.append({"shape": None, "scale": None, "method": "none", "r_max": r_max})
            continue
        shape, scale, how = _gamma_fit(null)
        if how == "degenerate":
            tail = 0.0 if r_max > float(null[0]) else 1.0
        else:
            tail = float(stats.gamma.sf(r_max, shape, scale=scale))
        pv_class.append(float(-np.expm1((k - 1) * np.log1p(-tail))) if tail < 1 else 1.0)
        fits.append({"shape": shape, "scale": scale, "method": how, "r_max": r_max})
    pv_class_arr = np.asarray(pv_class)
    target = int(pv_class_arr.argmin())
    pv_min = float(pv_class_arr[target])
    pv = float(-np.expm1(k * np.log1p(-pv_min))) if pv_min < 1 else 1.0
    source = int(np.where(off[:, target], r[:, target], -np.inf).argmax())
    return {"pv_class": pv_class, "pv": pv, "target": target, "source": source, "detected": pv < theta,
            "gamma": fits}


def source_classes(reciprocals: torch.Tensor | np.ndarray, target: int, source: int,
                   threshold: float = SEPARATION_THRESHOLD) -> list[int]:
    """The classes an attack into ``target`` comes from: ``source`` (the most suspicious pair's) and every other
    class whose reciprocal into the target is an outlier among the K−1 reciprocals into it (Neural Cleanse's MAD
    test, index > ``threshold``; :func:`guard.detect.mad_anomaly_index`). A column test, not the Gamma null of
    eqs. 10–11: that null is fitted to the pairs into the *other* classes, and a target that every class reaches
    easily (on pattern D's CIFAR-10 Step 0, every pair into the cat) puts every source in its tail. No test on the
    norms finds the sources of a backdoor the model generalises to every class (pattern C from three sources on a
    CIFAR-10 Step 0: every pair into the target is short). With fewer than three other classes there is no test:
    ``[source]``."""
    r = np.asarray(reciprocals, dtype=np.float64)
    others = [s for s in range(r.shape[0]) if s != target]
    if len(others) < 3:
        return [source]
    outliers = mad_anomaly_index([-r[s, target] for s in others], threshold).flagged
    return sorted({source} | {others[i] for i in outliers if r[others[i], target] > 0})


@register_cleanser
class ReverseEngineering(Cleanser):
    """Xiang et al.'s RE defense: :meth:`cleanse` estimates a pattern for every ordered class pair, tests for
    an attack and removes the images of the detected target class from which the subtracted pattern takes the
    most margin (the margin rule) or whose label it changes (eq. 12)."""

    name = "re"
    config_class = ReverseEngineeringConfig
    description = ("reverse engineering: pair patterns, Gamma order-statistic test, cleansing by the subtracted "
                   "pattern (Xiang et al.)")

    def estimate_patterns(self, model, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                          device=None, progress: bool = False, pairs=None, refine: bool = False) -> PairPatterns:
        """Step 1 (Algorithm 1 lines 3–8) for every ordered class pair (or the given ``pairs``), batched on the
        inversion engine; ``refine``: at the refinement's finer steps."""
        cfg = self.config
        generator = self._generator(generator)
        check_training_set(model, train_set, min_per_class=1, features=False)
        device = _device_of(model, device)
        check_finite_outputs(model, train_set.images[:cfg.batch_size], device)
        k = train_set.num_classes
        tasks = pair_tasks(train_set.images, train_set.labels, num_classes=k, generator=generator,
                           max_images=cfg.max_images, removal=True, pairs=pairs)
        result = invert(tasks, LogSurrogate(model, weight=cfg.weight), cfg.inversion(refine), device=device,
                        progress=progress)
        norms = torch.full((k, k), math.nan, dtype=torch.float64)
        steps = torch.zeros(k, k, dtype=torch.int64)
        patterns = {}
        for i, task in enumerate(tasks):
            s, t = task.source, task.target
            norms[s, t] = float(result.size[i]) if bool(result.found[i]) else math.inf
            steps[s, t] = int(result.steps[i])
            patterns[(s, t)] = result.triggers[i]["delta"].float()
        logger.info("RE: %d of %d pairs reached pi=%.2f in %.1fs", int(result.found.sum()), len(tasks), cfg.pi,
                    result.seconds)
        return PairPatterns(norms, patterns, steps, result.seconds)

    def cleanse(self, model, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device=None, progress: bool = False) -> CleanseResult:
        cfg = self.config
        started = time.perf_counter()
        generator = self._generator(generator)
        check_training_set(model, train_set, min_per_class=1, features=False)
        k = train_set.num_classes
        if k < 3:
            raise ValueError(f"RE's order-statistic test needs at least 3 classes, got {k}")
        device = _device_of(model, device)
        pairs = self.estimate_patterns(model, train_set, generator=generator, device=device, progress=progress)
        test = order_statistic_test(pairs.reciprocals, cfg.theta)
        target, source = test["target"], test["source"]
        detected = bool(test["detected"])
        pattern = pairs.patterns[(source, target)] if detected else None
        refined = None
        if detected and cfg.refine_step_size is not None:
            refined = self.estimate_patterns(model, train_set, generator=generator, device=device,
                                             pairs=[(source, target)], refine=True)
            if math.isfinite(float(refined.norms[source, target])):
                pattern = refined.patterns[(source, target)]
        sources = source_classes(pairs.reciprocals, target, source) if detected else None
        removed = torch.zeros(0, dtype=torch.int64)
        scale, source_rate, mixture, rule = cfg.subtract_scale, None, None, None
        if detected:
            if scale is None:
                scale, source_rate = removal_scale(model, train_set, source, target, pattern, cfg.removal_pi,
                                                   batch_size=cfg.batch_size, device=device)
            if cfg.removal == "margin":
                removed, mixture = margin_removal(model, train_set, target, pattern, scale=scale,
                                                  posterior=cfg.removal_posterior, seed=sklearn_seed(generator),
                                                  batch_size=cfg.batch_size, device=device, progress=progress)
                rule = mixture["rule"]
            else:
                rule = "flip"
                removed = subtraction_removal(model, train_set, target, pattern, scale=scale,
                                              to=sources if cfg.removal_to == "sources" else None,
                                              batch_size=cfg.batch_size, device=device, progress=progress)
        r = pairs.reciprocals
        stats_per_class, scores = {}, {}
        for c in range(k):
            pv_c = test["pv_class"][c]
            corrected = float(-np.expm1(k * np.log1p(-pv_c))) if pv_c < 1 else 1.0
            scores[c] = -math.log10(max(corrected, _TINY))
            into = [(float(r[s, c]), s) for s in range(k) if s != c]
            fit = test["gamma"][c]
            stats_per_class[c] = {"p_value": pv_c, "corrected_p_value": corrected, "max_reciprocal": max(into)[0],
                                  "argmax_source": max(into)[1], "gamma_shape": fit["shape"],
                                  "gamma_scale": fit["scale"], "gamma_fit": fit["method"],
                                  "pairs_found": int(torch.isfinite(pairs.norms[:, c]).sum())}
        norms = [[None if s == t or not math.isfinite(float(pairs.norms[s, t])) else float(pairs.norms[s, t])
                  for t in range(k)] for s in range(k)]
        logger.info("RE: pv %.3g (theta %g) -> %s", test["pv"], cfg.theta,
                    f"target {target}, source {source}, removed {removed.numel()}" if detected else "no detection")
        return CleanseResult(
            self.name, detected, target if detected else None,
            {"name": "p_value", "value": test["pv"], "threshold": cfg.theta, "alarm": "below",
             "underflow": test["pv"] == 0.0},
            scores, -math.log10(cfg.theta), stats_per_class, removed, len(train_set), self._config_dict(),
            pattern=pattern,
            details={"source_class": source if detected else None,
                     "source_classes": sources, "most_suspicious": {"source": source,
                     "target": target}, "pattern_norm": None if pattern is None else float(pattern.norm()),
                     "norms": norms, "steps": pairs.steps.tolist(), "pairs": k * (k - 1),
                     "pair_seconds": round(pairs.seconds, 3),
                     "coarse_pattern_norm": float(pairs.norms[source, target]) if detected else None,
                     "subtract_scale": scale if detected else None, "removal_source_rate": source_rate,
                     "margin_mixture": mixture, "removal_rule": rule,
                     "refined_steps": None if refined is None else int(refined.steps[source, target]),
                     "refined_found": None if refined is None else math.isfinite(
                         float(refined.norms[source, target]))},
            seconds=time.perf_counter() - started)


@torch.inference_mode()
def subtraction_removal(model, train_set: ImageTensorDataset, target: int, pattern: torch.Tensor, *,
                        scale: float = 1.0, to=None, batch_size: int = 128, device=None,
                        progress: bool = False) -> torch.Tensor:
    """Eq. 12: the sorted indices of the images of ``train_set`` labelled ``target`` whose label under ``model``
    changes when the pattern is subtracted, ``f([x − scale·v̂]_c) ≠ target`` (``scale`` 1: eq. 12 as stated).
    ``pattern`` is ``(C, H, W)`` in the [0, 1] pixel scale. ``to``: class indices other than ``target``; an
    image is then removed only when its new label is one of them (the attack's source classes)."""
    if to is not None:
        to = list(to)
        bad = [c for c in to if not is_int(c) or not 0 <= c < train_set.num_classes or c == target]
        if not to or bad:
            raise ValueError(f"to must be None or a non-empty list of class indices in [0, {train_set.num_classes - 1}]"
                             f" other than the target {target}, got {to!r}")
    index, preds = subtracted_labels(model, train_set, target, pattern, scale=scale, batch_size=batch_size,
                                     device=device, progress=progress)
    moved = preds != target if to is None else torch.isin(preds, torch.tensor(to, dtype=preds.dtype))
    return index[moved]


def subtracted_labels(model, train_set: ImageTensorDataset, target: int, pattern: torch.Tensor, *,
                      scale: float = 1.0, batch_size: int = 128, device=None,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted indices of the images of ``train_set`` labelled ``target`` and their labels under ``model``
    once the pattern is subtracted, ``f([x − scale·v̂]_c)``: what eq. 12 (:func:`subtraction_removal`) decides on."""
    index = _subtraction_candidates(train_set, target, pattern, scale, batch_size)
    if index.numel() == 0:
        return index, torch.zeros(0, dtype=torch.int64)
    return index, _shifted_logits(model, train_set.images[index], -scale * pattern, batch_size=batch_size,
                                  device=device, progress=progress).argmax(1)


def margin_drops(model, train_set: ImageTensorDataset, target: int, pattern: torch.Tensor, *, scale: float = 1.0,
                 batch_size: int = 128, device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted indices of the images of ``train_set`` labelled ``target`` and how much target margin each loses
    when the pattern is subtracted, ``m_t(x) − m_t([x − scale·v̂]_c)`` with ``m_t = logit_t − max_{c≠t} logit_c``
    (float64): what :func:`margin_removal` decides on."""
    index = _subtraction_candidates(train_set, target, pattern, scale, batch_size)
    margins = functools.partial(_target_margins, model, train_set.images[index], target, batch_size=batch_size,
                                device=device, progress=progress)
    return index, margins(torch.zeros_like(pattern)) - margins(-scale * pattern)


def margin_removal(model, train_set: ImageTensorDataset, target: int, pattern: torch.Tensor, *, scale: float = 1.0,
                   posterior: float = 0.1, fallback: bool = True, seed: int = 0, batch_size: int = 128,
                   device=None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The margin rule (module docstring): the sorted indices of the images labelled ``target`` whose margin drop
    (:func:`margin_drops`) exceeds the threshold τ of a two-component Gaussian mixture fitted to the drops
    (scikit-learn, 3 initialisations from ``seed``), and the fit: the multiple ``scale`` it ran at, the
    components' means, standard deviations and weights (high component first), the modes of the fitted density,
    τ, why the split was not trusted (``fallback``), the rule that decided and the ``other`` fits made on the way.
    τ is the drop between the two means at which the high component's posterior first exceeds ``posterior`` (the
    posterior rises monotonically there; beyond the means a wider component also takes the far tail on the other
    side, which a threshold leaves out). The split is not trusted when the density has one mode (its modes all
    lie between the means; no dip between them: the drops show no poison mode, only a skewed spread; ``"one
    mode"``) or when the high component holds half of the target's images or more (the poisons are a minority of
    the class; ``"majority"``). With ``fallback``, an untrusted split at ``scale`` > 1 is fitted again at the
    estimate itself (scale 1, eq. 12's own subtraction: a stronger one can take margin from the clean images too),
    and where that is not trusted either, eq. 12 (:func:`subtraction_removal`) decides at ``scale`` and the fit's
    ``rule`` says ``"flip"``, as it does when fewer than two distinct drops leave nothing to fit (``modes`` 0,
    ``fallback`` ``"no fit"``)."""
    check_fraction("posterior", posterior, high_open=True)
    index = _subtraction_candidates(train_set, target, pattern, scale, batch_size)
    margins = functools.partial(_target_margins, model, train_set.images[index], target, batch_size=batch_size,
                                device=device, progress=progress)
    before = margins(torch.zeros_like(pattern))                         # margin_drops' first term, shared by the tries
    fits, scales = [], (scale, 1.0) if fallback and scale > 1 else (scale,)
    for k in scales:
        drops = before - margins(-k * pattern)
        fit = {"scale": k, **_drop_mixture(drops.numpy(), posterior, seed)}
        if fit["threshold"] is not None and not (fallback and fit["fallback"]):
            return index[drops > fit["threshold"]], {**fit, "rule": "margin", "other": fits}
        fits.append(fit)
    return subtraction_removal(model, train_set, target, pattern, scale=scale, batch_size=batch_size, device=device,
                               progress=progress), {**fits[0], "rule": "flip", "other": fits[1:]}


def _drop_mixture(drops: np.ndarray, posterior: float, seed: int) -> dict:
    """:func:`margin_removal`'s two-component Gaussian mixture on the margin drops, its modes, threshold and
    ``fallback`` (None where the split is trusted)."""
    fit = {"means": None, "stds": None, "weights": None, "modes": 0, "posterior": posterior, "threshold": None,
           "fallback": "no fit"}
    x = drops[:, None]
    if np.unique(x).size < 2:
        return fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mixture = GaussianMixture(2, n_init=3, random_state=seed).fit(x)
    order = np.argsort(-mixture.means_.ravel())
    high, low = mixture.means_.ravel()[order]
    grid = np.linspace(low, high, _MARGIN_GRID)
    density = mixture.score_samples(grid[:, None])
    dips = np.count_nonzero((density[1:-1] < density[:-2]) & (density[1:-1] < density[2:]))
    above = np.flatnonzero(mixture.predict_proba(grid[:, None])[:, order[0]] > posterior)
    fit.update(means=[float(high), float(low)], stds=np.sqrt(mixture.covariances_.ravel()[order]).tolist(),
               weights=mixture.weights_[order].tolist(), modes=1 + int(dips),
               threshold=float(grid[above[0]] if above.size else high))
    fit["fallback"] = ("one mode" if fit["modes"] < 2 else
                       "majority" if fit["weights"][0] >= _MAX_POISON_WEIGHT else None)
    return fit


def removal_scale(model, train_set: ImageTensorDataset, source: int, target: int, pattern: torch.Tensor,
                  fraction: float, *, batch_size: int = 128, device=None) -> tuple[float, float]:
    """The smallest multiple k ≥ 1 of ``pattern`` (to within 0.01, at most 4) whose addition sends ``fraction`` of
    *all* the images labelled ``source`` to ``target``, ``ρ(k) = mean f([x + k·v̂]_c) = target``, and ρ there.

    ρ need not rise along the estimate's ray: past the strength of the planted pattern the images can go on to a
    third class (on a CIFAR-10 Step 0 of pattern C with three sources, 0.957 at k = 1, 0.990 at 1.5, 0.46 at 4). So
    k is scanned in steps of 0.25 and the first step that reaches ``fraction`` is bisected (about 8 passes over the
    source class). ρ(1) ≥ ``fraction`` returns 1; a ray that never reaches it returns the scanned multiple with the
    highest ρ (the smallest of them) and that ρ, and a warning is logged."""
    _check_removal_inputs(train_set, pattern, batch_size, source=source, target=target)
    check_fraction("fraction", fraction)
    images = train_set.images[train_set.labels == source]
    if len(images) == 0:
        raise ValueError(f"no images are labelled {source}: the source class's rate is undefined")

    def rate(k: float) -> float:
        preds = _shifted_logits(model, images, k * pattern, batch_size=batch_size, device=device).argmax(1)
        return float((preds == target).double().mean())

    low, at_low = 1.0, rate(1.0)
    if at_low >= fraction:
        return low, at_low
    best, at_best = low, at_low
    high = at_high = None
    while high is None and low < _MAX_REMOVAL_SCALE:
        k = min(low + _REMOVAL_SCALE_STEP, _MAX_REMOVAL_SCALE)
        at_k = rate(k)
        if at_k >= fraction:
            high, at_high = k, at_k
        else:
            if at_k > at_best:
                best, at_best = k, at_k
            low = k
    if high is None:
        logger.warning("RE: no multiple of v̂ up to %g sends %g of class %d to %d (at most %.4f, at %g·v̂); eq. 12 "
                       "subtracts %g·v̂", _MAX_REMOVAL_SCALE, fraction, source, target, at_best, best, best)
        return best, at_best
    while high - low > _REMOVAL_SCALE_TOLERANCE:
        middle = (low + high) / 2
        at_middle = rate(middle)
        if at_middle >= fraction:
            high, at_high = middle, at_middle
        else:
            low = middle
    return round(high, 6), at_high


def _check_removal_inputs(train_set: ImageTensorDataset, pattern: object, batch_size: object,
                          **classes: object) -> None:
    """The named class indices lie in the set's classes, ``pattern`` is shaped like one of its images and
    ``batch_size`` is a positive int."""
    for name, cls in classes.items():
        if not is_int(cls) or not 0 <= cls < train_set.num_classes:
            raise ValueError(f"{name} must be a class index in [0, {train_set.num_classes - 1}], got {cls!r}")
    if not isinstance(pattern, torch.Tensor) or tuple(pattern.shape) != tuple(train_set.images.shape[1:]):
        got = tuple(pattern.shape) if isinstance(pattern, torch.Tensor) else type(pattern).__name__
        raise ValueError(f"pattern must be a tensor shaped like one image {tuple(train_set.images.shape[1:])}, "
                         f"got {got}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _subtraction_candidates(train_set: ImageTensorDataset, target: object, pattern: object, scale: object,
                            batch_size: object) -> torch.Tensor:
    """The sorted indices of the images labelled ``target``, once the inputs of a subtraction check out."""
    _check_removal_inputs(train_set, pattern, batch_size, target=target)
    if not is_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    return (train_set.labels == target).nonzero().squeeze(1)


def _target_margins(model, images: torch.Tensor, target: int, shift: torch.Tensor, *, batch_size: int, device,
                    progress: bool = False) -> torch.Tensor:
    """The target margins ``m_t([x + shift]_c) = logit_t − max_{c≠t} logit_c`` (float64) of uint8 ``images``."""
    if len(images) == 0:
        return torch.zeros(0, dtype=torch.float64)
    logits = _shifted_logits(model, images, shift, batch_size=batch_size, device=device, progress=progress).double()
    others = logits.clone()
    others[:, target] = -math.inf
    return logits[:, target] - others.max(1).values


@torch.inference_mode()
def _shifted_logits(model, images: torch.Tensor, shift: torch.Tensor, *, batch_size: int, device,
                    progress: bool = False) -> torch.Tensor:
    """The logits ``f([x + shift]_c)`` of uint8 ``images`` (on the CPU), in eval mode (the model's mode is
    restored)."""
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    shift = shift.to(device, dtype)
    logits = []
    try:
        for chunk in tqdm(images.split(batch_size), desc="re cleansing", unit="batch", disable=not progress,
                          leave=False):
            logits.append(model((chunk.to(device, dtype).div_(255) + shift).clamp(0, 1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits)
