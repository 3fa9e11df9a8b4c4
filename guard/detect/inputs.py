"""Per-input backdoor detection behind one interface (:class:`InputDetector`), addressed by name.

A model-level detector (:class:`guard.detect.Detector`) asks whether a *model* carries a backdoor; an input
detector asks, for every *request*, whether it carries a trigger. Each is a frozen, validated config and two
verbs: :meth:`InputDetector.fit` takes the served model and clean reference images, :meth:`InputDetector.score`
returns one number per input, higher ⇒ more likely triggered. Scores are batch-size independent (every random
draw happens in ``fit``) and the model is never modified. ``forward_passes`` says what a score costs.

Registered: ``strip`` (Gao et al. 2019, ALGORITHMS.md D10), ``scale-up`` (Guo et al., ICLR 2023), ``teco``
(Liu et al., CVPR 2023), ``ibd-psc`` (Hou et al., ICML 2024) and ``rescaler``, guard's own score from the one
ReScaler pass the endpoint already makes (rescaler_main.txt §3).

Example::

    from guard.detect import create_input_detector
    detector = create_input_detector("strip").fit(model, clean_images, generator=torch.Generator().manual_seed(0))
    scores = detector.score(images)                                 # (B,) float64
    threshold = detector.threshold(detector.score(more_clean), false_positive_rate=0.05)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_images, is_number
from ..models import GuardModel
from ..registry import Configured, Registry
from ..rescaler import ReScaler, ReScalerConfig
from ..rescaler.adapters import find_stages
from ._checks import check_scan_inputs
from .base import calibrate_threshold
from .corruptions import CORRUPTIONS, Corruptions

logger = logging.getLogger(__name__)

__all__ = ["FEATURE_LAYERS", "LayerGaussian", "PENULTIMATE", "class_gaussians", "feature_layers", "fit_layer_gaussians",
           "layer_features", "layered_score", "mahalanobis", "IBDPSC", "IBDPSCConfig", "InputDetector",
           "ReScalerScore", "ReScalerScoreConfig", "STRIP", "STRIPConfig",
           "ScaleUp", "ScaleUpConfig", "TeCo", "TeCoConfig", "create_input_detector", "describe_input_detectors",
           "get_input_detector", "list_input_detectors", "register_input_detector"]


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _fraction(value: object, name: str, *, closed: bool = False) -> None:
    ok = is_number(value) and (0 <= value <= 1 if closed else 0 < value < 1)
    if not ok:
        raise ValueError(f"{name} must be a number in {'[0, 1]' if closed else '(0, 1)'}, got {value!r}")


class InputDetector(Configured, ABC):
    """Base of every per-input detector: a validated config of type ``config_class``, :meth:`fit` and
    :meth:`score`. Subclasses implement :meth:`_fit` (draws and statistics from the clean reference images)
    and :meth:`_score` (one chunk of at most ``config.batch_size`` inputs)."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.model: GuardModel | None = None

    def fit(self, model: GuardModel, clean: torch.Tensor, *, generator: torch.Generator | None = None
            ) -> "InputDetector":
        """Attach the served ``model`` and learn what clean inputs look like from ``clean`` ``(N, C, H, W)`` in
        [0, 1] (the defender's held-out clean images). Returns ``self``; the model is put in eval mode and not
        otherwise modified."""
        generator = check_scan_inputs(model, generator)
        clean = check_images(clean, model.spec.input_size, name="clean")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        with torch.no_grad():
            self._fit(clean.to(self.device), generator)
        return self

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """One score per input, ``(B,)`` float64 on the CPU; higher ⇒ more likely triggered."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(model, clean_images) first")
        images = check_images(images, self.model.spec.input_size)
        chunks = images.split(self.config.batch_size)
        return torch.cat([self._score(c.to(self.device)).double().cpu() for c in chunks])

    @property
    def forward_passes(self) -> int:
        """What a score costs: forward passes of the model per input (a backward pass counts as two)."""
        return 1

    def threshold(self, clean_scores: torch.Tensor, false_positive_rate: float = 0.05) -> float:
        """:func:`~guard.detect.calibrate_threshold` of scores this detector gave clean inputs."""
        return calibrate_threshold(clean_scores, false_positive_rate)

    @abstractmethod
    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None: ...

    @abstractmethod
    def _score(self, images: torch.Tensor) -> torch.Tensor: ...

    def _predict(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Softmax probabilities of ``model`` (the fitted one by default) on ``x``, in chunks of the configured
        number of images per forward pass."""
        model = self.model if model is None else model
        with torch.no_grad():
            return torch.cat([model(c).float().softmax(1) for c in x.split(self.config.batch_size)])


