"""ISSBA-style sample-specific invisible backdoor — the light substitute of ALGORITHMS.md A13.

ISSBA (Li et al., ICCV 2021) hides a secret bit string in every image with a StegaStamp encoder; the
sample-specific, imperceptible residual is the trigger. No pretrained encoder is available here, so (as A13
recommends, marked "ISSBA-substitute") a small U-Net-style encoder and a CNN decoder are trained on the victim's
training images with ``L = BCE(decoder(clip(x + r)), s) + λ·mean(r²)/ε²``, the residual bounded by
``r = ε·tanh(·)``; the poisons are ``clip(x + r(x, s_t))`` for the attacker's fixed secret ``s_t``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttackConfig, BackdoorAttack, check_float, check_int, register_attack
from .primitives import from_uint8

logger = logging.getLogger(__name__)

__all__ = ["ISSBA", "ISSBAConfig"]


@dataclass(frozen=True)
class ISSBAConfig(AttackConfig):
    """``eps``: ℓ∞ bound of the residual (8/255); ``bits``: secret length; ``steps``, ``lr``, ``batch_size``:
    the encoder/decoder training (PyP's code exposes 250 steps for its light version); ``width``: channels;
    ``residual_weight`` λ, ramped up linearly over the first half of training — 0 by default: on CPU-sized
    budgets any positive λ we tried collapsed the residual to zero before the decoder learned the code, so
    imperceptibility rests on the ℓ∞ bound ε alone. 10 % poison rate (A13 default)."""

    budget: float = 0.1
    eps: float = 8 / 255
    bits: int = 16
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    width: int = 16
    residual_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        check_int("bits", self.bits, 1)
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("width", self.width, 1)
        check_float("residual_weight", self.residual_weight, 0.0)


class _Encoder(nn.Module):
    """Two-level U-Net: (image, secret) -> residual in [−ε, ε]. As in StegaStamp, the secret first goes
    through a dense layer to a coarse 3×8×8 pattern, upsampled to the image size and concatenated."""

    def __init__(self, bits: int, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.secret = nn.Linear(bits, 3 * 8 * 8)
        self.inc = nn.Conv2d(6, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.Conv2d(3 * width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        planes = F.interpolate(self.secret(secret * 2 - 1).view(-1, 3, 8, 8), size=x.shape[-2:], mode="nearest")
        a = F.relu(self.inc(torch.cat([x - 0.5, planes], 1)))
        b = F.relu(self.mid(F.relu(self.down(a))))
        b = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        return self.eps * torch.tanh(self.out(F.relu(self.up(torch.cat([a, b], 1)))))


class _Decoder(nn.Module):
    """Two stride-2 convolutions and a dense layer over the whole (H/4 × W/4) map: the code is spatial."""

    def __init__(self, bits: int, width: int, size: tuple[int, int]) -> None:
        super().__init__()
        h, w = ((s + 3) // 4 for s in size)
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(2 * width * h * w, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x - 0.5)


def _init(module: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-uniform weights and zero biases drawn from ``generator`` (never the global RNG)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)
            nn.init.zeros_(m.bias)


@register_attack
class ISSBA(BackdoorAttack):
    """ISSBA-substitute: the encoder is fitted on the training set inside :meth:`poison` (or by :meth:`fit`),
    deterministically from ``config.seed``; the trigger of an image is its own encoder residual."""

    name = "issba"
    config_class = ISSBAConfig
    description = "ISSBA-substitute: small trained encoder hides the target's secret bits (Li et al. 2021)"

    def __init__(self, config=None, **options) -> None:
        super().__init__(config, **options)
        self.encoder: _Encoder | None = None
        self.bit_accuracy: float | None = None

    def make_params(self, shape, generator):
        return {"secret": torch.randint(0, 2, (self.config.bits,), generator=generator).float()}

    def fit(self, images: torch.Tensor) -> float:
        """Train the encoder/decoder on uint8 ``images`` (N, 3, H, W); returns the decoder's bit accuracy
        on the last batch (how reliably the secret is embedded)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fit: expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + 2)
        encoder = _Encoder(cfg.bits, cfg.width, cfg.eps)
        decoder = _Decoder(cfg.bits, cfg.width, tuple(images.shape[-2:]))
        _init(encoder, g)
        _init(decoder, g)
        opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=cfg.lr)
        accuracy = 0.0
        for step in range(cfg.steps):
            idx = torch.randint(0, images.shape[0], (min(cfg.batch_size, images.shape[0]),), generator=g)
            x = from_uint8(images[idx])
            secret = torch.randint(0, 2, (x.shape[0], cfg.bits), generator=g).float()
            r = encoder(x, secret)
            logits = decoder((x + r).clamp(0, 1))
            ramp = min(1.0, 2 * step / cfg.steps)  # secret first, then imperceptibility (as StegaStamp)
            loss = F.binary_cross_entropy_with_logits(logits, secret) + \
                ramp * cfg.residual_weight * (r ** 2).mean() / cfg.eps ** 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            accuracy = ((logits > 0).float() == secret).float().mean().item()
        logger.info("issba: encoder trained for %d steps, bit accuracy %.3f", cfg.steps, accuracy)
        encoder.eval().requires_grad_(False)
        self.encoder, self.bit_accuracy = encoder, accuracy
        return accuracy

    def poison(self, train_set, generator):
        if self.encoder is None:
            self.check_num_classes(train_set.num_classes)
            self.fit(train_set.images)
        result = super().poison(train_set, generator)
        result.extra["encoder_bit_accuracy"] = self.bit_accuracy
        return result

    def apply(self, x, params, generator):
        if self.encoder is None:
            raise ValueError("issba: the encoder is trained on the victim's training set by poison() or fit(); "
                             "call one of them before applying the trigger")
        encoder = self.encoder.to(x.device)
        secret = params["secret"].to(x).expand(x.shape[0], -1)
        with torch.no_grad():
            return (x + encoder(x, secret)).clamp(0, 1)
