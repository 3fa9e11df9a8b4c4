"""Request decoding: every accepted form gives the exact pixels; every bad form a 4xx naming the problem."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from guard.serving import BadRequest, GuardConfig, decode_request, reject_form_encoding, select_field
from guard.serving.decode import fit_to_size

SIZE = (16, 16)
CONFIG = GuardConfig()


def _rgb(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, fmt)
    return buf.getvalue()


def _expected(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zeros: a few KB that would decode to width*height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", "", None, "image/jpeg"])
def test_png_body_decodes_to_exact_pixels(content_type):
    array = _rgb()
    out = decode_request(_encode(array), content_type, CONFIG, SIZE)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    assert torch.equal(out, _expected(array))


def test_json_base64_and_data_url_decode_like_the_raw_body():
    array = _rgb(seed=1)
    raw = _encode(array)
    b64 = base64.b64encode(raw).decode()
    expected = _expected(array)
    assert torch.equal(decode_request({"image": b64}, "application/json", CONFIG, SIZE), expected)
    body = json.dumps({"image": f"data:image/png;base64,{b64}"}).encode()
    assert torch.equal(decode_request(body, "application/json; charset=utf-8", CONFIG, SIZE), expected)


def test_jpeg_bmp_webp_decode():
    array = _rgb(seed=2)
    for fmt in ("JPEG", "BMP", "WEBP"):
        out = decode_request(_encode(array, fmt), "image/*", CONFIG, SIZE)
        assert out.shape == (3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1


@pytest.mark.parametrize("value, content_type, status, words", [
    (b"", "image/png", 400, "empty request body"),
    (bytearray(), None, 400, "empty request body"),
    (b"not an image at all", "image/png", 400, "could not decode the body as an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", 400, "could not decode"),
    (b"hello", "text/plain", 415, "unsupported content type 'text/plain'"),
    (b"<xml/>", "application/xml", 415, "expected image/*"),
    (b'{"image": ', "application/json", 400, "malformed JSON"),
    (b"", "application/json", 400, "empty JSON body"),
    ({"img": "abc"}, "application/json", 400, "got an object with keys ['img']"),
    ([1, 2], "application/json", 400, "got a JSON list"),
    ({"image": "not base64!!"}, "application/json", 400, "malformed base64"),
    ({"image": "data:image/png,abc"}, "application/json", 400, "base64 data URL"),
    ({"image": base64.b64encode(b"junk").decode()}, "application/json", 400, "could not decode the body"),
])
def test_bad_bodies_name_the_problem(value, content_type, status, words):
    with pytest.raises(BadRequest) as info:
        decode_request(value, content_type, CONFIG, SIZE)
    assert info.value.status == status
    assert words in info.value.message
    assert info.value.to_dict() == {"code": status, "type": "BadRequest", "message": info.value.message}


def test_truncated_png_is_a_400():
    raw = _encode(_rgb(64, 64))
    with pytest.raises(BadRequest) as info:
        decode_request(raw[: len(raw) // 2], "image/png", CONFIG, SIZE)
    assert info.value.status == 400 and "PNG" in info.value.message


def test_decompression_bomb_is_refused_from_the_header():
    bomb = png_bomb(20_000, 20_000)
    assert len(bomb) < 200_000
    with pytest.raises(BadRequest) as info:
        decode_request(bomb, "image/png", CONFIG, SIZE)
    assert info.value.status == 413
    assert "400000000 pixels" in info.value.message and "decompression-bomb" in info.value.message
    with pytest.raises(BadRequest) as info:
        decode_request(png_bomb(5_000, 4_000), "image/png", CONFIG, SIZE)
    assert info.value.status == 413 and "5000x4000 = 20000000 pixels, the limit is 16000000" in info.value.message
    small_limit = GuardConfig(max_image_pixels=100)
    with pytest.raises(BadRequest) as info:
        decode_request(_encode(_rgb()), "image/png", small_limit, SIZE)
    assert info.value.status == 413 and "16x16 = 256 pixels" in info.value.message


def test_grayscale_rgba_palette_convert_to_rgb():
    array = _rgb(seed=3)
    gray = np.array(Image.fromarray(array).convert("L"))
    out = decode_request(_encode(gray), "image/png", CONFIG, SIZE)
    assert torch.equal(out, torch.from_numpy(gray).float().div(255).expand(3, -1, -1))
    rgba = np.concatenate([array, np.full((16, 16, 1), 7, np.uint8)], axis=2)
    assert torch.equal(decode_request(_encode(rgba), "image/png", CONFIG, SIZE), _expected(array))
    palette = _encode(array, mode="P")
    expected = _expected(np.asarray(Image.open(io.BytesIO(palette)).convert("RGB")))
    assert torch.equal(decode_request(palette, "image/png", CONFIG, SIZE), expected)


def test_16_bit_grayscale_is_scaled_not_clipped():
    gray16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0 .. 65535
    out = decode_request(_encode(gray16), "image/png", CONFIG, SIZE)
    assert torch.allclose(out[0], torch.from_numpy(gray16.astype(np.float32) / 65535), atol=1e-6)
    assert torch.equal(out[0], out[2])
    assert float(out.mean()) == pytest.approx(0.5, abs=0.01)  # clipping at 255 would give nearly all white


@pytest.mark.parametrize("array, mode_name", [
    (np.zeros((16, 16), np.uint8), "8-bit grayscale"),
    (np.zeros((16, 16, 4), np.uint8), "RGB with alpha"),
    (np.zeros((16, 16), np.uint16), "16-bit grayscale"),
])
def test_strict_color_policy_refuses_non_rgb(array, mode_name):
    with pytest.raises(BadRequest) as info:
        decode_request(_encode(array), "image/png", GuardConfig(convert_color=False), SIZE)
    assert info.value.status == 415 and mode_name in info.value.message and "RGB" in info.value.message


def test_resize_modes():
    image = torch.rand(3, 20, 40)
    crop = fit_to_size(image, (10, 10), "center-crop")
    assert crop.shape == (3, 10, 10)
    scaled = fit_to_size(image, (10, 20), "stretch")
    assert torch.allclose(crop, scaled[:, :, 5:15])  # same scale, centre columns
    assert fit_to_size(image, (20, 40), "exact") is image
    with pytest.raises(BadRequest) as info:
        fit_to_size(image, (16, 16), "exact")
    assert info.value.status == 400
    assert "expected a 16x16 image" in info.value.message and "got 40x20" in info.value.message
    big = decode_request(_encode(_rgb(64, 48)), "image/png", CONFIG, SIZE)
    assert big.shape == (3, 16, 16) and 0 <= float(big.min()) and float(big.max()) <= 1


def test_select_field_and_form_encoding():
    assert select_field({"body": b"x"}) == "body"
    assert select_field({"data": b"x", "other": b"y"}) == "data"
    assert select_field({"upload": b"x"}) == "upload"
    with pytest.raises(BadRequest, match="expected one image field"):
        select_field({"a": b"x", "b": b"y"})
    reject_form_encoding({"Content-Type": "image/png"})
    with pytest.raises(BadRequest) as info:
        reject_form_encoding({"content-type": "application/x-www-form-urlencoded"})
    assert info.value.status == 415 and "--data-binary" in info.value.message


def test_an_unanswered_request_status_must_be_4xx_or_5xx():
    assert BadRequest(507, "out of memory", kind="OutOfMemory").to_dict()["code"] == 507
    for status in (200, 302, 600):
        with pytest.raises(ValueError, match="4xx or 5xx status, got"):
            BadRequest(status, "no")
