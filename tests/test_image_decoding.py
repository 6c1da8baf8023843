"""Images an attacker would craft: each is damaged data (named, skippable), never a traceback."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from dist_train.config import DataConfig
from dist_train.data.pipeline import SampleDecoder
from dist_train.errors import DataError


def png(size=(8, 8), text: bytes | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("comment", text.decode("latin-1"), zip=True)
    out = io.BytesIO()
    Image.new("L", size, 128).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def declaring(data: bytes, width: int, height: int) -> bytes:
    """The same PNG with another size in its header (IHDR, CRC fixed): nothing else changes."""
    ihdr = 8  # after the signature: length, "IHDR", then width and height
    body = data[ihdr + 4:ihdr + 8] + struct.pack(">II", width, height) + data[ihdr + 16:ihdr + 21]
    return data[:ihdr + 8] + body[4:] + struct.pack(">I", zlib.crc32(body)) + data[ihdr + 25:]


def decode(image: bytes, **data):
    decoder = SampleDecoder(DataConfig(channels=1, image_size=8, mean=[0.5], std=[0.5], augment="none", **data),
                            train=False, num_classes=10)
    return decoder({"__url__": "s.tar", "__key__": "k1", "png": image, "cls": b"3"})


def test_a_plain_png_decodes():
    image, label = decode(png())
    assert tuple(image.shape) == (1, 8, 8) and label == 3


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (declaring(png(), 30000, 30000), r"s\.tar: sample 'k1': \.png: Image size \(900000000 pixels\) exceeds "
                                         r"limit .* \(data\.max_image_pixels=89478485\)"),
        (declaring(png(), 10000, 10000), r"s\.tar: sample 'k1': \.png: 10000 x 10000 pixels, more than "
                                         r"data\.max_image_pixels=89478485"),
        (png(text=bytes(4 << 20)), r"s\.tar: sample 'k1': \.png is not a decodable image \(.*[Tt]oo [Ll]arge"),
    ],
    ids=["decompression bomb", "past the pixel limit", "huge compressed text chunk"],
)
def test_a_crafted_png_is_damaged_data_named_in_one_line(image, message):
    with pytest.raises(DataError, match=message) as caught:
        decode(image)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_the_pixel_limit_is_a_setting():
    with pytest.raises(DataError, match=r"8 x 8 pixels, more than data\.max_image_pixels=63"):
        decode(png(), max_image_pixels=63)
    assert decode(png(), max_image_pixels=64)[1] == 3


def saved_as(fmt: str, mode: str = "L", **options) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (8, 8), 100).save(out, format=fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PCX", "SGI", "GIF", "PPM"])
def test_a_png_member_in_another_format_is_refused_not_decoded(fmt):
    """The member's name does not choose the decoder: only JPEG, PNG and WebP are read."""
    expected = r"^s\.tar: sample 'k1': \.png is not a decodable image \(not a JPEG, PNG or WebP file\)$"
    with pytest.raises(DataError, match=expected):
        decode(saved_as(fmt))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a_misnamed_jpeg_or_webp_still_decodes(fmt):
    image, _ = decode(saved_as(fmt, quality=100))  # uint8: normalized later, batched on the device
    assert image.dtype == torch.uint8 and (image.int() - 100).abs().max() <= 1


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    out = io.BytesIO()
    Image.fromarray(values).save(out, format="PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode == "I;16"
    image, _ = decode(out.getvalue())
    assert torch.equal(image[0], torch.from_numpy(np.rint(values / 257.0).astype(np.uint8)))
    assert image.min() == 0 and image.max() == 255  # black stays black, white white, the rest in between
