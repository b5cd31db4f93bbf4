"""Intake time of a 12-megapixel JPEG (draft-mode decode at 1/2 scale, resize to the model's 224 x 224
input, lossless PNG) against a full decode of the same file, and how far the pixels the model then
sees are from `processor(original)`, the IDEFICS processor on the fully decoded original.

Draft mode skips part of the inverse DCT and colour conversion, but every JPEG must still be
entropy-decoded in full, so the gain depends on how much detail (how many bits) a photo has:
the benchmark measures a smooth and a detailed photo. PIL and numpy only (no torch threads).

    python benchmarks/image_intake.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image, ImageFilter

from bot.images.intake import MODEL_IMAGE_SIZE, prepare_image
from model.pictures import decode


def photo(detail: bool, width: int = 4000, height: int = 3000) -> bytes:
    """A photo-like JPEG: detail at every scale with less energy at finer ones (the 1/f spectrum of
    natural images). The smooth one keeps only the coarse scales (sky, walls, out-of-focus areas)."""
    sizes = (8, 16, 32, 64, 128, 256, 512, 1024) if detail else (8, 16, 32, 64)
    channels = []
    for _ in range(3):
        picture = None
        for octave, size in enumerate(sizes):
            layer = Image.effect_noise((size * width // height, size), 64).resize((width, height), Image.Resampling.BICUBIC)
            picture = layer if picture is None else Image.blend(picture, layer, 1 / (octave + 1.5))
        channels.append(picture if detail else picture.filter(ImageFilter.BoxBlur(2)))
    buffer = io.BytesIO()
    Image.merge("RGB", channels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def fastest(function, rounds: int) -> float:
    """The best of `rounds` timings: the least disturbed by whatever else the machine does."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return min(samples)


def full_decode(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()


def full_decode_and_resize(data: bytes) -> None:
    """What the processor pays for the original: a full decode and a resize to the input square."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image.resize((MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE), Image.Resampling.BICUBIC)


def pixel_distance(data: bytes) -> tuple[float, float]:
    """Mean and max |delta| between the pixel values of the intake's image and of the original, both
    through IDEFICS' processor (normalised units: one 8-bit level is about 0.015)."""
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    processor = IdeficsImageProcessorPil(image_size=MODEL_IMAGE_SIZE)
    seen = np.asarray(processor(decode(prepare_image(data, "photo.jpg")), return_tensors="np"))[0]
    expected = np.asarray(processor(Image.open(io.BytesIO(data)), return_tensors="np"))[0]
    delta = np.abs(seen - expected)
    return float(delta.mean()), float(delta.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"12-megapixel JPEGs (4000x3000, quality 90), best of {args.rounds} rounds, one thread")
    for label, detail in (("smooth photo", False), ("detailed photo", True)):
        data = photo(detail)
        intake = fastest(partial(prepare_image, data, "photo.jpg"), args.rounds)
        decode = fastest(partial(full_decode, data), args.rounds)
        decode_resize = fastest(partial(full_decode_and_resize, data), args.rounds)
        mean, largest = pixel_distance(data)
        verdict = "OK" if mean <= 0.002 else "above target"
        print(f"  {label} ({len(data) / 2**20:.1f} MB):")
        print(f"    intake (draft decode at 1/2, resize to 224, PNG): {intake * 1000:6.1f} ms")
        print(f"    full decode:                                      {decode * 1000:6.1f} ms  -> intake {decode / intake:.1f}x its time")
        print(f"    full decode + resize to 224 (the processor's):    {decode_resize * 1000:6.1f} ms  -> intake {decode_resize / intake:.1f}x faster")
        print(f"    pixels vs processor(original): mean |delta| {mean:.4f}, max {largest:.4f} (target mean <= 0.002: {verdict})")


if __name__ == "__main__":
    main()
