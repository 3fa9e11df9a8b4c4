"""Turn one HTTP request into one model input, or into a :class:`BadRequest` for that request alone.

Accepted bodies: image bytes (PNG, JPEG, BMP, GIF, WebP, TIFF) as the raw body or as a multipart file
field, or JSON ``{"image": "<base64 of those bytes>"}`` (a ``data:image/...;base64,`` prefix is allowed).
Every failure raises :class:`BadRequest` with the HTTP status and a message that says what was expected
and what was received; the server answers that request with it while its batch-mates go on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from .config import GuardConfig

#: image formats Pillow may open; others (EPS, PDF, ...) are refused rather than handed to a plugin
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
#: request fields that may carry the image, in order of preference (``body`` is a raw request body)
IMAGE_FIELDS = ("data", "file", "image", "body")
_JSON_TYPES = ("application/json", "text/json")
_BYTES_TYPES = ("application/octet-stream", "")
_EXPECTED_TYPES = "image/*, application/octet-stream, application/json or multipart/form-data"
# 16-bit and 32-bit integer grayscale modes and the value that maps to white
_WIDE_GRAY = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}
_MODE_NAMES = {"L": "8-bit grayscale", "LA": "grayscale with alpha", "P": "palette", "PA": "palette with alpha",
               "RGBA": "RGB with alpha", "RGBa": "RGB with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr",
               "1": "1-bit", "F": "32-bit float", **{m: "16-bit grayscale" for m in _WIDE_GRAY if m != "I"},
               "I": "32-bit integer grayscale"}


class BadRequest(ValueError):
    """One request the server cannot answer with a prediction; ``status`` is the HTTP code it gets: a 4xx for
    the request's fault, a 5xx for the server's (e.g. 507: it did not fit in memory even alone)."""

    def __init__(self, status: int, message: str, *, kind: str = "BadRequest",
                 details: dict[str, object] | None = None) -> None:
        if not 400 <= status < 600:
            raise ValueError(f"an unanswered request maps to a 4xx or 5xx status, got {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.details = dict(details or {})

    def to_dict(self) -> dict[str, object]:
        """The response body: ``{"code", "type", "message"}`` and any details (a refusal's score and threshold)."""
        return {"code": self.status, "type": self.kind, "message": self.message, **self.details}


def select_field(request: Mapping[str, object]) -> str:
    """The request field holding the image: one of :data:`IMAGE_FIELDS`, or the only field there is."""
    for name in IMAGE_FIELDS:
        if name in request:
            return name
    if len(request) == 1:
        return next(iter(request))
    raise BadRequest(400, f"expected one image field (one of {', '.join(IMAGE_FIELDS)}), "
                          f"got fields {sorted(request)}")


def reject_form_encoding(request_headers: Mapping[str, object]) -> None:
    """Refuse (415) a URL-encoded form body — what ``curl --data-binary`` sends without a type — whose
    bytes the server has already split into meaningless form fields."""
    for name, value in request_headers.items():
        if name.lower() == "content-type" and isinstance(value, str):
            if value.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
                raise BadRequest(415, f"unsupported content type {value!r}; expected {_EXPECTED_TYPES} "
                                      f"(e.g. curl -H 'Content-Type: image/png' --data-binary @image.png, "
                                      f"or curl -F data=@image.png)")


def decode_request(value: object, content_type: str | None, config: GuardConfig,
                   size: tuple[int, int]) -> torch.Tensor:
    """Decode one request body into a float ``(3, H, W)`` tensor in [0, 1] at ``size`` = (H, W).

    ``value`` is the body (bytes, or a dict when the server already parsed JSON) and ``content_type`` its
    media type. Raises :class:`BadRequest` (400 malformed or undecodable, 413 too large, 415 unsupported
    type or colour mode).
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in _JSON_TYPES:
        raw = _image_from_json(value)
    elif kind.startswith("image/") or kind in _BYTES_TYPES:
        raw = _as_bytes(value)
    else:
        raise BadRequest(415, f"unsupported content type {content_type!r}; expected {_EXPECTED_TYPES} "
                              f"(e.g. curl -H 'Content-Type: image/png' --data-binary @image.png, "
                              f"or curl -F data=@image.png)")
    if not raw:
        raise BadRequest(400, "empty request body; expected the bytes of an image (PNG, JPEG, ...)")
    image = open_image(raw, config.max_image_pixels)
    return fit_to_size(to_tensor(image, config.convert_color), size, config.resize)


def _as_bytes(value: object) -> bytes:
    """A raw body's bytes; a string is a parsed JSON field (a KServe instance ``{"data": "<base64>"}``)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return _base64(value, "the request's string field")
    raise BadRequest(400, f"expected image bytes in the request body, got {type(value).__name__}")


def _image_from_json(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, str)):
        text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
        if not text.strip():
            raise BadRequest(400, "empty JSON body; expected {\"image\": \"<base64 PNG/JPEG>\"}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(400, f"malformed JSON body ({exc.msg} at position {exc.pos}); "
                                  "expected {\"image\": \"<base64 PNG/JPEG>\"}") from None
    if not isinstance(value, dict) or not isinstance(value.get("image"), str):
        got = (f"an object with keys {sorted(value)}" if isinstance(value, dict)
               else f"a JSON {type(value).__name__}")
        raise BadRequest(400, f"expected a JSON object {{\"image\": \"<base64 PNG/JPEG>\"}}, got {got}")
    return _base64(value["image"], '"image"')


