"""Conversation turns: a message takes its place in its conversation, its images are taken in, the
conversation is fitted into the model's context, and the answer is streamed and stored with the
question. Also resuming a question a killed process left unanswered, and forgetting conversations.

A conversation's only lock is the store's `hold_conversation` (shared by every process on the same
state); `Arrivals` only counts, so that in "latest" mode a message that waited learns it was overtaken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Iterator
from contextlib import aclosing, contextmanager

from bot.core.conversation import Author, ConversationKey, Turn, Unanswered
from bot.core.generation import Generation
from bot.core.messages import Final, IncomingMessage, Refusal, ReplyEvent
from bot.core.prompt import PromptTooLong, clean_text, fit
from bot.images.attachments import ImageIntake
from bot.runtime.config import Config
from bot.runtime.metrics import Metrics
from bot.runtime.retention import kept_images
from bot.state.store import Forgotten, Store, StoreUnavailable
from model.service import ModelError

log = logging.getLogger(__name__)

_RESUMED = "I was restarted while writing this answer, so it comes late."
_OVERTAKEN = "A newer message arrived while this one waited, so I'll answer that one with this in mind."
UNSAVED = "I couldn't save this conversation right now, so I can't answer it. Please try again in a little while."
_NOT_REMEMBERED = "I couldn't save this conversation right now, so I won't remember this exchange."


def unsaved(metrics: Metrics, label: str, error: StoreUnavailable) -> Final:
    """The answer when the state can't be written: the asker is told, the admin gets one line."""
    _log_unsaved(metrics, label, error)
    return Final("", (UNSAVED,))


def _log_unsaved(metrics: Metrics, label: str, error: StoreUnavailable) -> None:
    metrics.error("state_unavailable")
    log.error("state.unavailable", extra={"conversation": label, "error": str(error)})


class Arrivals:
    """Counts each conversation's messages as they arrive; nothing is kept for quiet conversations."""

    def __init__(self) -> None:
        self._arrived: Counter[Hashable] = Counter()
        self._present: Counter[Hashable] = Counter()

    @contextmanager
    def arriving(self, key: Hashable) -> Iterator[Callable[[], bool]]:
        """While inside, the message is counted; yields a check: has a newer message arrived since?"""
        self._arrived[key] += 1
        self._present[key] += 1
        number = self._arrived[key]
        try:
            yield lambda: self._arrived[key] != number
        finally:
            self._present[key] -= 1
            if not self._present[key]:
                del self._present[key], self._arrived[key]


