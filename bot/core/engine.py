"""The engine: from an incoming message (text + attachments) to a streamed reply.

    adapter -> IncomingMessage -> Engine.reply() -> Waiting / Partial / Final -> adapter

It takes the images in, keeps one request at a time per conversation (in arrival order), renders the
conversation within the model's context, streams the model's answer, and stores both turns. Every
problem a person can cause or meet ends as a `Final` whose notes say, in plain words, what happened.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from bot.runtime.config import Config
from bot.core.conversation import Author, ConversationKey, ImageRef, Turn, Unanswered
from bot.core.fairness import ConversationTurns, RateLimiter
from bot.images.fetch import FetchLimits, FetchRefused, fetch, file_name
from bot.images.intake import ACCEPTED, ImageLimits, ImageRejected, prepare_image
from bot.runtime.metrics import Metrics
from bot.core.prompt import PromptItems, PromptTooLong, clean_text, fit
from bot.state.store import Store
from bot.core.tasks import FewShotPair, TaskError, build_task
from model.service import (
    Finished,
    GenerationParams,
    GenerationRequest,
    ModelError,
    ModelImage,
    ModelService,
    Prompt,
    Queued,
    Started,
    TextDelta,
)

log = logging.getLogger(__name__)

_IMAGE_LINK = re.compile(r"https?://[^\s<>\"')]+?\.(?:png|jpe?g|gif|webp|bmp)(?:\?[^\s<>\"')]*)?(?=[\s<>\"')]|$)", re.IGNORECASE)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"}
_RESTARTING = "I'm shutting down for a moment; please send that again in a minute."
_RESUMED = "I was restarted while writing this answer, so it comes late."


@dataclass(frozen=True)
class Attachment:
    """A file that came with a message. `read(max_bytes)` fetches it (lazily: ignored files never are)."""

    name: str
    read: Callable[[int], Awaitable[bytes]]
    size: int | None = None
    content_type: str | None = None

    def looks_like_image(self) -> bool:
        """False only when both the type and the name say it is something else."""
        if self.content_type is None or self.content_type.startswith("image/"):
            return True
        return Path(self.name).suffix.lower() in _IMAGE_SUFFIXES


@dataclass(frozen=True)
class IncomingMessage:
    """A message for the bot, free of any platform's types. `shared`: several people talk here."""

    key: ConversationKey
    author: Author
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    message_id: str = ""
    shared: bool = False


@dataclass(frozen=True)
class TaskRequest:
    """A one-off image task (a slash command). Without images, the channel's last image is used."""

    task: str
    key: ConversationKey
    author: Author
    attachments: tuple[Attachment, ...] = ()
    question: str = ""
    labels: str = ""


@dataclass(frozen=True)
class Waiting:
    """The request waits for the model; `position` 1 is next."""

    position: int


@dataclass(frozen=True)
class Working:
    """The model has started on the reply; its text follows."""


@dataclass(frozen=True)
class Partial:
    """The reply so far (the whole text, not a delta)."""

    text: str


@dataclass(frozen=True)
class Final:
    """The end of a reply: the model's text ("" when there is none) and notes for the asker."""

    text: str
    notes: tuple[str, ...] = ()


ReplyEvent = Waiting | Working | Partial | Final


class _Refusal(Exception):
    """Input that ends the request with a message to the asker and no model call."""


