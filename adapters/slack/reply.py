"""Showing one Slack reply, from the engine's events to the thread.

    events -> stoppable -> SlackStream (native streaming)            -> feedback buttons at the stop
                        \\-> LiveReply on a ButtonedThread (fallback) -> feedback buttons on the last message

- In a thread, the reply streams natively (`slack_stream`) unless `[slack] native_streaming` is off or
  the workspace refused the method (`slack_streaming`: decided in the shared store, for every process);
  a reply whose stream Slack refused (for the workspace, or for its channel or thread) continues in
  the fallback with nothing lost. If Slack closes a stream before the reply is all in it, the rest
  follows in the thread the fallback's way, starting with "…".
- The fallback is the placeholder that is edited as the text comes (`LiveReply`), as in a DM outside
  threads, where Slack can't stream.
- While the model works, the thread's status line says so (the place in the queue, or "is looking at
  your image…") where no placeholder does: beside a native stream, and in the assistant panel's
  chats (threads of a DM). A Stop button is on the reply from the start (a queued answer, or one whose
  image is loading, can be stopped too): on the placeholder, or, as a native stream takes no buttons
  until it ends, on a small message posted at once, before the stream, that goes when it ends. Only
  the asker may press it, unless `[slack] anyone_can_stop`. A finished answer carries feedback buttons.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import StopValue, feedback_blocks, stop_button
from adapters.slack.delivery import SlackThread, transient
from adapters.slack.stream import SlackStream, StreamClosed, StreamRefused
from adapters.slack.streaming import StreamingChoice, Values
from bot.sdk.delivery import LiveReply
from bot.sdk.stopping import Replies, stoppable
from ground.messages import Final, Partial, ReplyEvent

log = logging.getLogger(__name__)

PLACEHOLDER = "_Thinking…_"
CONTINUED = "…"  # starts the rest of a reply whose stream Slack closed
WRITING = "_Writing an answer…_"
LOOKING = "is looking at your image…"
THINKING = "is thinking…"


@dataclass(frozen=True)
class Place:
    """Where a reply goes and whom it is for: a channel (or DM) and thread, the asker and their team."""

    channel: str
    thread_ts: str | None
    asker: str
    team: str


class ButtonedThread:
    """A `SlackThread` as LiveReply's surface, with a Stop button on the first message while the
    reply is written; `finish` swaps it for the feedback buttons on the last message. `begun`: the
    messages a stopped process had posted for the reply (its first one carries a Stop button)."""

    def __init__(self, thread: SlackThread, stop: StopValue, begun: Sequence[str] = ()):
        self.thread = thread
        self.stop = stop
        self.texts: dict[str, str] = {}  # message ts -> its text as this process last showed it
        self._first: str | None = begun[0] if begun else None

    async def post(self, text: str) -> str:
        controls = [stop_button(self.stop)] if self._first is None else None
        ts = await self.thread.post(text, controls)
        self._first = self._first or ts
        self.texts[ts] = text
        return ts

    async def edit(self, message: str, text: str) -> None:
        await self.thread.edit(message, text, [stop_button(self.stop)] if message == self._first else None)
        self.texts[message] = text

    async def finish(self, messages: list[str], final: Final) -> None:
        """The reply is shown: no more Stop; feedback buttons under the answer if it was stored. A
        stopped process's message that the answer didn't need goes. If this process showed nothing
        (another one took the question over), the messages are left to that one."""
        shown = [message for message in messages if message in self.texts]
        if not shown:
            return
        first, last = self._first, shown[-1]
        if first is not None and first != last and first in self.texts:
            await self.thread.edit(first, self.texts[first], [])
        await self.thread.edit(last, self.texts[last], feedback_blocks(final.turn_id) if final.turn_id else [])
        for message in messages:
            if message not in self.texts:
                await self.thread.delete(message)


class SlackReply:
    """One reply to show at `place`, as the SDK's `Presenter`: `run(events)` shows it, going on in
    `begun` (the messages a stopped process had posted for it) if there are any."""

    surface = None  # the messages' handles are Slack's ts, their ids as they are

    def __init__(self, replies: SlackReplies, place: Place, key: str, working: str, begun: Sequence[str] = (), taken_over: bool = False):
        self.replies = replies
        self.place = place
        self.key = key
        self.working = working
        self.begun = list(begun)
        self.taken_over = taken_over  # a question of a stopped process: nothing is shown before its events
        self.messages: list[str] = []  # what it posted (ts), once shown
        self.on_post: Callable[[list[Any]], Awaitable[None]] | None = None

    async def run(self, events: AsyncIterator[ReplyEvent]) -> Final:
        return await self.replies.show(events, self)


class SlackReplies:
    """Shows the adapter's replies, and knows which are being written (for their Stop buttons)."""

    def __init__(self, client: AsyncWebClient, values: Values, *, message_limit: int, anyone_can_stop: bool, native_streaming: bool = True):
        """`values`: where the workspace's refusal of streams is kept for every process (the Platform)."""
        self.client = client
        self.message_limit = message_limit
        self.writing = Replies(anyone_can_stop)
        self.streaming = StreamingChoice(values, enabled=native_streaming)
        self._statuses = True  # False once Slack refused to set a thread's status

    def reply(self, place: Place, message_id: str, working: str = THINKING, begun: Sequence[str] = (), taken_over: bool = False) -> SlackReply:
        """The reply to the message `message_id` (of `place.channel`), to show at `place` (going on in
        `begun`; `taken_over`: as SlackReply says)."""
        return SlackReply(self, place, f"{place.channel}/{message_id}", working, begun, taken_over)

    async def show(self, events: AsyncIterator[ReplyEvent], reply: SlackReply) -> Final:
        """Show `reply` (its key is what its Stop button names); what it posts goes into `reply.messages`."""
        place, key, working = reply.place, reply.key, reply.working
        stop = StopValue(key, place.asker)
        events = stoppable(events, self.writing.start(key, place.asker))
        thread_ts = place.thread_ts
        streaming = thread_ts is not None and not reply.begun and await self.streaming.allowed()
        status = (streaming or (thread_ts is not None and place.channel.startswith("D"))) and not reply.taken_over
        try:
            if status:
                await self._status(place, working)
            if streaming and thread_ts is not None:
                try:
                    return await self._stream(events, place, thread_ts, stop, reply)
                except StreamRefused as refused:
                    await self.streaming.refused(refused.error)
                    events = _replayed(refused.seen, events)
                except StreamClosed as closed:
                    rest = _rest(closed.shown, _replayed(closed.seen, events, closed.pending))
                    return await self._edited(rest, place, stop, reply, placeholder=None, shown=[closed.ts])
            return await self._edited(events, place, stop, reply)
        finally:
            self.writing.done(key)
            if status:
                await self._status(place, "")  # the status line goes when the reply is there

    async def _stream(self, events: AsyncIterator[ReplyEvent], place: Place, thread_ts: str, stop: StopValue, reply: SlackReply) -> Final:
        control = SlackThread(self.client, place.channel, thread_ts)
        stop_messages: list[str] = []
        if not reply.taken_over:  # at once: the answer may wait in the queue or for its image a while
            stop_messages.append(await control.post(WRITING, [stop_button(stop)]))

        async def started() -> None:
            self.streaming.started()
            if stream.ts is not None:
                reply.messages.append(stream.ts)
                if reply.on_post is not None:
                    await reply.on_post(list(reply.messages))
            if not stop_messages:  # a question taken over: nothing is shown before it is ours
                stop_messages.append(await control.post(WRITING, [stop_button(stop)]))

        stream = SlackStream(
            self.client,
            place.channel,
            thread_ts,
            (place.asker, place.team),
            status=lambda status: self._status(place, status),
            working=reply.working,
            blocks=lambda final: feedback_blocks(final.turn_id) if final.turn_id else [],
            started=started,
        )
        try:
            return await stream.run(events)
        finally:
            for message in stop_messages:
                await control.delete(message)

    async def _edited(
        self,
        events: AsyncIterator[ReplyEvent],
        place: Place,
        stop: StopValue,
        reply: SlackReply,
        placeholder: str | None = PLACEHOLDER,
        shown: Sequence[str] = (),
    ) -> Final:
        """The reply as edited messages; `shown`: messages of it posted already (a closed stream), which stay as they are."""
        surface = ButtonedThread(SlackThread(self.client, place.channel, place.thread_ts), stop, reply.begun)
        placeholder = None if reply.taken_over else placeholder
        on_post = _after(shown, reply.on_post) if shown and reply.on_post is not None else reply.on_post
        live = LiveReply(surface, limit=self.message_limit, placeholder=placeholder, messages=reply.begun, on_post=on_post)
        reply.messages = live.messages  # one list: what is posted, as it is posted
        final = await live.run(events)
        await surface.finish(live.messages, final)
        return final

    async def _status(self, place: Place, status: str) -> None:
        """Set the status line of the reply's thread ("" clears it); a refusal turns statuses off."""
        if place.thread_ts is None or not self._statuses:
            return
        try:
            await self.client.assistant_threads_setStatus(channel_id=place.channel, thread_ts=place.thread_ts, status=status)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
            if not isinstance(error, SlackApiError) or transient(error):
                return  # one missed status line; the reply goes on
            self._statuses = False
            log.warning("slack.status_unavailable", extra={"error": error.response.get("error")})


