"""The slash command (`/idefics` unless configured otherwise): one-off image tasks.

    /idefics ask <image url> <question>          /idefics caption <image url>
    /idefics classify <image url> <label, ...>   /idefics story <image url>
    /idefics reset                               /idefics forget
    /idefics help

The commands are the shared table's (`bot.core.commands`), so they mean what they mean on every
platform. The command is acknowledged at once (Slack waits 3 seconds at most) with an ephemeral
"working" note; the answer goes to the command's `response_url`. Without an image URL the core takes
the last image the bot saw in the channel and says so.

A post to `response_url` that Slack answers with 429 waits out the Retry-After and is tried again.
Any other failure is not repeated (the answer may have been shown already, and a response_url takes
five posts at most) but logged with its conversation.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.webhook.async_client import AsyncWebhookClient

from adapters.slack.delivery import RETRIES
from adapters.slack.text import escape, plain_text
from bot.sdk.access import AccessSettings, Requester, refusal_reason
from bot.sdk.delivery import format_final, split_message
from bot.sdk.platform import Platform
from ground.commands import COMMANDS, IMAGE_COMMANDS, LAST_IMAGE_HINT
from ground.conversation import Author, ConversationKey
from ground.messages import CommandRequest, Final

log = logging.getLogger(__name__)

# How each command of the table is written after the slash command.
_USAGE = {
    "ask": "ask <image url> <question>",
    "caption": "caption <image url>",
    "classify": "classify <image url> <label, label, ...>",
    "story": "story <image url>",
    "reset": "reset",
    "forget": "forget",
    "help": "help",
}
WORKING = "⏳ Working on it…"
# Any scheme: a link the bot won't fetch (file://, gopher://) gets its reason, instead of being read as the question.
_LINK = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


class UsageError(ValueError):
    """The command's text can't be understood; the message shows how to write it."""


@dataclass(frozen=True)
class SlashCommand:
    """What the person asked for: `action` is a command of the shared table."""

    action: str
    image_url: str | None = None
    text: str = ""  # the question (ask) or the labels (classify)


def help_text(command: str) -> str:
    lines = [f"*{command} {_USAGE[name]}*: {COMMANDS[name].summary}" for name in COMMANDS if name != "help"]
    return "\n".join([*lines, f"{LAST_IMAGE_HINT} To chat, mention me with a question and an image; I answer in the thread."])


def parse_command(text: str, command: str = "/idefics") -> SlashCommand:
    """The command in `text` (already plain text), or `UsageError`."""
    action, _, rest = text.strip().partition(" ")
    action = action.lower()
    if action in ("", "help"):
        return SlashCommand("help")
    if action in ("reset", "forget"):
        return SlashCommand(action)
    if action not in IMAGE_COMMANDS:
        raise UsageError(f"I don't know “{action}”. Try:\n{help_text(command)}")
    rest = rest.strip()
    first, _, after = rest.partition(" ")
    if _LINK.fullmatch(first):
        return SlashCommand(action, first, after.strip())
    return SlashCommand(action, None, rest)


def _is_dm(payload: dict) -> bool:
    return payload.get("channel_name") == "directmessage" or payload.get("channel_id", "").startswith("D")


Spawn = Callable[[Awaitable[None], str], object]


class SlashCommands:
    """Handles the slash command for the adapter: acknowledges, then answers via `response_url`."""

    def __init__(self, platform: Platform, settings: AccessSettings, spawn: Spawn, message_limit: int, command: str = "/idefics"):
        """`spawn(coroutine, name)` runs the work in the adapter's own tasks (stopped with it)."""
        self.platform = platform
        self.command = command
        self.settings = settings
        self.spawn = spawn
        self.message_limit = message_limit

    async def handle(self, ack: Callable[..., Awaitable[None]], command: dict) -> None:
        """Bolt's listener for the command: answer within Slack's 3 seconds, work afterwards."""
        who = Requester(user_id=command.get("user_id", ""), channel_id=command.get("channel_id", ""), is_dm=_is_dm(command))
        reason = refusal_reason(self.settings, who)
        self.platform.record("command" if reason is None else "refused")
        if reason is not None:
            log.info("slack.command_refused", extra={"reason": reason, "channel": who.channel_id})
            await ack(text="Sorry, I'm not available to you here.")
            return
        try:
            parsed = parse_command(plain_text(command.get("text", "")), self.command)
        except UsageError as error:
            await ack(text=escape(str(error)))  # it quotes what was typed
            return
        if parsed.action == "help":
            await ack(text=escape(help_text(self.command)))
            return
        await ack(text=WORKING)
        log.info("slack.command", extra={"action": parsed.action, "channel": who.channel_id, "image_url": parsed.image_url is not None})
        self.spawn(self._answer(parsed, command), f"command-{parsed.action}")

    async def _answer(self, parsed: SlashCommand, payload: dict) -> None:
        channel, user = payload["channel_id"], payload["user_id"]
        request = CommandRequest(
            parsed.action,
            ConversationKey(self.platform.name, channel),  # a slash command can't say which thread it was typed in
            Author(user, payload.get("user_name") or user),
            (self.platform.link(parsed.image_url),) if parsed.image_url else (),
            parsed.text,
        )
        final = Final("", ("The reply ended unexpectedly; please try again.",))
        async for event in self.platform.command(request):
            if isinstance(event, Final):
                final = event
        if parsed.action in ("reset", "forget") or not final.text:  # nothing to show the channel: tell the asker only
            await self._respond(payload, parsed, text=escape(format_final(final, lambda note: note)))
            return
        answer = f"{self._heading(parsed, user)}\n{escape(format_final(final, lambda note: f'_{note}_'))}"
        for part in split_message(answer, self.message_limit):
            if not await self._respond(payload, parsed, text=part, response_type="in_channel", unfurl_links=False, unfurl_media=False):
                return

    async def _respond(self, payload: dict, parsed: SlashCommand, **message) -> bool:
        """Post `message` to the command's response_url; False (and logged) if Slack didn't take it."""
        client = AsyncWebhookClient(payload["response_url"], retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=RETRIES)])
        try:
            response = await client.send_dict(message)
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = type(error).__name__
        else:
            if response.status_code == 200:
                return True
            reason = f"HTTP {response.status_code}: {response.body[:100]}"
        self.platform.lost(ConversationKey(self.platform.name, payload["channel_id"]), command=parsed.action, error=reason)
        return False

    @staticmethod
    def _heading(parsed: SlashCommand, user: str) -> str:
        """Whose request this answers, so the channel can follow (the user id is Slack's, the rest escaped)."""
        if parsed.action == "ask":
            return f"<@{user}> asked: {escape(parsed.text)}"
        if parsed.action == "classify":
            return f"<@{user}> asked which of these fits: {escape(parsed.text)}"
        return f"{parsed.action.capitalize()} for <@{user}>:"