class Conversations:
    """Answers messages in their conversations and keeps both turns in the store."""

    def __init__(self, config: Config, store: Store, intake: ImageIntake, generation: Generation, metrics: Metrics):
        self.config = config
        self.store = store
        self.intake = intake
        self.generation = generation
        self.metrics = metrics
        self.latest_wins = config.limits.conversation_mode == "latest"
        self._arrivals = Arrivals()
        self._kept: frozenset[str] | None = None

    async def reply(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        started = time.perf_counter()
        final = Final("")
        # The message takes its place in the conversation as it arrives, before its images are taken
        # in: one whose image is slow to download is not overtaken by the messages sent after it.
        with self._arrivals.arriving(message.key) as overtaken:
            try:
                async with self.store.hold_conversation(message.key):
                    try:
                        refs, notes = await self.intake.take_in(message.key, message.attachments, message.text)
                    except Refusal as refusal:
                        self.metrics.error("input_refused")
                        final = Final("", (str(refusal),))
                    else:
                        text = clean_text(message.text)
                        user_turn = Turn("user", (*((text,) if text else ()), *refs), message.author, message.message_id)
                        if not text and not refs:
                            final = Final("", (*notes, "Send me a question, an image, or both, and I'll answer."))
                        elif self.latest_wins and overtaken():
                            # A newer message is waiting; this one joins the history unanswered.
                            await self.store.add_turn(message.key, user_turn)
                            final = Final("", (*notes, _OVERTAKEN))
                        else:
                            history = await self.store.load_turns(message.key)
                            async with aclosing(self._answer(message.key, history, user_turn, message.shared, notes, started)) as events:
                                async for event in events:
                                    if isinstance(event, Final):
                                        final = event
                                    else:
                                        yield event
            except StoreUnavailable as error:
                final = unsaved(self.metrics, str(message.key), error)
        yield final  # shown once the conversation is free for its next message

    async def unanswered(self, platform: str) -> list[Unanswered]:
        """Messages of `platform` that a stopped process stored but never answered, at most
        [bot] resume_window_s old, oldest first."""
        window = self.config.bot.resume_window_s
        if not window:
            return []
        return await self.store.unanswered(platform, time.time() - window)

    async def resume(self, pending: Unanswered, shared: bool) -> AsyncIterator[ReplyEvent]:
        started = time.perf_counter()
        final = Final("")
        # Under the conversation's hold, so that a process still answering it finishes first.
        try:
            async with self.store.hold_conversation(pending.key):
                history = await self.store.load_turns(pending.key)
                # Still unanswered, and this process is the one to take it over (exactly one is).
                if history and history[-1].id == pending.turn.id and await self.store.adopt(pending):
                    log.info("turn.resuming", extra={"conversation": str(pending.key)})
                    async with aclosing(self._answer(pending.key, history[:-1], history[-1], shared, [_RESUMED], started)) as events:
                        async for event in events:
                            if isinstance(event, Final):
                                final = event
                            else:
                                yield event
        except StoreUnavailable as error:
            final = unsaved(self.metrics, str(pending.key), error)
        yield final

    async def _answer(
        self, key: ConversationKey, history: list[Turn], user_turn: Turn, shared: bool, notes: list[str], started: float
    ) -> AsyncGenerator[ReplyEvent, None]:
        """Answer `user_turn` after `history` and store the answer; the last event is a Final. The
        user turn is stored first unless it already is (a resumed one). A turn that ends unanswered
        (failed, too long, cancelled) is taken back: no question stays in the store without its answer.
        An answer that can't be stored is still given, with a note that it won't be remembered."""
        stored = user_turn if user_turn.id is not None else None
        answer: str | None = None
        model, budget = self.generation.model, self.generation.params.max_new_tokens
        try:
            try:
                fitted = await fit(
                    [*history, user_turn],
                    model.count_tokens,
                    context_tokens=model.info.context_tokens,
                    reserve_tokens=budget,
                    max_images=self.config.conversation.max_images,
                    system_prompt=self.config.conversation.system_prompt,
                    shared=shared,
                    sendable=self.generation.sendable_check(),
                )
            except PromptTooLong as too_long:
                self.metrics.error("too_long")
                yield Final("", (*notes, str(too_long)))
                return
            except ModelError as error:  # a remote model counts tokens on its server, which can fail
                self.metrics.error(type(error).__name__)
                yield Final("", (*notes, str(error)))
                return
            if stored is None:
                stored = await self.store.add_turn(key, user_turn, answerer=self.store.process_id)
            async for event in self.generation.stream(fitted.items, budget, str(key)):
                if isinstance(event, Final):
                    answer, notes = event.text, [*notes, *event.notes]
                    break
                yield event
        finally:
            if not answer and stored is not None and stored.id is not None:
                # Cancelled (message deleted, shutdown) or failed: the turn was never answered.
                await asyncio.shield(self._take_back(key, stored.id))
        if not answer:
            yield Final("", tuple(notes) or ("The model gave an empty reply; try asking differently.",))
            return
        previous = next((turn for turn in reversed(history) if turn.role == "assistant"), None)
        if fitted.dropped and (previous is None or not previous.dropped):
            notes.append("This conversation is now longer than I can read at once, so I no longer see its oldest messages.")
        try:
            await self.store.add_turn(key, Turn("assistant", (answer,), dropped=fitted.dropped))
        except StoreUnavailable as error:
            _log_unsaved(self.metrics, str(key), error)
            notes.append(_NOT_REMEMBERED)
            if stored is not None and stored.id is not None:
                await self._take_back(key, stored.id)  # else a restart would answer it again
        log.info(
            "turn.answered",
            extra={"conversation": str(key), "images": len(user_turn.images), "dropped": fitted.dropped, "seconds": round(time.perf_counter() - started, 3)},
        )
        yield Final(answer, tuple(notes))

    async def _take_back(self, key: ConversationKey, turn_id: int) -> None:
        """Remove a stored turn that ends unanswered. If the state can't be written, it stays (a
        restart within [bot] resume_window_s would answer it late)."""
        try:
            await self.store.remove_turn(turn_id)
        except StoreUnavailable as error:
            log.warning("state.turn_kept", extra={"conversation": str(key), "error": str(error)})

    async def reset(self, key: ConversationKey) -> int:
        """Forget a conversation and the images only it used (waits for a reply in progress there
        to finish first)."""
        async with self.store.hold_conversation(key):
            return await self.store.reset(key, await self._kept_images())

    async def forget(self, platform: str, author: Author) -> Forgotten:
        """Forget a person everywhere on `platform`: their messages, the answers to them, and the
        images only they sent."""
        gone = await self.store.forget_author(platform, author.id, await self._kept_images())
        log.info("state.forgot_author", extra={"platform": platform, "turns": gone.turns, "images": gone.images})
        return gone

    async def _kept_images(self) -> frozenset[str]:
        """The few-shot examples' images: the config refers to them, so they are never forgotten."""
        if self._kept is None:
            self._kept = await kept_images(self.config)
        return self._kept

    async def reset_channel(self, platform: str, channel: str) -> tuple[int, int]:
        """Forget every conversation of a channel, one by one as `reset` does; returns how many
        conversations and turns that was."""
        counts = [await self.reset(key) for key in await self.store.conversations_in(platform, channel)]
        return len(counts), sum(counts)
