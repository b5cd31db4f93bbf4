"""The base of an adapter's settings model: its config section, validated at start-up.

An adapter declares which of its keys are secrets that may come from the environment; when the
section doesn't say `enabled`, the adapter is on exactly when those secrets are there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import model_validator

from bot.settings import Section

__all__ = ["AdapterSettings", "Section"]


class AdapterSettings(Section):
    """Settings of an adapter that `idefics-bot run` starts when `enabled`."""

    # Secret keys of the section that may come from an environment variable: key -> variable.
    environment: ClassVar[dict[str, str]] = {}
    # An adapter that needs no account anywhere (the web chat) can be the one that runs when no other
    # is enabled: with `enabled` left out of its section, `enabled` is None, which means exactly that.
    runs_alone: ClassVar[bool] = False

    enabled: bool | None = False

    @classmethod
    def secrets_needed(cls, section: Mapping[str, Any]) -> list[str]:
        """The secret keys the adapter needs to run with these settings (all of `environment`, unless
        an adapter says otherwise)."""
        return list(cls.environment)

    @model_validator(mode="before")
    @classmethod
    def _enabled_by_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" not in data:
            needed = cls.secrets_needed(data)
            data = {**data, "enabled": None if cls.runs_alone else bool(needed) and all(data.get(key) for key in needed)}
        return data

    @model_validator(mode="after")
    def _enabled_has_secrets(self) -> AdapterSettings:
        if self.enabled:
            for key in self.secrets_needed(self.__dict__):
                if getattr(self, key, None) is None:
                    raise ValueError(f"is enabled but has no {key}: set {key} in this section, or {self.environment[key]}")
        return self
