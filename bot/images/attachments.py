"""Taking a message's images in: its attachments and the image links in its text, fetched and checked
together, stored, and remembered as the channel's last image. A refusal names every file that
can't be used."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from bot.images.fetch import FetchLimits, FetchRefused, fetch, file_name
from bot.images.intake import ACCEPTED, ImageLimits, ImageRejected, prepare_image
from bot.settings import ImagesConfig
from bot.state.store import Store
from ground.conversation import ConversationKey, ImageRef
from ground.images import ModelImage
from ground.messages import IMAGE_SUFFIXES, Attachment, Refusal
from model.service import ModelService

# A link runs to the next space or delimiter: greedy and with nothing after it to backtrack into, so
# finding them takes time linear in the text, whatever the text is.
_LINK = re.compile(r"https?://[^\s<>\"')]+", re.IGNORECASE)


def image_links(text: str) -> list[str]:
    """The http(s) links in `text` whose path ends like an image file's (trailing punctuation is
    the sentence's, not the link's)."""
    links = (match.rstrip(".,;:!?") for match in _LINK.findall(text))
    return [link for link in links if PurePosixPath(urlsplit(link).path).suffix.lower() in IMAGE_SUFFIXES]


class ImageIntake:
    """A message's images -> stored `ImageRef`s, under the `[images]` limits."""

    def __init__(self, settings: ImagesConfig, store: Store, model: ModelService):
        """`model`: whose processor's input size the images are kept at (known once it has started)."""
        self.settings = settings
        self.store = store
        self.model = model
        self.limits = ImageLimits(settings.max_bytes, settings.max_pixels, settings.max_aspect_ratio)
        self.fetch_limits = FetchLimits(
            max_bytes=settings.max_bytes,
            connect_timeout=settings.connect_timeout_s,
            total_timeout=settings.fetch_timeout_s,
            allow_private=settings.allow_private_addresses,
            allowed_hosts=frozenset(settings.allowed_hosts),
        )

    def link(self, url: str) -> Attachment:
        """An attachment for an image link somebody gave, fetched under the link rules."""

        async def read(max_bytes: int) -> bytes:
            return await fetch(url, replace(self.fetch_limits, max_bytes=max_bytes))

        return Attachment(name=file_name(url), read=read)

    async def take_in(self, key: ConversationKey, attachments: Sequence[Attachment], text: str) -> tuple[list[ImageRef], list[str]]:
        """Fetch and check the images of a message; returns them and notes about files left out.
        Raises `Refusal` if one can't be used: the asker meant to show it, so answering without it
        would mislead."""
        notes: list[str] = []
        wanted = [a for a in attachments if a.looks_like_image()]
        for ignored in (a for a in attachments if not a.looks_like_image()):
            notes.append(f"{ignored.name} isn't an image, so I left it out. I can read {ACCEPTED}.")
        if self.settings.fetch_links:
            wanted += [self.link(url) for url in dict.fromkeys(image_links(text))]
        limit = self.settings.max_per_turn
        if len(wanted) > limit:
            raise Refusal(f"That's {len(wanted)} images; I can take {limit} per message. Please send fewer.")
        results = await asyncio.gather(*(self._take_one(a) for a in wanted), return_exceptions=True)
        refusals = [str(r) for r in results if isinstance(r, (ImageRejected, FetchRefused))]
        for failure in (r for r in results if isinstance(r, BaseException) and not isinstance(r, (ImageRejected, FetchRefused))):
            raise failure
        if refusals:
            raise Refusal(" ".join(refusals))
        refs = [await self.store.put_image(image) for image in results if isinstance(image, ModelImage)]
        if refs:
            await self.store.remember_image(key.platform, key.channel, refs[-1])
        return refs, notes

    async def _take_one(self, attachment: Attachment) -> ModelImage:
        limit = self.settings.max_bytes
        if attachment.size is not None and attachment.size > limit:
            raise ImageRejected(f"{attachment.name} is {attachment.size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB per image.")
        return await self.prepare(await attachment.read(limit), attachment.name)

    async def prepare(self, data: bytes, name: str) -> ModelImage:
        """Check one image's bytes and keep what the model's processor makes of it, off the event loop."""
        info = self.model.info
        return await asyncio.to_thread(prepare_image, data, name, self.limits, info.image_size, info.image_longest_edge)
