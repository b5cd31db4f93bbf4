"""The platform SDK from an adapter author's side: a throwaway adapter, installed through an entry point
of its own (a distribution written into a temporary directory), brings its own config section and
gets its messages and commands answered by `idefics-bot run`'s process, without a line of `bot/`
knowing it."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from bot.runtime.config import load_config
from bot.settings import ConfigError
from tests.bots import BotRun
from tests.conftest import image_bytes

ADAPTER = '''
"""A chat platform that lives in a test: messages come from `say`, replies go to `shown`."""

import asyncio

from pydantic import SecretStr

from ground.conversation import Author, ConversationKey
from ground.messages import Attachment, CommandRequest, Final, IncomingMessage
from bot.sdk.access import AccessSettings, Requester, refusal_reason
from bot.sdk.delivery import LiveReply
from bot.sdk.platform import Platform


class EchoSettings(AccessSettings):
    environment = {"token": "ECHO_TOKEN"}

    token: SecretStr | None = None
    greeting: str = "hello"


class Board:
    """Where the adapter shows replies: a list of messages, edited in place."""

    def __init__(self):
        self.messages = []

    async def post(self, text):
        self.messages.append(text)
        return len(self.messages) - 1

    async def edit(self, index, text):
        self.messages[index] = text


class EchoAdapter:
    Settings = EchoSettings
    delivery_errors = (ConnectionError,)
    name = "echo"
    running = []  # the started adapters, for the test to talk to
    waiters = []  # futures that get the adapter once it has started

    def __init__(self, platform: Platform, settings: EchoSettings):
        self.platform = platform
        self.settings = settings
        self.connected = False

    async def start(self):
        self.connected = True
        EchoAdapter.running.append(self)
        for waiter in EchoAdapter.waiters:
            waiter.set_result(self)

    async def stop(self):
        self.connected = False
        EchoAdapter.running.remove(self)

    async def say(self, user, channel, text, image=None, message_id="m1"):
        """A message from `user`; returns what the bot shows, or None if it stays out."""
        if refusal_reason(self.settings, Requester(user, channel)) is not None:
            self.platform.record("refused")
            return None
        if not await self.platform.first_delivery(message_id, message_id=message_id):
            return None
        files = (Attachment("photo.png", _reader(image)),) if image is not None else ()
        key = ConversationKey(self.name, channel, message_id)
        board = Board()
        final = await self.platform.answer(IncomingMessage(key, Author(user, user), text, files, message_id), LiveReply(board, limit=1000))
        return board.messages if final is not None else None

    async def command(self, user, channel, name, text=""):
        final = Final("")
        async for event in self.platform.command(CommandRequest(name, ConversationKey(self.name, channel), Author(user, user), (), text)):
            final = event
        return final


def _reader(data):
    async def read(max_bytes):
        return data

    return read
'''


@pytest.fixture
def echo_installed(tmp_path, monkeypatch):
    """The throwaway adapter as an installed distribution with an `idefics_bot.adapters` entry point."""
    site = tmp_path / "site"
    (site / "echo_adapter-0.1.dist-info").mkdir(parents=True)
    (site / "echo_adapter.py").write_text(ADAPTER)
    (site / "echo_adapter-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-adapter\nVersion: 0.1\n")
    (site / "echo_adapter-0.1.dist-info" / "entry_points.txt").write_text("[idefics_bot.adapters]\necho = echo_adapter:EchoAdapter\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    monkeypatch.delitem(__import__("sys").modules, "echo_adapter", raising=False)


def echo_config(tmp_path, tiny_checkpoint, echo: str, environ: dict | None = None):
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(f"""
        [model]
        checkpoint = "{tiny_checkpoint}"
        [generation]
        max_new_tokens = 24
        [state]
        path = "{tmp_path / 'state' / 'bot.sqlite3'}"
        [echo]
        """)
        + echo
    )
    return load_config(path, environ=environ or {})


def test_the_adapters_section_is_its_own_settings_model(echo_installed, tmp_path, tiny_checkpoint):
    config = echo_config(tmp_path, tiny_checkpoint, 'greeting = "hi"\n', {"ECHO_TOKEN": "secret-token"})
    section = config.section("echo")
    assert type(section).__name__ == "EchoSettings" and section.greeting == "hi"
    assert section.enabled and section.token.get_secret_value() == "secret-token"  # on: its secret is there
    assert not echo_config(tmp_path, tiny_checkpoint, "").section("echo").enabled
    with pytest.raises(ConfigError, match=r"\[echo\] colour: unknown key"):
        echo_config(tmp_path, tiny_checkpoint, 'colour = "red"\n')
    with pytest.raises(ConfigError, match=r"\[echo\] is enabled but has no token: set token in this section, or ECHO_TOKEN"):
        echo_config(tmp_path, tiny_checkpoint, "enabled = true\n")


async def test_a_throwaway_adapter_gets_messages_and_commands_answered(echo_installed, tmp_path, tiny_checkpoint, tap):
    config = echo_config(tmp_path, tiny_checkpoint, 'token = "t"\nblocked_users = ["mallory"]\n')
    from echo_adapter import EchoAdapter

    started = asyncio.get_running_loop().create_future()
    EchoAdapter.waiters.append(started)
    run = await BotRun(config).start(started)
    try:
        echo = started.result()
        answer = tap.force_next("a red square")
        shown = await echo.say("ann", "c1", "What is this?", image=image_bytes())
        assert shown == [answer] and "What is this?" in tap.prompt() and tap.prompt().count("<image>") == 1
        assert await echo.say("ann", "c1", "What is this?") is None  # the same message again: answered once
        assert await echo.say("mallory", "c1", "hi", message_id="m2") is None  # the adapter's own access rules

        story = tap.force_next("once upon a time")
        told = await echo.command("bob", "c1", "story")
        assert told.text == story and told.notes == ("I used the last image I saw in this channel (photo.png).",)
        reset = await echo.command("bob", "c1", "reset")
        assert reset.text == "Forgot 1 conversation here (2 messages); the next message starts afresh."
    finally:
        await run.stop()
