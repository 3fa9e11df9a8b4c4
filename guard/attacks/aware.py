"""The attacker a guarded endpoint invites: a backdoor trained through ReScaler's adaptation (and, optionally,
past guard's trigger detector).

A supply-chain attack in the form of PCB (pick_your_poison.txt Alg. 5; ALGORITHMS.md A17): the attacker trains
the model and knows the endpoint's defense. Every training step adds, on a ``batch_fraction`` of the batch
stamped with the BadNets patch and labelled t:

* the backdoor itself, CE(F_θ(x̃), t), forwarded in training mode with the clean rest of the batch (as PCB, for
  the same reason: BatchNorm statistics of a triggered-only batch, or eval mode on a model still training, teach
  a backdoor that costs the clean accuracy);
* in eval mode (what the endpoint runs), ``adapt_weight`` × CE(F_{θ,w*(x̃)}(x̃), t), with w* ReScaler's adapted
  scalars (rescaler_main.txt eq. 3) at the served ε and α, differentiated through the ascent step (second
  order): the triggered input should keep the target after :meth:`guard.rescaler.ReScaler.adapt`;
* ``evade_weight`` × the feature-space distance of x̃ to the clean target-class images of the batch at the
  layers guard's trigger detector reads (:func:`guard.detect.inputs.feature_layers`: every residual stage's
  channel mean and std, the penultimate features), each dimension scaled by the clean images' variance — the
  latent-inseparability term of adaptive attacks on feature-space detectors (Tan & Shokri 2020; Qi et al.
  2023's Adaptive-Blend), aimed at guard's own layers.
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
    ``evade_weight`` weigh the adaptation and detector terms (0 turns a term off)."""

    batch_fraction: float = 0.1
    eps: float = ReScalerConfig.eps
    alpha: float = ReScalerConfig.alpha
    adapt_weight: float = 1.0
    evade_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("batch_fraction", self.batch_fraction, 0.0, 1.0, low_open=True)
        ReScalerConfig(self.eps, self.alpha)  # the same checks as the served ReScaler's
        check_float("adapt_weight", self.adapt_weight, 0.0)
        check_float("evade_weight", self.evade_weight, 0.0)


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
        on the first ``batch_fraction`` of ``x``); the eval-mode terms restore the training mode after them."""
        model, c = rescaler.model, self.config
        layers = feature_layers(model) if c.evade_weight > 0 else ()

        def extra_loss(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            k = max(1, round(c.batch_fraction * x.shape[0]))
            triggered = self.apply(x[:k], self.trigger_params(tuple(x.shape[1:])), None)
            clean_target = x[y == c.target] if layers else x[:0]
            target = torch.full((k,), c.target, dtype=torch.int64, device=x.device)
            loss = F.cross_entropy(model(torch.cat([triggered, x[k:]]))[:k], target)
            training = model.training
            model.eval()
            try:
                capture = layer_features(model, layers, detach=False) if layers else contextlib.nullcontext({})
                with capture as features:
                    adaptation = rescaler.adapt(torch.cat([triggered, clean_target]), create_graph=True)
            finally:
                model.train(training)
            if c.adapt_weight > 0:
                loss = loss + c.adapt_weight * F.cross_entropy(adaptation.logits[:k], target)
            if layers and clean_target.shape[0] >= 2:
                loss = loss + c.evade_weight * self._feature_distance(features, layers, k)
            return loss

        return extra_loss

    @staticmethod
    def _feature_distance(features: dict[str, list[torch.Tensor]], layers: tuple[str, ...], k: int) -> torch.Tensor:
        """Mean over ``layers`` of the variance-scaled squared distance of each triggered row (the first k of the
        eval-mode plain forward's features) to the clean target-class rows' mean."""
        total = 0.0
        for layer in layers:
            plain = features[layer][0]  # ReScaler's first forward is the undefended one
            clean = plain[k:].detach()
            total = total + ((plain[:k] - clean.mean(0)) ** 2 / (clean.var(0) + 1e-6)).mean()
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
