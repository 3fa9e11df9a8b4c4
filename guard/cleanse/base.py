"""The training-set cleansing interface: configs, the result, input checks, features and the registry.

A cleanser inspects a training set that may be poisoned, through a model trained on that very set (the
defender owns both; reverse_engineering_cleansing.txt §3, ALGORITHMS.md D11–D14). It has a frozen, validated
config and one verb, :meth:`Cleanser.cleanse`, returning a :class:`CleanseResult`: whether the set is
poisoned, the inferred target class, per-class statistics, which images to remove, the statistic behind the
verdict and, for reverse engineering, the estimated backdoor pattern. Results are JSON documents
(:meth:`CleanseResult.to_dict`) that ``guard archive --scan`` also accepts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import is_int, is_number, resolve_generator
from ..data import ImageTensorDataset
from ..detect.base import register_report_method
from ..registry import Configured, Registry

__all__ = ["CleanseConfig", "CleanseResult", "Cleanser", "FeatureSet", "check_training_set", "cleanser_from_dict",
           "create_cleanser", "describe_cleansers", "extract_features", "get_cleanser", "inference_copy",
           "list_cleansers", "register_cleanser", "suspect_from_record"]

#: marks a JSON document as a cleansing report (``guard cleanse --out``)
REPORT_KIND = "cleanse"


@dataclass(frozen=True)
class CleanseConfig:
    """Options every cleanser shares: ``batch_size`` of the feature / prediction passes (128: the fastest
    ResNet-20 pass on a 2-core CPU, benchmarks/cleanse_cifar10.py)."""

    batch_size: int = 128

    def __post_init__(self) -> None:
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


def check_fraction(name: str, value: object, *, high_open: bool = False) -> None:
    """``value`` a number in (0, 1] — or (0, 1) with ``high_open``."""
    if not is_number(value) or not 0 < value <= 1 or (high_open and value == 1):
        raise ValueError(f"{name} must be a number in (0, 1{')' if high_open else ']'}, got {value!r}")


def check_optional_class(name: str, value: object) -> None:
    if value is not None and (not is_int(value) or value < 0):
        raise ValueError(f"{name} must be None or a class index >= 0, got {value!r}")


@dataclass(frozen=True)
class CleanseResult:
    """What a cleanser found (JSON-ready through :meth:`to_dict`).

    ``detected`` / ``target_class``: the verdict and the inferred target (``None`` without detection);
    ``detected`` is ``None`` for a method that makes no verdict (SS removes its quota from every class).
    ``statistic``: the number behind the verdict and its threshold (``name``, ``value``, ``threshold``,
    ``alarm`` = ``"below"`` or ``"above"``): RE's order-statistic p-value, AC's silhouette, CI's cluster
    impurity; SS's largest spectral score, with no threshold. ``class_scores``: one number per class, larger =
    more suspicious, compared with ``score_threshold`` (what a served archive exports per class; empty for SS).
    ``class_statistics``: the method's per-class numbers. ``removed``: sorted indices of the images to drop.
    ``pattern``: the estimated additive backdoor pattern ``(C, H, W)`` (RE only). ``details``: method-specific
    extras (JSON-ready).
    """

    method: str
    detected: bool | None
    target_class: int | None
    statistic: dict[str, Any]
    class_scores: dict[int, float]
    score_threshold: float | None
    class_statistics: dict[int, dict[str, Any]]
    removed: torch.Tensor
    num_images: int
    config: dict[str, Any]
    pattern: torch.Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.detected is not None and not isinstance(self.detected, bool):
            raise TypeError(f"detected must be a bool or None, got {type(self.detected).__name__}")
        if bool(self.detected) != (self.target_class is not None):
            raise ValueError(f"detected={self.detected} contradicts target_class={self.target_class}")
        if not isinstance(self.removed, torch.Tensor) or self.removed.dtype != torch.int64 or self.removed.dim() != 1:
            raise TypeError("removed must be a 1-D int64 tensor of training-set indices")
        if self.removed.numel() and (int(self.removed.min()) < 0 or int(self.removed.max()) >= self.num_images):
            raise ValueError(f"removed indices must lie in [0, {self.num_images - 1}]")
        if self.pattern is not None and (not isinstance(self.pattern, torch.Tensor) or self.pattern.dim() != 3):
            raise TypeError("pattern must be None or a (C, H, W) tensor")

    @property
    def kept(self) -> torch.Tensor:
        """Sorted indices of the images that stay."""
        keep = torch.ones(self.num_images, dtype=torch.bool)
        keep[self.removed] = False
        return keep.nonzero().flatten()

    def cleansed(self, train_set: ImageTensorDataset) -> ImageTensorDataset:
        """``train_set`` without the removed images (what the model is retrained on)."""
        if not isinstance(train_set, ImageTensorDataset) or len(train_set) != self.num_images:
            got = len(train_set) if isinstance(train_set, ImageTensorDataset) else type(train_set).__name__
            raise ValueError(f"expected the {self.num_images}-image training set this result was computed on, "
                             f"got {got}")
        return train_set.subset(self.kept)

    def scan_report(self):
        """The verdict as a :class:`guard.detect.ScanReport` (what a served archive exports as gauges).

        Raises ``ValueError`` for a method that makes no verdict (SS)."""
        from ..detect import ScanReport

        if self.detected is None:
            raise ValueError(f"{self.method} makes no verdict (it removes a quota of every class); there is no "
                             f"detection for an endpoint to export — use re, ac or ci")

        return ScanReport(self.method, self.detected, self.target_class, dict(self.class_scores),
                          self.score_threshold, {"source": REPORT_KIND, "statistic": dict(self.statistic),
                                                 "num_removed": int(self.removed.numel())})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": REPORT_KIND, "method": self.method, "detected": self.detected,
                "target_class": self.target_class, "statistic": _json_ready(self.statistic),
                "class_scores": {str(c): _finite(s) for c, s in sorted(self.class_scores.items())},
                "score_threshold": None if self.score_threshold is None else _finite(self.score_threshold),
                "class_statistics": {str(c): _json_ready(s) for c, s in sorted(self.class_statistics.items())},
                "num_images": self.num_images, "num_removed": int(self.removed.numel()),
                "removed": self.removed.tolist(), "config": _json_ready(self.config),
                "pattern": None if self.pattern is None else self.pattern.tolist(),
                "details": _json_ready(self.details), "seconds": round(self.seconds, 3)}

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write :meth:`to_dict` (plus ``extra`` top-level keys, e.g. what the CLI adds) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **_json_ready(extra)}, indent=2, allow_nan=False))
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CleanseResult":
        if not isinstance(data, dict) or data.get("kind") != REPORT_KIND:
            got = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"expected a cleansing report (a JSON object with kind={REPORT_KIND!r}, "
                             f"written by `guard cleanse`), got kind {got!r}")
        missing = [k for k in ("method", "detected", "target_class", "statistic", "class_scores",
                               "score_threshold", "class_statistics", "removed", "num_images", "config")
                   if k not in data]
        if missing:
            raise ValueError(f"cleansing report lacks the keys {missing}")
        if data["method"] not in list_cleansers():
            raise ValueError(f"cleansing report method must be one of {list_cleansers()}, got {data['method']!r}")
        try:
            scores = {int(c): float(s) for c, s in data["class_scores"].items()}
            stats = {int(c): dict(s) for c, s in data["class_statistics"].items()}
            removed = torch.as_tensor(data["removed"], dtype=torch.int64).reshape(-1)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"cleansing report: malformed class_scores/class_statistics/removed: {exc}") from exc
        if not all(math.isfinite(s) for s in scores.values()):
            raise ValueError("cleansing report class_scores must be finite numbers")
        target = data["target_class"]
        pattern = data.get("pattern")
        detected = data["detected"]
        threshold = data["score_threshold"]
        return cls(method=data["method"], detected=None if detected is None else bool(detected),
                   target_class=None if target is None else int(target), statistic=dict(data["statistic"]),
                   class_scores=scores, score_threshold=None if threshold is None else float(threshold),
                   class_statistics=stats,
                   removed=removed, num_images=int(data["num_images"]), config=dict(data["config"]),
                   pattern=None if pattern is None else torch.tensor(pattern, dtype=torch.float32),
                   details=dict(data.get("details", {})), seconds=float(data.get("seconds", 0.0)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CleanseResult":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cleansing report not found: {path}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_ready(value: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python numbers, non-finite floats -> None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.floating, float)):
        return _finite(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------------- input checks

def check_training_set(model: object, train_set: object, min_per_class: int = 1, *,
                       features: bool = True) -> dict[int, torch.Tensor]:
    """Validate the (model, suspect set) pair every cleanser takes; returns each class's indices.

    The set must be an :class:`ImageTensorDataset` labelled with the model's classes, at the model's input
    size, with at least ``min_per_class`` images in every class; ``features``: the model must also have
    ``.features()`` (the methods that cluster penultimate features).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a guard.models.GuardModel), got {type(model).__name__}")
    if features and not callable(getattr(model, "features", None)):
        raise TypeError(f"model must have a .features(x) method returning penultimate features (a "
                        f"guard.models.GuardModel); got {type(model).__name__}, which has none")
    if not isinstance(train_set, ImageTensorDataset):
        raise TypeError(f"train_set must be a guard.data.ImageTensorDataset, got {type(train_set).__name__}")
    if len(train_set) == 0:
        raise ValueError("train_set is empty; expected the suspect training set")
    k = getattr(model, "num_classes", None)
    if k is not None and train_set.num_classes != k:
        raise ValueError(f"train_set is labelled with {train_set.num_classes} classes {train_set.classes[:12]} "
                         f"but the model predicts {k}; expected the set the model was trained on")
    spec = getattr(model, "spec", None)
    if spec is not None and tuple(train_set.images.shape[1:]) != tuple(spec.input_size):
        raise ValueError(f"train_set images have shape {tuple(train_set.images.shape[1:])} but model "
                         f"{spec.name!r} takes {tuple(spec.input_size)}")
    members = {c: (train_set.labels == c).nonzero().flatten() for c in range(train_set.num_classes)}
    small = {c: int(v.numel()) for c, v in members.items() if v.numel() < min_per_class}
    if small:
        named = ", ".join(f"{c} ({train_set.classes[c]!r}): {n}" for c, n in small.items())
        raise ValueError(f"every class needs at least {min_per_class} training image(s); got {named}")
    return members


