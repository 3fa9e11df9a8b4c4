"""The attack interface, its configs, the poisoning record and the registry.

An attack is one class with a frozen, validated config (ALGORITHMS.md §5 "common interface"):

* :class:`BackdoorAttack` — ``poison(train_set, generator)`` returns a poisoned copy of the training set and
  ``apply_trigger(x)`` stamps the trigger on test images. Like torchvision's ``v2.Transform``, the random part
  (``make_params``: the trigger's pattern, location, warping field, drawn once from ``config.seed``) is split
  from the deterministic part (``apply``), so a trigger is rebuilt exactly from the record of a run.
* :class:`TargetedAttack` — clean-label poisoning for one attack goal (target image, target class, poison
  class) against a known feature extractor (the transfer setting, ALGORITHMS.md S1/S5).

Both return a :class:`PoisonResult`: the poisoned dataset, which indices were poisoned and their original
labels. Poisons replace their clean originals ("without replacement", pick_your_poison.txt A.2.1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._validation import check_images, coerce_option, parse_config_options
from ..data import ImageTensorDataset
from .primitives import from_uint8, to_uint8

logger = logging.getLogger(__name__)

__all__ = ["Attack", "AttackConfig", "BackdoorAttack", "PoisonResult", "TargetedAttack", "attack_from_record",
           "config_to_json", "create_attack", "describe_attacks", "get_attack", "list_attacks", "parse_options", "register_attack"]

# ----------------------------------------------------------------------------------------- validation


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be an int in {bounds}, got {value}")


def check_float(name: str, value: object, low: float | None = None, high: float | None = None, *,
                low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    too_low = low is not None and (value < low or (low_open and value == low))
    if too_low or (high is not None and value > high):
        if high is None:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
        lower = "-inf" if low is None else low
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{lower}, {high}], got {value}")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_location(name: str, value: object) -> None:
    corners = ("top-left", "top-right", "bottom-left", "bottom-right")
    if isinstance(value, str):
        check_choice(name, value, corners)
    elif not (isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be one of {corners} or a (row, col) tuple of non-negative ints, "
                         f"got {value!r}")


@dataclass(frozen=True)
class AttackConfig:
    """Options every attack shares (validated on construction, picklable).

    ``target``: the attacker's target class t. ``budget``: fraction of the training set that is poisoned
    (``num_poisons`` overrides it with an absolute count m). ``seed``: seeds the trigger's own random draws
    (pattern, location, warping field, test-time randomness) so the trigger is a function of the config alone;
    which samples are poisoned comes from the generator passed to ``poison``.
    """

    target: int = 0
    budget: float = 0.01
    num_poisons: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("target", self.target, 0)
        check_float("budget", self.budget, 0.0, 1.0, low_open=True)
        if self.num_poisons is not None:
            check_int("num_poisons", self.num_poisons, 1)
        check_int("seed", self.seed, 0)

    def poison_count(self, n: int) -> int:
        """m for a training set of ``n`` images: ``num_poisons`` or ``round(budget·n)`` (at least 1)."""
        m = self.num_poisons if self.num_poisons is not None else max(1, round(self.budget * n))
        if m > n:
            raise ValueError(f"num_poisons={m} exceeds the {n} training images")
        return m


@dataclass(frozen=True)
class PoisonResult:
    """A poisoned training set and what changed.

    ``indices``: samples carrying the attack (trigger or perturbation), sorted; ``original_labels``: their labels
    before poisoning; ``cover_indices``: samples modified but keeping their true label (Adaptive regularisation
    samples, WaNet noise samples). Every other sample is byte-identical to the clean set.
    """

    dataset: ImageTensorDataset
    indices: torch.Tensor
    original_labels: torch.Tensor
    cover_indices: torch.Tensor
    attack: str
    config: AttackConfig
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def poison_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.dataset), dtype=torch.bool)
        mask[self.indices] = True
        return mask

    def record(self) -> dict[str, Any]:
        """JSON-ready description: attack name, config, poisoned indices and their original labels."""
        return {
            "attack": self.attack,
            "config": config_to_json(self.config),
            "num_poisons": int(self.indices.numel()),
            "indices": self.indices.tolist(),
            "original_labels": self.original_labels.tolist(),
            "poisoned_labels": self.dataset.labels[self.indices].tolist(),
            "cover_indices": self.cover_indices.tolist(),
            **self.extra,
        }


def config_to_json(config: AttackConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _check_dataset(train_set: object, name: str = "train_set") -> ImageTensorDataset:
    if not isinstance(train_set, ImageTensorDataset):
        raise TypeError(f"{name} must be a guard.data.ImageTensorDataset, got {type(train_set).__name__}")
    if len(train_set) == 0:
        raise ValueError(f"{name} is empty")
    return train_set


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def _check_class(name: str, value: int, num_classes: int) -> None:
    if not 0 <= value < num_classes:
        raise ValueError(f"{name}={value} is not a class of this dataset: expected 0..{num_classes - 1}")


class Attack:
    """Base of every attack: holds a validated config of type ``config_class``.

    Construct with a config or with its fields as keyword arguments: ``BadNets(target=3, budget=0.01)``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AttackConfig]] = AttackConfig
    kind: ClassVar[str] = ""          # "backdoor" or "targeted"
    clean_label: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, config: AttackConfig | None = None, **options: Any) -> None:
        if config is None:
            config = self.config_class(**options)
        elif options:
            raise TypeError(f"{type(self).__name__}: pass either a config or keyword options, not both")
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def _result(self, poisoned: ImageTensorDataset, indices: torch.Tensor, original: torch.Tensor,
                covers: torch.Tensor | None = None, **extra: Any) -> PoisonResult:
        order = indices.argsort()
        covers = torch.zeros(0, dtype=torch.int64) if covers is None else covers.sort().values
        return PoisonResult(poisoned, indices[order], original[order], covers, self.name, self.config, extra)