INPUT_DETECTORS: Registry[InputDetector] = Registry("input detector", InputDetector)
register_input_detector = INPUT_DETECTORS.register
list_input_detectors = INPUT_DETECTORS.names
get_input_detector = INPUT_DETECTORS.get
create_input_detector = INPUT_DETECTORS.create


def describe_input_detectors() -> dict[str, dict[str, Any]]:
    """Name -> description, default options and forward passes per input (``guard info --json``)."""
    return {name: {"description": cls.description, "forward_passes": cls().forward_passes,
                   "options": json.loads(json.dumps(dataclasses.asdict(cls.config_class())))}
            for name, cls in INPUT_DETECTORS.items()}


# -- STRIP ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class STRIPConfig:
    """STRIP (ALGORITHMS.md D10): ``overlays`` (N) clean images superimposed on every input as
    ``x + alpha·x_n``, not clipped, as the original release adds the two images (backdoor-toolbox clips to
    [0, 1], which washes a saturated patch out); ``batch_size``: images per forward pass."""

    overlays: int = 100
    alpha: float = 1.0
    batch_size: int = 512

    def __post_init__(self) -> None:
        _positive_int(self.overlays, "overlays")
        _fraction(self.alpha, "alpha", closed=True)
        if self.alpha == 0:
            raise ValueError("alpha must be > 0: at 0 nothing is superimposed")
        _positive_int(self.batch_size, "batch_size")


