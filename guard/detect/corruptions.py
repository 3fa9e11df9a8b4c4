"""The common image corruptions at five severities (Hendrycks & Dietterich, ICLR 2019), batched in torch.

The severity parameters are those of CIFAR-10-C (``make_cifar_c.py`` of the ImageNet-C release), which were
chosen for 32×32 images. Every random draw (noise fields, shuffles, blur angles, fog and snow layers, elastic
fields) is made once, when :class:`Corruptions` is built, and shared by every image, so a corrupted image is a
function of the image alone: scores computed from it do not depend on the batch. TeCo (Liu et al., CVPR 2023)
measures how robust a prediction is to these corruptions.

Two corruptions differ from the release: ``shot_noise`` draws the Poisson counts by their normal approximation
(mean and variance λ = c·x) so the draw can be shared, and ``frost`` is absent — it blends in photographs of
frost that guard does not ship — which leaves 14 of the 15.

Example::

    corruptions = Corruptions((3, 32, 32), generator=torch.Generator().manual_seed(0))
    y = corruptions.apply("glass_blur", x, severity=3)    # x: (B, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import jpeg_roundtrip

__all__ = ["CORRUPTIONS", "Corruptions"]

#: the 14 corruptions, in the order of the ImageNet-C release (frost omitted, see the module docstring)
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")

#: CIFAR-10-C severity parameters, severity 1 … 5
PARAMS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),            # radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iterations
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),                          # radius, sigma
    "zoom_blur": (0.06, 0.11, 0.16, 0.21, 0.26),                                          # zooms 1, 1.01, … < 1 + c
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),                        # strength, decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)),                                             # × image size
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _separable(x: torch.Tensor, kernel: torch.Tensor, mode: str = "replicate") -> torch.Tensor:
    """Filter every channel of ``x`` (B, C, H, W) with the 1-D ``kernel`` along both axes."""
    c, r = x.shape[1], len(kernel) // 2
    k = kernel.to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """scikit-image's ``gaussian`` (truncate 4, nearest-edge padding)."""
    return _separable(x, _gaussian_kernel(sigma))


def _filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with a 2-D ``kernel`` (odd size), mirrored borders (OpenCV's default)."""
    c, r = x.shape[1], kernel.shape[0] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), kernel.to(x).expand(c, 1, *kernel.shape), groups=c)


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The anti-aliased disk kernel of defocus blur."""
    size = 8 if radius <= 8 else math.ceil(radius)
    t = torch.arange(-size, size + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    k = torch.exp(-0.5 * (torch.arange(-1, 2, dtype=torch.float64) / alias_blur) ** 2)
    return _separable(disk[None, None], k / k.sum(), mode="reflect")[0, 0]


def _motion_kernel(radius: float, sigma: float, angle: float) -> torch.Tensor:
    """ImageMagick's motion blur: one-sided Gaussian weights along ``angle`` (degrees), integer offsets."""
    width = 2 * int(radius) + 1
    i = torch.arange(width, dtype=torch.float64)
    w = torch.exp(-(i ** 2) / (2 * sigma ** 2))
    w = w / w.sum()
    dx = (i * math.cos(math.radians(angle)) + 0.5).floor().long()
    dy = (i * math.sin(math.radians(angle)) + 0.5).floor().long()
    r = int(max(dx.abs().max(), dy.abs().max()))
    kernel = torch.zeros(2 * r + 1, 2 * r + 1, dtype=torch.float64)
    kernel.index_put_((dy + r, dx + r), w, accumulate=True)
    return kernel


def _motion(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with a motion ``kernel``, edge pixels repeated (ImageMagick's default)."""
    r = kernel.shape[0] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), kernel.to(x).expand(x.shape[1], 1, *kernel.shape),
                    groups=x.shape[1])


def _clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre of ``x`` (B, C, H, W) by ``zoom`` ≥ 1, keeping the size (bilinear)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    out = F.interpolate(crop, size=(round(ch * zoom), round(cw * zoom)), mode="bilinear", align_corners=True)
    th, tw = (out.shape[-2] - h) // 2, (out.shape[-1] - w) // 2
    return out[..., th:th + h, tw:tw + w]


