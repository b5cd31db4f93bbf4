"""Each part's settings: the core's sections of the config file (see config.example.toml), validated at
start-up, each read by the part it configures. The file itself, with the adapters' sections, is read by
`bot.runtime.config`.

Every section is a pydantic model that forbids unknown keys, so a typo is reported with the key's
name instead of being ignored. Secrets may come from the environment and are kept as `SecretStr`,
which never prints its value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from model.loading import DEFAULT_CHECKPOINT

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
    image_cache_mb: int = Field(256, ge=0)  # encoded images kept between requests (local backend); 0: none
    prompt_process: bool = True  # prompts processed in a process of their own while others decode (local backend)
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


class Settings(Section):
    """The core's settings: every section of the config file but the adapters' (`bot.runtime.config.Config`
    adds those). The parts of the bot take the sections they read."""

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
