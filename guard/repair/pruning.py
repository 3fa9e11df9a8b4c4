"""Pruning defenses: Fine-Pruning (Liu et al., RAID 2018; pick_your_poison.txt A.3, Table 5; ALGORITHMS.md D5),
registered as ``fine-pruning``, and Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021; D7) as ``anp``
(see :class:`AdversarialNeuronPruning`).

Fine-Pruning:

A backdoor can live in neurons of the last convolutional layer that clean images leave dormant. The neurons of
a residual network's last layer are the channels of its final feature map (after the last residual addition —
a pruned convolution filter would still pass its channel through the shortcut), and global pooling makes each
channel's mean activation one penultimate feature (:meth:`GuardModel.features`). So pruning channel c zeroes
column c of the final linear layer, and it stays zero through the fine-tuning (``torch.nn.utils.prune``).

1. Mean activation of every channel over the trusted images.
2. Prune channels in increasing order of mean activation while the held-out accuracy stays within
   ``prune_drop`` of the unpruned model's (Liu et al.: 4 points), at most a fraction ``ratio`` of them (PyP:
   96 %); with ``prune_drop=None`` exactly ``ratio`` of them.
3. Fine-tune every weight with cross-entropy through the shared loop P4, whose CDA budget starts at the pruned
   model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from .._validation import is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..train import evaluate, train
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig, choose_on_curve, measure_point

logger = logging.getLogger(__name__)

__all__ = ["ANP_THRESHOLDS", "AdversarialNeuronPruning", "AdversarialNeuronPruningConfig", "FinePruning",
           "FinePruningConfig", "channel_activations"]


@dataclass(frozen=True)
class FinePruningConfig(TrustedTuningConfig):
    """Fine-Pruning settings: prune at most ``ratio`` (Table 5: 96 %) of the last layer's channels, fewer when
    the held-out accuracy would fall more than ``prune_drop`` below the unpruned model's (Liu et al.'s 4 points;
    ``None``: prune exactly ``ratio``), then fine-tune 1,000 steps at lr 1e-3 (Table 5)."""

    ratio: float = 0.96
    prune_drop: float | None = 0.04

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.ratio) or not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be a fraction of the channels in (0, 1), got {self.ratio!r}")
        if self.prune_drop is not None and (not is_number(self.prune_drop) or not 0 <= self.prune_drop < 1):
            raise ValueError(f"prune_drop must be None or an accuracy drop in [0, 1) (0.04 = 4 points), "
                             f"got {self.prune_drop!r}")


@torch.no_grad()
def channel_activations(model: GuardModel, images: ImageTensorDataset, *, batch_size: int = 256,
                        device: torch.device | None = None) -> torch.Tensor:
    """Mean activation of every channel of the final feature map over ``images`` (uint8), shape ``(D,)``."""
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        total = None
        for chunk in images.images.split(batch_size):
            f = model.features(chunk.to(device, dtype).div_(255)).sum(0)
            total = f if total is None else total + f
    finally:
        model.train(was_training)
    mean = total / len(images)
    if not torch.isfinite(mean).all():
        raise ValueError("the model's penultimate features are NaN or infinite on the trusted images; "
                         "expected finite activations to rank its channels")
    return mean


@register_defense
class FinePruning(Defense):
    """Prune the last layer's dormant channels, then fine-tune (Liu et al. 2018; ALGORITHMS.md D5)."""

    name = "fine-pruning"
    config_class = FinePruningConfig
    kind = "repair"
    description = "Fine-Pruning: prune the last layer's channels dormant on trusted data, then fine-tune (D5)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        head = model.classifier
        order = channel_activations(model, trusted, device=device).argsort().cpu()   # dormant first
        channels = order.numel()
        most = min(math.floor(cfg.ratio * channels), channels - 1)

        def masked(count: int) -> torch.Tensor:
            mask = torch.ones_like(head.weight)
            mask[:, order[:count].to(mask.device)] = 0
            return mask

        cda_unpruned = evaluate(model, eval_set, device=device)
        count = most
        if cfg.prune_drop is not None:
            # the largest count whose accuracy stays within the drop (accuracy falls as channels go)
            low, high = 0, most
            original = head.weight.detach().clone()
            while low < high:
                mid = (low + high + 1) // 2
                head.weight.data.mul_(masked(mid))
                ok = evaluate(model, eval_set, device=device) >= cda_unpruned - cfg.prune_drop
                head.weight.data.copy_(original)
                low, high = (mid, high) if ok else (low, mid - 1)
            count = low
        logger.info("fine-pruning: %d of %d channels pruned", count, channels)
        prune.custom_from_mask(head, "weight", masked(count))
        try:
            result = cfg.run(model, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                             progress=progress)
        finally:
            prune.remove(head, "weight")
        details = {"channels": channels, "pruned": order[:count].tolist(), "cda_unpruned": cda_unpruned}
        return dataclasses.replace(result, details=details)