def _plasma(size: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """A diamond-square height map in [0, 1], ``size`` a power of two (the fog layer)."""
    m = torch.zeros(size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(a: torch.Tensor) -> torch.Tensor:
        return a / 4 + wibble * (torch.rand(a.shape, generator=generator, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        square = corners + corners.roll(-1, 0)
        square = square + square.roll(-1, 1)
        m[half:size:step, half:size:step] = wibbled(square)
        dr, ul = m[half:size:step, half:size:step], m[0:size:step, 0:size:step]
        m[0:size:step, half:size:step] = wibbled(dr + dr.roll(1, 0) + ul + ul.roll(-1, 1))
        m[half:size:step, 0:size:step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 0))
        step //= 2
        wibble /= decay
    m = m - m.min()
    return m / m.max()


def _pil_each(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` (PIL image -> PIL image) to every image of ``x`` as 8-bit RGB."""
    arrays = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(fn(Image.fromarray(a))) for a in arrays])
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


class Corruptions:
    """The 14 corruptions of :data:`CORRUPTIONS` for images of ``shape`` (C, H, W), random draws fixed by
    ``generator``."""

    def __init__(self, shape: tuple[int, int, int], generator: torch.Generator) -> None:
        c, h, w = shape
        if c != 3:
            raise ValueError(f"the corruptions act on RGB images; got {c} channels")
        self.shape = (c, h, w)
        g = generator
        self.normal = torch.randn(5, c, h, w, generator=g, dtype=torch.float64)
        self.uniform = torch.rand(5, c, h, w, generator=g, dtype=torch.float64)
        self.shuffles = [self._shuffle(*PARAMS["glass_blur"][s][1:], g) for s in range(5)]
        self.motion = [_motion_kernel(r, sd, float(torch.empty(1).uniform_(-45, 45, generator=g)))
                       for r, sd in PARAMS["motion_blur"]]
        size = 1 << max(h, w).bit_length() if max(h, w) & (max(h, w) - 1) else max(h, w)
        self.fog = [_plasma(size, d, g)[:h, :w] for _, d in PARAMS["fog"]]
        self.snow = [self._snow_layer(p, g) for p in PARAMS["snow"]]
        self.elastic = [self._elastic_grid(p, g) for p in PARAMS["elastic_transform"]]

    # -- draws made once -----------------------------------------------------------------------------------
    def _shuffle(self, delta: int, iterations: int, g: torch.Generator) -> torch.Tensor:
        """Glass blur's local pixel swaps, simulated on pixel indices: a permutation of the H·W positions."""
        _, h, w = self.shape
        index = np.arange(h * w).reshape(h, w)
        draws = torch.randint(-delta, delta, (iterations, h, w, 2), generator=g).numpy()
        for it in range(iterations):
            for i in range(h - delta, delta, -1):
                for j in range(w - delta, delta, -1):
                    dx, dy = draws[it, i, j]
                    index[i, j], index[i + dy, j + dx] = index[i + dy, j + dx], index[i, j]
        return torch.from_numpy(index.reshape(-1).copy())

    def _snow_layer(self, p: tuple, g: torch.Generator) -> torch.Tensor:
        _, h, w = self.shape
        loc, scale, zoom, threshold, radius, sigma, _ = p
        layer = loc + scale * torch.randn(1, 1, h, w, generator=g, dtype=torch.float64)
        layer = _clipped_zoom(layer, zoom)
        layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
        layer = (layer * 255).round() / 255
        kernel = _motion_kernel(radius, sigma, float(torch.empty(1).uniform_(-135, -45, generator=g)))
        return _motion(layer, kernel)[0]

    def _elastic_grid(self, p: tuple, g: torch.Generator) -> torch.Tensor:
        """The sampling grid of the elastic transform: a random affine map of three points, then a smooth
        random displacement field (``grid_sample`` coordinates, (1, H, W, 2))."""
        _, h, w = self.shape
        alpha, sigma, shift = (v * min(h, w) for v in p)
        centre = torch.tensor([w // 2, h // 2], dtype=torch.float64)
        half = min(h, w) // 3
        src = torch.stack([centre + half, centre + torch.tensor([half, -half]), centre - half])
        dst = src + (torch.rand(3, 2, generator=g, dtype=torch.float64) * 2 - 1) * shift
        # the affine map taking dst to src: output pixel (x, y) samples the input at A·(x, y, 1)
        a = torch.linalg.solve(torch.cat([dst, torch.ones(3, 1, dtype=torch.float64)], 1), src).T
        noise = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64) * 2 - 1
        field = alpha * _separable(noise, _gaussian_kernel(sigma, truncate=3), mode="reflect") if sigma > 0 else \
            torch.zeros(2, 1, h, w, dtype=torch.float64)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        xs, ys = xs + field[0, 0], ys + field[1, 0]
        sx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2]
        sy = a[1, 0] * xs + a[1, 1] * ys + a[1, 2]
        return torch.stack([sx / (w - 1) * 2 - 1, sy / (h - 1) * 2 - 1], -1)[None]

    # -- the corruptions -----------------------------------------------------------------------------------
    def apply(self, name: str, x: torch.Tensor, severity: int) -> torch.Tensor:
        """``x`` (B, C, H, W) in [0, 1] under corruption ``name`` at ``severity`` (1 … 5), in [0, 1]."""
        if name not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
        if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
            raise ValueError(f"severity must be an int in 1 … 5, got {severity!r}")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        s = severity - 1
        p = PARAMS[name][s]
        return getattr(self, "_" + name)(x, s, p).clamp(0, 1).to(x.dtype)

    def _gaussian_noise(self, x, s, c):
        return x + c * self.normal[s].to(x)

    def _shot_noise(self, x, s, c):
        return x + (x.clamp_min(0) / c).sqrt() * self.normal[(s + 1) % 5].to(x)

    def _impulse_noise(self, x, s, c):
        u = self.uniform[s].to(x).expand_as(x)
        return torch.where(u < c / 2, torch.zeros_like(x), torch.where(u < c, torch.ones_like(x), x))

    def _defocus_blur(self, x, s, p):
        return _filter2d(x, _disk(*p))

    def _glass_blur(self, x, s, p):
        b, c, h, w = x.shape
        x = (_gaussian_blur(x, p[0]).clamp(0, 1) * 255).floor() / 255
        x = x.flatten(2)[:, :, self.shuffles[s].to(x.device)].view(b, c, h, w)
        return _gaussian_blur(x, p[0])

    def _motion_blur(self, x, s, p):
        return _motion(x, self.motion[s])

    def _zoom_blur(self, x, s, c):
        zooms = torch.arange(1, 1 + c, 0.01, dtype=torch.float64).tolist()
        return (x + sum(_clipped_zoom(x, z) for z in zooms)) / (len(zooms) + 1)

    def _snow(self, x, s, p):
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = p[6] * x + (1 - p[6]) * torch.maximum(x, gray * 1.5 + 0.5)
        layer = self.snow[s].to(x)
        return x + layer + layer.flip(-1, -2)

    def _fog(self, x, s, p):
        peak = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x + p[0] * self.fog[s].to(x)) * peak / (peak + p[0])

    def _brightness(self, x, s, c):
        value = x.amax(1, keepdim=True)
        lifted = (value + c).clamp(max=1)
        return torch.where(value > 0, x * lifted / value.clamp_min(1e-12), lifted.expand_as(x))

    def _contrast(self, x, s, c):
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * c + mean

    def _elastic_transform(self, x, s, p):
        grid = self.elastic[s].to(x).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

    def _pixelate(self, x, s, c):
        _, _, h, w = x.shape
        return _pil_each(x, lambda im: im.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))

    def _jpeg_compression(self, x, s, quality):
        return jpeg_roundtrip(x, quality)
