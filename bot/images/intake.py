"""Image intake: bytes from anywhere -> the model's pixels as a lossless PNG, or a refusal that names the file.

The content is identified by its bytes, never by its name or Content-Type. Size, pixel count and
shape are checked from the header before anything is decoded, so a decompression bomb costs nothing.

What is kept is what the model's processor would make of the original: an image larger than the
processor's square input (224 x 224 for IDEFICS) in either side is resized to exactly that square,
with the processor's own filter (PIL bicubic), so the processor's resize of the stored image changes
nothing; a smaller image keeps its pixels, and the processor upscales it as it would the original.
Either way the model sees `processor(original image)`, bit for bit. A processor that keeps the aspect
ratio (Idefics3, SmolVLM: `longest_edge`) gets the same treatment: a larger image is scaled to that
longest edge as the processor scales it (its rounding, Lanczos), a smaller one keeps its pixels (the
processor scales it up itself). The one approximation: a JPEG
at least twice `DRAFT_FACTOR` times the input size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
draft mode, several times faster), never below `DRAFT_FACTOR` times the input size, which keeps the
pixels within a mean of 0.002 (normalised units) of a full decode (benchmarks/image_intake.py).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageOps

from ground.images import ModelImage

# IDEFICS' processor input: every image becomes this square (ModelInfo.image_size has the loaded model's).
MODEL_IMAGE_SIZE = 224
# A draft-decoded JPEG keeps at least this many times the input size on each side, so the resize to
# the input averages out the draft's differences from a full decode: a mean |delta| of 0.0014-0.0019
# on detailed photos at 6 (0.0020-0.0027 at 4), in the processor's units (an 8-bit level is 0.015).
DRAFT_FACTOR = 6

# HEIC (iPhone photos) through libheif; Pillow itself reads AVIF.
pillow_heif.register_heif_opener()

_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "WEBP": "WebP", "BMP": "BMP", "HEIF": "HEIC", "AVIF": "AVIF"}
ACCEPTED = "PNG, JPEG, WebP, GIF, BMP, HEIC and AVIF"
# ISO base media files (HEIF, AVIF) name their kind in brands of the leading `ftyp` box.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


class ImageRejected(ValueError):
    """The image can't be used; the message names it and says why, in words fit for the chat."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    max_aspect_ratio: float = 20.0


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes (a PIL format name), or None if it isn't one we read."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return _iso_media_kind(data)


def _iso_media_kind(data: bytes) -> str | None:
    """"HEIF" or "AVIF" from the brands of a leading `ftyp` box (AVIF wins: it is built on HEIF)."""
    if data[4:8] != b"ftyp":
        return None
    box_size = int.from_bytes(data[:4], "big")
    if not 16 <= box_size <= min(len(data), 1024):
        return None
    brands = {data[8:12]} | {data[offset : offset + 4] for offset in range(16, box_size - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIF"
    return None


def describe_non_image(data: bytes) -> str:
    """A few words for what a non-image file seems to be."""
    head = data[:512].lstrip().lower()
    if head.startswith(b"%pdf"):
        return "a PDF document, not an image"
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "a web page (HTML), not an image"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "an SVG drawing, which I can't read"
    if data[4:8] == b"ftyp":
        return "a video or another media file, not an image"
    if head.startswith(b"pk\x03\x04"):
        return "a ZIP archive, not an image"
    if not data:
        return "empty"
    return "not in an image format I can read"


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def longest_edge_size(width: int, height: int, edge: int) -> tuple[int, int]:
    """(width, height) with the longest side scaled to `edge`, by the rule of Idefics3's image
    processor (the other side rounded down, then up to an even number)."""
    if width >= height:
        scaled = int(edge / (width / height))
        return edge, max(1, scaled + scaled % 2)
    scaled = int(edge * (width / height))
    return max(1, scaled + scaled % 2), edge


def prepare_image(
    data: bytes, name: str, limits: ImageLimits = ImageLimits(), size: int = MODEL_IMAGE_SIZE, longest_edge: int | None = None
) -> ModelImage:
    """Check one image and keep the pixels the model's processor makes of it for a `size` x `size`
    input, or (with `longest_edge`) for a processor that keeps the aspect ratio and scales the
    longest side to that. CPU-bound: call it off the event loop."""
    side = longest_edge or size
    if len(data) > limits.max_bytes:
        raise ImageRejected(f"{name} is {_megabytes(len(data))}; the limit is {_megabytes(limits.max_bytes)} per image.")
    kind = sniff(data)
    if kind is None:
        what = describe_non_image(data)
        if what == "empty":
            raise ImageRejected(f"{name} is empty.")
        raise ImageRejected(f"{name} is {what}. I can read {ACCEPTED}.")
    label = _FORMATS[kind]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size
            _check_shape(name, width, height, limits)
            if kind == "JPEG":
                # The largest reduction that leaves both sides at least DRAFT_FACTOR x size (none if that's 1/1).
                image.draft("RGB", (side * DRAFT_FACTOR, side * DRAFT_FACTOR))
            image.load()  # a GIF or animated WebP: only the first frame is decoded
            image = _to_rgb(ImageOps.exif_transpose(image))
            if longest_edge is not None:
                if max(image.size) > longest_edge:
                    image = image.resize(longest_edge_size(*image.size, longest_edge), Image.Resampling.LANCZOS)  # as Idefics3's processor does
            elif image.width > size or image.height > size:
                image = image.resize((size, size), Image.Resampling.BICUBIC)  # as IDEFICS' processor does
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"{name} has too many pixels to be decoded safely; the limit is {limits.max_pixels / 1e6:g} megapixels.") from None
    except OSError as exc:
        if "truncated" in str(exc):
            raise ImageRejected(f"{name} is cut off: the {label} file is incomplete.") from None
        raise ImageRejected(f"{name} could not be read: the {label} file is damaged.") from None
    except (ValueError, SyntaxError, IndexError, EOFError, MemoryError):
        raise ImageRejected(f"{name} could not be read: the {label} file is damaged.") from None
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    encoded = buffer.getvalue()
    return ModelImage(digest=hashlib.sha256(encoded).hexdigest(), data=encoded, name=name)


def _check_shape(name: str, width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise ImageRejected(f"{name} has no pixels.")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageRejected(
            f"{name} is {width}x{height} pixels ({pixels / 1e6:.1f} megapixels); the limit is {limits.max_pixels / 1e6:g} megapixels."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageRejected(
            f"{name} is {width}x{height} pixels, too long and thin to read (the limit is {limits.max_aspect_ratio:g}:1)."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white (the model was not trained on alpha)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