def _base64(text: str, where: str) -> bytes:
    """The bytes of base64 ``text`` (a ``data:image/...;base64,`` prefix allowed)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest(400, f"expected a base64 data URL (data:image/...;base64,...), got {header!r}")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, f"malformed base64 in {where} ({exc}); expected the base64 of an image") from None


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Open and decode image bytes, refusing decompression bombs from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(413, f"image too large ({exc}); the limit is {max_pixels} pixels "
                              f"(decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise BadRequest(400, f"could not decode the body as an image ({len(raw)} bytes starting "
                              f"{raw[:8]!r}); expected one of {', '.join(IMAGE_FORMATS)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadRequest(413, f"image too large: {width}x{height} = {width * height} pixels, the limit is "
                              f"{max_pixels} (decompression-bomb guard)")
    if width < 1 or height < 1:
        raise BadRequest(400, f"image has no pixels ({width}x{height})")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data after a valid header
        raise BadRequest(400, f"could not decode the {image.format} image: {exc}") from None
    return image


def to_tensor(image: Image.Image, convert_color: bool) -> torch.Tensor:
    """A float ``(3, H, W)`` tensor in [0, 1]; 16-bit grayscale is scaled by 65535, not clipped at 255."""
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    elif not convert_color:
        raise BadRequest(415, f"expected an 8-bit RGB image, got mode {mode!r} "
                              f"({_MODE_NAMES.get(mode, 'unsupported')}); convert it to RGB first")
    elif mode in _WIDE_GRAY:
        gray = np.asarray(image).astype(np.float64)
        if gray.min() < 0 or gray.max() > _WIDE_GRAY[mode]:
            raise BadRequest(415, f"integer grayscale image with values in [{gray.min():.0f}, {gray.max():.0f}]; "
                                  f"expected 8- or 16-bit values")
        array = np.repeat((gray / _WIDE_GRAY[mode]).astype(np.float32)[..., None], 3, axis=2)
    elif mode == "F":
        raise BadRequest(415, "floating-point images are not supported; expected 8-bit or 16-bit integer pixels")
    else:
        if mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")
        array = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def fit_to_size(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Bring a ``(3, h, w)`` image to ``size`` = (H, W) as :attr:`GuardConfig.resize` says."""
    height, width = size
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if mode == "exact":
        raise BadRequest(400, f"expected a {width}x{height} image (width x height), got {w}x{h}")
    if mode == "stretch":
        out = TF.resize(image, [height, width], antialias=True)
    else:  # center-crop: scale so both sides cover the target, then crop the centre
        scale = max(height / h, width / w)
        out = TF.resize(image, [max(height, round(h * scale)), max(width, round(w * scale))], antialias=True)
        out = TF.center_crop(out, [height, width])
    return out.clamp_(0.0, 1.0)
