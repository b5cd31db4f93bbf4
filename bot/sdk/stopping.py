"""Stop buttons, the same on every platform: which replies are being written, who may stop each, and a
reply's events that end early when it is stopped.

With processes sharing the state, a click may reach a process other than the one writing the reply
(Slack hands it to any connection or backend, Discord to the process of the shard): that process
asks the others through the state (`Platform.ask_owner`), and the one writing the reply stops it and
answers with the outcome.

A stopped reply ends like any other, with a `Final`: the text written so far and a note saying who
stopped it, so the platform shows it the usual way. The engine's request is closed at that moment:
the model stops spending time on it and its place in the queue is freed.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bot.sdk.platform import Platform
from ground.messages import Final, Partial, ReplyEvent

_STOP = "stop"  # the topic of a Stop click asked of the other processes


@dataclass
class Writing:
    """A reply being written: who asked, and how to stop it (the name of who did, once stopped)."""

    asker: str
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    stopped_by: str = ""

    def stop(self, who: str) -> None:
        self.stopped_by = who
        self.stopped.set()


class StopOutcome(enum.StrEnum):
    STOPPED = "stopped"
    NOT_ALLOWED = "not_allowed"
    FINISHED = "finished"  # or being written by a process that didn't answer


class Replies:
    """The replies this process is writing, by a key the platform's Stop button carries."""

    def __init__(self, anyone_can_stop: bool):
        self.anyone_can_stop = anyone_can_stop
        self._writing: dict[str, Writing] = {}
        self._platform: Platform | None = None

    async def route(self, platform: Platform) -> None:
        """Take Stop clicks for this process's replies from the other processes on `platform`'s
        state, and pass on those for replies written elsewhere."""
        self._platform = platform
        await platform.answer_for(_STOP, self._asked)

    def start(self, key: str, asker: str) -> Writing:
        writing = self._writing[key] = Writing(asker)
        return writing

    def done(self, key: str) -> None:
        self._writing.pop(key, None)

    async def stop(self, key: str, who: str, name: str) -> StopOutcome:
        """Stop the reply `key` for the person `who` (called `name`), here or in the process writing
        it: a `StopOutcome`."""
        outcome = self._stop_here(key, who, name)
        if outcome is StopOutcome.FINISHED and self._platform is not None:
            answer = await self._platform.ask_owner(_STOP, {"reply": key, "who": who, "name": name})
            if answer is not None and answer.get("outcome") in set(StopOutcome):
                return StopOutcome(answer["outcome"])
        return outcome

    def _asked(self, body: dict) -> dict | None:
        """Another process's Stop click: answered by this process only if it writes that reply."""
        outcome = self._stop_here(str(body.get("reply", "")), str(body.get("who", "")), str(body.get("name", "")))
        return None if outcome is StopOutcome.FINISHED else {"outcome": str(outcome)}

    def _stop_here(self, key: str, who: str, name: str) -> StopOutcome:
        writing = self._writing.get(key)
        if writing is None:
            return StopOutcome.FINISHED
        if who != writing.asker and not self.anyone_can_stop:
            return StopOutcome.NOT_ALLOWED
        writing.stop(name)
        return StopOutcome.STOPPED


def stopped_note(name: str) -> str:
    return f"Stopped by {name}." if name else "Stopped."


async def stoppable(events: AsyncIterator[ReplyEvent], writing: Writing) -> AsyncIterator[ReplyEvent]:
    """`events` until `writing` is stopped; then a Final with the text so far and who stopped it. The
    engine's request ends at the stop, or when the reply is cancelled (its question was deleted)."""
    text = ""
    stopped = asyncio.ensure_future(writing.stopped.wait())
    following: asyncio.Future | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                await _cancelled(following)  # the request ends here (its turn is taken back)
                yield Final(text, (stopped_note(writing.stopped_by),))
                return
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            following = None
            if isinstance(event, Partial):
                text = event.text
            yield event
            if isinstance(event, Final):
                return
    finally:
        for task in (following, stopped):
            if task is not None:
                await _cancelled(task)
        close = getattr(events, "aclose", None)  # an async generator (the engine's) is closed now, not when collected
        if close is not None:
            await close()


async def _cancelled(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
