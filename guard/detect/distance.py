"""Class distance (MOTH, ALGORITHMS.md M12 and D9): how far each class is from being hijacked.

For an ordered pair (s → t) the distance is the size of the smallest NC-style trigger (mask and pattern,
P1.2/P2) that sends at least τ of the class-s images to t: the L1 norm of the mask replicated over the C
colour channels (the MOTH code's convention, so C × the H×W mask's L1; the published CIFAR-10 ResNet-20
distance is 61.31 ± 4.50, MOTH's Supplementary.md), minimum over seeds. A backdoor from s to t is a
short-cut: its pair's distance is much smaller than the others; MOTH hardening enlarges every distance. The
model-level figure is the mean over the K(K−1) pairs, and a hardening's *enlargement* the mean of
``(d_after − d_before) / d_before`` over pairs.

Every ordered pair (and every seed) is one task of the batched inversion engine
(:mod:`guard.detect.inversion`), all in one run. The MOTH reference inverts each pair for 1,000 passes over
≤ 100 images with 3 seeds (:meth:`ClassDistanceConfig.reference`, a GPU budget: 27 million image passes
for CIFAR-10). The default is a CPU budget for all 90 pairs of a CIFAR-10 ResNet-20 in minutes: 100 passes
over 20 images per pair in one batch, patience 5, and an early stop once a pair's best mask stops shrinking
(on four ResNet-20 pairs, 80 passes gave 35–72 and 160 passes 27–38). Fewer passes leave distances
larger and fewer images make them smaller than the reference's, so compare numbers measured with one
config; ``benchmarks/moth_cifar10.py`` puts both beside the published number.

Example::

    result = ClassDistance().measure(model, test_set, generator=torch.Generator().manual_seed(0))
    result.matrix[s, t], result.mean, result.to_dict()
    after.enlargement(result)        # mean relative growth of every pair's distance
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch

from .._validation import is_int, resolve_generator
from ..data import ImageTensorDataset
from ..models import GuardModel
from ._checks import check_dataset
from .inversion import CostSchedule, InversionConfig, MaskPatternTrigger, TargetCrossEntropy, invert, pair_tasks

logger = logging.getLogger(__name__)

__all__ = ["ClassDistance", "ClassDistanceConfig", "DistanceResult"]


@dataclass(frozen=True)
class ClassDistanceConfig:
    """How the distances are measured (MOTH ``Trigger``, ALGORITHMS.md D9 "Class distance").

    Per pair: ``images_per_class`` source images (a random subset when there are more), ``steps`` passes over
    them in batches of ``batch_size``, Adam (``lr`` 0.1, betas (0.5, 0.9)), success bound τ =
    ``attack_threshold`` (0.9), the cost schedule P3 from ``init_cost`` (1e-3) with ``patience`` and
    ``multiplier`` (MOTH: 10 and 1.5), restarts at each new best plus U(±``restart_noise``) (0.01); the
    minimum over ``seeds`` independent runs. ``early_stop_patience``: stop a pair whose best mask has not
    shrunk for that many passes once the cost has gone up and down (``None``: never, as MOTH). ``pairs``:
    the ordered pairs to measure (``None``: all). ``chunk_size``: most images per forward/backward pass
    (``None``: the engine's default for the device; the result does not depend on it). Defaults: the CPU budget
    (see the module docstring); :meth:`reference` the MOTH code's.
    """

    steps: int = 100
    images_per_class: int = 20
    batch_size: int = 20
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    attack_threshold: float = 0.9
    init_cost: float = 1e-3
    patience: int = 5
    multiplier: float = 1.5
    restart_noise: float = 0.01
    early_stop_patience: int | None = 15
    seeds: int = 1
    pairs: tuple[tuple[int, int], ...] | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("images_per_class", "seeds"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.pairs is not None:
            if isinstance(self.pairs, (str, bytes)) or not all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(c) and c >= 0 for c in p)
                    and p[0] != p[1] for p in self.pairs) or not tuple(self.pairs):
                raise ValueError(f"pairs must be None or (source, target) pairs of distinct class indices, "
                                 f"got {self.pairs!r}")
            object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
        object.__setattr__(self, "betas", self.inversion_config().betas)  # the engine validates the rest

    @classmethod
    def reference(cls, **overrides) -> "ClassDistanceConfig":
        """The MOTH code's ``validate()``: 1,000 passes over ≤ 100 images in batches of 32, patience 10, no
        early stop, minimum over 3 seeds."""
        return cls(**{"steps": 1000, "images_per_class": 100, "batch_size": 32, "patience": 10,
                      "early_stop_patience": None, "seeds": 3, **overrides})

    def schedule(self) -> CostSchedule:
        return CostSchedule(self.attack_threshold, self.init_cost, self.patience, self.multiplier,
                            start_at_zero=False, early_stop_patience=self.early_stop_patience,
                            restart_noise=self.restart_noise)

    def inversion_config(self) -> InversionConfig:
        return InversionConfig(MaskPatternTrigger(), self.schedule(), steps=self.steps, batch_size=self.batch_size,
                               sampling="epoch", lr=self.lr, betas=self.betas, chunk_size=self.chunk_size)


@dataclass(frozen=True)
class DistanceResult:
    """``matrix[s, t]``: the distance of pair s → t (channel-replicated mask L1; ``inf`` where no seed
    reached τ, NaN on the diagonal and for unmeasured pairs); ``per_seed`` ``(seeds, K, K)``; ``found`` the
    measured pairs that reached τ."""

    matrix: torch.Tensor
    per_seed: torch.Tensor
    config: ClassDistanceConfig
    seconds: float

    @property
    def measured(self) -> torch.Tensor:
        """Bool ``(K, K)``: the pairs that were measured."""
        return ~torch.isnan(self.matrix)

    @property
    def found(self) -> torch.Tensor:
        return self.measured & torch.isfinite(self.matrix)

    @property
    def mean(self) -> float:
        """Mean distance over the measured pairs that reached τ (NaN when none did)."""
        values = self.matrix[self.found]
        return values.mean().item() if values.numel() else math.nan

    @property
    def smallest(self) -> tuple[int, int]:
        """The pair with the smallest distance — the easiest to hijack."""
        masked = torch.where(self.found, self.matrix, torch.full_like(self.matrix, math.inf))
        if not bool(self.found.any()):
            raise ValueError("no pair reached the success bound; there is no smallest distance")
        index = int(masked.flatten().argmin())
        return divmod(index, self.matrix.shape[1])

    def enlargement(self, before: "DistanceResult") -> float:
        """Mean over the pairs found in both of ``(d_self − d_before) / d_before`` (ALGORITHMS.md M12)."""
        if not isinstance(before, DistanceResult) or before.matrix.shape != self.matrix.shape:
            raise ValueError(f"before must be a DistanceResult of a {tuple(self.matrix.shape)} matrix")
        both = self.found & before.found
        if not bool(both.any()):
            return math.nan
        return ((self.matrix[both] - before.matrix[both]) / before.matrix[both]).mean().item()

    def to_dict(self) -> dict:
        """JSON-ready: the matrix (``null`` off the measured or successful pairs), mean (``null`` when no pair
        reached τ), counts, config."""
        def rows(m: torch.Tensor) -> list:
            return [[v if math.isfinite(v) else None for v in row] for row in m.tolist()]

        mean = self.mean
        return {"matrix": rows(self.matrix), "per_seed": [rows(m) for m in self.per_seed],
                "mean": mean if math.isfinite(mean) else None,
                "pairs_measured": int(self.measured.sum()), "pairs_found": int(self.found.sum()),
                "smallest": list(self.smallest) if bool(self.found.any()) else None,
                "config": asdict(self.config), "seconds": self.seconds}


class ClassDistance:
    """Measures the class distance of every ordered pair (ALGORITHMS.md M12); one verb: :meth:`measure`."""

    def __init__(self, config: ClassDistanceConfig | None = None, **options) -> None:
        if config is None:
            config = ClassDistanceConfig(**options)
        elif options:
            raise TypeError("ClassDistance: pass either a config or keyword options, not both")
        if not isinstance(config, ClassDistanceConfig):
            raise TypeError(f"config must be a ClassDistanceConfig, got {type(config).__name__}")
        self.config = config

    def measure(self, model: GuardModel, dataset: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device: str | torch.device | None = None, progress: bool = False) -> DistanceResult:
        """Distances of ``model``'s class pairs on the labelled clean images ``dataset`` (MOTH: the first
        K·100 test images). Every class of a measured pair needs images. The model is not modified."""
        cfg = self.config
        if not isinstance(model, GuardModel):
            raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
        check_dataset(dataset, "dataset")
        generator = resolve_generator(generator)
        k = model.num_classes
        pairs = cfg.pairs if cfg.pairs is not None else tuple((s, t) for s in range(k) for t in range(k) if s != t)
        outside = [p for p in pairs if max(p) >= k]
        if outside:
            raise ValueError(f"pairs {outside} name classes outside [0, {k - 1}] of this {k}-class model")
        present = set(torch.unique(dataset.labels).tolist())
        missing = sorted({c for p in pairs for c in p} - present)
        if missing:
            raise ValueError(f"the dataset has no images of classes {missing}; every class of a measured pair "
                             f"needs some (present: {sorted(present)})")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        started = time.perf_counter()
        tasks = []
        for _ in range(cfg.seeds):
            tasks += pair_tasks(dataset.images, dataset.labels, num_classes=k, generator=generator,
                                max_images=cfg.images_per_class, pairs=pairs)
        result = invert(tasks, TargetCrossEntropy(model), cfg.inversion_config(), device=device, progress=progress)
        channels = dataset.images.shape[1]
        per_seed = torch.full((cfg.seeds, k, k), math.nan, dtype=torch.float64)
        for i, task in enumerate(tasks):
            per_seed[i // len(pairs), task.source, task.target] = channels * result.size[i]
        matrix = per_seed.min(0).values if cfg.seeds > 1 else per_seed[0].clone()
        logger.info("class distance of %d pairs x %d seeds in %.1fs", len(pairs), cfg.seeds, result.seconds)
        return DistanceResult(matrix, per_seed, cfg, time.perf_counter() - started)
