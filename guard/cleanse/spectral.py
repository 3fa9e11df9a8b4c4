"""Spectral Signatures (Tran et al., NeurIPS 2018), as compared in reverse_engineering_cleansing.txt §3, §5.2.3;
ALGORITHMS.md D11.

A backdoor leaves a trace in the penultimate features of its target class: the poisoned images sit apart
from the clean ones along one direction, which becomes the top singular direction of the class's centred
features. Each image scores the square of its projection on that direction, and the ``1.5·ε·n`` highest
scores of a class are removed (ε: an upper bound on the poisoned fraction; at most half the class). SS makes
no verdict: it removes its quota from every class (or from a known target class).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from ..data import ImageTensorDataset
from .base import (CleanseConfig, CleanseResult, Cleanser, check_fraction, check_optional_class, check_training_set,
                   extract_features, register_cleanser)

logger = logging.getLogger(__name__)

__all__ = ["SpectralSignatures", "SpectralSignaturesConfig"]


@dataclass(frozen=True)
class SpectralSignaturesConfig(CleanseConfig):
    """``eps``: the assumed upper bound on the poisoned fraction of a class; ``1.5·eps·n_c`` images of class c
    are removed (Tran et al.; at most half the class). ``target``: a known target class — only that class is
    cleansed (Xiang's comparison, which removes 1000 images of it: ``eps = 1000 / (1.5·n_t)``); ``None``
    cleanses every class as Tran et al. do. SS has no detection test (ALGORITHMS.md D11): its result's
    ``detected`` is ``None``.
    """

    eps: float = 0.1
    target: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("eps", self.eps)
        check_optional_class("target", self.target)


def spectral_scores(features: torch.Tensor) -> torch.Tensor:
    """Outlier scores ``τ_i = (R̃_i · v)²`` of one class's features ``(n, D)``, v the top right-singular vector
    of the centred features (ALGORITHMS.md D11)."""
    x = features.double().numpy()
    projection = PCA(n_components=1, svd_solver="full").fit_transform(x)[:, 0]
    return torch.from_numpy(projection**2)


@register_cleanser
class SpectralSignatures(Cleanser):
    """Spectral Signatures: remove the ``1.5·ε·n`` images of a class that project furthest on its top singular
    direction; one verb, :meth:`cleanse`."""

    name = "ss"
    config_class = SpectralSignaturesConfig
    description = "Spectral Signatures: remove the 1.5*eps*n top singular-direction outliers of a class (Tran et al.)"

    def cleanse(self, model, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device=None, progress: bool = False) -> CleanseResult:
        cfg = self.config
        started = time.perf_counter()
        self._generator(generator)  # validated for a uniform signature; SS draws nothing at random
        members = check_training_set(model, train_set, min_per_class=2)
        if cfg.target is not None and cfg.target >= train_set.num_classes:
            raise ValueError(f"target={cfg.target} is not a class of this set: expected 0..{train_set.num_classes - 1}")
        feats = extract_features(model, train_set, batch_size=cfg.batch_size, device=device, progress=progress)
        classes = [c for c in members if cfg.target is None or c == cfg.target]
        removed: list[torch.Tensor] = []
        stats: dict[int, dict] = {}
        top = 0.0
        for c in tqdm(classes, desc="ss classes", unit="class", disable=not progress, leave=False):
            index = members[c]
            scores = spectral_scores(feats.features[index])
            count = min(math.ceil(1.5 * cfg.eps * index.numel() - 1e-9), index.numel() // 2)
            order = scores.argsort(descending=True)
            removed.append(index[order[:count]])
            cut = float(scores[order[count - 1]]) if count else float("inf")
            stats[c] = {"images": int(index.numel()), "removed": count, "max_score": float(scores[order[0]]),
                        "median_score": float(scores.median()), "removal_cutoff": cut}
            top = max(top, float(scores[order[0]]))
        removed_t = torch.cat(removed).sort().values if removed else torch.zeros(0, dtype=torch.int64)
        logger.info("SS: removed %d of %d images from %d classes", removed_t.numel(), len(train_set), len(classes))
        return CleanseResult(
            self.name, None, None, {"name": "spectral_score", "value": top, "threshold": None, "alarm": None},
            {}, None, stats, removed_t, len(train_set), self._config_dict(),
            details={"known_target": cfg.target}, seconds=time.perf_counter() - started)