@dataclass(frozen=True)
class FeatureSet:
    """Penultimate features ``(N, D)`` (float32, CPU) and the model's predictions ``(N,)`` on a training set."""

    features: torch.Tensor
    predictions: torch.Tensor


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in channels-last memory format, for the passes over a whole training set:
    a CIFAR ResNet-20 runs about 1.5x faster that way on CPU, and the caller's model keeps its own layout."""
    return copy.deepcopy(model).eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def extract_features(model: nn.Module, train_set: ImageTensorDataset, *, batch_size: int = 128,
                     device: str | torch.device | None = None, progress: bool = False) -> FeatureSet:
    """Penultimate features (``model.features``) and predictions of every image, in batches, on an
    :func:`inference_copy` of ``model``.

    The predictions come from the model's own classifier head on those features, so one forward serves both.
    Raises ``ValueError`` when a feature is NaN or infinite (a diverged model cannot be cleansed with).
    """
    device = _device_of(model, device)
    model = inference_copy(model)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    head = getattr(model, "classifier", None)
    feats, preds = [], []
    chunks = train_set.images.split(batch_size)
    for chunk in tqdm(chunks, desc="features", unit="batch", disable=not progress, leave=False):
        x = chunk.to(device, dtype).div_(255).contiguous(memory_format=torch.channels_last)
        f = model.features(x)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"model.features(x) must return a (batch, D) tensor, got {got}")
        logits = head(f) if isinstance(head, nn.Linear) else model(x)
        feats.append(f.float().cpu())
        preds.append(logits.argmax(1).cpu())
    features = torch.cat(feats)
    bad = ~torch.isfinite(features).all(1)
    if bool(bad.any()):
        first = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"model.features returned NaN/Inf for {int(bad.sum())} of {len(features)} images "
                         f"(first indices {first}); expected finite features from a trained model")
    return FeatureSet(features, torch.cat(preds))