class BackdoorAttack(Attack):
    """A trigger-based backdoor: ``poison`` a training set, ``apply_trigger`` to test images.

    Subclasses implement ``make_params(shape, generator)`` (the trigger's random draws, once per image shape)
    and ``apply(x, params, generator)`` (the test-time trigger); ``apply_poison`` defaults to ``apply``
    (Adaptive attacks occlude at poisoning time, TSB stamps one trigger instead of all). ``pool`` picks
    the candidate samples: non-target classes for poison-label, the target class for clean-label attacks.
    """

    kind = "backdoor"
    #: True when the attack controls training instead of the data (its verb is ``train``, not ``poison``)
    supply_chain: ClassVar[bool] = False

    def __init__(self, config: AttackConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self._params: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    # ---------------------------------------------------------------- subclass hooks
    def make_params(self, shape: tuple[int, int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def apply_poison(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                     generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, params, generator)

    def apply_cover(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        return self.apply_poison(x, params, generator)

    def num_covers(self, m: int, n: int) -> int:
        """How many label-keeping cover samples go with ``m`` poisons (0 except Adaptive/WaNet)."""
        return 0

    def pool(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples that may be poisoned."""
        return labels == self.config.target if self.clean_label else labels != self.config.target

    def check_num_classes(self, num_classes: int) -> None:
        _check_class("target", self.config.target, num_classes)

    # ---------------------------------------------------------------- public API
    def trigger_params(self, shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        """The trigger's parameters for images of ``shape`` (C, H, W), drawn once from ``config.seed``."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._params:
            self._params[shape] = self.make_params(shape, torch.Generator().manual_seed(self.config.seed))
        return self._params[shape]

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Test-time trigger on float images ``(N, C, H, W)`` in [0, 1] (not quantized).

        ``generator`` drives per-image randomness where the attack has any (TSB locations); by default a
        generator seeded from ``config.seed`` makes the result a function of the inputs.
        """
        check_images(x)
        if generator is None:
            generator = torch.Generator().manual_seed(self.config.seed + 1)
        return self.apply(x, self.trigger_params(tuple(x.shape[1:])), _check_generator(generator))

    def select(self, labels: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the ``m`` samples to poison, uniformly without replacement from :meth:`pool`."""
        candidates = self.pool(labels).nonzero().flatten()
        if candidates.numel() < m:
            who = "target-class" if self.clean_label else "eligible"
            raise ValueError(f"{self.name}: budget asks for {m} poisons but the training set has only "
                             f"{candidates.numel()} {who} images")
        return candidates[torch.randperm(candidates.numel(), generator=generator)[:m]]

    def poison(self, train_set: ImageTensorDataset, generator: torch.Generator) -> PoisonResult:
        """A poisoned copy of ``train_set``: ``m`` samples get the training-time trigger (and label t for
        poison-label attacks); ``num_covers`` further samples get it with their true label."""
        _check_dataset(train_set)
        _check_generator(generator)
        self.check_num_classes(train_set.num_classes)
        n = len(train_set)
        m = self.config.poison_count(n)
        indices = self.select(train_set.labels, m, generator)
        params = self.trigger_params(tuple(train_set.images.shape[1:]))
        images, labels = train_set.images.clone(), train_set.labels.clone()
        original = labels[indices].clone()
        images[indices] = to_uint8(self.apply_poison(from_uint8(images[indices]), params, generator))
        if not self.clean_label:
            labels[indices] = self.config.target
        k = self.num_covers(m, n)
        covers = None
        if k:
            free = torch.ones(n, dtype=torch.bool)
            free[indices] = False
            candidates = free.nonzero().flatten()
            if candidates.numel() < k:
                raise ValueError(f"{self.name}: {k} cover samples requested but only {candidates.numel()} "
                                 f"images are left after {m} poisons")
            covers = candidates[torch.randperm(candidates.numel(), generator=generator)[:k]]
            images[covers] = to_uint8(self.apply_cover(from_uint8(images[covers]), params, generator))
        logger.info("%s: poisoned %d of %d images (%d cover samples)", self.name, indices.numel(), n, k)
        return self._result(ImageTensorDataset(images, labels, train_set.classes), indices, original, covers)

    def triggered(self, dataset: ImageTensorDataset, generator: torch.Generator | None = None,
                  batch_size: int = 1024) -> ImageTensorDataset:
        """``dataset`` with the test-time trigger on every image (8-bit), true labels kept — the input of
        the ASR metrics (ALGORITHMS.md M2)."""
        _check_dataset(dataset, "dataset")
        self.check_num_classes(dataset.num_classes)
        if generator is None:
            generator = torch.Generator().manual_seed(self.config.seed + 1)
        params = self.trigger_params(tuple(dataset.images.shape[1:]))
        out = torch.cat([to_uint8(self.apply(from_uint8(chunk), params, generator))
                         for chunk in dataset.images.split(batch_size)])
        return ImageTensorDataset(out, dataset.labels.clone(), dataset.classes)


class TargetedAttack(Attack):
    """Clean-label poisoning of one attack goal against a known feature extractor (ALGORITHMS.md S5).

    ``poison(train_set, goal, target_image, surrogate, generator)`` perturbs the goal's base images
    (labels unchanged) and returns the poisoned set; ``target_input(target_image)`` is what the victim is
    queried with (the target image itself, or with the trigger for CLBD/HTBD); success = poison class.
    """

    kind = "targeted"
    clean_label = True


# ------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an attack under ``cls.name``; a duplicate name raises ``ValueError``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"attack {cls.name!r} is already registered (by {_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def list_attacks(kind: str | None = None) -> list[str]:
    """Registered attack names (optionally only ``"backdoor"`` or ``"targeted"`` ones), sorted."""
    return sorted(n for n, c in _REGISTRY.items() if kind is None or c.kind == kind)


def get_attack(name: str) -> type[Attack]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(list_attacks())}")
    return _REGISTRY[name]


def create_attack(name: str, **options: Any) -> Attack:
    """``create_attack("badnets", target=3, budget=0.01)`` -> a configured attack."""
    return get_attack(name)(**options)


def describe_attacks() -> dict[str, dict[str, Any]]:
    """Name -> kind, label policy, description and default options of every registered attack."""
    out = {}
    for name in list_attacks():
        cls = _REGISTRY[name]
        try:
            defaults = config_to_json(cls.config_class())
        except (TypeError, ValueError):  # a config with required fields has no defaults to show
            defaults = {}
        out[name] = {"kind": cls.kind, "clean_label": cls.clean_label, "description": cls.description,
                     "options": defaults}
    return out


def _field_types(config_class: type[AttackConfig]) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def parse_options(name: str, items: list[str] | tuple[str, ...]) -> AttackConfig:
    """``parse_options("badnets", ["target=3", "budget=0.01"])`` -> the attack's validated config (values as
    :func:`guard._validation.parse_config_options` reads them)."""
    return parse_config_options(get_attack(name).config_class, items, what=f"attack {name!r}")


def attack_from_record(record: dict[str, Any]) -> Attack:
    """Rebuild the attack of a :meth:`PoisonResult.record` (e.g. to trigger test images in another process)."""
    cls = get_attack(record["attack"])
    hints = _field_types(cls.config_class)
    config = {k: coerce_option(v, hints[k]) for k, v in record["config"].items()}
    return cls(cls.config_class(**config))
