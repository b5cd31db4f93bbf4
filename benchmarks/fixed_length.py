"""What the model-service benchmarks send: replies of a fixed length and small generated images."""

from __future__ import annotations

import hashlib
import io

from PIL import Image
from transformers import LogitsProcessor

from ground.images import ModelImage


class NoEarlyEnd(LogitsProcessor):
    """Every reply runs to its max_new_tokens, so the modes compared do the same work."""

    def __init__(self, banned: list[int]):
        self.banned = banned

    def __call__(self, input_ids, scores):
        scores[:, self.banned] = -float("inf")
        return scores


def image(seed: int) -> ModelImage:
    """A small PNG whose colour depends on `seed`, so different seeds are different images."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (seed * 30 % 256, 80, 200 - seed * 20 % 200)).save(buffer, "PNG")
    data = buffer.getvalue()
    return ModelImage(hashlib.sha256(data).hexdigest(), data, f"{seed}.png")
