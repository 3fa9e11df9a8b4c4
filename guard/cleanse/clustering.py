"""Activation Clustering (Chen et al. 2019) and Cluster Impurity (Xiang et al. 2019), as compared in
reverse_engineering_cleansing.txt §3 and supp. §14; ALGORITHMS.md D12, D13.

Both cluster each class's penultimate features, expecting the poisoned images of the target class to form a
cluster of their own. AC projects to 10 dimensions, splits with 2-means and tests the split's silhouette
and the smaller cluster's size; CI fits a full-covariance Gaussian mixture whose size BIC chooses, then asks
of every component how many of its images change label when blurred — a blurred trigger stops working, so
a component of poisons is *impure* under blurring.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from joblib import Parallel, delayed
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from .base import (CleanseConfig, CleanseResult, Cleanser, _device_of, check_fraction, check_optional_class,
                   check_training_set, extract_features, inference_copy, register_cleanser,
                   sklearn_seed)

logger = logging.getLogger(__name__)

__all__ = ["REDUCTIONS", "ActivationClustering", "ActivationClusteringConfig", "ClusterImpurity",
           "ClusterImpurityConfig", "bic_mixture", "box_blur", "class_mixtures"]

#: AC's projections to 10 dimensions (``ActivationClusteringConfig.reduction``)
REDUCTIONS = ("pca", "ica")


@dataclass(frozen=True)
class ActivationClusteringConfig(CleanseConfig):
    """AC settings (ALGORITHMS.md D12).

    ``dims`` 10 and ``reduction`` ``"pca"`` (Xiang, Adap-code; ``"ica"``: the AC paper and ART); 2-means with
    ``n_init`` restarts and ``max_iter`` 2000 (Adap-code). A class is flagged when its silhouette exceeds
    ``silhouette_threshold`` and its smaller cluster holds less than ``size_threshold`` of it (ART's
    silhouette analysis, size 0.35); the default 0.29 is Xiang's threshold for the compact ResNet-18 (0.52
    wide, 0.23 MobileNetV2, 0.24 DenseNet: chosen per architecture for zero false detections). The target is
    the flagged class with the largest silhouette; its smaller cluster is removed. ``target``: a known
    target class whose smaller cluster is removed whatever the test says (Xiang's comparison).
    """

    dims: int = 10
    reduction: str = "pca"
    silhouette_threshold: float = 0.29
    size_threshold: float = 0.35
    n_init: int = 10
    max_iter: int = 2000
    target: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dims", "n_init", "max_iter"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not is_number(self.silhouette_threshold) or not -1 <= self.silhouette_threshold < 1:
            raise ValueError(f"silhouette_threshold must be a number in [-1, 1), got {self.silhouette_threshold!r}")
        check_fraction("size_threshold", self.size_threshold, high_open=True)
        check_optional_class("target", self.target)


def _reduce(x: np.ndarray, dims: int, method: str, seed: int) -> np.ndarray:
    dims = min(dims, x.shape[1], x.shape[0] - 1)
    if method == "pca":
        return PCA(n_components=dims, random_state=seed).fit_transform(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return FastICA(n_components=dims, whiten="unit-variance", max_iter=1000, random_state=seed).fit_transform(x)


def two_means(features: torch.Tensor, config: ActivationClusteringConfig, seed: int) -> tuple[np.ndarray, float]:
    """AC's split of one class: cluster labels (cluster 1 = the smaller one) and the silhouette score."""
    x = _reduce(features.double().numpy(), config.dims, config.reduction, seed)
    labels = KMeans(2, n_init=config.n_init, max_iter=config.max_iter, random_state=seed).fit_predict(x)
    if np.unique(labels).size < 2:  # all features identical: nothing to split
        return np.zeros(len(x), dtype=np.int64), -1.0
    if (labels == 1).sum() > (labels == 0).sum():
        labels = 1 - labels
    return labels.astype(np.int64), float(silhouette_score(x, labels))


@register_cleanser
class ActivationClustering(Cleanser):
    """Activation Clustering with the silhouette and relative-size tests; one verb, :meth:`cleanse`."""

    name = "ac"
    config_class = ActivationClusteringConfig
    description = "Activation Clustering: 10-d projection, 2-means, silhouette and relative-size tests (Chen et al.)"

    def cleanse(self, model, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device=None, progress: bool = False) -> CleanseResult:
        cfg = self.config
        started = time.perf_counter()
        generator = self._generator(generator)
        members = check_training_set(model, train_set, min_per_class=3)
        if cfg.target is not None and cfg.target >= train_set.num_classes:
            raise ValueError(f"target={cfg.target} is not a class of this set: expected 0..{train_set.num_classes - 1}")
        feats = extract_features(model, train_set, batch_size=cfg.batch_size, device=device, progress=progress)
        stats: dict[int, dict] = {}
        smaller: dict[int, torch.Tensor] = {}
        silhouettes: dict[int, float] = {}
        for c in tqdm(members, desc="ac classes", unit="class", disable=not progress, leave=False):
            index = members[c]
            labels, silhouettes[c] = two_means(feats.features[index], cfg, sklearn_seed(generator))
            smaller[c] = index[torch.from_numpy(labels) == 1]
            fraction = smaller[c].numel() / index.numel()
            flagged = silhouettes[c] > cfg.silhouette_threshold and fraction < cfg.size_threshold
            stats[c] = {"images": int(index.numel()), "silhouette": silhouettes[c],
                        "smaller_cluster_fraction": fraction, "flagged": flagged}
        flagged = [c for c in stats if stats[c]["flagged"]]
        target = max(flagged, key=lambda c: silhouettes[c]) if flagged else None
        cleansed_class = cfg.target if cfg.target is not None else target
        removed = (smaller[cleansed_class].sort().values if cleansed_class is not None
                   else torch.zeros(0, dtype=torch.int64))
        value = silhouettes[target] if target is not None else max(silhouettes.values())
        logger.info("AC: %s; removed %d images", f"target {target}" if target is not None else "no detection",
                    removed.numel())
        return CleanseResult(
            self.name, target is not None, target,
            {"name": "silhouette", "value": value, "threshold": cfg.silhouette_threshold, "alarm": "above"},
            dict(silhouettes), cfg.silhouette_threshold, stats, removed, len(train_set), self._config_dict(),
            details={"flagged_classes": flagged, "known_target": cfg.target}, seconds=time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ cluster impurity

@dataclass(frozen=True)
class ClusterImpurityConfig(CleanseConfig):
    """CI settings (ALGORITHMS.md D13; the blur size, BIC range and mixture initialisation are the defaults
    chosen there, §7 item 26).

    Per class, Gaussian mixtures with full covariances and 1…``max_components`` components (k-means
    initialisation, ``reg_covar`` added to the diagonals) are compared by BIC, each size from one
    initialisation; the sweep stops once ``bic_patience`` sizes in a row have not lowered the best BIC
    (``None``: every size). The size of smallest BIC is refitted with ``n_init`` restarts and kept.
    In a class of two or more components, a component whose impurity (the fraction of its images whose
    predicted label changes under a ``blur_size``×``blur_size`` box blur) exceeds ``impurity_threshold`` is
    removed whole; 0.65 is Xiang's threshold for the compact ResNet-18 (0.62 wide, 0.36 MobileNetV2, 0.46
    DenseNet). A class kept as one component is not tested: removing it would remove the class.
    ``n_jobs`` classes are fitted at a time, each on one BLAS thread (``None``: ``torch.get_num_threads()``);
    the result does not depend on it.
    """

    impurity_threshold: float = 0.65
    max_components: int = 10
    n_init: int = 5
    reg_covar: float = 1e-6
    blur_size: int = 3
    bic_patience: int | None = 2
    n_jobs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("impurity_threshold", self.impurity_threshold, high_open=True)
        if self.n_jobs is not None and (not is_int(self.n_jobs) or self.n_jobs < 1):
            raise ValueError(f"n_jobs must be None or an int >= 1, got {self.n_jobs!r}")
        for name, low in (("max_components", 2), ("n_init", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.bic_patience is not None and (not is_int(self.bic_patience) or self.bic_patience < 1):
            raise ValueError(f"bic_patience must be None or an int >= 1, got {self.bic_patience!r}")
        if not is_number(self.reg_covar) or self.reg_covar <= 0:
            raise ValueError(f"reg_covar must be a number > 0, got {self.reg_covar!r}")
        if not is_int(self.blur_size) or self.blur_size < 3 or self.blur_size % 2 == 0:
            raise ValueError(f"blur_size must be an odd int >= 3, got {self.blur_size!r}")


def box_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Average filter of ``size``×``size`` per channel, same output size (border windows average the pixels
    they cover)."""
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)


def bic_mixture(features: torch.Tensor, config: ClusterImpurityConfig, seed: int) -> tuple[np.ndarray, list[float]]:
    """Component of each image under the BIC-chosen full-covariance mixture, and the BIC of each size tried
    (see :class:`ClusterImpurityConfig` for the sweep)."""
    x = features.double().numpy()

    def fit(k: int, n_init: int) -> GaussianMixture:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return GaussianMixture(k, covariance_type="full", init_params="kmeans", n_init=n_init,
                                   reg_covar=config.reg_covar, random_state=seed).fit(x)

    bics: list[float] = []
    for k in range(1, min(config.max_components, len(x)) + 1):
        bics.append(float(fit(k, 1).bic(x)))
        best = int(np.argmin(bics))
        if config.bic_patience is not None and len(bics) - 1 - best >= config.bic_patience:
            break
    k = int(np.argmin(bics)) + 1
    return fit(k, config.n_init).predict(x).astype(np.int64), bics


def class_mixtures(features: list[torch.Tensor], config: ClusterImpurityConfig, seeds: list[int]
                   ) -> list[tuple[np.ndarray, list[float]]]:
    """:func:`bic_mixture` of every class's features, ``config.n_jobs`` classes at a time in threads, each
    on one BLAS thread: a 64-d full-covariance fit spends most of its time in small matrix products, which
    a multi-threaded BLAS runs several times slower than one thread does (benchmarks/cleanse_cifar10.py)."""
    jobs = min(config.n_jobs or torch.get_num_threads(), len(features))
    with threadpool_limits(limits=1, user_api="blas"):
        return Parallel(n_jobs=jobs, backend="threading")(
            delayed(bic_mixture)(f, config, seed) for f, seed in zip(features, seeds))


@torch.inference_mode()
def _blurred_predictions(model, images: torch.Tensor, size: int, batch_size: int, device) -> torch.Tensor:
    """Predictions of ``model`` (an :func:`~guard.cleanse.base.inference_copy`) on the blurred ``images``."""
    dtype = next(model.parameters()).dtype
    preds = []
    for chunk in images.split(batch_size):
        x = box_blur(chunk.to(device, dtype).div_(255), size).contiguous(memory_format=torch.channels_last)
        preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds)


@register_cleanser
class ClusterImpurity(Cleanser):
    """Cluster Impurity: BIC-sized Gaussian mixture per class, blur impurity per component; one verb,
    :meth:`cleanse`."""

    name = "ci"
    config_class = ClusterImpurityConfig
    description = "Cluster Impurity: full-covariance GMM per class sized by BIC, blur impurity (Xiang et al. 2019)"

    def cleanse(self, model, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device=None, progress: bool = False) -> CleanseResult:
        cfg = self.config
        started = time.perf_counter()
        generator = self._generator(generator)
        members = check_training_set(model, train_set, min_per_class=2)
        device = _device_of(model, device)
        feats = extract_features(model, train_set, batch_size=cfg.batch_size, device=device, progress=progress)
        classes = list(members)
        seeds = [sklearn_seed(generator) for _ in classes]
        mixtures = dict(zip(classes, class_mixtures([feats.features[members[c]] for c in classes], cfg, seeds)))
        net = inference_copy(model)
        stats: dict[int, dict] = {}
        scores: dict[int, float] = {}
        flagged: list[tuple[float, int, torch.Tensor]] = []
        for c in tqdm(classes, desc="ci impurity", unit="class", disable=not progress, leave=False):
            index = members[c]
            components, bics = mixtures[c]
            k = int(components.max()) + 1
            stats[c] = {"images": int(index.numel()), "components": k, "bic": bics, "impurity": None}
            scores[c] = 0.0
            if k < 2:
                continue
            blurred = _blurred_predictions(net, train_set.images[index], cfg.blur_size, cfg.batch_size, device)
            changed = (blurred != feats.predictions[index]).double()
            comp = torch.from_numpy(components)
            impurity = [float(changed[comp == j].mean()) for j in range(k)]
            sizes = [int((comp == j).sum()) for j in range(k)]
            stats[c].update(impurity=impurity, component_sizes=sizes)
            scores[c] = max(impurity)
            for j in range(k):
                if impurity[j] > cfg.impurity_threshold:
                    flagged.append((impurity[j], c, index[comp == j]))
        target = max(flagged, key=lambda f: f[0])[1] if flagged else None
        removed = (torch.cat([f[2] for f in flagged]).sort().values if flagged
                   else torch.zeros(0, dtype=torch.int64))
        value = max(scores.values())
        logger.info("CI: %s; removed %d images from %d components",
                    f"target {target}" if target is not None else "no detection", removed.numel(), len(flagged))
        return CleanseResult(
            self.name, target is not None, target,
            {"name": "impurity", "value": value, "threshold": cfg.impurity_threshold, "alarm": "above"},
            scores, cfg.impurity_threshold, stats, removed, len(train_set), self._config_dict(),
            details={"flagged_components": [{"class": c, "impurity": i, "images": int(ix.numel())}
                                            for i, c, ix in flagged]},
            seconds=time.perf_counter() - started)
