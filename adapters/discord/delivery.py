"""Showing replies in Discord: a channel or thread, or a deferred command's response, as a
`bot.sdk.delivery.Surface`, so `LiveReply` streams into it (edits at most once a second, 2,000 characters
per message, notes in italics). Nothing the bot posts can ping anyone: every message carries
`allowed_mentions` that allow none, whatever the model writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import discord
from discord.utils import escape_markdown

from adapters.discord.buttons import RegenerateButton, StopButton, buttons
from bot.sdk.delivery import LiveReply, Surface, format_final, split_message
from bot.sdk.stopping import Replies, stoppable
from ground.messages import Final, Partial, ReplyEvent

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
NO_PINGS = discord.AllowedMentions.none()
# Discord accepts follow-ups to a command for 15 minutes; past this the asker is told, while we still can.
ANSWER_WINDOW = timedelta(minutes=15) - timedelta(seconds=10)
TOO_SLOW = "The model took longer than Discord lets me answer a command (15 minutes). Please try again later, or mention me in a channel."
# An app installed only to the person's account may send 5 follow-ups per interaction (Discord's error
# 40094 past that): with the original response, a command's answer has 6 messages there.
USER_INSTALL_MESSAGES = 6
CUT = "The answer goes on, but Discord lets an app installed to your account show only this much of it: ask for a shorter answer."


def note(text: str) -> str:
    """A note under a reply (an ignored file, a refused image...), in italics."""
    return f"*{escape_markdown(text)}*"


def live_reply(surface: Surface, **options: Any) -> LiveReply:
    """A streamed reply the Discord way: 2,000 characters a message, notes in italics (`options`: as
    `LiveReply` takes them)."""
    return LiveReply(surface, limit=MESSAGE_LIMIT, note=note, **options)


class ChannelSurface:
    """Messages in a channel, thread or DM. The first answers `reply_to` (when given) and carries
    `controls` (the Stop button) while the reply is written; every message is linked to the
    conversation through `on_post`, so replying to any of them continues it. `begun`: the messages a
    stopped process had posted for the reply, which are edited before any is posted (the first of
    them carries that process's Stop button)."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        reply_to: discord.Message | discord.PartialMessage | None = None,
        on_post: Callable[[discord.Message], Awaitable[None]] | None = None,
        controls: discord.ui.View | None = None,
        begun: Sequence[discord.Message | discord.PartialMessage] = (),
    ):
        self.channel = channel
        self.reply_to = reply_to
        self.on_post = on_post
        self.controls = controls
        self.begun = list(begun)
        self.posted: list[discord.Message] = []
        self._edited: set[int] = set()  # the begun messages this process showed something in (by their ids)

    async def post(self, text: str) -> discord.Message:
        options: dict[str, Any] = {"allowed_mentions": NO_PINGS}
        if not self.posted and not self.begun:  # the first message answers the question and carries the controls
            if self.reply_to is not None:
                options["reference"] = self.reply_to.to_reference(fail_if_not_exists=False)
            if self.controls is not None:
                options["view"] = self.controls
        message = await self.channel.send(text, **options)
        self.posted.append(message)
        if self.on_post is not None:
            await self.on_post(message)
        return message

    async def edit(self, message: discord.Message | discord.PartialMessage, text: str) -> None:
        await message.edit(content=text, allowed_mentions=NO_PINGS)
        self._edited.add(message.id)

    @staticmethod
    def message_id(message: discord.Message) -> str:
        """A posted message's id, as the platform SDK keeps it."""
        return str(message.id)

    async def finish(self, buttons: discord.ui.View | None) -> None:
        """The reply is shown: the Stop button goes, and the last message gets `buttons` (if any). A
        begun message the answer didn't need goes; if this process showed nothing (another one took
        the question over), the messages are left to that one."""
        shown = [message for message in self.begun if message.id in self._edited] + self.posted
        if not shown or (self.controls is None and buttons is None and not self.begun):
            return
        first, last = shown[0], shown[-1]
        if first is not last and (self.controls is not None or self.begun):
            await first.edit(view=None)
        await last.edit(view=buttons)
        for message in self.begun:
            if message.id not in self._edited:
                with contextlib.suppress(discord.HTTPException):
                    await message.delete()

    async def discard(self) -> None:
        """Delete what was posted, and the begun messages (the question was deleted, so its answer
        goes too; or a stopped process never stored it)."""
        for message in [*self.begun, *self.posted]:
            with contextlib.suppress(discord.HTTPException):  # already gone, or not ours to delete any more
                await message.delete()


