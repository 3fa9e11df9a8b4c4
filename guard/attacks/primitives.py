"""Trigger operators shared by every attack (ALGORITHMS.md P1), implemented once, in [0, 1] pixel space.

All operators take float batches ``(N, C, H, W)`` in [0, 1] and return new tensors (inputs are never
modified). Poisoned images are stored as 8-bit pixels: :func:`quantize` / :func:`to_uint8` are the one
place that rounding happens (reverse_engineering_cleansing.txt footnote 3; ALGORITHMS.md §0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["add_clip", "blend", "checkerboard", "from_uint8", "mask_blend", "patch_box", "quantize",
           "random_pattern", "stamp", "to_uint8", "warp"]


def _check_batch(x: torch.Tensor, name: str = "images") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"{name}: expected a float tensor of shape (N, C, H, W) in [0, 1], got "
                         f"{x.dtype} of shape {tuple(x.shape)}")


def patch_box(image_hw: tuple[int, int], patch_hw: tuple[int, int],
              location: str | tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``patch_hw`` patch placed at ``location`` in an ``image_hw`` image.

    ``location`` is ``"top-left"``, ``"top-right"``, ``"bottom-left"``, ``"bottom-right"`` or an explicit
    ``(row, col)``; a patch that does not fit raises ``ValueError``.
    """
    (h, w), (ph, pw) = image_hw, patch_hw
    if ph > h or pw > w or ph < 1 or pw < 1:
        raise ValueError(f"patch of size {ph}x{pw} does not fit in a {h}x{w} image")
    corners = {"top-left": (0, 0), "top-right": (0, w - pw), "bottom-left": (h - ph, 0),
               "bottom-right": (h - ph, w - pw)}
    if isinstance(location, str):
        if location not in corners:
            raise ValueError(f"location must be one of {tuple(corners)} or (row, col), got {location!r}")
        return corners[location]
    r, c = location
    if not (0 <= r <= h - ph and 0 <= c <= w - pw):
        raise ValueError(f"a {ph}x{pw} patch at (row, col)=({r}, {c}) leaves the {h}x{w} image; "
                         f"expected row in [0, {h - ph}] and col in [0, {w - pw}]")
    return int(r), int(c)


def stamp(x: torch.Tensor, patch: torch.Tensor, rows: torch.Tensor | int, cols: torch.Tensor | int,
          alpha: float | torch.Tensor = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Patch stamp (P1.1): ``x'[:, R] = (1 - a)·x[:, R] + a·P`` over the rectangle at ``(rows, cols)``.

    ``rows``/``cols`` are ints (same place for every image) or int tensors ``(N,)`` (one place per image);
    ``mask`` (``(ph, pw)`` or ``(N, ph, pw)``, values in [0, 1]) multiplies ``a`` per pixel, which is how
    occluded triggers (Adaptive-Patch) are stamped. ``a = 1`` is opaque BadNets stamping.
    """
    _check_batch(x)
    n, c, h, w = x.shape
    if patch.dim() != 3 or patch.shape[0] not in (1, c):
        raise ValueError(f"patch: expected shape ({c} or 1, ph, pw), got {tuple(patch.shape)}")
    ph, pw = patch.shape[1:]
    rows = torch.as_tensor(rows, device=x.device).expand(n)
    cols = torch.as_tensor(cols, device=x.device).expand(n)
    if ph > h or pw > w:
        raise ValueError(f"patch of size {ph}x{pw} does not fit in a {h}x{w} image")
    if bool((rows < 0).any() | (rows > h - ph).any() | (cols < 0).any() | (cols > w - pw).any()):
        raise ValueError(f"patch positions must keep a {ph}x{pw} patch inside the {h}x{w} image")
    r = rows[:, None] + torch.arange(ph, device=x.device)                     # (N, ph)
    q = cols[:, None] + torch.arange(pw, device=x.device)                     # (N, pw)
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    weight = a.expand(ph, pw) if mask is None else a * mask.to(x)
    weight = weight.expand(n, ph, pw)[:, None]                                # (N, 1, ph, pw)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    ri, ci = r[:, None, :, None], q[:, None, None, :]
    out = x.clone()
    region = x[batch, chan, ri, ci]
    out[batch, chan, ri, ci] = (1 - weight) * region + weight * patch.to(x).expand(c, ph, pw)
    return out


def mask_blend(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Mask–pattern blend (P1.2, Neural Cleanse): ``(1 - m)⊙x + m⊙Δ`` with ``m`` (H, W) over channels."""
    _check_batch(x)
    return (1 - mask.to(x)) * x + mask.to(x) * pattern.to(x)


def blend(x: torch.Tensor, key: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Global blend (P1.3, Chen et al. 2017): ``(1 - α)·x + α·k`` with a full-size key image ``k``."""
    _check_batch(x)
    return (1 - alpha) * x + alpha * key.to(x)


def add_clip(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Additive, clipped (P1.4; Xiang eq. 1): ``clip(x + v)`` to [0, 1]."""
    _check_batch(x)
    return (x + v.to(x)).clamp_(0, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp (P1.5, WaNet): ``grid_sample(x, G, align_corners=True)``; ``grid`` is (H, W, 2) or (N, H, W, 2)."""
    _check_batch(x)
    grid = grid.to(x)
    if grid.dim() == 3:
        grid = grid.expand(x.shape[0], *grid.shape)
    return F.grid_sample(x, grid, align_corners=True).clamp_(0, 1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """8-bit quantization ``q(x) = round(255·clip(x)) / 255`` (ALGORITHMS.md §0.1)."""
    return x.clamp(0, 1).mul(255).round_().div_(255)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 pixels, rounding to the nearest level (same levels as :func:`quantize`)."""
    return x.clamp(0, 1).mul(255).round_().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float images in [0, 1]."""
    return x.float().div_(255)


def checkerboard(size: int | tuple[int, int], channels: int = 3) -> torch.Tensor:
    """A black/white checkerboard patch (C, h, w), white at (0, 0) (the ANP/NAD BadNets trigger)."""
    h, w = (size, size) if isinstance(size, int) else size
    board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0).float()
    return board.expand(channels, h, w).clone()


def random_pattern(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """I.i.d. uniform pixels in [0, 1] on the 8-bit grid: the seeded substitute for image assets (A20)."""
    return torch.randint(0, 256, shape, generator=generator).float().div_(255)
