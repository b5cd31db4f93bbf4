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
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from bot.platform.adapter import adapter_settings_model, installed_adapters
from bot.runtime.files import FileTooLarge, NotARegularFile, read_regular_file
from model.loading import DEFAULT_CHECKPOINT

DEFAULT_CONFIG_PATH = Path("config.toml")

# The opening of the IDEFICS reference chat demo's system prompt (without its example turns, whose
# images live on the web).
DEFAULT_SYSTEM_PROMPT = (
    "The following is a conversation between a highly knowledgeable and intelligent visual AI assistant, called "
    "Assistant, and a human user, called User. In the following interactions, User and Assistant will converse in "
    "natural language, and Assistant will do its best to answer User’s questions. Assistant has the ability to "
    "perceive images and reason about the content of visual inputs. Assistant was built to be respectful, polite "
    "and inclusive. It knows a lot, and always tells the truth. When prompted with an image, it does not make up "
    "facts.\nThe conversation begins:"
)

MiB = 1024 * 1024
MAX_CONFIG_BYTES = MiB


class ConfigError(Exception):
    """The configuration can't be used; the message names the file, the key and the problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    backend: Literal["local", "tgi", "openai"] = "local"
    checkpoint: str = DEFAULT_CHECKPOINT
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    device_map: str | None = None
    max_batch_size: int = Field(64, ge=1, le=256)  # a ceiling: max_batch_tokens (memory) is the real limit
    max_batch_tokens: int = Field(16384, ge=64)  # KV cache rows x tokens of the running batch, at most
    threads: int | None = Field(None, ge=1, le=1024)  # torch.set_num_threads; unset: torch's own choice
    max_queue: int = Field(64, ge=1)
    queue_timeout_s: float = Field(120.0, gt=0)
    generation_timeout_s: float = Field(300.0, gt=0)
    stall_timeout_s: float = Field(120.0, gt=0)  # no new token for this long: the worker is replaced
    # backend = "tgi": a text-generation-inference server serving IDEFICS (url: its root address).
    # backend = "openai": an OpenAI-compatible server (url: its /v1 base; model: the served model's id).
    url: str | None = None
    model: str | None = None
    token: SecretStr | None = None  # or TGI_TOKEN / OPENAI_API_KEY; never logged
    max_concurrency: int = Field(16, ge=1, le=1024)
    max_retries: int = Field(3, ge=0, le=10)
    connect_timeout_s: float = Field(10.0, gt=0)
    payload_limit: int = Field(2_000_000, ge=10_000)  # bytes per request: the server's --payload-limit

    @model_validator(mode="after")
    def _tgi_has_an_address(self) -> ModelConfig:
        if self.backend == "tgi" and not self.url:
            raise ValueError('backend = "tgi" needs url, the TGI server\'s address (e.g. url = "http://127.0.0.1:8080")')
        if self.backend == "openai" and not (self.url and self.model):
            raise ValueError(
                'backend = "openai" needs url, the server\'s /v1 base (e.g. url = "http://127.0.0.1:8000/v1"), and model, the id of '
                'the model it serves (e.g. model = "HuggingFaceTB/SmolVLM-Instruct")'
            )
        if self.url is not None:
            address = urlsplit(self.url)
            if address.scheme not in ("http", "https") or not address.hostname:
                raise ValueError('url must be an http:// or https:// address, e.g. "http://127.0.0.1:8080"')
        return self


class GenerationConfig(Section):
    max_new_tokens: int = Field(512, ge=1, le=2000)
    do_sample: bool = False
    temperature: float = Field(0.4, gt=0, le=5)
    top_p: float = Field(0.8, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)


class ConversationConfig(Section):
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_images: int = Field(8, ge=1, le=64)  # images in one model input, history included
    # Longer messages are refused before anything reads them; 2,048 tokens hold about 8,000 characters.
    max_message_chars: int = Field(8000, ge=100, le=100_000)


class FewShotExample(Section):
    image: Path
    text: str


TaskName = Literal["caption", "prompted_caption", "vqa", "classify", "classify_generate", "story", "few_shot", "chat"]


class TasksConfig(Section):
    few_shot: list[FewShotExample] = []
    max_new_tokens: dict[TaskName, Annotated[int, Field(ge=1, le=2048)]] = {}
    num_beams: dict[TaskName, Annotated[int, Field(ge=1, le=8)]] = {}


class ImagesConfig(Section):
    max_bytes: int = Field(20 * MiB, ge=1024)
    max_pixels: int = Field(25_000_000, ge=10_000)
    max_per_turn: int = Field(4, ge=1, le=32)
    max_aspect_ratio: float = Field(20.0, ge=1)
    fetch_links: bool = True  # treat image links in a message's text as images of the turn
    connect_timeout_s: float = Field(5.0, gt=0)
    fetch_timeout_s: float = Field(20.0, gt=0)
    allow_private_addresses: bool = False
    allowed_hosts: list[str] = []  # addresses or names fetched even when private (e.g. "127.0.0.1" in tests)


class LimitsConfig(Section):
    """Fair sharing: a token bucket per user (0 per minute turns it off), and what happens to messages
    that arrive while their conversation is being answered: "queue" answers each in order, "latest"
    answers only the newest of those waiting (the others still join the conversation)."""

    per_user_per_minute: float = Field(10.0, ge=0)
    per_user_burst: int = Field(5, ge=1)
    conversation_mode: Literal["queue", "latest"] = "queue"


class StateConfig(Section):
    """Where conversations live: the SQLite file at `path`, or, when `url` is set, a PostgreSQL
    database that several bot processes can share."""

    path: Path = Path("state/idefics-bot.sqlite3")
    url: SecretStr | None = None  # postgresql://user:password@host:port/database; may carry a password
    max_connections: int = Field(20, ge=5, le=1000)  # to PostgreSQL, per process
    # Turns older than this many days are deleted (unset: kept for good). Images nothing refers to
    # any more are deleted once they are image_grace_minutes old, whatever retention_days says.
    retention_days: float | None = Field(None, gt=0)
    image_grace_minutes: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _url_is_postgresql(self) -> StateConfig:
        if self.url is None:
            return self
        url = self.url.get_secret_value()
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url must be a postgresql:// URL, like postgresql://idefics:secret@db.example:5432/idefics")
        try:
            urlsplit(url).port  # noqa: B018 (parsing the port is the check)
        except ValueError:
            # The URL's text stays out of the message: it may hold the password.
            raise ValueError(
                "url (or DATABASE_URL) can't be parsed as a URL: check the brackets around an IPv6 address, the port number, and that "
                "the password's special characters are percent-encoded (@ as %40, / as %2F, [ as %5B)"
            ) from None
        return self


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = Field(False, alias="json")


class BotConfig(Section):
    # On SIGTERM the bot stops taking messages and exits within this many seconds: replies in flight
    # finish if they can, the others are told the bot is stopping.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # At start-up, messages that a stopped process stored but never answered (it was killed while
    # replying) are answered if they are at most this old; 0 turns that off.
    resume_window_s: float = Field(900.0, ge=0)
    # Processes sharing PostgreSQL: at most this long after one dies, another answers the questions
    # it left (in the messages it had posted for them).
    adopt_after_s: float = Field(20.0, ge=1, le=3600)


class HealthConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)


# Secrets of the core's own sections that may come from the environment: (section, key) -> variable.
# Adapters declare theirs in their settings model (`AdapterSettings.environment`). The model's
# token comes from the variable of the backend in use (`_MODEL_TOKEN_FROM_ENV`).
_SECRETS_FROM_ENV = {
    ("model", "token"): "TGI_TOKEN",
    ("state", "url"): "DATABASE_URL",
}
_MODEL_TOKEN_FROM_ENV = {"tgi": "TGI_TOKEN", "openai": "OPENAI_API_KEY"}


class Config(Section):
    bot: BotConfig = BotConfig()
    health: HealthConfig = HealthConfig()
    model: ModelConfig = ModelConfig()
    generation: GenerationConfig = GenerationConfig()
    conversation: ConversationConfig = ConversationConfig()
    tasks: TasksConfig = TasksConfig()
    images: ImagesConfig = ImagesConfig()
    limits: LimitsConfig = LimitsConfig()
    state: StateConfig = StateConfig()
    logging: LoggingConfig = LoggingConfig()

    # Every other section belongs to an installed adapter (`[discord]`, `[slack]`, ...): it is validated
    # by the settings model that adapter registers (see bot.platform.adapter), and kept as extra fields.
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
    for (section, key), env in _SECRETS_FROM_ENV.items():
        if (section, key) == ("model", "token"):
            env = _MODEL_TOKEN_FROM_ENV.get(str(backend), env)
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
