"""What a chat platform adapter is to the bot, and how the bot finds the installed ones.

Adapters live in the `adapters` package and depend on `bot`, never the other way round: the bot finds
them through the `idefics_bot.adapters` entry points declared in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol

from bot.config import Config
from bot.engine import Engine

ENTRY_POINT_GROUP = "idefics_bot.adapters"


class Adapter(Protocol):
    """A running connection to one chat platform."""

    name: str

    async def start(self) -> None:
        """Connect and begin handling messages; returns once connected."""

    async def stop(self) -> None:
        """Disconnect. The engine has already drained or cancelled the replies in flight."""


class AdapterFactory(Protocol):
    """An adapter class: says whether the config turns it on, and builds it."""

    name: str

    @staticmethod
    def enabled(config: Config) -> bool: ...

    def __call__(self, config: Config, engine: Engine) -> Adapter: ...


def installed_adapters() -> dict[str, AdapterFactory]:
    """Every adapter registered in the `idefics_bot.adapters` entry point group, by name."""
    return {point.name: point.load() for point in entry_points(group=ENTRY_POINT_GROUP)}
