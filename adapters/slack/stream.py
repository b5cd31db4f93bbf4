"""A reply streamed the native way: one thread message that grows through `chat.startStream`,
`chat.appendStream` and `chat.stopStream`, while the thread's status line says what the bot is doing.

The stream starts with the first text (so an empty stream never shows), takes more at most once per
`interval`, and ends with the rest of the text, the notes and the finished reply's blocks (feedback
buttons). If Slack refuses to start a stream (for this workspace, or for this channel or thread),
`StreamRefused` carries the events read so far, so the reply can go on another way with nothing lost;
nothing was posted then. Slack may also close a long stream itself (`message_not_in_streaming_state`
on an append or the stop): `StreamClosed` then says what the stream shows and carries the events
still to show, so the rest can follow in ordinary messages. Streaming calls add text each time, so
they are never repeated after a doubtful failure (see `slack_delivery`): such a reply is reported,
not doubled.

Text is escaped as everywhere in the adapter (`slack_text.escape`), character by character, so what
was sent stays a prefix of what follows.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.delivery import transient
from adapters.slack.text import escape
from bot.sdk.delivery import format_final
from ground.messages import Final, Partial, ReplyEvent, Waiting, Working

log = logging.getLogger(__name__)

CALL_LIMIT = 12_000  # characters of markdown_text per streaming call
ENDED_UNEXPECTEDLY = "The reply ended unexpectedly; please try again."

Status = Callable[[str], Awaitable[None]]


CLOSED = "message_not_in_streaming_state"  # Slack ended the stream (it does so to long streams)


class StreamRefused(Exception):
    """Slack refused `chat.startStream` (its error in `error`); `seen` are the events read so far."""

    def __init__(self, error: str, seen: list[ReplyEvent]):
        super().__init__(error)
        self.error = error
        self.seen = seen


class StreamClosed(Exception):
    """Slack closed the stream `ts` before the reply was all in it: it shows `shown` (the reply's text,
    unescaped); the reply goes on with the events `seen` (the latest text read), then `pending` (the
    next event, being awaited) and the rest of the iterator."""

    def __init__(self, ts: str, shown: str, seen: list[ReplyEvent], pending: asyncio.Future | None):
        super().__init__(CLOSED)
        self.ts = ts
        self.shown = shown
        self.seen = seen
        self.pending = pending


def waiting_status(position: int) -> str:
    return f"is waiting for the model: you're #{position} in line…"


def italic(note: str) -> str:
    return f"_{note}_"


class SlackStream:
    """One reply, streamed into the thread `thread_ts` of `channel` for `recipient` (user, team)."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        thread_ts: str,
        recipient: tuple[str, str],
        *,
        status: Status,
        working: str = "is thinking…",
        blocks: Callable[[Final], list[dict]] = lambda final: [],
        started: Callable[[], Awaitable[None]] | None = None,
        interval: float = 1.0,
    ):
        """`blocks(final)`: the finished reply's blocks; `started()` runs once the stream is there."""
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.recipient = recipient
        self.status = status
        self.working = working
        self.blocks = blocks
        self.started = started
        self.interval = interval
        self.ts: str | None = None  # the stream's message, once started
        self._sent = ""  # the text in the stream (unescaped), as far as Slack took it

    async def run(self, events: AsyncIterator[ReplyEvent]) -> Final:
        """Stream the reply; returns the final event once the stream is stopped."""
        loop = asyncio.get_running_loop()
        seen: list[ReplyEvent] = []
        last_sent, unsent = -math.inf, ""
        final: Final | None = None
        iterator = aiter(events)
        following: asyncio.Future | None = None
        latest: list[ReplyEvent] = []  # the last text event read: what a closed stream's rest starts from
        try:
            while final is None:
                following = following or asyncio.ensure_future(anext(iterator))
                # Text that came too soon after the last call goes out when the interval is over, even
                # if the model is slow to say more.
                wait = max(0.0, last_sent + self.interval - loop.time()) if unsent else None
                await asyncio.wait({following}, timeout=wait)
                if not following.done():
                    await self._send(unsent, seen)
                    last_sent, unsent = loop.time(), ""
                    continue
                try:
                    event = following.result()
                except StopAsyncIteration:
                    break
                following = None
                if self.ts is None:
                    seen.append(event)
                if isinstance(event, (Partial, Final)):
                    latest = [event]
                if isinstance(event, Waiting):
                    await self.status(waiting_status(event.position))
                elif isinstance(event, Working):
                    await self.status(self.working)
                elif isinstance(event, Partial):
                    unsent = event.text.rstrip()  # trailing spaces wait: the final text may come without them
                    if loop.time() - last_sent >= self.interval:
                        await self._send(unsent, seen)
                        last_sent, unsent = loop.time(), ""
                elif isinstance(event, Final):
                    final = event
            final = final or Final("", (ENDED_UNEXPECTEDLY,))
            text = format_final(final, italic)
            if text or self.ts is not None:  # nothing to say (a question another process took over): no message
                await self._finish(text, final, seen)
            return final
        except SlackApiError as error:
            if error.response.get("error") != CLOSED or self.ts is None:
                raise
            log.warning("slack.stream_closed", extra={"channel": self.channel, "shown": len(self._sent)})
            pending, following = following, None  # the rest of the reply is still to come: not cancelled
            raise StreamClosed(self.ts, self._sent, latest, pending) from None
        finally:
            if following is not None and not following.done():
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)

    async def _send(self, text: str, seen: list[ReplyEvent]) -> None:
        if len(text) <= len(self._sent) or not text.startswith(self._sent):
            return
        pieces = _pieces(text[len(self._sent) :])
        if self.ts is None:
            await self._start(pieces.pop(0), seen)
        for piece in pieces:
            await self._append(piece)

    async def _append(self, piece: str) -> None:
        await self.client.chat_appendStream(channel=self.channel, ts=self._started(), markdown_text=escape(piece))
        self._sent += piece

    async def _start(self, text: str, seen: list[ReplyEvent]) -> None:
        user, team = self.recipient
        try:
            response = await self.client.chat_startStream(
                channel=self.channel, thread_ts=self.thread_ts, markdown_text=escape(text), recipient_user_id=user, recipient_team_id=team
            )
        except SlackApiError as error:
            if transient(error):
                raise
            raise StreamRefused(str(error.response.get("error")), seen) from None
        self.ts, self._sent = response["ts"], text
        if self.started is not None:
            await self.started()

    def _started(self) -> str:
        if self.ts is None:
            raise RuntimeError("the stream has not started")
        return self.ts

    async def _finish(self, text: str, final: Final, seen: list[ReplyEvent]) -> None:
        # The model's final text may differ a little from what was streamed (a re-run with sampling):
        # what is in the stream stays, and only the notes follow it.
        notes = "".join("\n\n" + italic(note) for note in final.notes)
        rest = text[len(self._sent) :] if text.startswith(self._sent) else notes
        pieces = _pieces(rest) or [""]
        if self.ts is None:
            await self._start(pieces.pop(0), seen)
            pieces = pieces or [""]
        for piece in pieces[:-1]:
            await self._append(piece)
        last = escape(pieces[-1])
        await self.client.chat_stopStream(channel=self.channel, ts=self._started(), markdown_text=last or None, blocks=self.blocks(final) or None)
        self._sent += pieces[-1]


def _pieces(text: str) -> list[str]:
    """`text` in pieces that one streaming call takes once escaped."""
    pieces, start, size = [], 0, 0
    for index, character in enumerate(text):
        width = len(escape(character))
        if size + width > CALL_LIMIT:
            pieces.append(text[start:index])
            start, size = index, 0
        size += width
    return pieces + ([text[start:]] if start < len(text) else [])