# ------------------------------------------------------------------------------------ adversarial neuron pruning

@dataclass(frozen=True)
class AdversarialNeuronPruningConfig(TrustedTuningConfig):
    """ANP settings (ALGORITHMS.md D7; the ANP code's CIFAR-10 recipe): ``steps`` 2,000 mask updates of SGD
    (lr 0.2, momentum 0.9, no Nesterov) on batches of 128 trusted images; perturbation bound ``eps`` 0.4 on
    every neuron's multiplicative noise, one signed ascent step on it per batch; trade-off ``alpha`` 0.2 between
    the clean and the perturbed loss; neurons with mask < ``threshold`` 0.2 are pruned. The thresholds 0, 0.05,
    …, 0.9 form the trade-off curve (the code's sweep); ``eval_every``: steps between the mask records of
    ``details["rounds"]``."""

    steps: int = 2000
    lr: float = 0.2
    nesterov: bool = False
    eval_every: int = 500
    eps: float = 0.4
    alpha: float = 0.2
    threshold: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not is_number(self.alpha) or not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (the clean loss's weight), got {self.alpha!r}")
        if not is_number(self.threshold) or not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be a mask value in (0, 1), got {self.threshold!r}")


#: the pruning thresholds of the trade-off curve (the ANP code's sweep)
ANP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))


