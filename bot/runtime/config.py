"""Configuration: one TOML file (see config.example.toml), validated at start-up.

Every section is a pydantic model that forbids unknown keys, so a typo is reported with the key's
name instead of being ignored. Secrets may come from the environment and are kept as `SecretStr`,
which never prints its value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from bot.sdk.adapter import adapter_settings_model, installed_adapters
from bot.settings import ConfigError, MiB, Settings
from ground.files import FileTooLarge, NotARegularFile, read_regular_file

DEFAULT_CONFIG_PATH = Path("config.toml")


MAX_CONFIG_BYTES = MiB


# Secrets of the core's own sections that may come from the environment: (section, key) -> variable.
# Adapters declare theirs in their settings model (`AdapterSettings.environment`). The model's
# token comes from the variable of the backend in use (`_MODEL_TOKEN_FROM_ENV`), else TGI_TOKEN.
_SECRETS_FROM_ENV = {
    ("model", "token"): "TGI_TOKEN",
    ("state", "url"): "DATABASE_URL",
}
_MODEL_TOKEN_FROM_ENV = {"openai": "OPENAI_API_KEY"}


class Config(Settings):
    """The config file: the core's sections (`Settings`) and the sections of the installed adapters."""

    # Every other section belongs to an installed adapter (`[discord]`, `[slack]`, ...): it is validated
    # by the settings model that adapter registers (see bot.sdk.adapter), and kept as extra fields.
    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _adapter_sections(self) -> Config:
        extra = self.__pydantic_extra__ or {}
        for name, section in extra.items():
            model = adapter_settings_model(name)
            if not isinstance(section, model):
                extra[name] = model.model_validate(section if isinstance(section, dict) else {})
        return self

    def section(self, name: str) -> BaseModel:
        """The settings of adapter `name`: its section as written, or its defaults."""
        extra = self.__pydantic_extra__ or {}
        if name in extra:
            return extra[name]
        return adapter_settings_model(name).model_validate({})

    def with_checkpoint(self, checkpoint: str | None) -> Config:
        """This configuration with `[model] checkpoint` replaced (the CLI's --model)."""
        if not checkpoint:
            return self
        return self.model_copy(update={"model": self.model.model_copy(update={"checkpoint": checkpoint})})


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (default: ./config.toml if present, else built-in defaults) and the environment."""
    if environ is None:
        environ = os.environ
    if path is None:
        path = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    data: dict = {}
    source = "built-in defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = tomllib.loads(read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file. Copy config.example.toml to start one, or leave out --config.") from None
        except OSError as exc:
            raise ConfigError(f"{path}: can't be read ({exc.strerror}).") from None
        except NotARegularFile as odd:
            raise ConfigError(str(odd)) from None
        except FileTooLarge as too_large:
            raise ConfigError(f"{path}: {too_large.size / MiB:.1f} MB is far too large for a config file.") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}.") from None
    errors: list[str] = []  # the core's sections' first, then the adapters'
    adapter_errors: list[str] = []
    sections: dict[str, BaseModel] = {}
    for name in installed_adapters():
        raw = data.pop(name, {})
        if not isinstance(raw, dict):
            adapter_errors.append(f"[{name}] must be a table of settings")
            continue
        model = adapter_settings_model(name)
        from_environment = []  # for errors that name the variable rather than the key
        for key, env in getattr(model, "environment", {}).items():
            if environ.get(env) and not raw.get(key):
                raw[key] = environ[env]
                from_environment.append(key)
        try:
            sections[name] = model.model_validate(raw, context={"from_environment": from_environment})
        except ValidationError as exc:
            adapter_errors += [_describe(error, name, frozenset(getattr(model, "environment", {}))) for error in exc.errors()]
    model_section = data.get("model", {})
    backend = model_section.get("backend") if isinstance(model_section, dict) else None
    model_token = _MODEL_TOKEN_FROM_ENV.get(str(backend), _SECRETS_FROM_ENV["model", "token"])
    for (section, key), env in {**_SECRETS_FROM_ENV, ("model", "token"): model_token}.items():
        if environ.get(env) and isinstance(data.get(section, {}), dict) and not data.get(section, {}).get(key):
            data.setdefault(section, {})[key] = environ[env]
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors += [_describe(error) for error in exc.errors()]
    if errors or adapter_errors:
        raise ConfigError(f"{source}: " + "; ".join(errors + adapter_errors))
    return config.model_copy(update=sections)


def _describe(error: Any, section: str | None = None, secrets: frozenset[str] = frozenset()) -> str:
    """One validation error in words, located as `[section] key`. `section`: the adapter section the
    error's location is inside (None: a core section, named by the location itself)."""
    location = [*([section] if section else []), *(str(part) for part in error["loc"])]
    message = error["msg"].removeprefix("Value error, ")
    if not location:
        return message
    if len(location) == 1:
        return f"[{location[0]}] {message}" if section else f"[{location[0]}]: {message}"
    key = f"[{location[0]}] {'.'.join(location[1:])}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against config.example.toml)"
    secret = location[-1] in secrets | {key for _, key in _SECRETS_FROM_ENV}
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict) and not secret:
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"
