"""Assembling one bot process from its configuration: store, model service, engine, adapters."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

from bot.core.engine import Engine
from bot.platform.adapter import Adapter, AdapterFactory, installed_adapters, load_adapter
from bot.platform.sdk import Platform, error_name
from bot.platform.settings import AdapterSettings
from bot.runtime.config import Config
from bot.runtime.metrics import Metrics
from bot.state.postgres import PostgresStore
from bot.state.store import SQLiteStore, Store
from model.loading import CheckpointSettings
from model.service import ModelService

log = logging.getLogger(__name__)

# Of the shutdown grace, the part kept for telling the askers of unfinished replies that the bot stops.
_NOTICE_S = 5.0


def create_model(config: Config) -> ModelService:
    """The model service the config asks for (not started yet)."""
    settings = config.model
    if settings.backend == "tgi":
        from model.tgi import TGIBackend, TGISettings

        return TGIBackend(
            TGISettings(
                url=settings.url or "",  # the config refuses backend = "tgi" without a url
                token=settings.token.get_secret_value() if settings.token else None,
                max_concurrency=settings.max_concurrency,
                max_queue=settings.max_queue,
                max_retries=settings.max_retries,
                connect_timeout_s=settings.connect_timeout_s,
                payload_limit=settings.payload_limit,
                reply_tokens=config.generation.max_new_tokens,
            )
        )
    from model.local import BatchSettings, LocalBackend

    return LocalBackend(
        CheckpointSettings(settings.checkpoint, settings.dtype, settings.quantization, settings.device_map),
        BatchSettings(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue=settings.max_queue,
            stall_timeout_s=settings.stall_timeout_s,
            threads=settings.threads,
        ),
    )


def enabled_adapters(config: Config) -> list[str]:
    """The adapters `idefics-bot run` starts: those whose section is enabled; with none, those that run
    alone unless their section says `enabled = false` (see `AdapterSettings.runs_alone`)."""
    sections = {name: section for name in installed_adapters() if isinstance(section := config.section(name), AdapterSettings)}
    return [name for name, section in sections.items() if section.enabled] or [name for name, section in sections.items() if section.enabled is None]


def create_store(config: Config) -> Store:
    """The state store the config asks for (not opened yet): PostgreSQL if `[state] url` is set."""
    state = config.state
    if state.url is not None:
        # A lease of half the adoption delay, checked every quarter of it: a dead process's questions
        # are found at most three quarters of the delay after its last renewal.
        return PostgresStore(state.url.get_secret_value(), max_connections=state.max_connections, lease_s=config.bot.adopt_after_s / 2)
    return SQLiteStore(state.path)


class Runtime:
    """The shared services of a process, opened on enter and closed on exit (model last in, first out)."""

    def __init__(self, config: Config, store: Store | None = None, model: ModelService | None = None):
        self.config = config
        self.store = store or create_store(config)
        self.model = model or create_model(config)
        self.metrics = Metrics()
        self.engine = Engine(config, self.model, self.store, self.metrics)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Runtime:
        await self.store.open()
        self._stack.push_async_callback(self.store.close)
        await self.model.start()
        self._stack.push_async_callback(self.model.close)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._stack.aclose()

    def platform(self, name: str, factory: AdapterFactory) -> Platform:
        """The core as adapter `name` (made by `factory`) sees it."""
        describe = getattr(factory, "describe_error", error_name)
        return Platform(name, self.engine, self.store, self.metrics, self.config.images, factory.delivery_errors, describe)

    def adapter(self, name: str) -> Adapter:
        """The installed adapter `name`, built on this process's core with its own config section."""
        factory = load_adapter(name)
        return factory(self.platform(name, factory), self.config.section(name))

    async def shutdown(self, grace: float) -> None:
        """Stop taking requests and end the ones in flight within `grace` seconds: they finish if they
        can by then; the rest are cancelled and their askers told the bot is stopping, in a part of
        the grace kept for that."""
        notice = min(_NOTICE_S, grace / 4)
        if not await self.engine.drain(grace - notice):
            log.warning("shutdown.cancelling", extra={"grace_s": grace})
        await self.model.close()  # anything still waiting gets a "shutting down" answer
        await self.engine.drain(notice)  # let adapters post those answers
