"""How long the state keeps things: turns for `[state] retention_days`, images while something
refers to them (a turn, a channel's last image, a few-shot example) and for a grace period after
that, so that an image stored a moment ago by another process, for a turn it is about to store, is
never taken away from it."""

from __future__ import annotations

import asyncio
import logging
import time

from bot.images.intake import ImageLimits, ImageRejected, prepare_image
from bot.settings import Settings
from bot.state.store import Forgotten, Store, StoreUnavailable
from ground.files import read_regular_file

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0


async def kept_images(config: Settings) -> frozenset[str]:
    """The digests of the few-shot example images: the config refers to them, so they stay."""
    images = config.images
    limits = ImageLimits(images.max_bytes, images.max_pixels, images.max_aspect_ratio)
    digests = set()
    for example in config.tasks.few_shot:
        try:
            data = await asyncio.to_thread(read_regular_file, example.image, images.max_bytes)
            digests.add((await asyncio.to_thread(prepare_image, data, example.image.name, limits)).digest)
        except (OSError, ValueError, ImageRejected):
            continue  # an example that can't be read was never stored
    return frozenset(digests)


async def prune(config: Settings, store: Store, dry_run: bool = False) -> Forgotten:
    """Delete (or, with `dry_run`, count) what the state no longer keeps."""
    days = config.state.retention_days
    before = time.time() - days * 86400 if days is not None else None
    return await store.prune(before, await kept_images(config), config.state.image_grace_minutes * 60, dry_run)


async def keep_pruned(config: Settings, store: Store) -> None:
    """Prune now and every hour, until cancelled. Several processes may prune the same state."""
    while True:
        try:
            gone = await prune(config, store)
            log.info("state.pruned", extra={"turns": gone.turns, "images": gone.images, "bytes": gone.image_bytes})
        except StoreUnavailable as error:
            log.error("state.prune_failed", extra={"error": str(error)})
        await asyncio.sleep(PRUNE_EVERY_S)