@torch.inference_mode()
def check_finite_outputs(model: nn.Module, images: torch.Tensor, device) -> None:
    """Raise ``ValueError`` when the model's logits on (a batch of) ``images`` are NaN or infinite."""
    model.eval()
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    logits = model(images.to(device, dtype).div_(255))
    bad = ~torch.isfinite(logits).all(1)
    if bool(bad.any()):
        raise ValueError(f"the model returned NaN/Inf logits for {int(bad.sum())} of {len(images)} images; "
                         f"expected finite outputs from a trained model")


def sklearn_seed(generator: torch.Generator) -> int:
    """An int seed for a scikit-learn ``random_state``, drawn from ``generator``."""
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


# ---------------------------------------------------------------------------------------------- cleanser

class Cleanser(Configured):
    """Base of every training-set defense: a validated config of type ``config_class`` and one verb.

    Construct with a config or with its fields: ``ActivationClustering(silhouette_threshold=0.3)``.
    Subclasses implement :meth:`cleanse`.
    """

    config_class: ClassVar[type[CleanseConfig]] = CleanseConfig

    def cleanse(self, model: nn.Module, train_set: ImageTensorDataset, *, generator: torch.Generator | None = None,
                device: str | torch.device | None = None, progress: bool = False) -> CleanseResult:
        """Inspect ``train_set`` through ``model`` (trained on it) and say what to remove.

        ``generator`` (CPU) drives every random draw; ``device`` defaults to the model's. The model is left in
        eval mode and otherwise unchanged.
        """
        raise NotImplementedError

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        return resolve_generator(generator)

    def _config_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.config)}


