"""The model-defense interface and registry, and the result every defense returns.

A defense repairs a model it suspects (Pivotal Tuning, Neural Cleanse unlearning) or hardens one before it
is served (MOTH). Each is one class with a frozen, validated config and one verb, :meth:`Defense.defend`:
a model plus trusted data in, a :class:`RepairResult` out — the defended *copy* (the input model is never
modified, also when the run fails) and a JSON-serialisable history. Defenses are addressed by name
(``create_defense("pivotal", steps=2000)``); the CLI, ``guard info``, archive manifests and metrics take the
names from :func:`list_defenses`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .._validation import resolve_generator
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..registry import Configured, Registry

__all__ = ["AsrProbe", "Defense", "RepairPoint", "RepairResult", "create_defense", "describe_defenses",
           "get_defense", "list_defenses", "register_defense"]

#: ``asr(model) -> float``: the attack success rate of a model, measured by the caller who knows the trigger
#: (e.g. ``guard.metrics.attack_success_rate`` on triggered test images); a defense itself never sees a trigger.
AsrProbe = Callable[[nn.Module], float]

_KINDS = ("repair", "hardening")


@dataclass(frozen=True)
class RepairPoint:
    """One evaluation of the model during a defense: steps done, clean accuracy on the held-out set and, when a
    triggered set was given, the attack success rate (``None`` otherwise)."""

    step: int
    cda: float
    asr: float | None


@dataclass(frozen=True)
class RepairResult:
    """The defended model (a copy; the input model is untouched) at the chosen point, and the trade-off curve.

    ``chosen`` is the lowest-ASR admissible point when ASR was measured (ALGORITHMS.md M10), else the last
    admissible one (always the last one for a hardening defense); a point is admissible while
    ``cda > cda0 − max_cda_drop`` (every point when ``max_cda_drop`` is ``None``). ``stopped_early`` says the
    CDA budget ended the run before the step budget. ``method``: the defense's registered name; ``details``:
    method-specific JSON-ready records (the scan a repair used, MOTH's pair bookkeeping).
    """

    model: GuardModel
    history: tuple[RepairPoint, ...]
    chosen: RepairPoint
    cda0: float
    max_cda_drop: float | None
    stopped_early: bool
    seconds: float
    method: str = ""
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the model)."""
        return {"method": self.method, "cda0": self.cda0, "max_cda_drop": self.max_cda_drop,
                "stopped_early": self.stopped_early, "seconds": self.seconds, "chosen": dataclasses.asdict(self.chosen),
                "history": [dataclasses.asdict(p) for p in self.history], "details": self.details}


class Defense(Configured, ABC):
    """Base of every model defense: a validated config of type ``config_class`` and :meth:`defend`.

    Construct with a config or with its fields as keyword options. ``kind``: ``"repair"`` (a suspected
    model, ``guard repair``) or ``"hardening"`` (before serving, ``guard harden``). ``needs_all_classes``:
    the trusted set must hold every class of the model.
    """

    kind: ClassVar[str] = "repair"
    needs_all_classes: ClassVar[bool] = False

    def defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
               asr: AsrProbe | None = None, generator: torch.Generator | None = None,
               device: str | torch.device | None = None, progress: bool = False) -> RepairResult:
        """Defend a copy of ``model`` with the trusted labelled images ``trusted`` (D_trust).

        ``eval_set``: held-out clean labelled data — the CDA of every evaluation point (and the CDA budget of
        the repairs); ``asr`` (a callable model -> ASR) only records the trade-off when the trigger is known
        (benchmarks, ``--attack``). Randomness comes from ``generator`` (a fresh seeded one when ``None``).
        The input model is never modified, also when the run fails.
        """
        if not isinstance(model, GuardModel):
            raise TypeError(f"model must be a guard.models.GuardModel, got {type(model).__name__}")
        if not isinstance(trusted, ImageTensorDataset):
            raise TypeError(f"trusted must be a guard.data.ImageTensorDataset, got {type(trusted).__name__}")
        if len(trusted) == 0:
            raise ValueError("the trusted set is empty; a defense needs labelled clean images to train on")
        if not isinstance(eval_set, torch.utils.data.Dataset) or len(eval_set) == 0:
            size = f" of {len(eval_set)} images" if isinstance(eval_set, torch.utils.data.Dataset) else ""
            raise ValueError(f"eval_set must be a non-empty dataset of held-out clean images, got "
                             f"{type(eval_set).__name__}{size}")
        if asr is not None and not callable(asr):
            raise TypeError(f"asr must be a callable model -> attack success rate, got {type(asr).__name__}")
        present = set(torch.unique(trusted.labels).tolist())
        outside = sorted(c for c in present if not 0 <= c < model.num_classes)
        if outside:
            raise ValueError(f"trusted labels {outside} are not classes of this {model.num_classes}-class model")
        missing = sorted(set(range(model.num_classes)) - present)
        if missing and self.needs_all_classes:
            raise ValueError(f"{self.name} needs trusted images of every class; classes {missing} have none "
                             f"(the trusted set holds {sorted(present)})")
        generator = resolve_generator(generator)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        started = time.perf_counter()
        working = copy.deepcopy(model).to(device)
        result = self._defend(working, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                              progress=progress)
        return dataclasses.replace(result, method=self.name, seconds=time.perf_counter() - started)

    @abstractmethod
    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        """The defense proper, on ``model`` — already a copy on ``device``, free to change in place."""


DEFENSES: Registry[Defense] = Registry("defense", Defense, kinds=_KINDS)
register_defense = DEFENSES.register
list_defenses = DEFENSES.names  # list_defenses("hardening") -> the hardening defenses
get_defense = DEFENSES.get
create_defense = DEFENSES.create  # create_defense("pivotal", steps=2000) -> a configured defense


def describe_defenses() -> dict[str, dict[str, Any]]:
    """Name -> kind, description and default options of every registered defense (``guard info --json``)."""
    return {name: {"kind": cls.kind, "description": cls.description,
                   "options": json.loads(json.dumps(dataclasses.asdict(cls.config_class())))}
            for name, cls in DEFENSES.items()}
