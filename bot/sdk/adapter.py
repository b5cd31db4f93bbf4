"""What a chat platform adapter is to the bot, and how the bot finds the installed ones.

Adapters live outside `bot/` (ours in the `adapters` package) and depend on `bot`, never the other way
round: the bot finds them by name through the `idefics_bot.adapters` entry points (see pyproject.toml).
The name is also the adapter's config section: `[discord]` is validated by the discord adapter's
`Settings` model. An adapter is built from the `Platform` (the core as it sees it) and its settings.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    from bot.sdk.platform import Platform

ENTRY_POINT_GROUP = "idefics_bot.adapters"


class Adapter(Protocol):
    """A running connection to one chat platform."""

    name: str
    connected: bool  # for /healthz: False while the platform connection is down

    async def start(self) -> None:
        """Connect and begin handling messages; returns once connected."""

    async def stop(self) -> None:
        """Disconnect. The engine has already drained or cancelled the replies in flight."""


class AdapterFactory(Protocol):
    """An adapter class: its settings model, the errors that mean a reply could not be delivered, and
    the constructor taking the core's `Platform` and the adapter's own settings."""

    Settings: ClassVar[type[BaseModel]]
    delivery_errors: ClassVar[tuple[type[BaseException], ...]]

    def __call__(self, platform: Platform, settings: Any) -> Adapter: ...


class AdapterMissing(Exception):
    """No adapter of that name is installed."""


def installed_adapters() -> list[str]:
    """The names of the installed adapters (their entry points), sorted."""
    return sorted({entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)})


def load_adapter(name: str) -> AdapterFactory:
    """The adapter class registered under `name` in the `idefics_bot.adapters` entry points."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise AdapterMissing(f"The {name} adapter is not installed; reinstall idefics-bot (make run does it).")
    factory: AdapterFactory = next(iter(found)).load()
    return factory


def adapter_settings_model(name: str) -> type[BaseModel]:
    """The pydantic model of `[name]`: the settings model its adapter registers. A section no adapter
    owns is a mistake (a typo, or an adapter that isn't installed)."""
    return _settings_model(name, tuple(installed_adapters()))


@cache
def _settings_model(name: str, installed: tuple[str, ...]) -> type[BaseModel]:
    if name not in installed:
        raise ValueError(f"[{name}] is not a section of the configuration, nor an installed adapter's (installed adapters: {', '.join(installed)})")
    return load_adapter(name).Settings
