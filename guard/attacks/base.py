"""The attack interface, its configs, the poisoning record and the registry.

An attack is one class with a frozen, validated config and one verb (ALGORITHMS.md §5 "common interface"):

* :class:`BackdoorAttack` — ``poison(train_set, generator)`` returns a poisoned copy of the training set and
  ``apply_trigger(x)`` stamps the trigger on test images (:class:`Trigger`).
* :class:`SupplyChainAttack` — ``train(model, train_set, config, generator=...)``: the attacker controls
  training, the data stay clean (PCB); a trigger-based one also has ``apply_trigger``.
* :class:`TargetedAttack` — clean-label poisoning for one attack goal (target image, target class, poison
  class) against a known feature extractor (the transfer setting, ALGORITHMS.md S1/S5).

The verbs are abstract methods: a subclass that leaves one out cannot be instantiated or registered.
``poison`` returns a :class:`PoisonResult`: the poisoned dataset, which indices were poisoned and their original
labels. Poisons replace their clean originals ("without replacement", pick_your_poison.txt A.2.1). Its
``record()`` (JSON), written by :func:`save_record` with whatever state the attack holds beyond its config,
rebuilds the attack with :func:`load_record`.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._validation import check_images, coerce_option, parse_config_options
from ..data import ImageTensorDataset
from ..registry import Configured, Registry
from .primitives import from_uint8, to_uint8

logger = logging.getLogger(__name__)

__all__ = ["Attack", "AttackConfig", "BackdoorAttack", "PoisonConfig", "PoisonResult", "SupplyChainAttack",
           "TargetedAttack", "Trigger", "attack_from_record", "config_to_json", "create_attack", "describe_attacks",
           "get_attack", "list_attacks", "load_record", "parse_options", "register_attack", "save_record",
           "state_path"]

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
    """Options every trigger-based attack shares (validated on construction, picklable).

    ``target``: the attacker's target class t. ``seed``: seeds the trigger's own random draws (pattern,
    location, warping field, test-time randomness) so the trigger is a function of the config alone; which
    samples are poisoned comes from the generator passed to ``poison``.
    """

    target: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("target", self.target, 0)
        check_int("seed", self.seed, 0)


@dataclass(frozen=True)
class PoisonConfig(AttackConfig):
    """A data-poisoning budget: ``budget`` is the fraction of the training set that is poisoned, ``num_poisons``
    overrides it with an absolute count m."""

    budget: float = 0.01
    num_poisons: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("budget", self.budget, 0.0, 1.0, low_open=True)
        if self.num_poisons is not None:
            check_int("num_poisons", self.num_poisons, 1)

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
    config: Any
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


def config_to_json(config: Any) -> dict[str, Any]:
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


class Attack(Configured, abc.ABC):
    """Base of every attack: holds a validated config of type ``config_class``.

    Construct with a config or with its fields as keyword arguments: ``BadNets(target=3, budget=0.01)``.
    ``refused_options`` names the options this attack does not use, with the reason: passing one (for a field
    its config shares with other attacks: setting it away from its default) raises ``ValueError``, so no
    option is silently ignored.
    """

    config_class: ClassVar[type] = AttackConfig
    kind: ClassVar[str] = ""          # "backdoor", "supply-chain" or "targeted"
    clean_label: ClassVar[bool] = False
    refused_options: ClassVar[dict[str, str]] = {}

    def __init__(self, config: Any = None, **options: Any) -> None:
        type(self).refuse_options(options)
        super().__init__(config, **options)
        type(self).refuse_options(dataclasses.asdict(self.config))

    @classmethod
    def refuse_options(cls, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``options`` set one of ``refused_options``: an option the config lacks, or a
        shared field set away from its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        for key, why in cls.refused_options.items():
            if key in options and (key not in defaults or options[key] != defaults[key]):
                raise ValueError(f"attack {cls.name!r} refuses option {key}={options[key]!r}: {why}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors the attack needs beyond its config to act exactly as it did (ISSBA's fitted encoder, Adv's
        surrogate); :func:`save_record` stores them beside the record. Empty for most attacks."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"attack {self.name!r} keeps no state, got tensors {sorted(state)[:5]}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def _result(self, poisoned: ImageTensorDataset, indices: torch.Tensor, original: torch.Tensor,
                covers: torch.Tensor | None = None, **extra: Any) -> PoisonResult:
        order = indices.argsort()
        covers = torch.zeros(0, dtype=torch.int64) if covers is None else covers.sort().values
        return PoisonResult(poisoned, indices[order], original[order], covers, self.name, self.config, extra)


class Trigger(abc.ABC):
    """The test-time trigger of an attack (a mixin for :class:`Attack` subclasses whose config has ``target`` and
    ``seed``): ``apply_trigger(x)`` stamps it on test images, ``triggered(dataset)`` on a whole set.

    Like torchvision's ``v2.Transform``, the random part (``make_params``: the trigger's pattern, location,
    warping field, drawn once from ``config.seed``) is split from the deterministic part (``apply``), so a
    trigger is rebuilt exactly from the record of a run.
    """

    config: AttackConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._params: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def make_params(self, shape: tuple[int, int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The trigger's random draws for images of ``shape`` (none by default)."""
        return {}

    @abc.abstractmethod
    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The test-time trigger on float images ``(N, C, H, W)`` in [0, 1]."""

    def check_num_classes(self, num_classes: int) -> None:
        _check_class("target", self.config.target, num_classes)

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


class BackdoorAttack(Trigger, Attack):
    """A trigger-based data-poisoning backdoor: ``poison`` a training set, ``apply_trigger`` to test images.

    Subclasses implement ``apply(x, params, generator)`` (the test-time trigger) and, where the trigger has
    random parts, ``make_params(shape, generator)``; ``apply_poison`` defaults to ``apply`` (Adaptive attacks
    occlude at poisoning time, TSB stamps one trigger instead of all). ``pool`` picks the candidate samples:
    non-target classes for poison-label, the target class for clean-label attacks.
    """

    kind = "backdoor"

    # ---------------------------------------------------------------- subclass hooks
    def apply_poison(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                     generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, params, generator)

    def apply_cover(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                    generator: torch.Generator) -> torch.Tensor:
        return self.apply_poison(x, params, generator)

    def num_covers(self, m: int, n: int) -> int:
        """How many label-keeping cover samples go with ``m`` poisons (0 except Adaptive/WaNet)."""
        return 0

    def poison_count(self, n: int) -> int:
        """How many of ``n`` training images are poisoned (the config's budget)."""
        return self.config.poison_count(n)

    def pool(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the samples that may be poisoned."""
        return labels == self.config.target if self.clean_label else labels != self.config.target

    # ---------------------------------------------------------------- public API
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
        m = self.poison_count(n)
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


class SupplyChainAttack(Attack):
    """An attack that controls training rather than the data (ALGORITHMS.md A17): its verb is ``train``, which
    trains a model on a clean training set with the attacker's procedure and returns
    :func:`guard.train.train`'s result. The training set is never modified."""

    kind = "supply-chain"

    @abc.abstractmethod
    def train(self, model: torch.nn.Module, train_set: ImageTensorDataset, config: Any, *,
              generator: torch.Generator, **train_kwargs: Any) -> Any:
        """Train ``model`` in place on the clean ``train_set`` with ``config`` (a
        :class:`guard.train.TrainConfig`); ``train_kwargs`` go to :func:`guard.train.train`."""

    def record(self) -> dict[str, Any]:
        """The JSON record of a run, in the form of :meth:`PoisonResult.record` (no sample is poisoned)."""
        return {"attack": self.name, "config": config_to_json(self.config), "num_poisons": 0, "indices": [],
                "original_labels": [], "poisoned_labels": [], "cover_indices": []}


class TargetedAttack(Attack):
    """Clean-label poisoning of one attack goal against a known feature extractor (ALGORITHMS.md S5).

    ``poison(train_set, goal, target_image, surrogate, generator)`` perturbs the goal's base images
    (labels unchanged) and returns the poisoned set; ``target_input(target_image)`` is what the victim is
    queried with (the target image itself, or with the trigger for CLBD/HTBD); success = poison class.
    """

    kind = "targeted"
    clean_label = True

    @abc.abstractmethod
    def poison(self, train_set: ImageTensorDataset, goal: Any, target_image: torch.Tensor, surrogate: Any,
               generator: torch.Generator) -> PoisonResult:
        """Perturb the goal's base images in ``train_set`` against ``surrogate``."""

    @abc.abstractmethod
    def target_input(self, target_image: torch.Tensor) -> torch.Tensor:
        """What the victim is queried with for this goal."""


# ------------------------------------------------------------------------------------------- registry

ATTACKS: Registry[Attack] = Registry("attack", Attack, kinds=("backdoor", "supply-chain", "targeted"))
register_attack = ATTACKS.register
list_attacks = ATTACKS.names  # list_attacks("targeted") -> the targeted poisoning attacks
get_attack = ATTACKS.get
create_attack = ATTACKS.create  # create_attack("badnets", target=3, budget=0.01) -> a configured attack


def describe_attacks() -> dict[str, dict[str, Any]]:
    """Name -> kind, label policy, description and default options of every registered attack (options it
    refuses left out)."""
    out = {}
    for name, cls in ATTACKS.items():
        try:
            defaults = config_to_json(cls.config_class())
        except (TypeError, ValueError):  # a required option (adv's surrogate weights): the declared defaults
            defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                        for f in dataclasses.fields(cls.config_class) if f.default is not dataclasses.MISSING}
        out[name] = {"kind": cls.kind, "clean_label": cls.clean_label, "description": cls.description,
                     "options": {k: v for k, v in defaults.items() if k not in cls.refused_options}}
    return out


def _field_types(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def parse_options(name: str, items: list[str] | tuple[str, ...]) -> AttackConfig:
    """``parse_options("badnets", ["target=3", "budget=0.01"])`` -> the attack's validated config (values as
    :func:`guard._validation.parse_config_options` reads them); an option the attack refuses says why."""
    cls = get_attack(name)
    hints = _field_types(cls.config_class)
    for item in items:
        key = item.partition("=")[0].strip()
        if key in cls.refused_options and key not in hints:
            raise ValueError(f"attack {name!r} refuses option {key!r}: {cls.refused_options[key]}")
    config = parse_config_options(cls.config_class, items, what=f"attack {name!r}")
    cls.refuse_options(dataclasses.asdict(config))
    return config


def attack_from_record(record: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> Attack:
    """Rebuild the attack of a record (:meth:`PoisonResult.record`, :meth:`SupplyChainAttack.record`) with the
    tensors of its :meth:`~Attack.state_dict`, if it has any. :func:`load_record` reads both from disk."""
    cls = get_attack(record["attack"])
    hints = _field_types(cls.config_class)
    cls.refuse_options(record["config"])
    unknown = sorted(set(record["config"]) - set(hints))
    if unknown:
        raise ValueError(f"record of attack {cls.name!r} has options {unknown} it does not know; expected "
                         f"{', '.join(hints)}")
    config = {k: coerce_option(v, hints[k]) for k, v in record["config"].items()}
    attack = cls(cls.config_class(**config))
    if state:
        attack.load_state_dict(state)
    return attack


def state_path(record_path: str | Path) -> Path:
    """Where :func:`save_record` keeps an attack's state beside ``record_path``: ``<stem>.attack.safetensors``."""
    record_path = Path(record_path)
    return record_path.with_name(record_path.stem + ".attack.safetensors")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_record(record: dict[str, Any], path: str | Path, attack: Attack) -> Path:
    """Write ``record`` as JSON to ``path``. An attack with a state (:meth:`Attack.state_dict`) writes it beside
    the record (safetensors, :func:`state_path`) and the record names that file and its SHA-256, so
    :func:`load_record` rebuilds the attack exactly — ISSBA's fitted encoder included."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in record.items() if k != "state"}
    state = attack.state_dict()
    if state:
        file = state_path(path)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(file))
        record["state"] = {"file": file.name, "sha256": _sha256(file)}
    path.write_text(json.dumps(record, indent=2))
    return path


def load_record(path: str | Path) -> Attack:
    """The attack of a record written by :func:`save_record` (``guard poison``), its state checked against the
    SHA-256 the record holds."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a JSON attack record: {exc}") from exc
    if not isinstance(record, dict) or "attack" not in record or "config" not in record:
        raise ValueError(f"{path} is not an attack record: expected a JSON object with 'attack' and 'config'")
    state = None
    if "state" in record:
        file = path.parent / record["state"]["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{path}: the attack's state file {file} is missing")
        if _sha256(file) != record["state"]["sha256"]:
            raise ValueError(f"{path}: the attack's state file {file} changed since the record was written "
                             f"(SHA-256 mismatch)")
        state = load_file(str(file))
    return attack_from_record(record, state)
