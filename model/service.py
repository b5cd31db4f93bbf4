"""The model service interface: what the bot asks of any backend, in platform- and library-free types.

A backend takes a `GenerationRequest` (a `Chat`: the conversation as structured messages, which each
backend renders in its model's own format, plus generation settings) and streams `Queued`, `Started`, `TextDelta` and finally `Finished` events back. Nothing in
here knows about transformers, so the bot runs unchanged on the local backend or a remote server.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from ground.images import ModelImage

END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
# The tokens IDEFICS adds to LLaMA's vocabulary, and every token its tokenizer matches in raw text:
# LLaMA's own three as well (a typed "</s>" would end the document, and with it the image context).
IDEFICS_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", *IDEFICS_TOKENS)

# The reference chat demo stops here too: the model starting the user's next turn by itself.
USER_TURN_STOP = "\nUser:"


class ImageSlot(Protocol):
    """Where an image goes in a prompt whose tokens are counted: a `ModelImage`, or anything standing
    for one (the bot counts with references to stored images, without loading them)."""

    @property
    def name(self) -> str: ...


PromptItem = str | ModelImage
# A rendered prompt (text and images in order, as a backend's model takes them); `count_tokens` and
# `render` take image slots in place of images: only an image's place matters, not its pixels.
Prompt = Sequence[PromptItem]
CountedPrompt = Sequence[str | ImageSlot]
# A part of a message: text, or an image (a `ModelImage` in a request; any `ImageSlot` for counting).
Part = str | ModelImage | ImageSlot


@dataclass(frozen=True)
class Message:
    """One turn: who speaks and what they posted, text and images in the order posted."""

    role: Literal["system", "user", "assistant"]
    parts: tuple[Part, ...]  # (for token counting, image slots stand for images)
    speaker: str = ""  # a user's display name in a shared conversation; "" otherwise

    @property
    def text(self) -> str:
        """The message's text parts, one per line."""
        return "\n".join(part for part in self.parts if isinstance(part, str))


@dataclass(frozen=True)
class Chat:
    """What the model continues: messages in order (system first if any), ending with a user turn;
    the reply is the assistant's next turn."""

    messages: tuple[Message, ...]
    # The start of the assistant's reply, written for it and continued by the model (a guide cue such as "Category: ").
    reply_start: str = ""
    # IDEFICS v1 only: one of the guide's one-off task prompts in its own words, sent verbatim instead of
    # rendering `messages` in the User:/Assistant: format. Chat-templated families and OpenAI servers ignore it.
    guide: tuple[Part, ...] = ()

    @property
    def images(self) -> list[Part]:
        """Every image part, in order (of the guide too), repeats included."""
        parts = [part for message in self.messages for part in message.parts]
        return [part for part in (*parts, *self.guide) if not isinstance(part, str)]

    def continued(self, continuation: str) -> Chat:
        """The chat with `continuation` written after the start of the reply (for the guide, after
        its last item, which must be text): how a `ScoreRequest` reads each continuation."""
        guide = self.guide
        if guide:
            *head, last = guide
            if not isinstance(last, str):
                raise ValueError("a scored prompt ends with text")
            guide = (*head, last + continuation)
        return replace(self, reply_start=self.reply_start + continuation, guide=guide)

    def with_images(self, images: dict) -> Chat:
        """The chat with every image part replaced by `images[part]` (references by loaded images, say)."""

        def swap(parts: tuple[Part, ...]) -> tuple[Part, ...]:
            return tuple(part if isinstance(part, str) else images[part] for part in parts)

        messages = tuple(replace(message, parts=swap(message.parts)) for message in self.messages)
        return replace(self, messages=messages, guide=swap(self.guide))


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings; the defaults are those of the IDEFICS reference chat demo."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.4
    top_p: float = 0.8
    repetition_penalty: float = 1.0
    seed: int | None = None  # for sampling: the same seed gives the same reply; None picks one at random
    # Beam search (the guide's story task) keeps several candidates and picks the best at the end, so
    # such a reply can't stream: it arrives whole. Backends without beam search decode greedily.
    num_beams: int = 1


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. Time limits are in seconds; None means no limit."""

    prompt: Chat
    params: GenerationParams = field(default_factory=GenerationParams)
    stop_strings: tuple[str, ...] = (USER_TURN_STOP,)
    queue_timeout: float | None = None
    timeout: float | None = None
    label: str = ""  # for logs only: which conversation asked


@dataclass(frozen=True)
class ScoreRequest:
    """Continuations to weigh after one prompt: how likely the model finds each as the next words
    of the reply, e.g. a classification's labels after "Category: ". Each is read as
    `prompt.continued(continuation)`."""

    prompt: Chat
    continuations: tuple[str, ...]
    queue_timeout: float | None = None
    timeout: float | None = None
    label: str = ""  # for logs only: which conversation asked

    @property
    def time_limit(self) -> float | None:
        """The whole request's limit, queue and work together: the sum of those set, None if neither is."""
        limits = [limit for limit in (self.queue_timeout, self.timeout) if limit is not None]
        return sum(limits) if limits else None


@dataclass(frozen=True)
class Queued:
    """The request waits; `position` 1 means it goes into the next batch."""

    position: int


@dataclass(frozen=True)
class Started:
    """The request is in a batch that is generating now."""

    batch_size: int


