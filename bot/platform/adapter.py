"""What a chat platform adapter is to the bot, and how the bot finds the installed ones.

Adapters live in the `adapters` package and depend on `bot`, never the other way round: the bot finds
them by name through the `idefics_bot.adapters` entry points declared in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol

from bot.runtime.config import Config
from bot.core.engine import Engine

ENTRY_POINT_GROUP = "idefics_bot.adapters"

# Chat platforms `idefics-bot run` starts when their config section is enabled.
PLATFORMS = ("discord", "slack")


class Adapter(Protocol):
    """A running connection to one chat platform."""

    name: str
    connected: bool  # for /healthz: False while the platform connection is down

    async def start(self) -> None:
        """Connect and begin handling messages; returns once connected."""

    async def stop(self) -> None:
        """Disconnect. The engine has already drained or cancelled the replies in flight."""


class AdapterFactory(Protocol):
    """An adapter class, built from the whole config and the process's engine."""

    def __call__(self, config: Config, engine: Engine) -> Adapter: ...


class AdapterMissing(Exception):
    """No adapter of that name is installed."""


def load_adapter(name: str) -> AdapterFactory:
    """The adapter class registered under `name` in the `idefics_bot.adapters` entry points."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise AdapterMissing(f"The {name} adapter is not installed; reinstall idefics-bot (make run does it).")
    return next(iter(found)).load()


def enabled_platforms(config: Config) -> list[str]:
    return [name for name in PLATFORMS if getattr(config, name).enabled]