async def _replayed(seen: list[ReplyEvent], rest: AsyncIterator[ReplyEvent], pending: asyncio.Future | None = None) -> AsyncIterator[ReplyEvent]:
    """The events already read, then the one being awaited (`pending`, a future of `anext(rest)`), then the others."""
    for event in seen:
        yield event
    if pending is not None:
        try:
            yield await pending
        except StopAsyncIteration:
            return
    async for event in rest:
        yield event


def _after(shown: Sequence[str], on_post: Callable[[list[Any]], Awaitable[None]]) -> Callable[[list[Any]], Awaitable[None]]:
    """`on_post` told of the messages `shown` before the others: every message of a reply is recorded with it."""

    async def recorded(messages: list[Any]) -> None:
        await on_post([*shown, *messages])

    return recorded


async def _rest(shown: str, events: AsyncIterator[ReplyEvent]) -> AsyncIterator[ReplyEvent]:
    """A reply's events without the text `shown` already (in a stream Slack closed), after `CONTINUED`."""

    def after(text: str) -> str:
        return CONTINUED + (text[len(shown) :].lstrip() if text.startswith(shown) else text)

    async for event in events:
        if isinstance(event, Partial):
            yield Partial(after(event.text))
        elif isinstance(event, Final):
            yield replace(event, text=after(event.text))
        else:
            yield event
