"""Intake time of a 12-megapixel JPEG (draft-mode decode at 1/8 scale, downscale, re-encode) vs a
full decode of the same file. Target: intake at least 4x faster than the full decode.

Draft mode skips most of the inverse DCT and colour conversion, but every JPEG must still be
entropy-decoded in full, so the gain depends on how much detail (how many bits) a photo has:
the benchmark measures a smooth and a detailed photo.

    python benchmarks/image_intake.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageFilter  # noqa: E402

from bot.images.intake import MAX_SIDE, prepare_image  # noqa: E402


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


def full_decode_and_downscale(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"12-megapixel JPEGs (4000x3000, quality 90), best of {args.rounds} rounds")
    for label, detail in (("smooth photo", False), ("detailed photo", True)):
        data = photo(detail)
        intake = fastest(lambda: prepare_image(data, "photo.jpg"), args.rounds)
        decode = fastest(lambda: full_decode(data), args.rounds)
        decode_downscale = fastest(lambda: full_decode_and_downscale(data), args.rounds)
        verdict = "OK" if decode / intake >= 4 else "below target"
        print(f"  {label} ({len(data) / 2**20:.1f} MB):")
        print(f"    intake (draft decode, downscale, re-encode): {intake * 1000:6.1f} ms")
        print(f"    full decode:                                 {decode * 1000:6.1f} ms  -> intake {decode / intake:.1f}x faster (target 4x: {verdict})")
        print(f"    full decode + downscale:                     {decode_downscale * 1000:6.1f} ms  -> intake {decode_downscale / intake:.1f}x faster")


if __name__ == "__main__":
    main()