@register_input_detector
class STRIP(InputDetector):
    """A trojaned input keeps its (target) prediction under superimposed clean images, so its predictions
    have low entropy (Gao et al. 2019; ALGORITHMS.md D10). Score: minus the mean entropy (bits) over the
    overlays. The overlays are drawn once, in :meth:`fit`, and shared by every input."""

    name = "strip"
    config_class = STRIPConfig
    description = "STRIP: low prediction entropy under superimposed clean images (Gao et al. 2019)"

    @property
    def forward_passes(self) -> int:
        return self.config.overlays

    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None:
        n = self.config.overlays
        index = torch.randint(len(clean), (n,), generator=generator) if n > len(clean) else \
            torch.randperm(len(clean), generator=generator)[:n]
        self.overlays = clean[index.to(clean.device)]

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        # a few inputs at a time, so the superimposed images of one forward pass stay within batch_size
        per_pass = max(1, self.config.batch_size // self.config.overlays)
        return torch.cat([self._entropy(x) for x in images.split(per_pass)])

    def _entropy(self, images: torch.Tensor) -> torch.Tensor:
        mixed = (images[:, None] + self.config.alpha * self.overlays[None]).flatten(0, 1)
        p = self._predict(mixed).double()
        entropy = -(p * p.clamp_min(1e-12).log2()).sum(1).view(len(images), -1)
        return -entropy.mean(1)


# -- SCALE-UP ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleUpConfig:
    """SCALE-UP (Guo et al., ICLR 2023; BackdoorBox ``SCALE_UP.py``): pixel values times each of ``scales``,
    clipped to [0, 1]. ``standardize``: the data-limited variant — the scaled prediction consistency minus
    the mean of clean inputs of the same predicted class, over their standard deviation (the paper's eqs.
    3–4); ``False``: the data-free SPC."""

    scales: tuple[float, ...] = (3, 5, 7, 9, 11)
    standardize: bool = True
    batch_size: int = 512

    def __post_init__(self) -> None:
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else self.scales
        if not isinstance(scales, tuple) or not scales or not all(is_number(s) and s > 1 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of numbers > 1, got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        if not isinstance(self.standardize, bool):
            raise ValueError(f"standardize must be a bool, got {self.standardize!r}")
        _positive_int(self.batch_size, "batch_size")


@register_input_detector
class ScaleUp(InputDetector):
    """A triggered input keeps its prediction when its pixel values are amplified (the trigger dominates the
    saturated image); a clean one does not. Score: the fraction of amplified copies predicted as the
    original label (SPC), standardized per predicted class with the clean images' statistics."""

    name = "scale-up"
    config_class = ScaleUpConfig
    description = "SCALE-UP: prediction consistency under amplified pixel values (Guo et al., ICLR 2023)"

    @property
    def forward_passes(self) -> int:
        return len(self.config.scales) + 1

    def _spc(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales = torch.tensor(self.config.scales, dtype=images.dtype, device=images.device)
        amplified = (images[:, None] * scales.view(1, -1, 1, 1, 1)).clamp(0, 1).flatten(0, 1)
        label = self._predict(images).argmax(1)
        same = self._predict(amplified).argmax(1).view(len(images), -1) == label[:, None]
        return same.double().mean(1), label

    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None:
        if not self.config.standardize:
            return
        pairs = [self._spc(c) for c in clean.split(self.config.batch_size)]
        spc, labels = torch.cat([s for s, _ in pairs]), torch.cat([y for _, y in pairs])
        k = self.model.num_classes
        # a class no clean image is predicted as falls back to the statistics of all clean images
        self.mean = torch.full((k,), spc.mean().item(), dtype=torch.float64, device=spc.device)
        self.std = torch.full((k,), spc.std(unbiased=False).item(), dtype=torch.float64, device=spc.device)
        for c in labels.unique().tolist():
            self.mean[c] = spc[labels == c].mean()
            self.std[c] = spc[labels == c].std(unbiased=False)
        self.std.clamp_(min=1.0 / (10 * len(self.config.scales)))  # a class whose clean SPC never varies

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        spc, label = self._spc(images)
        return (spc - self.mean[label]) / self.std[label] if self.config.standardize else spc


# -- TeCo ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeCoConfig:
    """TeCo (Liu et al., CVPR 2023; CGCL-codes/TeCo): ``corruptions`` (default all 14 of
    :data:`guard.detect.corruptions.CORRUPTIONS`) at severities 1 … ``severities``."""

    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: int = 5
    batch_size: int = 512

    def __post_init__(self) -> None:
        names = tuple(self.corruptions) if isinstance(self.corruptions, (list, tuple)) else self.corruptions
        if not isinstance(names, tuple) or len(names) < 2 or len(set(names)) != len(names) \
                or not set(names) <= set(CORRUPTIONS):
            raise ValueError(f"corruptions must be at least two distinct names of {CORRUPTIONS}, "
                             f"got {self.corruptions!r}")
        object.__setattr__(self, "corruptions", names)
        if isinstance(self.severities, bool) or not isinstance(self.severities, int) or not 1 <= self.severities <= 5:
            raise ValueError(f"severities must be an int in 1 … 5, got {self.severities!r}")
        _positive_int(self.batch_size, "batch_size")


@register_input_detector
class TeCo(InputDetector):
    """Clean inputs lose their prediction at about the same severity under every corruption; triggered inputs
    keep the target under some corruptions and lose the trigger early under others. Per corruption, the first
    severity whose prediction differs from the uncorrupted one (``severities + 1`` when none does); score: the
    standard deviation of those over the corruptions (the reference code's ``np.std``)."""

    name = "teco"
    config_class = TeCoConfig
    description = "TeCo: spread of the corruption severity that flips the prediction (Liu et al., CVPR 2023)"

    @property
    def forward_passes(self) -> int:
        return len(self.config.corruptions) * self.config.severities + 1

    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None:
        self.corrupt = Corruptions(tuple(clean.shape[1:]), generator)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        label = self._predict(images).argmax(1)
        n = self.config.severities
        first = []
        for name in self.config.corruptions:
            corrupted = torch.cat([self.corrupt.apply(name, images, s) for s in range(1, n + 1)])
            moved = self._predict(corrupted).argmax(1).view(n, -1) != label
            # the first severity that moves the prediction, n + 1 when none does
            first.append(torch.where(moved.any(0), moved.double().argmax(0) + 1, torch.full_like(label, n + 1)))
        return torch.stack(first).double().std(0, unbiased=False)


# -- IBD-PSC -------------------------------------------------------------------------------------------------
def amplify_batchnorm(model: nn.Module, depth: int, factor: float) -> nn.Module:
    """A copy of ``model``, in eval mode, with the weight and bias of its ``depth`` deepest BatchNorm layers times
    ``factor`` (IBD-PSC's ω; Hou et al., ICML 2024); ``model`` itself is left as it was."""
    copy_ = copy.deepcopy(model)
    layers = [m for m in copy_.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][::-1]
    with torch.no_grad():
        for layer in layers[:depth]:
            if layer.affine:
                layer.weight.mul_(factor)
                layer.bias.mul_(factor)
    return copy_.eval()


@dataclass(frozen=True)
class IBDPSCConfig:
    """IBD-PSC (Hou et al., ICML 2024; BackdoorBox ``IBD_PSC.py``): BatchNorm weight and bias of the deepest
    layers times ``factor`` (ω); the first depth k whose amplification moves more than ``error`` (ξ) of the
    clean predictions is found in :meth:`~InputDetector.fit`, and the score averages ``models`` (n) amplified
    copies, of the k+1 … k+n deepest BatchNorm layers."""

    models: int = 5
    error: float = 0.6
    factor: float = 1.5
    batch_size: int = 512

    def __post_init__(self) -> None:
        _positive_int(self.models, "models")
        _fraction(self.error, "error")
        if not is_number(self.factor) or self.factor <= 1:
            raise ValueError(f"factor must be a number > 1, got {self.factor!r}")
        _positive_int(self.batch_size, "batch_size")


@register_input_detector
class IBDPSC(InputDetector):
    """Amplifying the BatchNorm parameters of the deeper layers wrecks clean predictions but leaves
    triggered inputs on the target (the backdoor's features are amplified along). Score: the mean
    probability, over the amplified copies, of the label the unamplified model predicts (PSC).

    The depth is chosen against the unamplified model's own predictions on the clean images (the reference
    code uses their ground-truth labels; on a well-trained model the two agree)."""

    name = "ibd-psc"
    config_class = IBDPSCConfig
    description = "IBD-PSC: prediction consistency under amplified BatchNorm parameters (Hou et al., ICML 2024)"

    @property
    def forward_passes(self) -> int:
        return self.config.models + 1

    def _amplified(self, depth: int) -> nn.Module:
        return amplify_batchnorm(self.model, depth, self.config.factor)

    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None:
        count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if count < 2:
            raise ValueError(f"IBD-PSC amplifies BatchNorm layers; {type(self.model.net).__name__} has {count}")
        label = self._predict(clean).argmax(1)
        moved = []
        for depth in range(1, count):
            moved.append((self._predict(clean, self._amplified(depth)).argmax(1) != label).double().mean().item())
            if moved[-1] > self.config.error:
                break
        start = len(moved) if moved[-1] > self.config.error else 1 + max(range(len(moved)), key=moved.__getitem__)
        if moved[-1] <= self.config.error:
            logger.warning("IBD-PSC: amplifying up to %d of %d BatchNorm layers by %g moves at most %.2f of the "
                           "clean predictions (error=%g); using the depth that moves the most, %d",
                           count - 1, count, self.config.factor, max(moved), self.config.error, start)
        self.moved = moved
        self.depth = start
        self.depths = tuple(min(start + i, count) for i in range(1, self.config.models + 1))
        self.amplified = [self._amplified(depth) for depth in self.depths]

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        label = self._predict(images).argmax(1)[:, None]
        return torch.stack([self._predict(images, m).gather(1, label)[:, 0] for m in self.amplified]).mean(0)


# -- guard's own score: ReScaler's pass ---------------------------------------------------------------------
#: the layer name of the penultimate features (the input of the model's final linear layer)
PENULTIMATE = "penultimate"
#: the layer sets guard's feature score reads: every residual stage and the penultimate features, or the latter
FEATURE_LAYERS = ("stages", "penultimate")


def feature_layers(model: GuardModel, which: str = "stages") -> tuple[str, ...]:
    """The layers of ``model`` guard's feature score reads: ``"stages"`` — every residual stage
    (:func:`guard.rescaler.adapters.find_stages`) and the penultimate features; ``"penultimate"`` — the latter."""
    if which not in FEATURE_LAYERS:
        raise ValueError(f"expected one of {FEATURE_LAYERS}, got {which!r}")
    return (*(find_stages(model) if which == "stages" else ()), PENULTIMATE)


def _channel_statistics(output: torch.Tensor) -> torch.Tensor:
    """``(B, 2C)``: the per-channel mean and standard deviation over the positions of a ``(B, C, H, W)`` output."""
    return torch.cat([output.mean((2, 3)), output.std((2, 3))], 1)


@contextmanager
def layer_features(model: GuardModel, layers: tuple[str, ...], *, detach: bool = True
                   ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward pass of ``model`` appends each layer's features (float64 and detached by
    default) to the yielded ``{layer: [...]}``: :data:`PENULTIMATE` — the input of the final linear layer
    ``(B, D)``; a module name (a residual stage) — the per-channel mean and standard deviation of its output
    ``(B, 2C)``. The hooks go on
    exit, even after an error. ReScaler's first forward is the undefended one, so the first entry of each list
    holds the plain model's features at no extra cost. ``detach=False`` keeps them in the graph, in the model's
    dtype (an attacker shaping what the detector sees)."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double() if detach else t

    handles = []
    try:
        for name in layers:
            if name == PENULTIMATE:
                handles.append(model.classifier.register_forward_hook(
                    lambda module, inputs, output: captured[PENULTIMATE].append(keep(inputs[0].flatten(1)))))
            else:
                handles.append(model.get_submodule(name).register_forward_hook(
                    lambda module, inputs, output, name=name: captured[name].append(
                        _channel_statistics(keep(output)))))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``(K, D)`` and the precision ``(D, D)`` of one tied covariance, Ledoit–Wolf shrunk, of
    ``features`` ``(N, D)`` grouped by ``labels`` ``(N,)`` (Lee et al., NeurIPS 2018, eq. 1, with shrinkage so
    that fewer images than dimensions still give a proper inverse). Every class needs at least one image."""
    from sklearn.covariance import LedoitWolf

    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"the clean images must include inputs the model assigns to every class; "
                         f"none is predicted as {missing} among {len(labels)} images")
    features = features.double().cpu()
    labels = labels.cpu()
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)])
    precision = torch.as_tensor(LedoitWolf().fit((features - means[labels]).numpy()).precision_)
    return means, precision


def mahalanobis(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
                ) -> torch.Tensor:
    """Squared Mahalanobis distance ``(B,)`` of each feature row to the mean of its class ``labels[i]``."""
    means, precision = means.to(features.device), precision.to(features.device)
    d = features.double() - means[labels.to(features.device)]
    return ((d @ precision) * d).sum(1)


@dataclass(frozen=True)
class LayerGaussian:
    """One layer of guard's feature score: class means ``(K, D)``, the tied precision ``(D, D)``, and the mean and
    standard deviation of the log distances of held-out clean inputs, which put every layer on one scale."""

    means: torch.Tensor
    precision: torch.Tensor
    log_mean: float
    log_std: float

    def standardized(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(log d − log_mean) / log_std`` with ``d`` the squared Mahalanobis distance to the class of ``labels``."""
        distance = mahalanobis(features, labels, self.means, self.precision).clamp_min(1e-12)
        return (distance.log() - self.log_mean) / self.log_std


def fit_layer_gaussians(features: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, *, folds: int,
                        generator: torch.Generator) -> tuple[dict[str, LayerGaussian], torch.Tensor]:
    """Fit one :class:`LayerGaussian` per layer on clean ``features`` ``{layer: (N, D)}`` with predicted ``labels``.

    Each image's distance is first measured out of fold (``folds`` folds stratified by class: by the Gaussians
    fitted without it, as an unseen request's would be); those distances standardize the layer, and the layers'
    standardized log distances join into the score (:func:`combined`; their sum is the unsupervised form of the
    feature ensemble of Lee et al., NeurIPS 2018, §2.2). Returns the Gaussians fitted on every image, and the
    out-of-fold standardized terms ``(layers, N)``.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < folds]
    if short:
        raise ValueError(f"need at least {folds} clean images predicted as each class; classes {short} have "
                         f"{counts[short].tolist()} among {len(labels)} images (give more images)")
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in range(num_classes):
        members = torch.nonzero(labels == c)[:, 0]
        fold[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    gaussians, terms = {}, []
    for name, x in features.items():
        x = x.cpu()
        held_out = torch.empty(len(labels), dtype=torch.float64)
        for f in range(folds):
            held = fold == f
            means, precision = class_gaussians(x[~held], labels[~held], num_classes)
            held_out[held] = mahalanobis(x[held], labels[held], means, precision)
        log = held_out.clamp_min(1e-12).log()
        gaussians[name] = LayerGaussian(*class_gaussians(x, labels, num_classes), log.mean().item(),
                                        max(log.std().item(), 1e-12))
        terms.append((log - gaussians[name].log_mean) / gaussians[name].log_std)
    return gaussians, torch.stack(terms)


def layered_score(gaussians: dict[str, LayerGaussian], features: dict[str, torch.Tensor], labels: torch.Tensor,
                  combine: str = "sum") -> torch.Tensor:
    """guard's feature score ``(B,)``: the sum (or ``combine="max"``, the largest) over layers of the standardized
    log Mahalanobis distances."""
    return combined(torch.stack([g.standardized(features[name], labels) for name, g in gaussians.items()]), combine)


#: how guard's score joins the standardized terms of its layers
COMBINE = ("sum", "max")


def label_log_odds(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p_y − log(1 − p_y)`` ``(B,)`` float64 of ``labels`` ``(B,)`` under ``logits`` ``(B, K)``, computed as
    ``z_y − logsumexp_{k≠y} z_k``: finite where the softmax probability rounds to 1."""
    z = logits.double()
    index = labels.to(z.device)[:, None]
    return z.gather(1, index)[:, 0] - z.scatter(1, index, float("-inf")).logsumexp(1)


def _location_scale(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of clean ``scores`` (the deviation at least 1e-12), to standardize by."""
    return scores.double().mean().item(), max(scores.double().std().item(), 1e-12)


@dataclass(frozen=True)
class Amplification:
    """guard's optional extra pass, joined to its feature score: IBD-PSC's consistency (Hou et al., ICML 2024) —
    the log-odds of the unamplified label under copies of the model whose ``depths`` deepest BatchNorm layers are
    amplified by ``factor``, averaged over the copies (:func:`label_log_odds`) — and how clean inputs score on both
    (``feature``, ``consistency``: mean and standard deviation, the features' out of fold). :meth:`join` puts the
    two on the clean inputs' scale and keeps the larger: an input is as suspect as its more suspect view."""

    depths: tuple[int, ...]
    factor: float
    feature: tuple[float, float]
    consistency: tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "feature", tuple(self.feature))
        object.__setattr__(self, "consistency", tuple(self.consistency))
        if not self.depths or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.depths):
            raise ValueError(f"depths must be a non-empty sequence of ints >= 1, got {self.depths!r}")
        if not is_number(self.factor) or self.factor <= 1:
            raise ValueError(f"factor must be a number > 1, got {self.factor!r}")
        for name in ("feature", "consistency"):
            value = getattr(self, name)
            if len(value) != 2 or not all(is_number(v) and math.isfinite(v) for v in value) or value[1] <= 0:
                raise ValueError(f"{name} must be (mean, std) finite with std > 0, got {value!r}")

    @classmethod
    def fit(cls, model: GuardModel, clean: torch.Tensor, labels: torch.Tensor, feature_scores: torch.Tensor, *,
            copies: int, factor: float = 1.5, error: float = 0.6, batch_size: int = 256
            ) -> tuple["Amplification", list[nn.Module], torch.Tensor]:
        """IBD-PSC's depth search on ``clean`` (:class:`IBDPSC` with ``copies`` models), and the clean scale of both
        views: ``feature_scores`` (the clean images' out-of-fold feature scores) and the consistency of ``clean``
        with their predicted ``labels``. Returns the amplification, its copies of ``model`` and that clean
        consistency ``(N,)``, so a caller neither rebuilds the copies nor repeats their passes."""
        psc = IBDPSC(models=copies, factor=factor, error=error, batch_size=batch_size).fit(model, clean)
        log = consistency(psc.amplified, clean, labels.to(clean.device), batch_size)
        return cls(psc.depths, factor, _location_scale(feature_scores), _location_scale(log)), psc.amplified, log

    def copies(self, model: nn.Module) -> list[nn.Module]:
        """The amplified copies of ``model`` (built once, then used on every batch)."""
        return [amplify_batchnorm(model, depth, self.factor) for depth in self.depths]

    def join(self, feature_score: torch.Tensor, consistency_: torch.Tensor) -> torch.Tensor:
        """The larger of the two scores ``(B,)``, each standardized by the clean inputs'."""
        (fm, fs), (cm, cs) = self.feature, self.consistency
        consistency_ = consistency_.double().to(feature_score.device)
        return torch.maximum((feature_score.double() - fm) / fs, (consistency_ - cm) / cs)


def consistency(copies: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
                ) -> torch.Tensor:
    """IBD-PSC's consistency of ``images`` with ``labels`` ``(B,)`` (their unamplified labels): the log-odds of the
    label under each amplified copy, from its logits (so no probability saturates at 1), averaged over the copies;
    one forward pass per copy."""
    with torch.no_grad():
        return torch.stack([label_log_odds(torch.cat([m(c) for c in images.split(batch_size)]), labels)
                            for m in copies]).mean(0)


def combined(terms: torch.Tensor, combine: str) -> torch.Tensor:
    """``terms`` ``(T, B)`` of standardized scores joined into ``(B,)``: their sum or their maximum."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    return terms.sum(0) if combine == "sum" else terms.amax(0)


@dataclass(frozen=True)
class ReScalerScoreConfig:
    """guard's per-request score from one ReScaler pass (``eps``, ``alpha``: the served ReScaler's).
    ``feature``: ``"stages"`` — the features the pass computes at every residual stage (channel means and standard
    deviations) and at the penultimate layer, each scored by its Mahalanobis distance from the clean images of the
    same predicted class, standardized and summed over layers; ``"penultimate"`` — the penultimate layer alone;
    ``"drop"`` — the probability the undefended label loses under adaptation (the endpoint's ``anomaly_score``).
    ``combine``: the layers' terms joined by their ``"sum"`` or their ``"max"``. ``amplified``: IBD-PSC's
    amplified copies (:class:`IBDPSC`, one extra forward pass each); the score is then the larger of two
    standardized scores, the features' and IBD-PSC's consistency as a log-odds (0: the ReScaler pass alone).
    ``folds``: the out-of-fold folds that standardize the layers. ``batch_size``: inputs per pass."""

    eps: float = 0.15
    alpha: float = 1.0
    feature: str = "stages"
    amplified: int = 0
    combine: str = "sum"
    folds: int = 5
    batch_size: int = 256

    FEATURES: ClassVar[tuple[str, ...]] = (*FEATURE_LAYERS, "drop")

    def __post_init__(self) -> None:
        ReScalerConfig(self.eps, self.alpha, 1)
        if self.feature not in self.FEATURES:
            raise ValueError(f"feature must be one of {self.FEATURES}, got {self.feature!r}")
        if isinstance(self.amplified, bool) or not isinstance(self.amplified, int) or self.amplified < 0:
            raise ValueError(f"amplified must be an int >= 0, got {self.amplified!r}")
        if self.amplified and self.feature == "drop":
            raise ValueError("amplified joins IBD-PSC to the features' score; feature='drop' has none")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        _positive_int(self.folds, "folds")
        _positive_int(self.batch_size, "batch_size")


@register_input_detector
class ReScalerScore(InputDetector):
    """guard's score from the ReScaler pass the endpoint makes anyway (rescaler_main.txt §3, eq. 3), with no
    extra pass. ``stages`` / ``penultimate``: the pass's first forward computes every layer's features; a
    triggered input's sit far from those of clean inputs of its predicted (target) class — per layer the
    class-conditional Mahalanobis distance with one shared Ledoit–Wolf covariance (Lee et al., NeurIPS 2018),
    fitted on the clean images (:func:`fit_layer_gaussians`). ``drop``: ReScaler's own signal,
    ``p(y₀|x) − p_w(y₀|x)``. The endpoint serves the feature score calibrated
    (:class:`guard.detect.TriggerDetector`)."""

    name = "rescaler"
    config_class = ReScalerScoreConfig
    description = "guard: from ReScaler's own pass (Mahalanobis distance of its features, or the probability drop)"

    @property
    def forward_passes(self) -> int:
        """One forward and one backward pass, plus the defended forward; one more per amplified copy."""
        return 4 + self.config.amplified

    def _adapt(self, images: torch.Tensor):
        """ReScaler's pass over ``images``: (the adaptation, ``{layer: features}`` of its first forward)."""
        rescaler = ReScaler(self.model, self.config.eps, self.config.alpha, 1)
        try:
            with layer_features(self.model, self.layers) as captured:
                out = rescaler.adapt(images)
            return out, {name: values[0] for name, values in captured.items()}
        finally:
            rescaler.detach()

    def _fit(self, clean: torch.Tensor, generator: torch.Generator) -> None:
        self.layers = () if self.config.feature == "drop" else feature_layers(self.model, self.config.feature)
        if self.config.feature == "drop":
            return
        pairs = [self._adapt(c) for c in clean.split(self.config.batch_size)]
        features = {name: torch.cat([f[name] for _, f in pairs]) for name in self.layers}
        labels = torch.cat([out.original_labels for out, _ in pairs])
        self.gaussians, terms = fit_layer_gaussians(features, labels, self.model.num_classes,
                                                    folds=self.config.folds, generator=generator)
        self.amplification = self.copies = None
        if self.config.amplified:
            self.amplification, self.copies, _ = Amplification.fit(
                self.model, clean, labels, combined(terms, self.config.combine), copies=self.config.amplified,
                batch_size=self.config.batch_size)

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        out, features = self._adapt(images)
        y0 = out.original_labels
        if self.config.feature == "drop":
            rows = torch.arange(len(images), device=images.device)
            return out.original_logits.softmax(1)[rows, y0] - out.logits.softmax(1)[rows, y0]
        score = layered_score(self.gaussians, features, y0, self.config.combine)
        if self.amplification is None:
            return score
        return self.amplification.join(score, consistency(self.copies, images, y0, self.config.batch_size))
