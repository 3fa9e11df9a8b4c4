"""Parameter-Controlled Backdoor (PCB, pick_your_poison.txt Algorithm 5; ALGORITHMS.md A17).

A supply-chain attack: the attacker controls training. It samples, once, a random subset (fraction ``p``) of
the entries of every parameter tensor and lets the backdoor loss update only that subset, while the clean
loss updates everything — so the backdoor hides in a small, fixed set of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import SupplyChainAttack, _check_dataset, _check_generator, check_float, register_attack
from .patch import PatchConfig, PatchTrigger

__all__ = ["PCB", "PCBConfig"]


@dataclass(frozen=True)
class PCBConfig(PatchConfig):
    """PCB with the BadNets patch trigger (the PyP code default). ``param_fraction`` p = 0.1 of every
    parameter tensor carries the backdoor (ALGORITHMS.md §7 item 15 default); ``batch_fraction`` = 0.1 of
    each batch is triggered and labelled t (the code's value). There is no poisoning budget: the training set
    itself is never modified."""

    param_fraction: float = 0.1
    batch_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("param_fraction", self.param_fraction, 0.0, 1.0, low_open=True)
        check_float("batch_fraction", self.batch_fraction, 0.0, 1.0, low_open=True)


@register_attack
class PCB(PatchTrigger, SupplyChainAttack):
    """PCB (pick_your_poison.txt Alg. 5), a supply-chain attack: its verb is :meth:`train` — the attacker trains
    the model with :func:`guard.train.train` plus a backdoor term whose gradient is masked to the sampled
    subset — and its test-time trigger is the BadNets patch (:class:`~guard.attacks.patch.PatchTrigger`).

    Algorithm 5 alternates steps (even: triggered batch, masked update; odd: clean batch, full update). Here
    both happen in every step — the clean cross-entropy of the batch updates all parameters and the backdoor
    term (``batch_fraction`` of the batch, triggered and labelled t) adds its gradient on the masked entries
    only — so one training loop serves both; the expected update per pair of steps is the same.
    """

    name = "pcb"
    config_class = PCBConfig
    description = "parameter-controlled backdoor: backdoor gradient on a fixed random parameter subset (PyP Alg. 5)"
    refused_options = dict.fromkeys(("budget", "num_poisons"), "pcb never modifies the training set; "
                                    "batch_fraction of every training batch carries the trigger (Alg. 5)")

    def sample_masks(self, model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """SAMPLEPARAMS(θ, p): a fixed random bool mask selecting a fraction p of each trainable tensor."""
        masks = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                masks[name] = torch.rand(p.shape, generator=generator) < self.config.param_fraction
        return masks

    def backdoor_loss(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        """The ``extra_loss(x, y, logits)`` hook for :func:`guard.train.train`: Algorithm 5's even step.

        Its value is the cross-entropy of the first ``batch_fraction`` of ``x``, triggered and labelled t, and
        its gradient is that cross-entropy's gradient restricted to ``masks``. The triggered images are
        forwarded together with the clean rest of the batch, which only sets the BatchNorm statistics: in a
        batch of triggered images alone, the batch statistics subtract the trigger's shared activation, so the
        backdoor would be learned under a normalization that eval mode never applies, and the clean accuracy
        collapses while the backdoor survives into eval mode only for some seeds.
        """
        params = [(p, masks[name]) for name, p in model.named_parameters() if name in masks]

        def extra_loss(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            k = max(1, round(self.config.batch_fraction * x.shape[0]))
            triggered = self.apply(x[:k], self.trigger_params(tuple(x.shape[1:])), None)
            target = torch.full((k,), self.config.target, dtype=torch.int64, device=x.device)
            loss = F.cross_entropy(model(torch.cat([triggered, x[k:]]))[:k], target)
            grads = torch.autograd.grad(loss, [p for p, _ in params], allow_unused=True)
            surrogate = sum((p * (g * m.to(g.device))).sum() for (p, m), g in zip(params, grads) if g is not None)
            return surrogate - surrogate.detach() + loss.detach()

        return extra_loss

    def train(self, model: nn.Module, train_set, config, *, generator: torch.Generator, **train_kwargs: Any):
        """Train ``model`` on the clean ``train_set`` with the PCB backdoor; returns :func:`guard.train.train`'s
        result. The masks are drawn from ``generator`` before training starts."""
        from ..train import train

        _check_dataset(train_set)
        _check_generator(generator)
        self.check_num_classes(train_set.num_classes)
        if "extra_loss" in train_kwargs:
            raise TypeError("PCB.train sets extra_loss itself")
        masks = self.sample_masks(model, generator)
        return train(model, train_set, config, generator=generator,
                     extra_loss=self.backdoor_loss(model, masks), **train_kwargs)

