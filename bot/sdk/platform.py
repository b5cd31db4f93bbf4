"""The platform SDK: everything an adapter may ask of the core, through one object per adapter.

    adapter event -> (route, access) -> Platform.first_delivery -> Platform.answer -> Engine.reply
                                                       -> LiveReply on the adapter's Surface

`Platform` offers: turns and commands (`answer`, `command`, `link`), what was said in a channel's
conversations (`conversations`, `turns`, `image`, for showing it again), the threads the bot follows
(`follow`, `follows`, `conversation_of`), once-only events (`first_delivery`), counting events for
/metrics (`record`), answering the questions a killed process left unanswered, after a restart
or, with processes sharing PostgreSQL, as soon as another notices (`watch_unanswered`, `resume`),
answering the latest question again (`latest_answer`, `regenerate`), votes on answers
(`record_feedback`), a few values an adapter keeps (`get_value`, `set_value`), and, with processes
sharing the state, asking the one that has something (a reply it is writing, for a Stop click that
reached another process: `ask_owner`, `answer_for`). It runs every
adapter's messages through the same steps and logs them the same way (`<adapter>.replied`,
`.duplicate`, `.reply_lost`, `.resumed`, with their conversation), and keeps the ids of the messages
each reply posts, so that a process taking a question over continues in them.
What an adapter implements in return: a `bot.sdk.delivery.Surface` (post, edit) per reply, or a
`Presenter` of its own; the errors that mean its platform didn't take a reply (`delivery_errors`);
and its own settings and access rules (see `bot.sdk.adapter`). An attachment whose file can't
be had raises `ImageRejected` (or `FetchRefused`, from `download`) from its `read`, with words for the asker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from bot.core.engine import Engine
from bot.images.fetch import FetchRefused as FetchRefused  # what `download` and an attachment's `read` raise to refuse a file
from bot.images.fetch import download as download  # a platform's file, redirects followed by the adapter's rule
from bot.images.intake import ImageRejected as ImageRejected  # an attachment's `read` raises it to refuse a file, saying why
from bot.metrics import Metrics
from bot.sdk.delivery import Presenter
from bot.sdk.files import local_attachment
from bot.settings import ConfigError as ConfigError  # what an adapter raises for a start-up problem its admin can fix
from bot.settings import ImagesConfig as ImagesConfig  # the [images] limits (`Platform.images`), for adapters that fetch files
from bot.state.store import Store, StoreUnavailable
from ground.conversation import Author, ConversationKey, ImageRef, Turn, Unanswered
from ground.images import ModelImage
from ground.messages import Attachment, CommandRequest, Final, IncomingMessage, ReplyEvent

ErrorFields = Callable[[BaseException], Mapping[str, Any]]
Handler = Callable[[dict[str, Any]], dict[str, Any] | None]
# How long a process waits for another one's answer: PostgreSQL passes a notification on in a few
# milliseconds, and a click must be answered (Discord: within 3 s) whether or not one comes.
ASK_TIMEOUT_S = 1.0


def error_name(error: BaseException) -> Mapping[str, Any]:
    """The log fields of a failed delivery, unless an adapter says more: the error's type."""
    return {"error": type(error).__name__}


