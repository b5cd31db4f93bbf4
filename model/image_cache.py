"""Encoded images kept between requests, by the content of the image.

A conversation sends its whole history every turn, so a photo posted once comes back with every
follow-up question; what the vision encoder (and perceiver or connector) made of it the first time
is kept here, within a budget of bytes, and the least recently used image goes first. Only the
model's worker thread changes it (it encodes every prompt), so it takes no lock: the event loop only
asks whether it holds an image (one dict lookup, atomic under the GIL), to spare the prompt process
work, and the worker copes with an image gone by then (`ImageEvicted`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ImageCache:
    """Each image's states as the language model takes them, by the image's digest, at most
    `budget_bytes` of tensors in all (0 keeps nothing)."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._states: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        return digest in self._states

    def digests(self) -> list[str]:
        """The digests of the images kept, the least recently used first."""
        return list(self._states)

    def get(self, digest: str) -> torch.Tensor | None:
        """The image's states, now the most recently used; None if they are not kept."""
        states = self._states.get(digest)
        if states is not None:
            self._states.move_to_end(digest)
        return states

    def put(self, digest: str, states: torch.Tensor) -> None:
        """Keep `states`, evicting the least recently used images until they fit (states larger
        than the whole budget are not kept)."""
        size = _bytes(states)
        if size > self.budget_bytes or digest in self._states:
            return
        while self.used_bytes + size > self.budget_bytes:
            _, evicted = self._states.popitem(last=False)
            self.used_bytes -= _bytes(evicted)
        self._states[digest] = states
        self.used_bytes += size


def _bytes(states: torch.Tensor) -> int:
    return states.numel() * states.element_size()
