"""Adversarial clean-label backdoor ("Adv" / AdvClean of pick_your_poison.txt §5.1, A.2; ALGORITHMS.md A7).

The trigger is not a pattern but a *targeted adversarial perturbation* computed for each image on an
independent, trained model: ℓ∞ PGD (ε = 8/255, step 2/255, 4 steps) toward a fixed class ``adv_class`` of that
model. Target-class training images get their perturbation, labels untouched; at test time every image gets
its own. PyP computes it on an ImageNet ResNet (class 421, "banister"); no ImageNet model is reachable here,
so the independent model is a registered one (``surrogate``, default the CIFAR ResNet-20) loaded from
``surrogate_weights`` — required: PGD on an untrained network yields noise no victim learns as a trigger. Pick
``adv_class`` different from ``target`` when the surrogate shares the victim's classes, so that ASR measures the
backdoor, not plain adversarial transfer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import create, get_spec
from .base import BackdoorAttack, PoisonConfig, check_float, check_int, register_attack

logger = logging.getLogger(__name__)

__all__ = ["AdvClean", "AdvConfig"]


@dataclass(frozen=True)
class AdvConfig(PoisonConfig):
    """``eps``/``step``/``steps``: the PGD of PyP's code (8/255, 2/255, 4); ``adv_class``: the surrogate's
    class the perturbation pushes toward; ``surrogate``: a registered model name; ``surrogate_weights``: its
    trained weights (a state dict file, required). Budget 1 % (PyP CIFAR-10: 500 of 50,000)."""

    budget: float = 0.01
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 4
    adv_class: int = 1
    surrogate: str = "resnet20"
    surrogate_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        check_float("step", self.step, 0.0, 1.0, low_open=True)
        check_int("steps", self.steps, 1)
        check_int("adv_class", self.adv_class, 0)
        get_spec(self.surrogate)  # an unknown name fails here, listing the registered ones
        if self.surrogate_weights is None:
            raise ValueError(
                f"adv needs surrogate_weights: its trigger is a targeted adversarial perturbation on a trained "
                f"independent model (pick_your_poison.txt §5.1), and an untrained {self.surrogate!r} gives none. "
                f"Pass the path of trained weights of {self.surrogate!r} (e.g. the pretrained "
                f"weights/resnet20-12fca82f.th of GUARD_DATA_DIR, or one from `guard train --model "
                f"{self.surrogate} --out surrogate.pt`), as surrogate_weights=PATH or --attack-opt "
                f"surrogate_weights=PATH")
        if not isinstance(self.surrogate_weights, str):
            raise TypeError(f"surrogate_weights must be a path string, got {self.surrogate_weights!r}")


@register_attack
class AdvClean(BackdoorAttack):
    """Clean-label backdoor whose per-image trigger is a targeted PGD perturbation on an independent model."""

    name = "adv"
    description = "clean-label, per-image adversarial trigger from an independent model (PyP 'Adv')"
    config_class = AdvConfig
    clean_label = True
    refused_options = {"seed": "the adv trigger is a deterministic PGD (no random start) on the trained "
                               "surrogate: nothing is drawn at random"}

    def __init__(self, config: AdvConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._surrogate: torch.nn.Module | None = None

    def surrogate_model(self) -> torch.nn.Module:
        """The independent model, loaded once and kept in eval mode with frozen parameters."""
        if self._surrogate is None:
            cfg = self.config
            if not Path(cfg.surrogate_weights).is_file():
                raise FileNotFoundError(f"adv: surrogate_weights file not found: {cfg.surrogate_weights}")
            self._set_surrogate(create(cfg.surrogate, weights=cfg.surrogate_weights, generator=torch.Generator()))
        return self._surrogate

    def _set_surrogate(self, model: torch.nn.Module) -> None:
        cfg = self.config
        if not 0 <= cfg.adv_class < model.num_classes:
            raise ValueError(f"adv_class={cfg.adv_class} is not a class of the surrogate {cfg.surrogate!r} "
                             f"({model.num_classes} classes)")
        self._surrogate = model.eval().requires_grad_(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The surrogate's weights: a record rebuilds the exact trigger even where the weights file is gone."""
        return {f"surrogate.{k}": v for k, v in self.surrogate_model().net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k.removeprefix("surrogate."): v for k, v in state.items()}
        model = create(self.config.surrogate, generator=torch.Generator())
        try:
            model.net.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"adv: the state does not fit the surrogate {self.config.surrogate!r}: {exc}") from exc
        self._set_surrogate(model)

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """``steps`` signed-gradient steps toward ``adv_class`` on the surrogate, projected onto the ℓ∞ ball
        of radius ε around ``x`` and onto [0, 1] (deterministic: no random start)."""
        cfg = self.config
        model = self.surrogate_model().to(x.device)
        target = torch.full((x.shape[0],), cfg.adv_class, dtype=torch.long, device=x.device)
        adv = x.clone()
        for _ in range(cfg.steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(adv), target)
                grad, = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv - cfg.step * grad.sign()
                adv = torch.min(torch.max(adv, x - cfg.eps), x + cfg.eps).clamp(0, 1)
        return adv.detach()