class ButtonedReply(LiveReply):
    """A reply on a `ChannelSurface` (LiveReply the Discord way, continuing in `messages` if a stopped
    process had begun them) with a Stop button while it is written (the reply is known as `reply` in
    `replies`, and stoppable by `asker` or as `replies` allows), and a Regenerate button for `asker` on
    the finished answer, if it was stored."""

    def __init__(
        self,
        channel: discord.abc.Messageable,
        reply_to: discord.Message | discord.PartialMessage | None,
        on_post: Callable[[discord.Message], Awaitable[None]] | None,
        replies: Replies,
        reply: int,
        asker: int,
        messages: Sequence[Any] = (),
    ):
        self.channel_surface = ChannelSurface(channel, reply_to, on_post, controls=buttons(StopButton(reply)), begun=messages)
        super().__init__(self.channel_surface, limit=MESSAGE_LIMIT, note=note, messages=messages)
        self.replies = replies
        self.reply = str(reply)
        self.asker = asker

    async def run(self, events: AsyncIterator[ReplyEvent]) -> Final:
        writing = self.replies.start(self.reply, str(self.asker))
        try:
            final = await super().run(stoppable(events, writing))
        finally:
            self.replies.done(self.reply)
        await self.channel_surface.finish(buttons(RegenerateButton(final.turn_id, self.asker)) if final.turn_id else None)
        return final

    async def discard(self) -> None:
        await self.channel_surface.discard()


class InteractionSurface:
    """A deferred command's answer: its original response first, then follow-up messages."""

    _ORIGINAL = "@original"

    def __init__(self, interaction: discord.Interaction):
        self.interaction = interaction
        self._shown_original = False

    async def post(self, text: str):
        if not self._shown_original:
            await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
            self._shown_original = True
            return self._ORIGINAL
        return await self.interaction.followup.send(text, wait=True, allowed_mentions=NO_PINGS)

    async def edit(self, message, text: str) -> None:
        if message == self._ORIGINAL:
            await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)
        else:
            await message.edit(content=text, allowed_mentions=NO_PINGS)


def message_budget(interaction: discord.Interaction) -> int | None:
    """How many messages an answer through `interaction` may have: None (no limit) unless the app runs
    there as installed to the person's account only (Discord's authorizing integration owners)."""
    return USER_INSTALL_MESSAGES if interaction.is_user_integration() and not interaction.is_guild_integration() else None


def fitted(text: str, notes: tuple[str, ...], messages: int) -> tuple[str, tuple[str, ...]]:
    """`text` and `notes` as they fit in `messages` messages: as they are, or the text cut at a word
    (the longest such beginning that fits) with the note `CUT` added."""

    def fits(candidate: str, with_notes: tuple[str, ...]) -> bool:
        formatted = format_final(Final(candidate, with_notes), note)
        # Text within the limit is one message: no need to split it to count.
        return len(formatted) <= MESSAGE_LIMIT or len(split_message(formatted, MESSAGE_LIMIT)) <= messages

    if fits(text, notes):
        return text, notes
    notes = (*notes, CUT)
    low, high = 0, min(len(text), messages * MESSAGE_LIMIT)  # the longest length known to fit, and one that may
    while low < high:
        middle = (low + high + 1) // 2
        if fits(_at_word(text, middle), notes):
            low = middle
        else:
            high = middle - 1
    return _at_word(text, low), notes


def _at_word(text: str, length: int) -> str:
    """The beginning of `text` of at most `length` characters, cut at a space if there is one, with "…"."""
    head = text[:length]
    if length < len(text) and " " in head:
        head = head.rsplit(" ", 1)[0]
    return head.rstrip() + "…" if head.strip() else ""


async def within(events: AsyncIterator[ReplyEvent], messages: int) -> AsyncIterator[ReplyEvent]:
    """`events` with their text cut to fit in `messages` messages (see `fitted`)."""
    async for event in events:
        if isinstance(event, Partial):
            yield Partial(fitted(event.text, (), messages)[0])
        elif isinstance(event, Final):
            text, notes = fitted(event.text, event.notes, messages)
            yield Final(text, notes, event.turn_id)
        else:
            yield event


async def answer_interaction(interaction: discord.Interaction, events: AsyncIterator[ReplyEvent]) -> None:
    """Stream `events` into a deferred interaction, in as many messages as Discord allows there (see
    `message_budget`); if it would outlast the interaction's 15 minutes, stop the request and say so.
    The clock starts when Discord created the interaction (or now, if this host's clock is behind Discord's)."""
    budget = message_budget(interaction)
    if budget is not None:
        events = within(events, budget)
    now = discord.utils.utcnow()
    remaining = (min(interaction.created_at, now) + ANSWER_WINDOW - now).total_seconds()
    deadline = asyncio.timeout(max(remaining, 0.0))
    try:
        async with deadline:
            await live_reply(InteractionSurface(interaction)).run(events)
    except TimeoutError:
        if not deadline.expired():
            raise
        log.warning("discord.command_too_slow", extra={"interaction": interaction.id})
        await interaction.edit_original_response(content=note(TOO_SLOW), allowed_mentions=NO_PINGS)