class _NeuronMasks(nn.Module):
    """The model with a mask m ∈ [0, 1] on every BatchNorm neuron (γ → γ·m) and, during the inner
    maximisation, multiplicative noise (γ → γ·(m + δ), β → β·(1 + ξ)); only the masks are trainable."""

    def __init__(self, model: GuardModel) -> None:
        super().__init__()
        self.model = model
        self.layers = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.affine]
        if not self.layers:
            raise ValueError(f"ANP masks BatchNorm neurons; {model.spec.name} has no affine BatchNorm layer")
        self.masks = nn.ParameterList([nn.Parameter(torch.ones_like(model.get_submodule(n).weight))
                                       for n in self.layers])

    def forward(self, x: torch.Tensor, noise: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        params = {}
        for i, name in enumerate(self.layers):
            bn = self.model.get_submodule(name)
            scale = self.masks[i] if noise is None else self.masks[i] + noise[i][0]
            params[f"{name}.weight"] = bn.weight * scale
            if noise is not None:
                params[f"{name}.bias"] = bn.bias * (1 + noise[i][1])
        return torch.func.functional_call(self.model, params, (x,))


@register_defense
class AdversarialNeuronPruning(Defense):
    """Prune the neurons most sensitive to adversarial neuron perturbation (Wu & Wang, NeurIPS 2021;
    ALGORITHMS.md D7).

    Masks are learnt through the one training loop: its cross-entropy is the clean (mask-only) loss, the
    perturbed loss rides on ``extra_loss`` with weight (1 − α)/α and the learning rate is scaled by α — the
    same SGD steps as minimising α·L_clean + (1 − α)·L_perturbed at ``lr`` — and the masks are projected onto
    [0, 1] before every forward pass. As in the ANP code the masks are learnt in training mode (batch
    statistics) and the pruning applies to the model's own running statistics, restored afterwards.
    Pruning zeroes the BatchNorm weight γ of every neuron whose mask is
    below the threshold; the chosen point is the lowest-ASR admissible threshold when ASR is measured, else the
    configured ``threshold`` (or the largest admissible one below it). The history holds the input model
    (step 0) and one point per threshold of :data:`ANP_THRESHOLDS`, whose ``step`` is the number of neurons it
    prunes.
    """

    name = "anp"
    config_class = AdversarialNeuronPruningConfig
    kind = "repair"
    description = "Adversarial Neuron Pruning: BatchNorm neuron masks under adversarial neuron noise (D7)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config

        first = measure_point(model, eval_set, asr, 0, device)
        masked = _NeuronMasks(model.requires_grad_(False)).to(device)
        rounds: list[dict] = []

        def project(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                for m in masked.masks:
                    m.clamp_(0, 1)
            return x

        def perturbed(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            noise = [tuple(((torch.rand(m.shape, generator=generator) * 2 - 1) * cfg.eps).to(m).requires_grad_()
                           for _ in range(2)) for m in masked.masks]
            flat = [t for pair in noise for t in pair]
            grads = torch.autograd.grad(F.cross_entropy(masked(x, noise), y), flat)
            noise = [((d + cfg.eps * gd.sign()).detach(), (b + cfg.eps * gb.sign()).detach())
                     for (d, b), gd, gb in zip(noise, grads[0::2], grads[1::2], strict=True)]
            return (1 - cfg.alpha) / cfg.alpha * F.cross_entropy(masked(x, noise), y)

        def record(stats) -> None:
            below = sum(int((m < cfg.threshold).sum()) for m in masked.masks)
            rounds.append({"step": stats.epoch * cfg.eval_every, "below_threshold": below})

        config = dataclasses.replace(cfg.train_config(), lr=cfg.lr * cfg.alpha)
        statistics = {name: b.detach().clone() for name, b in model.named_buffers()}
        try:
            train(masked, trusted, config, generator=generator, device=device, progress=progress,
                  extra_loss=perturbed, transform=project, callback=record)
        finally:
            model.requires_grad_(True)
            with torch.no_grad():  # the perturbed forward passes moved the running statistics
                for name, b in model.named_buffers():
                    b.copy_(statistics[name])
        project(None, None)  # the last step's projection
        masks = torch.cat([m.detach().flatten() for m in masked.masks])
        layers = [model.get_submodule(n) for n in masked.layers]
        original = [bn.weight.detach().clone() for bn in layers]

        def prune_below(threshold: float) -> int:
            count = 0
            with torch.no_grad():
                for bn, weight, m in zip(layers, original, masked.masks, strict=True):
                    cut = m.detach() < threshold
                    bn.weight.copy_(torch.where(cut, torch.zeros_like(weight), weight))
                    count += int(cut.sum())
            return count

        curve = [(t, measure_point(model, eval_set, asr, prune_below(t), device)) for t in ANP_THRESHOLDS]
        threshold, chosen = choose_on_curve(first, curve, cfg.max_cda_drop, lambda admissible: max(
            (tp for tp in admissible if tp[0] <= cfg.threshold), default=admissible[0], key=lambda tp: tp[0]))
        threshold = 0.0 if threshold is None else threshold
        prune_below(threshold)
        model.eval()
        logger.info("ANP: threshold %.2f prunes %d of %d neurons (CDA %.4f)", threshold, chosen.step,
                    masks.numel(), chosen.cda)
        details = {"neurons": masks.numel(), "threshold": threshold, "rounds": rounds,
                   "thresholds": [t for t, _ in curve],
                   "mask_quantiles": torch.quantile(masks, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()}
        return RepairResult(model, (first, *(p for _, p in curve)), chosen, first.cda, cfg.max_cda_drop,
                            False, 0.0, details=details)
