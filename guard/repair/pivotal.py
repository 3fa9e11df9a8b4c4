"""Pivotal Tuning with the Soft Latent Orthogonalization Loss (pick_your_poison.txt §4.1, Algorithm 3,
Table 5; ALGORITHMS.md D2), registered as the defense ``pivotal``.

A copy θ* of the suspect model θ̃ (the frozen *pivot*) is fine-tuned on trusted data with
``CE + λ_S·SLOL(θ̃, θ*) + λ_P·R(θ̃, θ*)``, pushing its class latents away from the pivot's while keeping its
parameters close to the pivot's, through the shared protocol :func:`guard.repair.trusted_finetune`.

Example::

    from guard.repair import create_defense
    result = create_defense("pivotal", steps=2000).defend(
        model, trusted, eval_set=heldout, asr=lambda m: asr_of(m),   # asr: optional, needs the trigger
        generator=torch.Generator().manual_seed(0))
    result.model, result.chosen.cda, result.chosen.asr, result.history
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig

logger = logging.getLogger(__name__)

__all__ = ["PivotalTuning", "PivotalTuningConfig", "parameter_distance", "slol"]

_SLOL_VARIANTS = ("paper", "code")


def _class_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean feature vector of every class present in ``labels`` (sorted class order), ``(K_b, D)``."""
    classes = torch.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).to(features.dtype)          # (B, K_b)
    return (onehot.T @ features) / onehot.sum(0)[:, None]


def slol(pivot_features: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *,
         variant: str = "paper") -> torch.Tensor:
    """Soft Latent Orthogonalization Loss (pick_your_poison.txt Algorithm 3; ALGORITHMS.md D2).

    Class centroids ``C_i`` of the pivot's latents and ``Ĉ_i`` of the repaired model's latents are taken
    over the classes present in the batch. ``variant="paper"``:
    ``Σ_{i<j} cos(C_i − C_j, Ĉ_i − Ĉ_j) + cos(Ĉ_i, Ĉ_j)``. ``variant="code"`` (the authors' code,
    ALGORITHMS.md §7 item 7): the same cross-model term plus ``‖ĈᵀĈ/K_b − diag(ĈᵀĈ/K_b)‖_F``, the
    diagonal broadcast along rows as in that code. Gradients flow into ``features`` only; with fewer than two classes
    in the batch there is no pair and the loss is 0.
    """
    if variant not in _SLOL_VARIANTS:
        raise ValueError(f"variant must be one of {_SLOL_VARIANTS}, got {variant!r}")
    for name, t in (("pivot_features", pivot_features), ("features", features)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, D) tensor, got {got}")
    if pivot_features.shape != features.shape:
        raise ValueError(f"pivot_features and features must have the same shape, got "
                         f"{tuple(pivot_features.shape)} and {tuple(features.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({features.shape[0]},) tensor, got {got}")
    pivot_c = _class_centroids(pivot_features.detach(), labels)
    own_c = _class_centroids(features, labels)
    k = own_c.shape[0]
    if k < 2:
        return features.sum() * 0.0
    i, j = torch.triu_indices(k, k, offset=1, device=features.device)
    cross = F.cosine_similarity(pivot_c[i] - pivot_c[j], own_c[i] - own_c[j], dim=1).sum()
    if variant == "paper":
        within = F.cosine_similarity(own_c[i], own_c[j], dim=1).sum()
    else:
        cov = own_c.T @ own_c / k
        within = torch.linalg.matrix_norm(cov - torch.diagonal(cov))
    return cross + within


def parameter_distance(pivot: nn.Module, model: nn.Module) -> torch.Tensor:
    """Mean squared parameter difference ``Σ_p ‖θ̃_p − θ*_p‖² / #params`` (the authors' code form of the
    regulariser R, with which Table 5's λ_R magnitudes make sense; ALGORITHMS.md D2, §7 item 8)."""
    total, count = None, 0
    pivot_params = dict(pivot.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(pivot_params):
        extra = sorted(set(names) ^ set(pivot_params))[:3]
        raise ValueError(f"pivot and model have different parameters (e.g. {extra}); expected two copies "
                         f"of one architecture")
    for name, p in model.named_parameters():
        q = pivot_params[name]
        if q.shape != p.shape:
            raise ValueError(f"pivot and model differ at parameter {name!r}; expected two copies of one "
                             f"architecture")
        term = (p - q.detach()).pow(2).sum()
        total = term if total is None else total + term
        count += p.numel()
    if total is None:
        raise ValueError("the model has no parameters")
    return total / count


@dataclass(frozen=True)
class PivotalTuningConfig(TrustedTuningConfig):
    """Pivotal Tuning hyper-parameters; defaults are Table 5's CIFAR-10 column (r = 1 %) of
    pick_your_poison.txt (ALGORITHMS.md D2, T5): 2,000 steps of SGD (momentum 0.9, Nesterov, lr 0.01,
    no weight decay), batch 128, λ_S = 0.05, λ_P = 20,000; (CDA, ASR) every 50 steps; Δ = 0.02 (the loop's
    settings: :class:`~guard.repair.TrustedTuningConfig`). ``slol_variant``: ``"paper"`` or ``"code"``, see
    :func:`slol`.
    """

    steps: int = 2000
    lr: float = 0.01
    slol_lambda: float = 0.05
    param_lambda: float = 20_000.0
    slol_variant: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("slol_lambda", "param_lambda"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.slol_variant not in _SLOL_VARIANTS:
            raise ValueError(f"slol_variant must be one of {_SLOL_VARIANTS}, got {self.slol_variant!r}")


@register_defense
class PivotalTuning(Defense):
    """Repair by Pivotal Tuning + SLOL (pick_your_poison.txt §4.1, Algorithm 3; ALGORITHMS.md D2)."""

    name = "pivotal"
    config_class = PivotalTuningConfig
    kind = "repair"
    description = "Pivotal Tuning with SLOL on trusted data, stopping at a 2-point CDA loss (PyP Alg. 3)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        pivot = copy.deepcopy(model).eval().requires_grad_(False)
        repaired = model.requires_grad_(True)
        captured: list[torch.Tensor] = []

        def capture(module, inputs, output):
            if module.training:  # the training forward only, not the evaluations between epochs
                captured.append(inputs[0])

        def regulariser(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            features = captured.pop().flatten(1)
            captured.clear()
            loss = logits.new_zeros(())
            if cfg.slol_lambda:
                with torch.no_grad():
                    pivot_features = pivot.features(x)
                loss = loss + cfg.slol_lambda * slol(pivot_features, features, y, variant=cfg.slol_variant)
            if cfg.param_lambda:
                loss = loss + cfg.param_lambda * parameter_distance(pivot, repaired)
            return loss

        handle = repaired.classifier.register_forward_hook(capture)
        try:
            return cfg.run(repaired, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                           progress=progress, extra_loss=regulariser)
        finally:
            handle.remove()