class Engine:
    """Ties turns to replies; shared by every adapter in the process."""

    def __init__(self, config: Config, model: ModelService, store: Store, metrics: Metrics | None = None):
        self.config = config
        self.model = model
        self.store = store
        self.metrics = metrics or Metrics()
        images = config.images
        self.image_limits = ImageLimits(images.max_bytes, images.max_pixels, images.max_aspect_ratio)
        self.fetch_limits = FetchLimits(
            max_bytes=images.max_bytes,
            connect_timeout=images.connect_timeout_s,
            total_timeout=images.fetch_timeout_s,
            allow_private=images.allow_private_addresses,
            allowed_hosts=frozenset(images.allowed_hosts),
        )
        generation = config.generation
        self.params = GenerationParams(
            max_new_tokens=generation.max_new_tokens,
            do_sample=generation.do_sample,
            temperature=generation.temperature,
            top_p=generation.top_p,
            repetition_penalty=generation.repetition_penalty,
        )
        limits = config.limits
        self._rates = RateLimiter(limits.per_user_per_minute, limits.per_user_burst) if limits.per_user_per_minute else None
        self._turns = ConversationTurns(latest_wins=limits.conversation_mode == "latest")
        self._few_shot: list[FewShotPair] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False

    @asynccontextmanager
    async def _tracked(self):
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    @asynccontextmanager
    async def _conversation_turn(self, key: ConversationKey, message: bool = True):
        """This process's turn in the conversation, then the store's hold on it, which the other
        processes sharing the state respect too. Yields whether a newer message overtook this one."""
        async with self._turns.turn(key, message) as overtaken, self.store.hold_conversation(key):
            yield overtaken

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for those in flight; True if all finished."""
        self.closing = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    # -- conversations -----------------------------------------------------------------------

    async def reply(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        """Answer one message in its conversation, streaming the reply."""
        async for event in self._admitted(message.key.platform, message.author, self._reply(message)):
            yield event

    async def _admitted(self, platform: str, author: Author | None, work: AsyncIterator[ReplyEvent]) -> AsyncIterator[ReplyEvent]:
        """`work`'s events if a new request can be taken now; else why not (shutting down, or too
        many requests from this person). Without an `author` (a resumed reply) no rate limit applies."""
        refusal = None
        if self.closing:
            self.metrics.error("shutting_down")
            refusal = _RESTARTING
        elif wait := (self._rates.acquire((platform, author.id)) if self._rates and author else 0):
            self.metrics.error("rate_limited")
            refusal = f"You're sending requests faster than I can answer. Please try again in {math.ceil(wait)} s."
        if refusal:
            yield Final("", (refusal,))
            return
        async with self._tracked():
            async for event in work:
                yield event

    async def _reply(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        started = time.perf_counter()
        # The message takes its place in the conversation as it arrives, before its images are taken
        # in: one whose image is slow to download is not overtaken by the messages sent after it.
        async with self._conversation_turn(message.key) as overtaken:
            try:
                refs, notes = await self._take_in(message.key, message.attachments, message.text)
            except _Refusal as refusal:
                self.metrics.error("input_refused")
                final = Final("", (str(refusal),))
            else:
                text = clean_text(message.text)
                user_turn = Turn("user", (*((text,) if text else ()), *refs), message.author, message.message_id)
                if not text and not refs:
                    final = Final("", (*notes, "Send me a question, an image, or both, and I'll answer."))
                elif overtaken:
                    # "latest" mode: a newer message is waiting; this one joins the history unanswered.
                    await self.store.add_turn(message.key, user_turn)
                    final = Final("", (*notes, "A newer message arrived while this one waited, so I'll answer that one with this in mind."))
                else:
                    history = await self.store.load_turns(message.key)
                    async with aclosing(self._answer_turn(message.key, history, user_turn, message.shared, notes, started)) as events:
                        async for event in events:
                            if isinstance(event, Final):
                                final = event
                            else:
                                yield event
        yield final  # shown once the conversation is free for its next message

    async def unanswered(self, platform: str) -> list[Unanswered]:
        """Messages of `platform` that a stopped process stored but never answered (it was killed while
        replying), at most [bot] resume_window_s old, oldest first: adapters `resume` them at start-up."""
        window = self.config.bot.resume_window_s
        if not window:
            return []
        return await self.store.unanswered(platform, time.time() - window)

    async def resume(self, pending: Unanswered, shared: bool) -> AsyncIterator[ReplyEvent]:
        """Answer `pending` in its conversation, as `reply` would have, without adding a turn; the
        answer carries a note saying it comes late. If the conversation moved on meanwhile (another
        process answered it, or a newer message was answered), it ends with an empty Final: nothing
        to show. `shared` as in `IncomingMessage`."""
        async for event in self._admitted(pending.key.platform, None, self._resume(pending, shared)):
            yield event

    async def _resume(self, pending: Unanswered, shared: bool) -> AsyncIterator[ReplyEvent]:
        started = time.perf_counter()
        final = Final("")
        # Under the conversation's hold, so that a process still answering it finishes first.
        async with self._conversation_turn(pending.key, message=False):
            history = await self.store.load_turns(pending.key)
            if history and history[-1].id == pending.turn.id:
                log.info("turn.resuming", extra={"conversation": str(pending.key)})
                async with aclosing(self._answer_turn(pending.key, history[:-1], history[-1], shared, [_RESUMED], started)) as events:
                    async for event in events:
                        if isinstance(event, Final):
                            final = event
                        else:
                            yield event
        yield final

    async def _answer_turn(
        self, key: ConversationKey, history: list[Turn], user_turn: Turn, shared: bool, notes: list[str], started: float
    ) -> AsyncIterator[ReplyEvent]:
        """Answer `user_turn` after `history` and store the answer; the last event is a Final. The
        user turn is stored first unless it already is (a resumed one). A turn that ends unanswered
        (failed, too long, cancelled) is taken back: no question stays in the store without its answer."""
        stored = user_turn if user_turn.id is not None else None
        answer: str | None = None
        try:
            try:
                fitted = await fit(
                    [*history, user_turn],
                    self.model.count_tokens,
                    context_tokens=self.model.info.context_tokens,
                    reserve_tokens=self.params.max_new_tokens,
                    max_images=self.config.conversation.max_images,
                    system_prompt=self.config.conversation.system_prompt,
                    shared=shared,
                    sendable=self._sendable_check(),
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
                stored = await self.store.add_turn(key, user_turn)
            async for event in self._generate(fitted.items, self.params.max_new_tokens, str(key)):
                if isinstance(event, Final):
                    answer, notes = event.text, [*notes, *event.notes]
                    break
                yield event
        finally:
            if not answer and stored is not None:
                # Cancelled (message deleted, shutdown) or failed: the turn was never answered.
                await asyncio.shield(self.store.remove_turn(stored.id))
        if not answer:
            yield Final("", tuple(notes) or ("The model gave an empty reply; try asking differently.",))
            return
        previous = next((turn for turn in reversed(history) if turn.role == "assistant"), None)
        if fitted.dropped and (previous is None or not previous.dropped):
            notes.append("This conversation is now longer than I can read at once, so I no longer see its oldest messages.")
        await self.store.add_turn(key, Turn("assistant", (answer,), dropped=fitted.dropped))
        log.info(
            "turn.answered",
            extra={"conversation": str(key), "images": len(user_turn.images), "dropped": fitted.dropped, "seconds": round(time.perf_counter() - started, 3)},
        )
        yield Final(answer, tuple(notes))

    async def reset(self, key: ConversationKey) -> int:
        """Forget a conversation (waits for a reply in progress there to finish first)."""
        async with self._conversation_turn(key, message=False):
            return await self.store.reset(key)

    async def reset_channel(self, platform: str, channel: str) -> tuple[int, int]:
        """Forget every conversation of a channel, one by one as `reset` does; returns how many
        conversations and turns that was."""
        counts = [await self.reset(key) for key in await self.store.conversations_in(platform, channel)]
        return len(counts), sum(counts)

    # -- one-off tasks -----------------------------------------------------------------------

    async def run_task(self, request: TaskRequest) -> AsyncIterator[ReplyEvent]:
        """Run a task on the given image (or the channel's last one); nothing is added to the conversation."""
        async for event in self._admitted(request.key.platform, request.author, self._run_task(request)):
            yield event

    async def _run_task(self, request: TaskRequest) -> AsyncIterator[ReplyEvent]:
        notes: list[str] = []
        try:
            refs, notes = await self._take_in(request.key, request.attachments, "")
            if not refs and request.task != "chat":
                last = await self.store.last_image(request.key.platform, request.key.channel)
                if last is None:
                    raise _Refusal("Give me an image (attach one or paste a link): I haven't seen one in this channel yet.")
                refs, notes = [last], [*notes, f"I used the last image I saw in this channel ({last.name})."]
            prompt = build_task(
                request.task,
                refs,
                question=request.question,
                labels=request.labels,
                examples=await self._few_shot_examples() if request.task == "few_shot" else (),
                system_prompt=self.config.conversation.system_prompt,
                max_new_tokens=dict(self.config.tasks.max_new_tokens),
            )
        except (_Refusal, TaskError) as refusal:
            self.metrics.error("input_refused")
            yield Final("", (*notes, str(refusal)))
            return
        async for event in self._generate(prompt.items, prompt.max_new_tokens, f"{request.key} task={request.task}"):
            if isinstance(event, Final):
                event = Final(event.text, (*notes, *event.notes))
                if not event.text and not event.notes:
                    event = Final("", ("The model gave an empty reply.",))
            yield event

    async def _few_shot_examples(self) -> list[FewShotPair]:
        if self._few_shot is None:
            pairs = []
            for example in self.config.tasks.few_shot:
                try:
                    data = await asyncio.to_thread(example.image.read_bytes)
                except OSError as exc:
                    raise _Refusal(f"The few-shot example image {example.image} can't be read ({exc.strerror}); fix [[tasks.few_shot]].") from None
                image = await self._prepare(data, example.image.name)
                pairs.append(FewShotPair(await self.store.put_image(image), example.text))
            self._few_shot = pairs
        return self._few_shot

    # -- shared steps ------------------------------------------------------------------------

    def link(self, url: str) -> Attachment:
        """An attachment for an image link somebody gave, fetched under the link rules."""

        async def read(max_bytes: int) -> bytes:
            return await fetch(url, replace(self.fetch_limits, max_bytes=max_bytes))

        return Attachment(name=file_name(url), read=read)

    def attachment_for(self, source: str) -> Attachment:
        """An attachment for a file path or an http(s) link typed by the person at the keyboard."""
        if "://" in source:
            return self.link(source)
        path = Path(source).expanduser()

        async def read(max_bytes: int) -> bytes:
            try:
                size = path.stat().st_size
                if size > max_bytes:
                    raise ImageRejected(f"{path.name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB per image.")
                return await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                raise ImageRejected(f"{source} can't be read: {exc.strerror or exc}.") from None

        return Attachment(name=path.name, read=read)

    async def _take_in(self, key: ConversationKey, attachments: Sequence[Attachment], text: str) -> tuple[list[ImageRef], list[str]]:
        """Fetch and check the images of a message. Raises `_Refusal` if one can't be used: the
        asker meant to show it, so answering without it would mislead."""
        notes: list[str] = []
        wanted = [a for a in attachments if a.looks_like_image()]
        for ignored in (a for a in attachments if not a.looks_like_image()):
            notes.append(f"{ignored.name} isn't an image, so I left it out. I can read {ACCEPTED}.")
        if self.config.images.fetch_links:
            wanted += [self.link(url) for url in dict.fromkeys(_IMAGE_LINK.findall(text))]
        limit = self.config.images.max_per_turn
        if len(wanted) > limit:
            raise _Refusal(f"That's {len(wanted)} images; I can take {limit} per message. Please send fewer.")
        results = await asyncio.gather(*(self._take_one(a) for a in wanted), return_exceptions=True)
        refusals = [str(r) for r in results if isinstance(r, (ImageRejected, FetchRefused))]
        for failure in (r for r in results if isinstance(r, BaseException) and not isinstance(r, (ImageRejected, FetchRefused))):
            raise failure
        if refusals:
            raise _Refusal(" ".join(refusals))
        refs = [await self.store.put_image(image) for image in results]
        if refs:
            await self.store.remember_image(key.platform, key.channel, refs[-1])
        return refs, notes

    async def _take_one(self, attachment: Attachment):
        limit = self.config.images.max_bytes
        if attachment.size is not None and attachment.size > limit:
            raise ImageRejected(f"{attachment.name} is {attachment.size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB per image.")
        return await self._prepare(await attachment.read(limit), attachment.name)

    async def _prepare(self, data: bytes, name: str):
        return await asyncio.to_thread(prepare_image, data, name, self.image_limits)

    async def _model_prompt(self, items: PromptItems, loaded: dict[ImageRef, ModelImage] | None = None) -> Prompt:
        """`items` with their images loaded from the store (those already in `loaded` are reused, new ones added)."""
        loaded = {} if loaded is None else loaded
        for ref in dict.fromkeys(item for item in items if isinstance(item, ImageRef)):
            if ref not in loaded:
                loaded[ref] = await self.store.get_image(ref)
        return [loaded[item] if isinstance(item, ImageRef) else item for item in items]

    def _sendable_check(self) -> Callable[[PromptItems], Awaitable[bool]] | None:
        """For a model with a limit on the size of a request, a check that a prompt keeps within it
        (the images of one fit are loaded once); None for a model without one."""
        limit = self.model.info.max_request_bytes
        if limit is None:
            return None
        loaded: dict[ImageRef, ModelImage] = {}

        async def sendable(items: PromptItems) -> bool:
            return await self.model.request_bytes(await self._model_prompt(items, loaded)) <= limit

        return sendable

    async def _generate(self, items: PromptItems, max_new_tokens: int, label: str) -> AsyncIterator[ReplyEvent]:
        """Stream the model's answer to `items`: Waiting and Partial events, then a Final."""
        prompt = await self._model_prompt(items)
        request = GenerationRequest(
            prompt=prompt,
            params=replace(self.params, max_new_tokens=max_new_tokens),
            queue_timeout=self.config.model.queue_timeout_s,
            timeout=self.config.model.generation_timeout_s,
            label=label,
        )
        text = ""
        metrics, clock = self.metrics, time.perf_counter
        waiting_since = generating_since = None
        try:
            async for event in self.model.stream(request):
                if isinstance(event, Queued):
                    if waiting_since is None:
                        waiting_since = clock()
                        metrics.queue_depth.inc()
                    yield Waiting(event.position)
                elif isinstance(event, Started):
                    if waiting_since is not None:
                        metrics.queue_depth.dec()
                        metrics.queue_wait.observe(clock() - waiting_since)
                        waiting_since = None
                    metrics.batch_size.observe(event.batch_size)
                    generating_since = clock()
                    yield Working()
                elif isinstance(event, TextDelta):
                    text += event.text
                    yield Partial(text)
                elif isinstance(event, Finished):
                    if generating_since is not None:
                        metrics.generation.observe(clock() - generating_since)
                    metrics.tokens.inc(event.tokens)
                    metrics.replies.labels(outcome=event.reason).inc()
                    yield Final(event.text)
                    return
        except ModelError as error:
            metrics.error(type(error).__name__)
            log.warning("request.failed", extra={"request": label, "error": type(error).__name__})
            yield Final("", (str(error),))
        finally:
            if waiting_since is not None:  # left the queue without starting (cancelled, timed out)
                metrics.queue_depth.dec()
