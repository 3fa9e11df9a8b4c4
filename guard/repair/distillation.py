"""Neural Attention Distillation (Li et al., ICLR 2021; pick_your_poison.txt A.3, Table 5; ALGORITHMS.md D6),
registered as the defense ``nad``.

A teacher — a copy of the suspect model fine-tuned with cross-entropy on the trusted images — is frozen; the
suspect model (the student) is then fine-tuned on the same images with cross-entropy plus ``β · Σ_k
L_AT(F_k^S, F_k^T)`` over the outputs F_k of its residual stages, through the shared loop P4. The attention map
of a feature map F (N×C×H×W) is ``A = Σ_c |F_c|^p`` normalised by its spatial L2 norm; L_AT is the mean squared
difference of the student's and the teacher's maps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch

from .._validation import is_int, is_number
from ..data import ImageTensorDataset
from ..models import GuardModel
from ..rescaler import find_stages
from ..train import train
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig

logger = logging.getLogger(__name__)

__all__ = ["AttentionDistillation", "AttentionDistillationConfig", "attention_map"]


@dataclass(frozen=True)
class AttentionDistillationConfig(TrustedTuningConfig):
    """NAD settings, Table 5's CIFAR-10 column: a teacher fine-tuned ``teacher_steps`` 1,000 steps, then 2,000
    student steps, both SGD at lr 0.01 (momentum 0.9, Nesterov), ``beta`` λ_at = 1,000 on every stage's
    attention map of power ``p`` = 2."""

    steps: int = 2000
    lr: float = 0.01
    teacher_steps: int = 1000
    beta: float = 1000.0
    p: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("teacher_steps", "p"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not is_number(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")


def attention_map(features: torch.Tensor, p: int = 2) -> torch.Tensor:
    """NAD's attention map of an ``(N, C, H, W)`` feature map: ``Σ_c |F_c|^p`` per pixel, divided by its L2
    norm over the pixels (+1e-6), flattened to ``(N, H·W)``."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be an (N, C, H, W) tensor, got {got}")
    a = features.abs().pow(p).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + 1e-6)


@register_defense
class AttentionDistillation(Defense):
    """Repair by attention distillation from a fine-tuned teacher (ALGORITHMS.md D6)."""

    name = "nad"
    config_class = AttentionDistillationConfig
    kind = "repair"
    description = "Neural Attention Distillation from a fine-tuned teacher on every residual stage (D6)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config
        stages = find_stages(model)
        if not stages:
            raise ValueError(f"NAD distils the outputs of residual stages; {model.spec.name} has none (expected "
                             f"nn.Sequential containers of residual blocks known to guard.rescaler.register_block)")
        teacher = copy.deepcopy(model)
        teacher_run = dataclasses.replace(cfg, steps=cfg.teacher_steps, eval_every=cfg.teacher_steps)
        train(teacher, trusted, teacher_run.train_config(), generator=generator, device=device, progress=progress)
        teacher.eval().requires_grad_(False)

        student_maps: list[torch.Tensor] = []
        teacher_maps: list[torch.Tensor] = []

        def keep(into: list[torch.Tensor], training_only: bool):
            def hook(module, inputs, output):
                if module.training or not training_only:  # not the student's evaluations between epochs
                    into.append(output)
            return hook

        def distillation(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher(x)
            loss = sum(torch.mean((attention_map(s, cfg.p) - attention_map(t, cfg.p)) ** 2)
                       for s, t in zip(student_maps, teacher_maps, strict=True))
            student_maps.clear()
            teacher_maps.clear()
            return cfg.beta * loss

        handles = [model.get_submodule(s).register_forward_hook(keep(student_maps, True)) for s in stages]
        handles += [teacher.get_submodule(s).register_forward_hook(keep(teacher_maps, False)) for s in stages]
        try:
            result = cfg.run(model, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                             progress=progress, extra_loss=distillation)
        finally:
            for h in handles:
                h.remove()
        return dataclasses.replace(result, details={"stages": stages})
