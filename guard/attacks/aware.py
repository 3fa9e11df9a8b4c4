"""The attacker a guarded endpoint invites: a backdoor trained through ReScaler's adaptation (and, optionally,
past guard's trigger detector).

A supply-chain attack in the form of PCB (pick_your_poison.txt Alg. 5; ALGORITHMS.md A17): the attacker trains
the model and knows the endpoint's defense. Every training step adds, on a ``batch_fraction`` of the batch
stamped with the BadNets patch and labelled t:

* the backdoor itself, CE(F_θ(x̃), t);
* ``adapt_weight`` × CE(F_{θ,w*(x̃)}(x̃), t), with w* ReScaler's adapted scalars (rescaler_main.txt eq. 3) at the
  served ε and α, computed in eval mode as the endpoint computes them and taken as given (first order, the
  default) or differentiated through the ascent step (``second_order``): the triggered input should keep the
  target after :meth:`guard.rescaler.ReScaler.adapt`;
* ``evade_weight`` × the feature-space distance of x̃ to the clean target-class images of the batch at the
  layers guard's trigger detector reads (:func:`guard.detect.inputs.feature_layers`: every residual stage's
  channel mean and std, the penultimate features), in units of the clean images' total variance — the
  latent-inseparability term of adaptive attacks on feature-space detectors (Tan & Shokri 2020; Qi et al.
  2023's Adaptive-Blend), aimed at guard's own layers.

All three are computed in one training-mode forward with the clean rest of the batch (as PCB does, so BatchNorm
sees the batch the clean loss sees).

Measured on the CIFAR ResNet-20 victim recipe (benchmarks/adaptive_cifar10.py): with the adaptation term the
3-epoch victim keeps its attack success through ReScaler (1.000) at CDA 0.866 (BadNets' victim: 0.919). The detector
term (weight 1) costs the clean accuracy — CDA 0.11 after 120 steps; the model meets it by sending every input to
the target's features — so a recipe for it is open.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..detect.inputs import feature_layers, layer_features
from ..rescaler import ReScaler, ReScalerConfig
from .base import SupplyChainAttack, _check_dataset, _check_generator, check_float, register_attack
from .patch import PatchConfig, PatchTrigger

__all__ = ["ReScalerAware", "ReScalerAwareConfig"]


@dataclass(frozen=True)
class ReScalerAwareConfig(PatchConfig):
    """``batch_fraction`` of each batch carries the trigger (PCB's 0.1); ``eps`` and ``alpha`` are the served
    ReScaler's (rescaler_appendix.txt §A defaults, which the attacker is assumed to know); ``adapt_weight`` and
    ``evade_weight`` weigh the adaptation and detector terms (0 turns a term off); ``second_order`` differentiates
    the adaptation term through eq. 3's step."""

    batch_fraction: float = 0.1
    eps: float = ReScalerConfig.eps
    alpha: float = ReScalerConfig.alpha
    adapt_weight: float = 1.0
    evade_weight: float = 0.0
    second_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("batch_fraction", self.batch_fraction, 0.0, 1.0, low_open=True)
        ReScalerConfig(self.eps, self.alpha)  # the same checks as the served ReScaler's
        check_float("adapt_weight", self.adapt_weight, 0.0)
        check_float("evade_weight", self.evade_weight, 0.0)
        if not isinstance(self.second_order, bool):
            raise TypeError(f"second_order must be true or false, got {self.second_order!r}")


@register_attack
class ReScalerAware(PatchTrigger, SupplyChainAttack):
    """A BadNets-patch backdoor trained so that its triggered inputs keep the target through ReScaler's
    adaptation (and, with ``evade_weight``, look like clean target-class inputs to guard's detector); its verb
    is :meth:`train`, and its test-time trigger is the BadNets patch."""

    name = "rescaler-aware"
    config_class = ReScalerAwareConfig
    description = "patch backdoor trained through ReScaler's adaptation (and past guard's detector)"
    refused_options = dict.fromkeys(("budget", "num_poisons"), "rescaler-aware never modifies the training set; "
                                    "batch_fraction of every training batch carries the trigger")

    def backdoor_loss(self, rescaler: ReScaler):
        """The ``extra_loss(x, y, logits)`` hook for :func:`guard.train.train` (module docstring's three terms,
        on the first ``batch_fraction`` of ``x``). One training-mode forward carries the triggered images twice,
        plain and under the adapted scalars, with the clean rest of the batch (zero scalars); the scalars come
        from ReScaler's eval-mode step, as the endpoint would learn them, and the training mode is restored."""
        model, c = rescaler.model, self.config
        layers = feature_layers(model) if c.evade_weight > 0 else ()

        def extra_loss(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            k = max(1, round(c.batch_fraction * x.shape[0]))
            triggered = self.apply(x[:k], self.trigger_params(tuple(x.shape[1:])), None)
            target = torch.full((k,), c.target, dtype=torch.int64, device=x.device)
            training = model.training
            model.eval()
            try:
                w = rescaler.adapt_scalars(triggered, create_graph=c.second_order)
            finally:
                model.train(training)
            scalars = torch.cat([torch.zeros_like(w), w, w.new_zeros(x.shape[0] - k, w.shape[1])])
            capture = layer_features(model, layers, detach=False) if layers else contextlib.nullcontext({})
            with capture as features:
                out = rescaler.logits_with(torch.cat([triggered, triggered, x[k:]]), scalars)
            loss = F.cross_entropy(out[:k], target)
            if c.adapt_weight > 0:
                loss = loss + c.adapt_weight * F.cross_entropy(out[k:2 * k], target)
            clean_target = 2 * k + torch.nonzero(y[k:] == c.target)[:, 0]
            if layers and clean_target.numel() >= 2:
                loss = loss + c.evade_weight * self._feature_distance(features, layers, k, clean_target)
            return loss

        return extra_loss

    @staticmethod
    def _feature_distance(features: dict[str, list[torch.Tensor]], layers: tuple[str, ...], k: int,
                          clean: torch.Tensor) -> torch.Tensor:
        """Mean over ``layers`` of the squared distance of each plain triggered row (the first k) to the mean of
        the ``clean`` target-class rows, in units of those rows' total variance (a per-dimension scale explodes
        on the dimensions that barely vary, e.g. channels ReLU leaves at 0)."""
        total = 0.0
        for layer in layers:
            rows = features[layer][0]
            reference = rows[clean].detach()
            spread = reference.var(0).sum() + 1e-6
            total = total + ((rows[:k] - reference.mean(0)) ** 2).sum(1).mean() / spread
        return total / len(layers)

    def train(self, model: nn.Module, train_set, config, *, generator: torch.Generator, **train_kwargs: Any):
        """Train ``model`` on the clean ``train_set`` with the aware backdoor; returns :func:`guard.train.train`'s
        result. ReScaler's hooks are on the model only while it trains."""
        from ..train import train

        _check_dataset(train_set)
        _check_generator(generator)
        self.check_num_classes(train_set.num_classes)
        if "extra_loss" in train_kwargs:
            raise TypeError("ReScalerAware.train sets extra_loss itself")
        rescaler = ReScaler(model, eps=self.config.eps, alpha=self.config.alpha)
        try:
            return train(model, train_set, config, generator=generator,
                         extra_loss=self.backdoor_loss(rescaler), **train_kwargs)
        finally:
            rescaler.detach()
