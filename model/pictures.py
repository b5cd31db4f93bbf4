"""Decoding a `ModelImage` into pixels (PIL), for the backends that need them; the interface itself
(model/service.py) stays free of image libraries."""

from __future__ import annotations

import io

from PIL import Image

from ground.images import ModelImage


def decode(image: ModelImage) -> Image.Image:
    """The image as an RGB PIL image."""
    picture = Image.open(io.BytesIO(image.data))
    picture.load()
    return picture.convert("RGB")