CLEANSERS: Registry[Cleanser] = Registry("cleanser", Cleanser)
list_cleansers = CLEANSERS.names
get_cleanser = CLEANSERS.get
create_cleanser = CLEANSERS.create  # create_cleanser("ac", silhouette_threshold=0.3) -> a configured cleanser


def register_cleanser(cls: type[Cleanser]) -> type[Cleanser]:
    """Class decorator adding a cleanser under ``cls.name``; its verdicts travel in archives as scan reports."""
    CLEANSERS.register(cls)
    register_report_method(cls.name)
    return cls


def cleanser_from_dict(data: dict[str, Any]) -> Cleanser:
    """Rebuild a cleanser from the ``config`` of a report (``{"name": ..., **fields}``)."""
    data = dict(data)
    cls = get_cleanser(data.pop("name", None))
    hints = {f.name: f for f in dataclasses.fields(cls.config_class)}
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in hints}
    return cls(cls.config_class(**fixed))


def describe_cleansers() -> dict[str, dict[str, Any]]:
    """Name -> description and default options of every registered cleanser (for ``guard info``)."""
    return {name: {"description": cls.description, "class": cls.__name__,
                   "options": _json_ready(dataclasses.asdict(cls.config_class()))}
            for name, cls in CLEANSERS.items()}


# ------------------------------------------------------------------------------------ records of attacks

def suspect_from_record(record: dict[str, Any], train_set: ImageTensorDataset):
    """Rebuild the poisoned training set ``guard poison`` built, from its JSON ``record`` and the clean set.

    ``train_set`` is the clean split the record names, already cut to ``record["train_images"]``. The attack is
    rebuilt from the record and re-run with the record's seed; the poisoned indices must come out as recorded,
    else ``ValueError`` (the record belongs to another dataset, split, size or version of the data).
    Returns the :class:`guard.attacks.PoisonResult`.
    """
    from ..attacks import attack_from_record

    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict (the JSON record of guard poison), got {type(record).__name__}")
    missing = [k for k in ("attack", "config", "indices", "seed") if k not in record]
    if missing:
        raise ValueError(f"attack record lacks {missing}; expected the JSON record `guard poison` writes")
    if not isinstance(train_set, ImageTensorDataset):
        raise TypeError(f"train_set must be a guard.data.ImageTensorDataset, got {type(train_set).__name__}")
    expected_n = record.get("train_images")
    if expected_n is not None and expected_n != len(train_set):
        raise ValueError(f"the record was made on {expected_n} training images, got a set of {len(train_set)}")
    attack = attack_from_record(record)
    if getattr(attack, "supply_chain", False) or not hasattr(attack, "poison"):
        raise ValueError(f"attack {record['attack']!r} does not poison a training set; nothing to cleanse")
    indices = record["indices"]
    if indices and (min(indices) < 0 or max(indices) >= len(train_set)):
        raise ValueError(f"record indices lie in [{min(indices)}, {max(indices)}], outside the {len(train_set)} "
                         f"training images; the record belongs to another dataset")
    result = attack.poison(train_set, torch.Generator().manual_seed(int(record["seed"])))
    if result.indices.tolist() != list(indices):
        raise ValueError(f"rebuilding {record['attack']!r} with seed {record['seed']} on this training set poisons "
                         f"other images than the record ({result.indices.numel()} vs {len(indices)} indices, "
                         f"first {result.indices[:3].tolist()} vs {list(indices)[:3]}); expected the dataset, "
                         f"split and size the record was made on")
    if "poisoned_labels" in record and result.dataset.labels[result.indices].tolist() != record["poisoned_labels"]:
        raise ValueError("the rebuilt poisoned labels differ from the record's poisoned_labels")
    return result
