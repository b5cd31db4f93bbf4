"""How long the state keeps things: turns for `[state] retention_days`, images while something
refers to them (a turn, a channel's last image, a few-shot example) and for a grace period after
that, so that an image stored a moment ago by another process, for a turn it is about to store, is
never taken away from it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from bot.images.intake import ImageLimits, ImageRejected, prepare_image
from bot.settings import Settings
from bot.state.store import Forgotten, Store, StoreUnavailable
from ground.files import read_regular_file
from model.service import ModelInfo

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0


async def kept_images(config: Settings, models: Iterable[ModelInfo]) -> frozenset[str]:
    """The digests of the few-shot example images: the config refers to them, so they stay. Each is
    prepared as the image intake prepares it for each of `models` (the model's image size or longest
    edge make the digest): the loaded model's, or, where none is loaded, every one it could be."""
    images = config.images
    limits = ImageLimits(images.max_bytes, images.max_pixels, images.max_aspect_ratio)
    preparations = {(info.image_size, info.image_longest_edge) for info in models}
    digests = set()
    for example in config.tasks.few_shot:
        try:
            data = await asyncio.to_thread(read_regular_file, example.image, images.max_bytes)
        except (OSError, ValueError):
            continue  # an example that can't be read was never stored
        for size, longest_edge in preparations:
            try:
                digests.add((await asyncio.to_thread(prepare_image, data, example.image.name, limits, size, longest_edge)).digest)
            except ImageRejected:
                break  # nor one that can't be used
    return frozenset(digests)


async def prune(config: Settings, store: Store, models: Iterable[ModelInfo], dry_run: bool = False) -> Forgotten:
    """Delete (or, with `dry_run`, count) what the state no longer keeps; `models` as for `kept_images`."""
    days = config.state.retention_days
    before = time.time() - days * 86400 if days is not None else None
    return await store.prune(before, await kept_images(config, models), config.state.image_grace_minutes * 60, dry_run)


async def keep_pruned(config: Settings, store: Store, model: ModelInfo) -> None:
    """Prune now and every hour, until cancelled. Several processes may prune the same state."""
    while True:
        try:
            gone = await prune(config, store, (model,))
            log.info("state.pruned", extra={"turns": gone.turns, "images": gone.images, "bytes": gone.image_bytes})
        except StoreUnavailable as error:
            log.error("state.prune_failed", extra={"error": str(error)})
        await asyncio.sleep(PRUNE_EVERY_S)
