"""Image intake: every kind of bad image gets a refusal that names it; good ones keep exactly the pixels
IDEFICS' processor makes of them (within a documented tolerance where a large JPEG is draft-decoded)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

from benchmarks.image_intake import photo
from bot.images.intake import ImageLimits, ImageRejected, prepare_image
from model.pictures import decode
from tests.conftest import image_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions in a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = image_bytes(size=(300, 200), kind="JPEG", quality=90)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 3000, r"huge.png is 0.0 MB; the limit is 0.0 MB per image"),
        ("report.pdf", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", r"report.pdf is a PDF document, not an image"),
        ("login.png", b"<!DOCTYPE html><html><body>Sign in</body></html>", r"login.png is a web page \(HTML\), not an image"),
        ("notes.txt", b"just some words", r"notes.txt is not in an image format I can read"),
        ("empty.jpg", b"", r"empty.jpg is empty"),
        ("half.jpg", truncated_jpeg(), r"half.jpg is cut off: the JPEG file is incomplete"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, r"broken.png could not be read: the PNG file is damaged"),
        ("bomb.png", png_header_only(100_000, 100_000), r"bomb.png has too many pixels to be decoded safely; the limit is 25 megapixels"),
        ("thirty.png", png_header_only(6000, 5000), r"thirty.png is 6000x5000 pixels \(30.0 megapixels\); the limit is 25 megapixels"),
        ("strip.png", image_bytes(size=(2100, 50)), r"strip.png is 2100x50 pixels, too long and thin to read \(the limit is 20:1\)"),
    ],
)
def test_bad_images_are_refused_by_name(name, data, message):
    limits = ImageLimits(max_bytes=2048) if name == "huge.png" else ImageLimits()
    with pytest.raises(ImageRejected, match=message):
        prepare_image(data, name, limits)


def test_a_real_thirty_megapixel_png_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (6000, 5000)).save(buffer, "PNG")
    with pytest.raises(ImageRejected, match=r"30.0 megapixels"):
        prepare_image(buffer.getvalue(), "big.png")


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "HEIF", "AVIF"])
def test_accepted_formats_become_the_models_square_in_png(kind):
    image = prepare_image(image_bytes(size=(1200, 900), kind=kind), f"photo.{kind.lower()}")
    decoded = decode(image)
    assert decoded.mode == "RGB" and decoded.size == (224, 224)
    assert image.data.startswith(b"\x89PNG") and len(image.digest) == 64


def test_an_image_smaller_than_the_models_input_keeps_its_pixels():
    data = image_bytes(size=(64, 48))
    assert decode(prepare_image(data, "small.png")).tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()
    assert decode(prepare_image(data, "small.png", size=30)).size == (30, 30)


def pixel_values(size: int, image: Image.Image) -> np.ndarray:
    """What IDEFICS' processor (the PIL backend, as the local backend loads it) gives the model."""
    return np.asarray(IdeficsImageProcessorPil(image_size=size)(image, return_tensors="np"))[0]


def textured(size: tuple[int, int], kind: str) -> bytes:
    """A picture with detail at every scale, small enough to make quickly."""
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    Image.blend(noise, fine, 0.25).save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
    return buffer.getvalue()


# Tolerances, in the processor's normalised units (one 8-bit level is about 0.015): exact unless the
# JPEG is draft-decoded (both sides at least 2 x 6 x the input size); then a mean |delta| of 0.002.
@pytest.mark.parametrize(
    "size, make, mean_delta",
    [
        (224, lambda: textured((160, 120), "PNG"), 0.0),
        (224, lambda: textured((1600, 1200), "PNG"), 0.0),
        (224, lambda: textured((300, 120), "PNG"), 0.0),  # downscaled one way, upscaled the other
        (224, lambda: textured((160, 120), "JPEG"), 0.0),
        (224, lambda: textured((2400, 1800), "JPEG"), 0.0),  # too small for a draft: decoded in full
        (224, lambda: photo(True, 2700, 2700), 0.002),  # draft-decoded at 1/2: the closest to the limit
        (224, lambda: photo(False, 4000, 3000), 0.002),  # 12 megapixels at 1/2
        (30, lambda: textured((1600, 1200), "PNG"), 0.0),  # the tiny checkpoint's processor
        (30, lambda: textured((1600, 1200), "JPEG"), 0.002),  # draft-decoded at 1/4
    ],
    ids=["png-small", "png-large", "png-wide", "jpeg-small", "jpeg-large", "jpeg-draft-detailed", "jpeg-draft-12mp", "tiny-png", "tiny-jpeg-draft"],
)
def test_the_model_sees_what_the_processor_makes_of_the_original(size, make, mean_delta):
    data = make()
    original = Image.open(io.BytesIO(data))
    expected = pixel_values(size, original)
    seen = pixel_values(size, decode(prepare_image(data, "photo", size=size)))
    delta = np.abs(seen - expected)
    assert delta.mean() <= mean_delta
    if not mean_delta:
        assert delta.max() == 0.0


def test_same_picture_same_digest_and_names_do_not_matter():
    data = image_bytes()
    assert prepare_image(data, "a.png").digest == prepare_image(data, "b.jpg").digest


def test_exif_orientation_is_applied():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 40), (0, 255, 0)).save(buffer, "JPEG", exif=exif)
    assert decode(prepare_image(buffer.getvalue(), "phone.jpg")).size == (40, 80)


def test_transparency_goes_on_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buffer, "PNG")
    assert decode(prepare_image(buffer.getvalue(), "clear.png")).getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (30, 30), color) for color in [(255, 0, 0)] + [(0, 0, 255)] * 300]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    red, _, blue = decode(prepare_image(buffer.getvalue(), "anim.gif")).getpixel((10, 10))
    assert red > 200 and blue < 50


def test_large_jpeg_is_decoded_at_reduced_scale(monkeypatch):
    photo = image_bytes(size=(4000, 3000), kind="JPEG", quality=85)
    decoded_sizes = []
    original_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded_sizes.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    assert decode(prepare_image(photo, "photo.jpg")).size == (224, 224)
    assert decoded_sizes[0] == (2000, 1500)  # decoded at 1/2 scale: a quarter of the pixels, still 6x the input
    prepare_image(photo, "photo.jpg", size=30)
    assert decoded_sizes[-2] == (500, 375)  # for a 30-pixel input, at 1/8


@pytest.mark.parametrize("kind, label", [("HEIF", "HEIC"), ("AVIF", "AVIF")])
def test_iphone_photos_and_avif_are_held_to_the_same_limits_before_decoding(monkeypatch, kind, label):
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    photo = image_bytes(size=(1200, 900), kind=kind)
    with pytest.raises(ImageRejected, match=r"photo is 1200x900 pixels \(1.1 megapixels\); the limit is 1 megapixels"):
        prepare_image(photo, "photo", ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageRejected, match=r"strip is 1050x50 pixels, too long and thin"):
        prepare_image(image_bytes(size=(1050, 50), kind=kind), "strip")
    assert decoded == []  # refused from the header alone
    with pytest.raises(ImageRejected, match=r"photo is \d+.\d MB; the limit is 0.0 MB per image"):
        prepare_image(photo, "photo", ImageLimits(max_bytes=len(photo) - 1))
    with pytest.raises(ImageRejected, match=rf"(cut off: the|could not be read: the) {label} file"):
        prepare_image(photo[: len(photo) // 2], "photo")
    red, green, blue = decode(prepare_image(image_bytes((200, 30, 30), size=(64, 48), kind=kind), "red")).getpixel((30, 20))
    assert red > 180 and green < 60 and blue < 60
