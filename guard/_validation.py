"""Input checks shared by every entry point: fail early, naming what was expected and what was received."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import logging
import math
import types
import typing
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


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


def resolve_generator(generator: object) -> torch.Generator:
    """The CPU ``torch.Generator`` a procedure draws its randomness from: ``generator`` itself, or a freshly
    seeded one when it is ``None`` (the seed is logged so the run can be repeated)."""
    if generator is None:
        generator = torch.Generator()
        logger.info("no generator given; seeded a fresh one with %d", generator.seed())
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
    return generator


def check_betas(value: object) -> tuple[float, float]:
    """Adam's ``betas``: two numbers in [0, 1); a list is accepted and returned as a tuple."""
    betas = tuple(value) if isinstance(value, (tuple, list)) else value
    if not isinstance(betas, tuple) or len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {value!r}")
    return betas


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``guard[extra]`` that provides it."""


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Fail before any work when ``module`` (a dependency of the ``guard[extra]`` extra) is not importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{purpose} needs the {module!r} module, which is not installed; "
                                f"install it with: pip install 'guard[{extra}]'")


def coerce_option(value: Any, hint: Any) -> Any:
    """Make a parsed literal fit a config field's annotation where the conversion is lossless (int -> float,
    list -> tuple); anything else is left for the config's own validation to reject."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            coerced = coerce_option(value, arg)
            if _fits(coerced, arg):
                return coerced
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        return tuple(coerce_option(v, inner) for v in value)
    if origin is tuple and isinstance(value, (int, float)) and len(args) == 2 and args[1] is Ellipsis:
        return (coerce_option(value, args[0]),)
    return value


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return isinstance(value, tuple)
    if hint is float:
        return isinstance(value, float)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_config_options(config_class: type, items: Sequence[str], *, what: str) -> Any:
    """``key=value`` strings -> a validated instance of the frozen dataclass ``config_class``.

    Values are Python literals (``3``, ``0.01``, ``true``, ``2,5,8`` or ``(2, 5, 8)``); anything that is not a
    literal is taken as a string (``location=bottom-right``). ``outer.inner=value`` sets a field of a nested
    config field (``repair.steps=100``), starting from that field's default. ``what`` names the owner in
    error messages (``"attack 'badnets'"``).
    """
    hints = typing.get_type_hints(config_class)
    options: dict[str, Any] = {}
    nested: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{what} option: expected key=value, got {item!r}")
        head, dot, rest = key.partition(".")
        if head not in hints:
            raise ValueError(f"{what} has no option {head!r}; expected one of {', '.join(hints)}")
        if dot:
            if not dataclasses.is_dataclass(hints[head]):
                raise ValueError(f"{what} option {head!r} has no fields; got {key!r}")
            nested.setdefault(head, []).append(f"{rest}={text}")
            continue
        if key in options:
            raise ValueError(f"{what} option {key!r} given twice")
        options[key] = coerce_option(_literal(text), hints[key])
    for head, sub in nested.items():
        if head in options:
            raise ValueError(f"{what} option {head!r} given both whole and by field")
        default = next(f for f in dataclasses.fields(config_class) if f.name == head)
        base = default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default
        inner = parse_config_options(type(base), sub, what=f"{what} option {head!r}")
        changed = {k.partition("=")[0].strip().partition(".")[0] for k in sub}
        options[head] = dataclasses.replace(base, **{k: getattr(inner, k) for k in changed})
    return config_class(**options)
