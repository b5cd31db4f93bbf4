"""An image as the model takes it: the encoded bytes of an RGB picture, known by their content hash.
The model, the store and the image intake share it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, eq=False)
class ModelImage:
    """An image ready for the model: the encoded bytes of an RGB picture, known by their content hash."""

    digest: str
    data: bytes
    name: str = "image"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelImage) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)
