"""Showing a streamed reply in chat: a status while it waits, edits as text arrives (throttled), the
final text split into messages that fit the platform, never inside a code block.

Adapters provide a `Surface` (post a message, edit a message) and a message length limit; `LiveReply`
does the rest, the same way on every platform.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from ground.messages import Final, Partial, ReplyEvent, Waiting, Working

_FENCE = "```"
_FENCE_OPENER = re.compile(r"```[\w+#.-]{0,20}")
_CLOSE = "\n```"


class Surface(Protocol):
    """Where a reply is shown. `post` returns a handle that `edit` takes."""

    async def post(self, text: str) -> Any: ...

    async def edit(self, message: Any, text: str) -> None: ...


class Presenter(Protocol):
    """What shows a reply from the engine's events and returns its Final once shown: `LiveReply` on a
    `Surface`, or a platform's own way (Slack's native streams). `messages`: what it posted; `on_post`
    is told them each time one is posted; `surface`, if it has `message_id(handle)`, names them."""

    messages: list[Any]
    on_post: Callable[[list[Any]], Awaitable[None]] | None
    surface: Any

    async def run(self, events: AsyncIterator[ReplyEvent]) -> Final: ...


def _inside_code(text: str, position: int) -> bool:
    return text.count(_FENCE, 0, position) % 2 == 1


def _cut_point(text: str, limit: int) -> tuple[int, bool]:
    """Where to cut `text` (longer than `limit`), and whether the cut falls inside a code block."""
    window = limit - len(_CLOSE)  # room to close a code block that can't be avoided
    floor = window // 3  # don't make a tiny message when a slightly worse boundary gives a full one
    for pattern in ("\n\n", "\n", ". ", "! ", "? ", " "):
        at = text.rfind(pattern, floor, window)
        while at != -1:
            cut = at + (1 if pattern in (". ", "! ", "? ") else 0)
            if not _inside_code(text, cut):
                return cut, False
            at = text.rfind(pattern, floor, at)
    opening = text.rfind(_FENCE, 0, window)
    if opening > 0 and _inside_code(text, window):
        return opening, False  # the message can end just before the code block starts
    at = text.rfind("\n", floor, window)
    cut = at if at != -1 else window
    return cut, _inside_code(text, cut)


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into messages of at most `limit` characters at paragraph, line, sentence or word
    boundaries. A code block too long for one message is closed and reopened across messages."""
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut, in_code = _cut_point(rest, limit)
        head, rest = rest[:cut].rstrip(), rest[cut:]
        if in_code:
            opened = _FENCE_OPENER.match(head[head.rfind(_FENCE) :])
            opener = opened.group(0) if opened else _FENCE
            head += _CLOSE
            rest = f"{opener}\n{rest.lstrip(chr(10))}"
        else:
            rest = rest.lstrip()
        chunks.append(head)
    if rest:
        chunks.append(rest)
    return chunks


def format_final(final: Final, note: Callable[[str], str]) -> str:
    """The final message text: the reply, then each note styled by `note` (italics, say)."""
    return "\n\n".join(part for part in (final.text, *(note(n) for n in final.notes)) if part)


def waiting_text(position: int) -> str:
    return f"⏳ Waiting for the model: you're #{position} in line."


WRITING = "✍️ Writing…"


class LiveReply:
    """Drives one reply on a `Surface` from the engine's events.

    `messages`: handles of messages already posted for this reply (by a process that died while
    writing it), which are edited before any new one is posted. `on_post` is told the handles of
    the reply's messages whenever one more was posted."""

    def __init__(
        self,
        surface: Surface,
        *,
        limit: int,
        note: Callable[[str], str] = lambda text: f"_{text}_",
        interval: float = 1.0,
        status_after: float = 2.0,
        placeholder: str | None = None,
        messages: Sequence[Any] = (),
        on_post: Callable[[list[Any]], Awaitable[None]] | None = None,
    ):
        self.surface = surface
        self.limit = limit
        self.note = note
        self.interval = interval
        self.status_after = status_after
        self.placeholder = placeholder
        self.messages: list[Any] = list(messages)
        self._shown: list[str | None] = [None] * len(self.messages)  # what those show is not known here
        self.on_post = on_post

    async def run(self, events: AsyncIterator[ReplyEvent]) -> Final:
        """Show the reply as it comes; returns the final event once it is shown."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        state: dict[str, Any] = {"text": "", "position": None, "final": None}

        async def pump() -> None:
            async for event in events:
                if isinstance(event, Waiting):
                    state["position"] = event.position
                elif isinstance(event, Working):
                    state["position"] = None
                elif isinstance(event, Partial):
                    state["position"], state["text"] = None, event.text
                elif isinstance(event, Final):
                    state["final"] = event
                    break
                changed.set()
            changed.set()

        started = loop.time()
        last_show, shown_text, shown_position = -math.inf, "", None
        pumping = asyncio.create_task(pump())
        try:
            if self.placeholder:
                await self._show(self.placeholder)
                last_show = loop.time()
            while True:
                changed.clear()
                if state["final"] is not None or pumping.done():
                    break
                now, wake = loop.time(), math.inf
                position, text = state["position"], state["text"]
                if position is not None and position != shown_position:
                    if now - started >= self.status_after and now - last_show >= self.interval:
                        await self._show(waiting_text(position))
                        last_show, shown_position = loop.time(), position
                    else:
                        wake = max(started + self.status_after, last_show + self.interval)
                elif text and text != shown_text:
                    if now - last_show >= self.interval:
                        await self._show(text)
                        last_show, shown_text = loop.time(), text
                    else:
                        wake = last_show + self.interval
                elif position is None and shown_position is not None and not text:
                    # The queue status is showing, but the model has started: don't leave it saying "waiting".
                    await self._show(WRITING)
                    last_show, shown_position = loop.time(), None
                timeout = None if wake == math.inf else max(0.0, wake - loop.time())
                try:
                    async with asyncio.timeout(timeout):
                        await changed.wait()
                except TimeoutError:
                    pass
            await pumping  # re-raises what went wrong upstream
            final = state["final"] or Final("", ("The reply ended unexpectedly; please try again.",))
            await self._show(format_final(final, self.note))
            return final
        finally:
            if not pumping.done():
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)

    async def _show(self, text: str) -> None:
        for index, chunk in enumerate(split_message(text, self.limit)):
            if index < len(self.messages):
                if self._shown[index] != chunk:
                    await self.surface.edit(self.messages[index], chunk)
                    self._shown[index] = chunk
            else:
                self.messages.append(await self.surface.post(chunk))
                self._shown.append(chunk)
                if self.on_post is not None:
                    await self.on_post(list(self.messages))
