"""ISSBA-style sample-specific invisible backdoor — the light substitute of ALGORITHMS.md A13.

ISSBA (Li et al., ICCV 2021) hides a secret bit string in every image with a StegaStamp encoder; the
sample-specific, imperceptible residual is the trigger. No pretrained encoder is available here, so (as A13
recommends, marked "ISSBA-substitute") a small U-Net-style encoder and a CNN decoder are trained on the victim's
training images with A13's ``L = BCE(decoder(clip(x + r)), s) + λ·‖r‖²`` (λ = 1; ‖r‖² summed over the
pixels of an image, averaged over the batch), the residual bounded by ``r = ε·tanh(·)``; the poisons are
``clip(x + r(x, s_t))`` for the attacker's fixed secret ``s_t``. The fitted encoder is the attack's state
(:meth:`ISSBA.state_dict`), saved beside a run's record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import BackdoorAttack, PoisonConfig, check_float, check_int, register_attack
from .primitives import from_uint8

logger = logging.getLogger(__name__)

__all__ = ["ISSBA", "ISSBAConfig"]


@dataclass(frozen=True)
class ISSBAConfig(PoisonConfig):
    """``eps``: ℓ∞ bound of the residual (8/255); ``bits``: secret length; ``steps``, ``lr``, ``batch_size``:
    the encoder/decoder training (PyP's code exposes 250 steps for its light version); ``width``: channels;
    ``residual_weight``: λ of A13's ‖r‖² term (1). As in StegaStamp the secret is learnt first: the term stays
    off until the decoder recovers it (running bit accuracy ≥ 0.9), then ramps linearly to λ over a quarter of
    ``steps`` — switched on from the start, it collapses the residual to zero before the decoder has learnt the
    code, and the trigger with it. 10 % poison rate (A13 default)."""

    budget: float = 0.1
    eps: float = 8 / 255
    bits: int = 16
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    width: int = 16
    residual_weight: float = 1.0

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


def _build(make: Callable[[], nn.Module], generator: torch.Generator | None) -> nn.Module:
    """``make()`` built on the meta device, then Kaiming-uniform weights and zero biases drawn from ``generator``
    (``None``: left uninitialised, for a state dict to fill); the global RNG is never touched."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device="cpu")
    if generator is not None:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)
                nn.init.zeros_(m.bias)
    return module


def stega_loss(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, secret: torch.Tensor,
               residual_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A13's loss ``BCE(decoder(clip(x + r)), s) + λ·‖r‖²`` for ``r = encoder(x, s)``; returns (loss, the
    decoder's logits, ‖r‖² averaged over the batch)."""
    r = encoder(x, secret)
    logits = decoder((x + r).clamp(0, 1))
    energy = (r ** 2).flatten(1).sum(1).mean()
    return F.binary_cross_entropy_with_logits(logits, secret) + residual_weight * energy, logits, energy


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
        self.residual_from: int | None = None  # the training step the ||r||^2 term switched on

    def make_params(self, shape, generator):
        return {"secret": torch.randint(0, 2, (self.config.bits,), generator=generator).float()}

    def fit(self, images: torch.Tensor) -> float:
        """Train the encoder/decoder on uint8 ``images`` (N, 3, H, W); returns the decoder's bit accuracy
        on the last batch (how reliably the secret is embedded)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"fit: expected uint8 RGB images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed + 2)
        encoder = _build(lambda: _Encoder(cfg.bits, cfg.width, cfg.eps), g)
        decoder = _build(lambda: _Decoder(cfg.bits, cfg.width, tuple(images.shape[-2:])), g)
        opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=cfg.lr)
        accuracy, running, start = 0.0, 0.5, None
        ramp = max(1, cfg.steps // 4)
        for step in range(cfg.steps):
            idx = torch.randint(0, images.shape[0], (min(cfg.batch_size, images.shape[0]),), generator=g)
            x = from_uint8(images[idx])
            secret = torch.randint(0, 2, (x.shape[0], cfg.bits), generator=g).float()
            # secret first, then ‖r‖² (as StegaStamp): off until the decoder reads the code, then ramped in
            weight = 0.0 if start is None else cfg.residual_weight * min(1.0, (step - start + 1) / ramp)
            loss, logits, _ = stega_loss(encoder, decoder, x, secret, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            accuracy = ((logits > 0).float() == secret).float().mean().item()
            running = 0.9 * running + 0.1 * accuracy
            if start is None and running >= 0.9:
                start = step + 1
        if start is None and cfg.residual_weight > 0:
            logger.warning("issba: the decoder never recovered the secret in %d steps (bit accuracy %.3f), so the "
                           "||r||^2 term stayed off; raise steps", cfg.steps, accuracy)
        logger.info("issba: encoder trained for %d steps, bit accuracy %.3f, ||r||^2 term from step %s",
                    cfg.steps, accuracy, start)
        encoder.eval().requires_grad_(False)
        self.encoder, self.bit_accuracy, self.residual_from = encoder, accuracy, start
        return accuracy

    def poison(self, train_set, generator):
        if self.encoder is None:
            self.check_num_classes(train_set.num_classes)
            self.fit(train_set.images)
        result = super().poison(train_set, generator)
        result.extra.update(encoder_bit_accuracy=self.bit_accuracy, residual_term_from_step=self.residual_from)
        return result

    def state_dict(self):
        """The fitted encoder (what the trigger is, beyond the config); empty before :meth:`fit`."""
        return {} if self.encoder is None else {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    def load_state_dict(self, state):
        cfg = self.config
        encoder = _build(lambda: _Encoder(cfg.bits, cfg.width, cfg.eps), None)
        try:
            encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"issba: the state does not fit an encoder of bits={cfg.bits}, width={cfg.width}: "
                             f"{exc}") from exc
        self.encoder, self.bit_accuracy, self.residual_from = encoder.eval().requires_grad_(False), None, None

    def apply(self, x, params, generator):
        if self.encoder is None:
            raise ValueError("issba: the encoder is trained on the victim's training set by poison() or fit(), or "
                             "loaded from a run's record (guard.attacks.load_record); do one of them before "
                             "applying the trigger")
        encoder = self.encoder.to(x.device)
        secret = params["secret"].to(x).expand(x.shape[0], -1)
        with torch.no_grad():
            return (x + encoder(x, secret)).clamp(0, 1)
