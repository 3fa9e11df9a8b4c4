"""Input checks shared by every entry point: fail early, naming what was expected and what was received."""

from __future__ import annotations

import importlib.util
import math

import torch


def check_images(x: object, input_size: tuple[int, int, int] | None = None, *, name: str = "images",
                 pixel_range: bool = True) -> torch.Tensor:
    """Validate a batch of images ``(B, C, H, W)``, floating point, finite, in [0, 1] when ``pixel_range``.

    Raises ``TypeError`` for a non-tensor or non-float tensor and ``ValueError`` for a wrong rank, channel
    count or size (against ``input_size``), an empty batch, NaN/Inf or values outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (convert with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name}: expected a floating-point tensor with values in [0, 1], got {x.dtype}{hint}")
    expected = "(B, C, H, W)" if input_size is None else f"(B, {', '.join(map(str, input_size))})"
    if x.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"{name}: expected a 4-D batch {expected}, got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got an empty batch {tuple(x.shape)}")
    if input_size is not None and tuple(x.shape[1:]) != tuple(input_size):
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/Inf entries")
    if pixel_range:
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name}: expected pixel values in [0, 1] (normalization happens inside the "
                             f"model), got range [{lo:.4g}, {hi:.4g}]")
    return x


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (config fields must not accept ``True`` as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``guard[extra]`` that provides it."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Fail before any work when ``module`` (a dependency of the ``guard[extra]`` extra) is not importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{purpose} needs the {module!r} module, which is not installed; "
                                f"install it with: pip install 'guard[{extra}]'")
