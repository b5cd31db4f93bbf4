"""Assembling one bot process from its configuration: store, model service, engine, adapters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from bot.core.engine import Engine
from bot.metrics import Metrics
from bot.runtime.config import Config
from bot.sdk.adapter import Adapter, AdapterFactory, installed_adapters, load_adapter
from bot.sdk.platform import Platform, error_name
from bot.sdk.settings import AdapterSettings
from bot.state.postgres import PostgresStore
from bot.state.store import SQLiteStore, Store
from model.loading import CheckpointSettings
from model.service import ModelService

log = logging.getLogger(__name__)

# Of the shutdown grace, the parts kept for telling the askers of unfinished replies that the bot
# stops, and for closing the platforms' connections and the state afterwards.
_NOTICE_S = 5.0
_CLOSING_S = 1.0


async def open_model(config: Config) -> ModelService:
    """The model service the config asks for, loaded or connected."""
    settings = config.model
    if settings.backend in ("tgi", "openai"):
        from model.remote import RemoteSettings

        remote = RemoteSettings(
            url=settings.url or "",  # the config refuses a remote backend without a url (and "openai" without a model)
            token=settings.token.get_secret_value() if settings.token else None,
            max_concurrency=settings.max_concurrency,
            max_queue=settings.max_queue,
            max_retries=settings.max_retries,
            connect_timeout_s=settings.connect_timeout_s,
            payload_limit=settings.payload_limit,
            reply_tokens=config.generation.max_new_tokens,
        )
        if settings.backend == "tgi":
            from model.tgi import TGIBackend, TGISettings

            return await TGIBackend.open(TGISettings(**vars(remote)))
        from model.openai import OpenAIBackend, OpenAISettings

        return await OpenAIBackend.open(OpenAISettings(**vars(remote), model=settings.model or ""))
    from model.local import BatchSettings, LocalBackend

    return await LocalBackend.open(
        CheckpointSettings(settings.checkpoint, settings.dtype, settings.quantization, settings.device_map),
        BatchSettings(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.max_queue,
            stall_timeout_s=settings.stall_timeout_s,
            threads=settings.threads,
            image_cache_bytes=settings.image_cache_mb * 2**20,
            prompt_process=settings.prompt_process,
        ),
    )


def enabled_adapters(config: Config) -> list[str]:
    """The adapters `idefics-bot run` starts: those whose section is enabled; with none, those that run
    alone unless their section says `enabled = false` (see `AdapterSettings.runs_alone`)."""
    sections = {name: section for name in installed_adapters() if isinstance(section := config.section(name), AdapterSettings)}
    return [name for name, section in sections.items() if section.enabled] or [name for name, section in sections.items() if section.enabled is None]


async def open_store(config: Config) -> Store:
    """The state store the config asks for, open: PostgreSQL if `[state] url` is set."""
    state = config.state
    if state.url is not None:
        # A lease of half the adoption delay, checked every quarter of it: a dead process's questions
        # are found at most three quarters of the delay after its last renewal.
        return await PostgresStore.open(state.url.get_secret_value(), max_connections=state.max_connections, lease_s=config.bot.adopt_after_s / 2)
    return await SQLiteStore.open(state.path)


class Runtime:
    """The shared services of a process: its store, model service, metrics and engine."""

    def __init__(self, config: Config, store: Store, model: ModelService):
        self.config = config
        self.store = store
        self.model = model
        self.metrics = Metrics()
        self.engine = Engine(config, self.model, self.store, self.metrics)

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, store: Store | None = None, model: ModelService | None = None) -> AsyncIterator[Runtime]:
        """`async with Runtime.open(config) as runtime:` the process's services, opened as the config
        says (unless given), and closed on exit, given ones too (the model first, then the store)."""
        async with AsyncExitStack() as stack:
            if store is None:
                store = await open_store(config)
            stack.push_async_callback(store.close)
            if model is None:
                model = await open_model(config)
            stack.push_async_callback(model.close)
            yield cls(config, store, model)

    def platform(self, name: str, factory: AdapterFactory) -> Platform:
        """The core as adapter `name` (made by `factory`) sees it."""
        describe = getattr(factory, "describe_error", error_name)
        return Platform(name, self.engine, self.store, self.metrics, self.config.images, factory.delivery_errors, describe)

    def adapter(self, name: str) -> Adapter:
        """The installed adapter `name`, built on this process's core with its own config section."""
        factory = load_adapter(name)
        return factory(self.platform(name, factory), self.config.section(name))

    async def shutdown(self, grace: float) -> None:
        """Stop taking requests and end the ones in flight within `grace` seconds, less a part kept
        for closing connections afterwards: they finish if they can; the rest are cancelled and
        their askers told the bot is stopping, in a part of the grace kept for that."""
        loop = asyncio.get_running_loop()
        notice, closing = min(_NOTICE_S, grace / 4), min(_CLOSING_S, grace / 4)
        notice_at = loop.time() + grace - notice - closing
        if not await self.engine.drain(notice_at - loop.time()):
            log.warning("shutdown.cancelling", extra={"grace_s": grace})
        try:
            # Anything still waiting gets a "shutting down" answer; a model step still running
            # (its rows stop at the next one) is not waited for past the notice.
            async with asyncio.timeout_at(notice_at + notice):
                await self.model.close()
        except TimeoutError:
            log.warning("shutdown.model_busy")
        await self.engine.drain(max(0.0, notice_at + notice - loop.time()))  # let adapters post those answers
