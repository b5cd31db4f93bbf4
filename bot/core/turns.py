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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, contextmanager

from bot.core.generation import Generation, LoadedImages
from bot.core.prompt import PromptTooLong, clean_text, fit
from bot.core.retention import kept_images
from bot.images.attachments import ImageIntake
from bot.metrics import Metrics
from bot.settings import Settings
from bot.state.store import Forgotten, Store, StoreUnavailable
from ground.conversation import Author, ConversationKey, Turn, Unanswered
from ground.messages import Final, IncomingMessage, Refusal, ReplyEvent
from model.service import ModelError

log = logging.getLogger(__name__)

_RESUMED = "I was restarted while writing this answer, so it comes late."
_ADOPTED = "The bot process that was writing this answer stopped, so another one took it over: it comes late."
_NOT_LATEST = "Only the latest answer of a conversation can be written again."
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

    def __init__(self, config: Settings, store: Store, intake: ImageIntake, generation: Generation, metrics: Metrics):
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
                async with self._after_stranded(message.key):
                    try:
                        refs, notes = await self.intake.take_in(message.key, message.attachments, message.text)
                    except Refusal as refusal:
                        self.metrics.error("input_refused")
                        final = Final("", (str(refusal),))
                    else:
                        text = clean_text(message.text, self.generation.model.info.special_tokens)
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

    def _after_stranded(self, key: ConversationKey) -> AbstractAsyncContextManager[None]:
        """The conversation's hold, for a new message: once the question a stopped process left
        unanswered at its end (if any) is answered, so that answers come in the order of their
        questions. That question is adopted (`resume`, by whichever process finds it first) while
        this message waits outside the hold; if it is not answered within two [bot] adopt_after_s
        (nobody can take it over), the new message goes first."""
        window = self.config.bot.resume_window_s
        if not window:
            return self.store.hold_conversation(key)
        return self._held_after_stranded(key, window)

    @asynccontextmanager
    async def _held_after_stranded(self, key: ConversationKey, window: float) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        patience = self.config.bot.adopt_after_s
        deadline: float | None = None
        while True:
            async with self.store.hold_conversation(key):
                stranded = await self.store.stranded(key, time.time() - window)
                if stranded is None or (deadline is not None and loop.time() >= deadline):
                    if stranded is not None:
                        log.warning("turn.stranded_overtaken", extra={"conversation": str(key), "turn": stranded})
                    yield
                    return
            if deadline is None:
                log.info("turn.waiting_for_stranded", extra={"conversation": str(key), "turn": stranded})
                deadline = loop.time() + 2 * patience
            await asyncio.sleep(patience / 4)  # as often as processes look for stranded questions

    async def unanswered(self, platform: str) -> list[Unanswered]:
        """Messages of `platform` that a stopped process stored but never answered, at most
        [bot] resume_window_s old, oldest first."""
        window = self.config.bot.resume_window_s
        if not window:
            return []
        return await self.store.unanswered(platform, time.time() - window)

    async def resume(self, pending: Unanswered, shared: bool) -> AsyncIterator[ReplyEvent]:
        async def unanswered(history: list[Turn]) -> int | None:
            # Still stored and unanswered, and this process is the one to take it over (exactly one
            # is). Whatever came after it (a follow-up that didn't wait), it is answered from the
            # turns before it.
            at = next((index for index, turn in enumerate(history) if turn.id == pending.turn.id), None)
            if at is None or (at + 1 < len(history) and history[at + 1].role == "assistant"):
                return None
            return at if await self.store.adopt(pending) else None

        late = _ADOPTED if self.store.shared else _RESUMED
        async for event in self._answer_stored(pending.key, unanswered, shared, [late], Final(""), "turn.resuming"):
            yield event

    async def regenerate(self, key: ConversationKey, turn_id: int, shared: bool) -> AsyncIterator[ReplyEvent]:
        """Answer again the question whose stored answer is `turn_id`, the latest of its conversation;
        the new answer replaces it in the history (if none comes, the old one stays)."""

        async def answered_last(history: list[Turn]) -> int | None:
            latest = len(history) >= 2 and history[-1].id == turn_id and history[-1].role == "assistant" and history[-2].role == "user"
            return len(history) - 2 if latest else None

        async for event in self._answer_stored(key, answered_last, shared, [], Final("", (_NOT_LATEST,)), "turn.regenerating", replace=True):
            yield event

    async def _answer_stored(
        self,
        key: ConversationKey,
        expected: Callable[[list[Turn]], Awaitable[int | None]],
        shared: bool,
        notes: list[str],
        otherwise: Final,
        event: str,
        replace: bool = False,
    ) -> AsyncIterator[ReplyEvent]:
        """Answer a question that is already stored, under the conversation's hold (so that a process
        still answering it finishes first): the turn at the index `expected(history)` gives, from the
        turns before it; with `replace` the question of the last answer, which the new answer
        replaces. If `expected` gives None (the conversation moved on, or another process takes the
        question), the Final is `otherwise`. Logs `event` when it answers."""
        started = time.perf_counter()
        final = otherwise
        try:
            async with self.store.hold_conversation(key):
                history = await self.store.load_turns(key)
                question = await expected(history)
                if question is not None:
                    log.info(event, extra={"conversation": str(key)})
                    replacing = history[-1] if replace else None
                    async with aclosing(self._answer(key, history[:question], history[question], shared, notes, started, replacing)) as events:
                        async for answer in events:
                            if isinstance(answer, Final):
                                final = answer
                            else:
                                yield answer
        except StoreUnavailable as error:
            final = unsaved(self.metrics, str(key), error)
        yield final

    async def _answer(
        self,
        key: ConversationKey,
        history: list[Turn],
        user_turn: Turn,
        shared: bool,
        notes: list[str],
        started: float,
        replacing: Turn | None = None,
    ) -> AsyncGenerator[ReplyEvent, None]:
        """Answer `user_turn` after `history` and store the answer; the last event is a Final. The
        user turn is stored first unless it already is (a resumed one). A turn that ends unanswered
        (failed, too long, cancelled) is taken back: no question stays in the store without its answer.
        With `replacing` (its stored answer), the new answer takes that one's place once it is stored,
        and if none comes the question keeps its old answer."""
        stored = user_turn if user_turn.id is not None else None
        # A regenerated question keeps its old answer if no new one comes, so it is never taken back.
        take_back = replacing is None
        answer: str | None = None
        model, budget = self.generation.model, self.generation.params.max_new_tokens
        loaded: LoadedImages = {}
        try:
            try:
                fitted = await fit(
                    [*history, user_turn],
                    self.generation.token_counter(loaded),
                    context_tokens=model.info.context_tokens,
                    reserve_tokens=budget,
                    max_images=self.config.conversation.max_images,
                    system_prompt=self.config.conversation.system_prompt,
                    shared=shared,
                    sendable=self.generation.sendable_check(loaded),
                    special_tokens=model.info.special_tokens,
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
            async for event in self.generation.stream(fitted.chat, budget, str(key), loaded):
                if isinstance(event, Final):
                    answer, notes = event.text, [*notes, *event.notes]
                    break
                yield event
        finally:
            if not answer and take_back and stored is not None and stored.id is not None:
                # Cancelled (message deleted, shutdown) or failed: the turn was never answered.
                await asyncio.shield(self._take_back(key, stored.id))
        if not answer:
            yield Final("", tuple(notes) or ("The model gave an empty reply; try asking differently.",))
            return
        previous = next((turn for turn in reversed(history) if turn.role == "assistant"), None)
        if fitted.dropped and (previous is None or not previous.dropped):
            notes.append("This conversation is now longer than I can read at once, so I no longer see its oldest messages.")
        answer_turn = await self.store.add_turn(key, Turn("assistant", (answer,), dropped=fitted.dropped), answers=stored.id if stored else None)
        if replacing is not None and replacing.id is not None:
            await self.store.remove_turn(replacing.id)
        log.info(
            "turn.answered",
            extra={"conversation": str(key), "images": len(user_turn.images), "dropped": fitted.dropped, "seconds": round(time.perf_counter() - started, 3)},
        )
        yield Final(answer, tuple(notes), turn_id=answer_turn.id)

    async def record_feedback(self, platform: str, turn_id: int, user_id: str, vote: str) -> bool:
        """Keep a person's vote ("up" or "down") on a stored answer, and count it; False if the answer
        is no longer stored."""
        recorded = await self.store.record_feedback(turn_id, platform, user_id, vote)
        self.metrics.feedback.labels(platform=platform, vote=vote, outcome="recorded" if recorded else "gone").inc()
        return recorded

    async def latest_answer(self, key: ConversationKey) -> int | None:
        """The stored id of the conversation's latest turn if it is an answer."""
        turns = await self.store.load_turns(key, limit=1)
        return turns[-1].id if turns and turns[-1].role == "assistant" else None

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
            self._kept = await kept_images(self.config, (self.intake.model.info,))
        return self._kept

    async def reset_channel(self, platform: str, channel: str) -> tuple[int, int]:
        """Forget every conversation of a channel, one by one as `reset` does; returns how many
        conversations and turns that was."""
        counts = [await self.reset(key) for key in await self.store.conversations_in(platform, channel)]
        return len(counts), sum(counts)