class Platform:
    """The core as the adapter `name` sees it."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        store: Store,
        metrics: Metrics,
        images: ImagesConfig,
        delivery_errors: tuple[type[BaseException], ...] = (),
        describe_error: ErrorFields = error_name,
    ):
        self.name = name
        self.images = images  # download limits and timeouts, for adapters that fetch files themselves
        self._engine = engine
        self._store = store
        self._metrics = metrics
        self._delivery_errors = delivery_errors
        self._describe_error = describe_error
        self._work: set[asyncio.Task[None]] = set()
        self.log = logging.getLogger(f"adapters.{name}")
        self._handlers: dict[str, Handler] = {}  # topic -> what answers other processes' asks
        self._asked: dict[str, asyncio.Future[dict[str, Any]]] = {}  # ask id -> its answer, once one comes
        self._listening = False

    # -- work after an acknowledgement -------------------------------------------------------

    def spawn(self, work: Awaitable[object], what: str) -> asyncio.Task[None]:
        """Run `work` as a task that `drain` waits for; a failure is logged once, never raised."""
        task = asyncio.create_task(self._logged(work, what), name=f"{self.name}-{what}")
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def drain(self, grace_s: float) -> None:
        """Give the spawned work `grace_s` seconds to finish (replies get posted), then cancel the rest."""
        if not self._work:
            return
        _, pending = await asyncio.wait(set(self._work), timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _logged(self, work: Awaitable[object], what: str) -> None:
        try:
            await work
        except self._delivery_errors as error:
            # The platform refused a call: expected now and then, and its answer says all there is.
            self.log.warning(f"{self.name}.api_error", extra={"work": what, **self._describe_error(error)})
        except Exception:
            self.log.exception(f"{self.name}.work_failed", extra={"work": what})

    # -- turns and commands ------------------------------------------------------------------

    def reply(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        """The reply to `message`, as events (for adapters that show them themselves, like a terminal)."""
        return self._engine.reply(message)

    def command(self, request: CommandRequest) -> AsyncIterator[ReplyEvent]:
        """The reply to a command of the shared table (`ground.commands.COMMANDS`)."""
        return self._engine.command(request)

    def link(self, url: str) -> Attachment:
        """An image link somebody gave, as an attachment (fetched under the link rules)."""
        return self._engine.link(url)

    def local_file(self, source: str) -> Attachment:
        """A file path (or link) typed by the person at the keyboard, as an attachment."""
        return local_attachment(source, self._engine.intake)

    def regenerate(self, key: ConversationKey, turn_id: int, author: Author, shared: bool) -> AsyncIterator[ReplyEvent]:
        """Answer again the question of `key`'s latest answer `turn_id` (see `latest_answer`); the new
        answer replaces it in the conversation."""
        return self._engine.regenerate(key, turn_id, author, shared)

    async def latest_answer(self, key: ConversationKey) -> int | None:
        """The stored id of the conversation's latest answer (None if its latest turn isn't one)."""
        return await self._engine.latest_answer(key)

    async def record_feedback(self, turn_id: int, user_id: str, vote: str) -> bool:
        """Keep a person's vote ("up" or "down") on the stored answer `turn_id` (`Final.turn_id`),
        counted in /metrics; False if that answer is no longer stored."""
        return await self._engine.record_feedback(self.name, turn_id, user_id, vote)

    async def get_value(self, name: str) -> str | None:
        """A value this adapter kept in the state (shared by every process on it)."""
        return await self._store.get_value(f"{self.name}.{name}")

    async def set_value(self, name: str, value: str) -> None:
        await self._store.set_value(f"{self.name}.{name}", value)

    async def reset(self, key: ConversationKey) -> int:
        """Forget one conversation; returns how many turns it had."""
        return await self._engine.reset(key)

    # -- what was said, for showing it again ----------------------------------------------------

    async def conversations(self, channel: str) -> list[ConversationKey]:
        """The conversations of a channel (one person's web chat, say) that have turns, oldest first."""
        return await self._store.conversations_in(self.name, channel)

    async def turns(self, key: ConversationKey) -> list[Turn]:
        """The newest turns of a conversation (up to 200), oldest first."""
        return await self._store.load_turns(key)

    async def image(self, ref: ImageRef) -> ModelImage:
        """A stored image (its encoded bytes), as the turns name it."""
        return await self._store.get_image(ref)

    # -- the threads the bot follows ---------------------------------------------------------

    async def follow(self, key: ConversationKey, message_id: str) -> None:
        """Link a message (one the bot posted, or a thread's first) to `key`: replies to it continue
        it. If the state can't be written just now, the link is left out (and logged)."""
        try:
            await self._store.link_message(self.name, message_id, key)
        except StoreUnavailable as error:
            self.log.warning("state.message_not_linked", extra={"conversation": str(key), "error": str(error)})

    async def conversation_of(self, message_id: str) -> ConversationKey | None:
        """The conversation a message was linked to by `follow`, if any."""
        return await self._store.conversation_of(self.name, message_id)

    async def follows(self, key: ConversationKey, message_id: str | None = None) -> bool:
        """Whether the bot is in the conversation `key`: it has turns, or `message_id` (its first
        message) was linked to it."""
        if message_id is not None and await self.conversation_of(message_id) is not None:
            return True
        return await self._store.has_conversation(key)

    # -- asking the process that has something ------------------------------------------------

    async def answer_for(self, topic: str, handler: Handler) -> None:
        """Answer the asks of other processes about `topic` (see `ask_owner`): `handler(body)` gives
        this process's answer, or None when what is asked about isn't here (so another may answer)."""
        self._handlers[topic] = handler
        await self._listen()

    async def ask_owner(self, topic: str, body: dict[str, Any], timeout: float = ASK_TIMEOUT_S) -> dict[str, Any] | None:
        """Ask the other processes that share the state about something only one of them has (the
        reply it is writing): that one's answer, or None if none came within `timeout` seconds (or
        the state has no other processes)."""
        if not self._store.shared:
            return None
        await self._listen()
        ask = uuid.uuid4().hex
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asked[ask] = answer
        try:
            await self._store.publish(json.dumps({"ask": ask, "topic": f"{self.name}.{topic}", "from": self._store.process_id, "body": body}))
            async with asyncio.timeout(timeout):
                return await answer
        except TimeoutError:
            return None
        except Exception as error:  # the state is out of reach: nobody can be asked
            self.log.warning(f"{self.name}.ask_failed", extra={"topic": topic, "error": type(error).__name__})
            return None
        finally:
            del self._asked[ask]

    async def _listen(self) -> None:
        if self._listening or not self._store.shared:
            return
        try:
            await self._store.subscribe(self._heard)
        except Exception as error:  # the state is out of reach: asks go unanswered until the next try
            self.log.warning(f"{self.name}.not_listening", extra={"error": type(error).__name__})
            return
        self._listening = True

    def _heard(self, message: str) -> None:
        """A message of a process on the state: an ask for a handler here, or an answer to an ask of this process."""
        try:
            heard = json.loads(message)
        except ValueError:
            return
        if not isinstance(heard, dict) or not isinstance(heard.get("body"), dict):
            return
        answered = self._asked.get(heard.get("answer", ""))
        if answered is not None and not answered.done():
            answered.set_result(heard["body"])
            return
        topic = heard.get("topic")
        handler = self._handlers.get(topic.removeprefix(f"{self.name}.")) if isinstance(topic, str) and topic.startswith(f"{self.name}.") else None
        if handler is None or heard.get("from") == self._store.process_id:
            return
        answer = handler(heard["body"])
        if answer is not None:
            self.spawn(self._store.publish(json.dumps({"answer": heard.get("ask"), "body": answer})), "answer")

    # -- the pipeline ------------------------------------------------------------------------

    def record(self, kind: str) -> None:
        """Count one event of this platform for /metrics (see `Metrics.adapter_event` for the kinds)."""
        self._metrics.adapter_event(self.name, kind)

    async def first_delivery(self, *event_ids: str, **about: Any) -> bool:
        """True the first time any process sees these ids (all of them new); a re-delivery is counted
        and logged (`<adapter>.duplicate`, with `about`), and gets False. If the state can't be
        written just now, True: answering a re-delivery twice beats answering nothing."""
        for event_id in event_ids:
            try:
                claimed = await self._store.claim_event(self.name, event_id)
            except StoreUnavailable as error:
                self.log.warning("state.event_not_claimed", extra={"error": str(error), **about})
                return True
            if not claimed:
                self.record("duplicate")
                self.log.info(f"{self.name}.duplicate", extra=dict(about))
                return False
        return True

    async def answer(self, message: IncomingMessage, live: Presenter, **about: Any) -> Final | None:
        """Answer `message` on `live`: the one path of every adapter's messages. Returns the final
        event once shown, or None if the platform didn't take the reply (counted and logged)."""
        self.record("message")
        started = time.perf_counter()
        self._keep_message_ids(live, message.message_id, message.key)
        final = await self.show(live, self._engine.reply(message), message.key, **about)
        await self._forget_reply(message.message_id)
        if final is not None:
            seconds = round(time.perf_counter() - started, 3)
            extra = {"conversation": str(message.key), **about, "answered": bool(final.text), "messages": len(live.messages), "seconds": seconds}
            self.log.info(f"{self.name}.replied", extra=extra)
        return final

    async def show(self, live: Presenter, events: AsyncIterator[ReplyEvent], key: ConversationKey, **about: Any) -> Final | None:
        """`live.run(events)`; None when the platform wouldn't take the reply in the end (after the
        adapter's own retries), which is counted and logged at ERROR with its conversation."""
        try:
            return await live.run(events)
        except self._delivery_errors as error:
            self.lost(key, **about, **self._describe_error(error), shown_messages=len(live.messages))
            return None

    def lost(self, key: ConversationKey, **about: Any) -> None:
        """A reply the platform didn't take: counted, and logged at ERROR with its conversation and
        `about` (what it answered, why it failed)."""
        self.record("reply_lost")
        self.log.error(f"{self.name}.reply_lost", extra={"conversation": str(key), **about})

    async def watch_unanswered(self, take_over: Callable[[Unanswered], object]) -> None:
        """Hand each question of this platform that a stopped process left unanswered to `take_over`
        (which starts answering it with `resume`), once: those there at start-up and, when processes
        share the state, those a process leaves when it dies, looked for four times per
        [bot] adopt_after_s. Runs until cancelled, or, with a state of one process, until the
        start-up ones are handed out."""
        handed: set[int | str | None] = set()
        first = True
        while True:
            try:
                found = [pending for pending in await self._engine.unanswered(self.name) if _handle(pending) not in handed]
            except Exception as error:  # the state may be out of reach for a while: look again later
                self.log.warning(f"{self.name}.unanswered_unknown", extra={"error": type(error).__name__})
                found = []
            if found or first:
                self.log.info(f"{self.name}.unanswered", extra={"found": len(found)})
            first = False
            for pending in found:
                handed.add(_handle(pending))
                take_over(pending)
            if not self._store.shared:
                return
            await asyncio.sleep(self._engine.config.bot.adopt_after_s / 4)

    async def resume(self, pending: Unanswered, live: Presenter, shared: bool, **about: Any) -> Final | None:
        """Answer a question left unanswered, on `live`, saying the answer comes late. Build `live`
        with `messages=` the handles of `pending.reply` (the messages the stopped process had posted
        for it) to continue in them."""
        key = pending.key
        self._keep_message_ids(live, pending.turn.message_id, key)
        final = await self.show(live, self._engine.resume(pending, shared), key, **about)
        if final is not None and not final.text and not final.notes:
            # Another process took it over first (or it was answered meanwhile): nothing was shown.
            self.log.info(f"{self.name}.resume_left", extra={"conversation": str(key), **about})
            return final
        await self._forget_reply(pending.turn.message_id)
        if final is not None:
            self.record("resumed")
            self.log.info(f"{self.name}.resumed", extra={"conversation": str(key), **about, "answered": bool(final.text), "messages": len(live.messages)})
        return final

    async def take_back(self, pending: Unanswered) -> bool:
        """For a reply whose process stopped before its question was stored (`pending.turn.id` is
        None): True if this process is the one to remove its messages (`pending.reply`), which the
        adapter then does."""
        taken = await self._store.adopt(pending)
        if taken:
            self.log.info(f"{self.name}.reply_removed", extra={"conversation": str(pending.key), "messages": len(pending.reply)})
        return taken

    async def _forget_reply(self, question: str) -> None:
        """The reply to `question` is shown in full: nobody is to continue or remove its messages."""
        if not question:
            return
        try:
            await self._store.forget_reply(self.name, question)
        except Exception as error:  # out of reach: once this process stops, its messages may be taken for a stray reply
            self.log.warning(f"{self.name}.reply_not_forgotten", extra={"error": type(error).__name__})

    def _keep_message_ids(self, live: Presenter, question: str, key: ConversationKey) -> None:
        """Keep the platform ids of `live`'s messages as they are posted in answer to the message
        `question` of `key`, so that a process taking the question over can edit them (or remove
        them, if this one stops before the question is stored). A surface whose handles are not
        the ids themselves says how to get one (`message_id(handle)`)."""
        if not question:
            return
        message_id = getattr(live.surface, "message_id", str)

        async def record(messages: list[Any]) -> None:
            try:
                await self._store.record_reply(self.name, question, [message_id(message) for message in messages], key)
            except Exception as error:  # the reply goes on; only a process taking it over would post anew
                self.log.warning(f"{self.name}.reply_not_recorded", extra={"error": type(error).__name__})

        live.on_post = record


def _handle(pending: Unanswered) -> int | str | None:
    """What tells one left question (or stray reply) from the others."""
    return pending.turn.id if pending.turn.id is not None else f"reply:{pending.turn.message_id}"
