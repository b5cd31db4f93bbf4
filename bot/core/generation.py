"""Generation: a prompt (a `Chat`) -> the model's streamed answer as reply events, measured on the way
(queue wait, batch size, generation time, tokens), the same on every backend."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from bot.metrics import Metrics
from bot.settings import Settings
from bot.state.store import Store
from ground.conversation import ImageRef
from ground.images import ModelImage
from ground.messages import Final, Partial, ReplyEvent, Waiting, Working
from model.service import Chat, ContextTooLong, Finished, GenerationParams, GenerationRequest, ModelError, ModelService, Queued, Started, TextDelta

log = logging.getLogger(__name__)

# One answer's stored images, by reference, loaded as its fitting and its prompt first need them:
# the answer passes the same one to all of them, so each image is read from the store once.
LoadedImages = dict[ImageRef, ModelImage]


class Generation:
    """Streams the model's answers to prompts."""

    def __init__(self, config: Settings, model: ModelService, store: Store, metrics: Metrics):
        self.model = model
        self.store = store
        self.metrics = metrics
        self.settings = config.model
        generation = config.generation
        self.params = GenerationParams(
            max_new_tokens=generation.max_new_tokens,
            do_sample=generation.do_sample,
            temperature=generation.temperature,
            top_p=generation.top_p,
            repetition_penalty=generation.repetition_penalty,
        )

    async def model_prompt(self, chat: Chat, loaded: LoadedImages | None = None) -> Chat:
        """`chat` with its images loaded from the store (those already in `loaded` are reused, new ones added)."""
        loaded = {} if loaded is None else loaded
        for ref in dict.fromkeys(part for part in chat.images if isinstance(part, ImageRef)):
            if ref not in loaded:
                loaded[ref] = await self.store.get_image(ref)
        return chat.with_images(loaded)

    def token_counter(self, loaded: LoadedImages) -> Callable[[Chat], Awaitable[int]]:
        """The model's token count, for one answer's fit: with the images taken from (and added to)
        `loaded` where an image's cost depends on its size, else with the references standing for them."""
        if not self.model.info.image_cost_varies:
            return self.model.count_tokens

        async def count(chat: Chat) -> int:
            return await self.model.count_tokens(await self.model_prompt(chat, loaded))

        return count

    def sendable_check(self, loaded: LoadedImages) -> Callable[[Chat], Awaitable[bool]] | None:
        """For a model with a limit on the size of a request, a check that a prompt keeps within it
        (its images taken from, and added to, `loaded`); None for a model without one."""
        limit = self.model.info.max_request_bytes
        if limit is None:
            return None

        async def sendable(chat: Chat) -> bool:
            return await self.model.request_bytes(await self.model_prompt(chat, loaded)) <= limit

        return sendable

    async def stream(self, chat: Chat, max_new_tokens: int, label: str, loaded: LoadedImages, num_beams: int = 1) -> AsyncIterator[ReplyEvent]:
        """Stream the model's answer to `chat` (its images taken from, and added to, `loaded`): Waiting
        and Partial events, then a Final. A beam search answer has no Partials: it is shown whole, with
        the working status until then."""
        prompt = await self.model_prompt(chat, loaded)
        request = GenerationRequest(
            prompt=prompt,
            params=replace(self.params, max_new_tokens=max_new_tokens, num_beams=num_beams),
            queue_timeout=self.settings.queue_timeout_s,
            timeout=self.settings.generation_timeout_s,
            label=label,
        )
        text = ""
        metrics, clock = self.metrics, time.perf_counter
        waiting_since: float | None = None
        generating_since: float | None = None
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
                    if num_beams == 1:
                        yield Partial(text)
                elif isinstance(event, Finished):
                    if generating_since is not None:
                        metrics.generation.observe(clock() - generating_since)
                    metrics.tokens.inc(event.tokens)
                    metrics.replies.labels(outcome=event.reason).inc()
                    yield Final(event.text, (event.note,) if event.note else ())
                    return
        except ModelError as error:
            metrics.error("too_long" if isinstance(error, ContextTooLong) else type(error).__name__)
            log.warning("request.failed", extra={"request": label, "error": type(error).__name__})
            yield Final("", (str(error),))
        finally:
            if waiting_since is not None:  # left the queue without starting (cancelled, timed out)
                metrics.queue_depth.dec()
