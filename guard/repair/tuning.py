"""The fine-tuning baselines of Pick your Poison and MOTH (pick_your_poison.txt A.3, Table 5; ALGORITHMS.md
D15, D16), registered as the defenses ``fine-tune`` and ``weight-decay``.

Both fine-tune every weight of a copy of the model with cross-entropy on the trusted images through the shared
loop :func:`guard.repair.trusted_finetune` (P4); ``weight-decay`` adds SGD's coupled L2 penalty λ_w, which
pulls the weights no clean image supports — a backdoor's among them — towards zero.

Example::

    result = create_defense("weight-decay").defend(model, trusted, eval_set=heldout,
                                                   generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import ImageTensorDataset
from ..models import GuardModel
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig

__all__ = ["FineTuning", "FineTuningConfig", "WeightDecay", "WeightDecayConfig"]


@dataclass(frozen=True)
class FineTuningConfig(TrustedTuningConfig):
    """Plain fine-tuning (ALGORITHMS.md D16; NAD's "Finetuning", MOTH's "Standard Finetune"): the loop's
    defaults, 1,000 steps at lr 1e-3 without weight decay."""


@dataclass(frozen=True)
class WeightDecayConfig(TrustedTuningConfig):
    """Weight-decay fine-tuning (ALGORITHMS.md D15; Table 5, CIFAR-10): 1,000 steps at lr 1e-3 with SGD's
    coupled L2 penalty ``weight_decay`` λ_w = 0.01 (the paper's grid: 0.01 … 1e-5)."""

    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_decay <= 0:
            raise ValueError(f"weight_decay must be > 0 for the weight-decay baseline (0 is the fine-tune "
                             f"defense), got {self.weight_decay!r}")


class _Tuning(Defense):
    """Cross-entropy fine-tuning of every weight with the config's settings."""

    kind = "repair"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        return self.config.run(model, trusted, eval_set=eval_set, asr=asr, generator=generator, device=device,
                               progress=progress)


@register_defense
class FineTuning(_Tuning):
    """Plain fine-tuning on the trusted images (ALGORITHMS.md D16)."""

    name = "fine-tune"
    config_class = FineTuningConfig
    description = "Fine-tuning on trusted data with cross-entropy, stopping at a 2-point CDA loss (D16)"


@register_defense
class WeightDecay(_Tuning):
    """Fine-tuning with an L2 weight penalty (pick_your_poison.txt A.3; ALGORITHMS.md D15)."""

    name = "weight-decay"
    config_class = WeightDecayConfig
    description = "Fine-tuning on trusted data with SGD weight decay 0.01 (PyP's baseline, D15)"