@dataclass(frozen=True)
class TextDelta:
    """New reply text; the deltas of a request add up to its `Finished.text`."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The reply is complete. `reason` is "stop" (end of utterance or stop string), "length", or
    "cut" (a remote server's stream broke off: `text` is what came, and `note` says so)."""

    text: str
    reason: str
    tokens: int
    note: str = ""  # for the asker, shown with the reply


StreamEvent = Queued | Started | TextDelta | Finished


def continued(prompt: Sequence, continuation: str) -> list:
    """A rendered `prompt` with `continuation` appended to its last item, which must be text."""
    *head, last = prompt
    if not isinstance(last, str):
        raise ValueError("a scored prompt ends with text")
    return [*head, last + continuation]


class ModelError(Exception):
    """A request could not be answered; `str(error)` is fit to show to the person who asked."""


class ModelBusy(ModelError):
    """The queue is full; try again in a moment."""


class ModelTimeout(ModelError):
    """The request ran past its queue or generation time limit."""

    @classmethod
    def after(cls, request: GenerationRequest, started: bool) -> ModelTimeout:
        """The error for `request` running out of time: waiting for the model, or (once `started`) generating."""
        if started:
            return cls(f"The reply took longer than {request.timeout:g} s, so I stopped it. Please try a shorter question.")
        return cls(f"The model was busy and your request waited more than {request.queue_timeout:g} s in the queue. Please try again.")

    @classmethod
    def scoring(cls, request: ScoreRequest) -> ModelTimeout:
        """The error for a `ScoreRequest` that ran out of its (queue + work) time."""
        seconds = (request.queue_timeout or 0) + (request.timeout or 0)
        return cls(f"The model was busy and couldn't weigh the labels within {seconds:g} s. Please try again.")


class GenerationFailed(ModelError):
    """The model raised while working on this request (the other requests of its batch go on)."""


class ContextTooLong(GenerationFailed):
    """A remote server refused the prompt as longer than its context (the bot's count fell short)."""


class ScoringUnavailable(ModelError):
    """The backend can't weigh continuations (its server scores no prompts): generate instead."""


class ModelUnavailable(ModelError):
    """The service is not running (not started, or shutting down)."""


class ModelLoadError(Exception):
    """The checkpoint could not be loaded; the message is one paragraph saying what failed and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    """What the bot needs to know about the model behind a service."""

    name: str
    context_tokens: int = 2048
    # The largest request the backend can send (a remote server's body limit); None: no such limit.
    max_request_bytes: int | None = None
    image_size: int = 224  # the processor resizes every image to this square; intake keeps exactly that
    # Set for a processor that keeps the aspect ratio (Idefics3): it scales every image to this
    # longest edge, and intake scales larger images down to it the same way (`image_size` is unused).
    image_longest_edge: int | None = None
    family: str = "idefics"  # the model's family (model/family.py): "idefics" (v1) or "idefics3"
    # Every token the model's tokenizer reads as itself in raw text, besides SPECIAL_TOKENS: the bot
    # removes them from what people type and from stored replies.
    special_tokens: tuple[str, ...] = ()

    @property
    def image_cost_varies(self) -> bool:
        """Whether an image's token cost depends on its size (Idefics3's tiles): then count tokens
        with the images themselves, not references standing for them."""
        return self.image_longest_edge is not None


class ModelService(abc.ABC):
    """An async model service, ready when made: `await LocalBackend.open(...)` (IDEFICS in this process)
    or `await TGIBackend.open(...)` (a text-generation-inference server)."""

    info: ModelInfo

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop taking requests, end the ones in flight, release the model."""

    @abc.abstractmethod
    async def count_tokens(self, prompt: Chat) -> int:
        """How many tokens `prompt` takes in the model's context, counted with the real tokenizer
        (its images may be any `ImageSlot`)."""

    @abc.abstractmethod
    def render(self, prompt: Chat) -> list[str | ImageSlot]:
        """What the model receives for `prompt`: the text this backend sends, with the images in their
        places (for `idefics-bot render` and for tests; images may be any `ImageSlot`)."""

    async def request_bytes(self, prompt: Chat) -> int:
        """The size of the request that would carry `prompt`, to compare with `info.max_request_bytes`
        (a backend that has such a limit says how large, images included)."""
        return 0

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        """Submit `request` and yield its events. Closing the generator (`aclose`, or leaving it to be
        collected) or cancelling the task that iterates cancels the request and frees its place.
        Raises a `ModelError` on failure."""

    def health(self) -> dict[str, bool]:
        """Named checks for /healthz, each True when fine (e.g. "loaded", "worker_alive")."""
        return {"started": True}

    @abc.abstractmethod
    async def score(self, request: ScoreRequest) -> list[float]:
        """The model's log-likelihood of each continuation right after the prompt (natural log,
        summed over the continuation's tokens), in order. Raises a `ModelError` on failure."""

    async def generate(self, request: GenerationRequest) -> Finished:
        """Run `request` to the end and return the finished reply."""
        # Closed on the way out, not when collected: the backend knows at once that it has ended.
        async with contextlib.aclosing(self.stream(request)) as stream:
            async for event in stream:
                if isinstance(event, Finished):
                    return event
        raise GenerationFailed("The model ended without a reply.")
