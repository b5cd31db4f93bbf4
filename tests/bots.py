"""The bot as `idefics-bot run` starts it (`run_bot`), against the fake Discord and the fake Slack, for
tests and benchmarks: the platform settings that point it at the fakes, waiting until it is connected,
and reading its answers off the fakes."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from adapters.discord.settings import DiscordSettings
from adapters.slack.adapter import SlackSettings
from bot.runtime.cli import run_bot
from bot.runtime.config import Config
from tests.fake_discord import FakeDiscord, Interaction
from tests.fake_slack import BOT_TOKEN, SIGNING_SECRET, FakeSlack, Journal, Posted
from tests.load_balancer import LoadBalancer
from tests.model_tap import ModelTap


class BotRun:
    """`run_bot(config)` in a task of this event loop, stopped through its own stop event (as by SIGTERM)."""

    def __init__(self, config: Config, source: str = "the test config"):
        self.config = config
        self.source = source
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self, *ready: Awaitable) -> BotRun:
        """Start, and return once every `ready` is done (the adapters are connected). If `run_bot` ends
        first, raise what went wrong."""
        self.task = asyncio.create_task(run_bot(self.config, self.source, self.stop_event))
        waiting = asyncio.ensure_future(asyncio.gather(*ready))
        await asyncio.wait({self.task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if self.task.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            self.task.result()  # raises what went wrong
            raise AssertionError("run_bot returned before the adapters were ready")
        waiting.result()  # raises if a readiness check failed
        return self

    async def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, timeout)


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


# -- Discord -----------------------------------------------------------------------------------


def discord_section(fake: FakeDiscord, **settings) -> DiscordSettings:
    """[discord] for a bot on `fake`, with its commands registered in the fake's guild."""
    settings = {"token": fake.token, "command_guild_ids": [fake.guild_id], **settings}
    return DiscordSettings(enabled=True, api_base_url=fake.api_base_url, gateway_url=fake.gateway_url, **settings)


def discord_connected(fake: FakeDiscord) -> Awaitable:
    """Done when a bot opens a gateway session with `fake` (one more than it has now)."""
    sessions = len(fake.sessions)
    return fake.wait_for(lambda: len(fake.sessions) > sessions)


async def bot_says(fake: FakeDiscord, channel: dict, text: str, *, exactly: bool = True) -> dict:
    """Wait for the bot's message in `channel` that reads `text` (or contains it)."""

    def found():
        return next((m for m in fake.bot_messages(channel["id"]) if (m["content"] == text if exactly else text in m["content"])), None)

    try:
        return await fake.wait_for(found)
    except TimeoutError:
        raise AssertionError(f"the bot never said {text!r} there; it said {fake.bot_texts(channel['id'])!r}") from None


async def thread_of(fake: FakeDiscord, question: dict) -> dict:
    """The thread the bot opens on `question` (it has the question's id)."""
    return await fake.wait_for(lambda: fake.channels.get(question["id"]))


async def command_answer(fake: FakeDiscord, interaction: Interaction, text: str, *, exactly: bool = True) -> str:
    """Wait until the command's response reads `text` (or contains it)."""

    def found():
        shown = interaction.original or ""
        return shown if (shown == text if exactly else text in shown) else None

    try:
        return await fake.wait_for(found)
    except TimeoutError:
        raise AssertionError(f"the command never showed {text!r}; it showed {interaction.original!r} after {interaction.responses!r}") from None


# -- Slack -------------------------------------------------------------------------------------


def slack_settings(slack: FakeSlack, **settings) -> dict:
    """[slack] keys for a bot on `slack` in HTTP mode, listening on a free port of 127.0.0.1. Replies
    are shown as edited placeholders unless `native_streaming=True` (tests/test_slack_surfaces.py)."""
    return {
        "mode": "http",
        "native_streaming": False,
        "bot_token": BOT_TOKEN,
        "signing_secret": SIGNING_SECRET,
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "api_base_url": slack.api_url,
    } | settings


def slack_section(slack: FakeSlack, **settings) -> SlackSettings:
    return SlackSettings(enabled=True, **slack_settings(slack, **settings))


class LogJournal(logging.Handler):
    """Log records, as a Journal a test can wait on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.journal = Journal()
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self.journal.add, record)


@contextmanager
def logged(name: str = "adapters") -> Iterator[Journal]:
    """The records of logger `name` (at every level) while inside."""
    handler = LogJournal()
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.journal
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def slack_started(logs: Journal) -> Awaitable:
    """Done when the Slack adapter logs that it has started (counted from now)."""
    seen = len(logs.items)
    return logs.wait_for(lambda records: any(r.msg == "slack.started" for r in records[seen:]), timeout=120)


def slack_failures(records: list[logging.LogRecord]) -> list[tuple]:
    """Errors, and Slack API calls that failed, among `records`."""
    return [(r.msg, r.__dict__.get("error")) for r in records if r.levelno >= logging.ERROR or r.msg == "slack.api_error"]


@asynccontextmanager
async def running(config: Config, logs: Journal, tap: ModelTap) -> AsyncIterator[BotRun]:
    """`run_bot` until the Slack adapter has started; stopped (as by SIGTERM) on exit, when nothing
    may have failed in the meantime."""
    seen = len(logs.items)
    run = await BotRun(config).start(slack_started(logs))
    try:
        yield run
    finally:
        tap.gate.set()
        await run.stop()
    failures = slack_failures(logs.items[seen:])
    assert not failures, failures


@dataclass
class Harness:
    """A running bot and the fake Slack it talks to (in HTTP mode); with a `balancer`, several bot
    processes behind it (`config` is the first one's)."""

    slack: FakeSlack
    config: Config
    logs: Journal
    tap: ModelTap
    balancer: LoadBalancer | None = None

    @property
    def endpoint(self) -> str:
        """Where Slack sends requests: the bot's HTTP listener, or the load balancer in front of the bots."""
        if self.balancer is not None:
            return self.balancer.url(self.config.slack.events_path)
        return f"http://127.0.0.1:{self.config.slack.http_port}{self.config.slack.events_path}"

    async def send(self, event: dict, *, event_id: str | None = None, retry: int | None = None) -> str:
        """Deliver `event` over HTTP as Slack does; returns its event_id."""
        body = self.slack.envelope(event, event_id)
        delivery = await self.slack.deliver(self.endpoint, body, retry=retry)
        assert delivery.status == 200, delivery
        return body["event_id"]

    async def outcome(self, event_id: str, event: str = "slack.replied", timeout: float = 60.0) -> logging.LogRecord:
        """Wait for the adapter's log record `event` about `event_id`."""
        return await self.logs.wait_for(
            lambda records: next((r for r in records if r.msg == event and getattr(r, "event_id", None) == event_id), None), timeout
        )

    async def answer(self, event: dict, timeout: float = 60.0) -> list[Posted]:
        """Deliver `event`, wait until it is answered, and return the bot's messages in its thread."""
        await self.outcome(await self.send(event), timeout=timeout)
        in_dm = event.get("channel_type") == "im"
        return self.slack.thread(event["channel"], event.get("thread_ts") or (None if in_dm else event["ts"]))

    async def command(self, text: str, **options) -> dict:
        """Run the slash command; returns what the bot posted to its response_url."""
        delivery, response_id = await self.slack.command(self.endpoint, text, **options)
        assert delivery.status == 200, delivery
        return await self.slack.responses.wait_for(lambda items: next((body for rid, body in items if rid == response_id), None))
