"""Mode Connectivity Repair (Zhao et al., ICLR 2020; MOTH's baseline, moth_supplementary.txt eq. 14;
ALGORITHMS.md D8), registered as the defense ``mcr``.

The suspect model ω1 and a copy fine-tuned on the trusted images ω2 are joined by a quadratic Bézier curve
``φ_θ(t) = (1−t)²·ω1 + 2t(1−t)·θ + t²·ω2`` whose middle point θ (every parameter, BatchNorm's affine ones
included; starting at (ω1 + ω2)/2) is trained with cross-entropy on the trusted images at a fresh t ~ U(0, 1)
per batch, endpoints fixed. Points along the curve keep clean accuracy while the backdoor, which the path
does not need, fades. Each evaluated point is instantiated, its BatchNorm statistics recomputed on the
trusted images (``torch.optim.swa_utils.update_bn``) as the model saw them in training — with the crop/flip
augmentation: statistics of unaugmented images cost the CIFAR ResNet-20 victims 4 points of CDA at t = 0 —
and measured.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .._validation import is_int, is_number
from ..data import ImageTensorDataset, random_crop_flip
from ..models import GuardModel
from ..train import train
from .base import AsrProbe, Defense, RepairResult, register_defense
from .finetune import TrustedTuningConfig, choose_on_curve, measure_point

logger = logging.getLogger(__name__)

__all__ = ["ModeConnectivityConfig", "ModeConnectivityRepair", "bezier"]


@dataclass(frozen=True)
class ModeConnectivityConfig(TrustedTuningConfig):
    """MCR settings (ALGORITHMS.md D8; the MCR code): the endpoint ω2 is fine-tuned ``endpoint_steps`` 1,000
    steps, the curve's middle point trained ``steps`` 1,000 steps (the code's 100 epochs of a 2.5 % clean set),
    both SGD at lr 0.01 (momentum 0.9, weight decay 1e-4, no Nesterov), batch 128; the curve is evaluated at
    ``points`` t = 0.1, …, 0.9. Without ASR the chosen t is the most accurate point within the CDA budget,
    ties going to the one farthest from both endpoints (D8's default). Each point's BatchNorm statistics are
    recomputed over ``bn_passes`` passes of the trusted images (augmented when ``augment``; the same images
    for every point)."""

    lr: float = 0.01
    nesterov: bool = False
    weight_decay: float = 1e-4
    eval_every: int = 100
    endpoint_steps: int = 1000
    points: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    bn_passes: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("endpoint_steps", "bn_passes"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (not isinstance(self.points, tuple) or not self.points
                or not all(is_number(t) and 0 <= t <= 1 for t in self.points)):
            raise ValueError(f"points must be a non-empty tuple of curve positions t in [0, 1], got {self.points!r}")


def bezier(t: float | torch.Tensor, start: torch.Tensor, middle: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The quadratic Bézier point ``(1−t)²·start + 2t(1−t)·middle + t²·end``
    (moth_supplementary.txt eq. 14)."""
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * middle + t ** 2 * end


class _Curve(nn.Module):
    """The model's architecture along the curve between fixed endpoints; only the middle point trains.
    :meth:`draw` picks the t of the next forward passes."""

    def __init__(self, model: GuardModel, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.names = [name for name, _ in model.named_parameters()]
        self.start, self.end = start, end
        self.middle = nn.ParameterList([nn.Parameter((start[n] + end[n]) / 2) for n in self.names])
        self.t = 0.5

    def point(self, t: float) -> dict[str, torch.Tensor]:
        return {n: bezier(t, self.start[n], m, self.end[n]) for n, m in zip(self.names, self.middle, strict=True)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, self.point(self.t), (x,))


@register_defense
class ModeConnectivityRepair(Defense):
    """Repair by a point on a trained Bézier curve between the model and its fine-tuned copy (ALGORITHMS.md
    D8). The history holds the input model (step 0) and one point per t of ``points``, its ``step`` 100·t;
    ``details["t"]`` the chosen t (``None``: no point within the CDA budget, the input model is kept)."""

    name = "mcr"
    config_class = ModeConnectivityConfig
    kind = "repair"
    description = "Mode Connectivity Repair: a point on a Bezier curve to the fine-tuned model (D8)"

    def _defend(self, model: GuardModel, trusted: ImageTensorDataset, *, eval_set: torch.utils.data.Dataset,
                asr: AsrProbe | None, generator: torch.Generator, device: torch.device,
                progress: bool) -> RepairResult:
        cfg = self.config

        first = measure_point(model, eval_set, asr, 0, device)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        endpoint = copy.deepcopy(model)
        endpoint_run = dataclasses.replace(cfg, steps=cfg.endpoint_steps, eval_every=cfg.endpoint_steps)
        train(endpoint, trusted, endpoint_run.train_config(), generator=generator, device=device, progress=progress)
        end = {n: p.detach().clone() for n, p in endpoint.named_parameters()}
        del endpoint

        curve = _Curve(model, start, end).to(device)

        def draw(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            curve.t = float(torch.rand((), generator=generator))
            return x

        try:
            train(curve, trusted, cfg.train_config(), generator=generator, device=device, progress=progress,
                  transform=draw)
        finally:
            model.requires_grad_(True)
        images = [(random_crop_flip(x, generator) if cfg.augment else x,) for _ in range(cfg.bn_passes)
                  for x in (chunk.to(device).float().div_(255) for chunk in trusted.images.split(cfg.batch_size))]

        def instantiate(t: float | None) -> None:
            """The curve's point t with BatchNorm statistics recomputed; ``None``: the input model."""
            with torch.no_grad():
                for name, value in (start if t is None else curve.point(t)).items():
                    model.get_parameter(name).copy_(value)
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
            if t is not None:
                update_bn(images, model)
            model.eval()

        points = []
        for t in cfg.points:
            instantiate(t)
            points.append((t, measure_point(model, eval_set, asr, round(100 * t), device)))
        t, chosen = choose_on_curve(first, points, cfg.max_cda_drop, lambda admissible: max(
            admissible, key=lambda tp: (tp[1].cda, -abs(tp[0] - 0.5))))
        instantiate(t)
        logger.info("MCR: chose t = %s (CDA %.4f, ASR %s)", t, chosen.cda, chosen.asr)
        return RepairResult(model, (first, *(p for _, p in points)), chosen, first.cda, cfg.max_cda_drop, False,
                            0.0, details={"t": t, "points": list(cfg.points)})
