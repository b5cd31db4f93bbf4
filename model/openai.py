"""The OpenAI-compatible backend: any server that speaks OpenAI's chat completions (vLLM and SGLang
for scale-out; Ollama, llama.cpp's llama-server and LM Studio on a desk), over HTTP.

A `Chat` goes to `POST {url}/chat/completions` as JSON messages (the system prompt, the user turns
with their images in the order posted as `data:` URIs in `image_url` parts, the bot's replies as
assistant turns, a speaker's name as "[Name] " at the start of their text), within a body budget
([model] payload_limit: images re-encoded first, the engine drops the oldest turns after that).
The reply streams back as server-sent events (`stream: true`, with the usage in a last chunk).
The line of requests waiting here, the retries and the time limits are those of every remote
backend (model/remote.py). Tokens are counted by the server's `POST /tokenize` where it has one
(vLLM, SGLang, llama.cpp), else by the model's own tokenizer if it is in the local Hugging Face
cache, else by a stated conservative estimate. Labels are weighed with vLLM's `prompt_logprobs`
where the server returns them; elsewhere `score` raises `ScoringUnavailable` and the bot lets the
model name a label itself. The protocol has no beam search: a request for beams decodes greedily.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image

from ground.images import ModelImage
from model.remote import (
    AUTH_REFUSED,
    BUSY,
    MODEL_IMAGE_SIDE,
    SERVER_FAILED,
    TOO_MANY_IMAGES,
    UNREADABLE,
    RemoteBackend,
    RemoteSettings,
    Retry,
    compact,
    data_uri,
    data_uri_bytes,
    server_events,
)
from model.reply_text import visible_text
from model.service import (
    Chat,
    ContextTooLong,
    Finished,
    GenerationFailed,
    GenerationRequest,
    ModelBusy,
    ModelError,
    ModelInfo,
    ModelLoadError,
    ModelTimeout,
    ModelUnavailable,
    Part,
    Queued,
    ScoreRequest,
    ScoringUnavailable,
    Started,
    StreamEvent,
    TextDelta,
)

log = logging.getLogger(__name__)

# The side images travel at: one tile of SmolVLM's processor (Idefics3's is 364), which resizes
# every image itself; larger would only cost bytes.
IMAGE_SIDE = 512
# Without a server that says so, the context assumed: the default of llama-server and Ollama.
DEFAULT_CONTEXT_TOKENS = 4096
# The stated conservative estimate, where neither the server nor a cached tokenizer can count:
# a token for every 3 bytes of UTF-8 (English averages about 4 characters a token; most other
# scripts take 2-3 bytes a character and about a token each), each message's role and markers
# as 8 tokens, and each image as IMAGE_TOKENS_ESTIMATE (SmolVLM and Idefics3 take 64-169 tokens
# for each 512 px or 364 px tile, and a 512 px image may become up to 5 tiles).
ESTIMATE_BYTES_PER_TOKEN = 3
MESSAGE_TOKENS_ESTIMATE = 8
IMAGE_TOKENS_ESTIMATE = 850
# The text of the reply to a request body: the messages and the settings, with room for stop strings.
_SETTINGS_BYTES = 1024

TOO_LONG = "Your message is too long for the model server to read. Please shorten it."
CUT = "The model server stopped sending this answer part-way, so it is cut short."
_PAYLOAD_REFUSED = (
    "The model server refused a request this large (HTTP 413). Please send fewer images at a time; whoever runs the bot "
    "can set [model] payload_limit to the server's (or its proxy's) body limit."
)
_QUOTA = "The model server's account has run out of quota, so I can't answer right now. Please tell whoever runs this bot."


@dataclass(frozen=True)
class OpenAISettings(RemoteSettings):
    """Where the server's `/v1` base is, which of its models to use, and how this process uses it."""

    model: str = ""


# -- the chat, as messages -------------------------------------------------------------------


def chat_messages(chat: Chat, image: Callable[[Any], dict | None] = lambda part: {"type": "image_url", "image_url": {"url": data_uri(part)}}) -> list[dict]:
    """The chat completion `messages` of `chat`: text and images in the order posted, a speaker's
    name as "[Name] " before their text, and the start of the reply written for the model (which
    the server continues: `continue_final_message`). `image(part)` gives an image's part (None
    leaves it out)."""
    messages: list[dict] = []
    for message in chat.messages:
        parts: list[dict] = []
        for part in message.parts:
            if isinstance(part, str):
                if parts and parts[-1]["type"] == "text":
                    parts[-1]["text"] += part
                elif part:
                    parts.append({"type": "text", "text": part})
            elif (item := image(part)) is not None:
                parts.append(item)
        if message.speaker:
            name = f"[{message.speaker}] "
            if parts and parts[0]["type"] == "text":
                parts[0]["text"] = name + parts[0]["text"]
            else:
                parts.insert(0, {"type": "text", "text": name})
        if all(part["type"] == "text" for part in parts):
            messages.append({"role": message.role, "content": "".join(part["text"] for part in parts)})
        else:
            messages.append({"role": message.role, "content": parts})
    if chat.reply_start:
        messages.append({"role": "assistant", "content": chat.reply_start})
    return messages


def render_messages(chat: Chat) -> list[Part]:
    """The messages of `chat` as the server gets them, for reading: "role: " before each, its text
    and its images in their places, a line break after it."""
    items: list[Part] = []
    for message in chat_messages(chat, lambda part: {"type": "image", "image": part}):
        content = message["content"]
        items.append(f"{message['role']}: ")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            items.append(part["text"] if part["type"] == "text" else part["image"])
        items.append("\n")
    return items


def continuing(chat: Chat) -> dict:
    """The extra settings for a chat whose reply has begun (vLLM's and SGLang's; none otherwise, as
    OpenAI refuses fields it doesn't know)."""
    return {"add_generation_prompt": False, "continue_final_message": True} if chat.reply_start else {}


def within_payload(chat: Chat, limit: int) -> tuple[Chat, int]:
    """`chat` as it travels under a body limit of `limit` bytes, and the messages' size: its
    images as they are if they fit, else all of them re-encoded as JPEG at most IMAGE_SIDE pixels a
    side, else at MODEL_IMAGE_SIDE. Dropping turns never makes a chat larger, so the engine can
    search for the longest history that fits. CPU-bound."""

    def size(chat: Chat) -> int:
        text = json.dumps(chat_messages(chat, lambda part: {"type": "image_url", "image_url": {"url": ""}}))
        return len(text.encode()) + sum(data_uri_bytes(part) for part in images(chat)) + _SETTINGS_BYTES

    total = size(chat)
    for side in (IMAGE_SIDE, MODEL_IMAGE_SIDE):
        if total <= limit or not images(chat):
            break
        original = chat
        chat = original.with_images({image: compact(image, side, squash=False) for image in images(original)})
        total = size(chat)
    return chat, total


def images(chat: Chat) -> list[ModelImage]:
    """The images of a chat that travels (the guide, which only IDEFICS v1 reads, left out)."""
    return [part for message in chat.messages for part in message.parts if isinstance(part, ModelImage)]


def estimate_tokens(messages: Sequence[dict], images: int) -> int:
    """The conservative estimate (see ESTIMATE_BYTES_PER_TOKEN) of what `messages` take, and `images`."""
    text = sum(len(str(message["content"]).encode()) for message in messages)
    return math.ceil(text / ESTIMATE_BYTES_PER_TOKEN) + MESSAGE_TOKENS_ESTIMATE * len(messages) + IMAGE_TOKENS_ESTIMATE * images


def _text_messages(chat: Chat) -> list[dict]:
    return chat_messages(chat, lambda part: None)


# -- the server's answers --------------------------------------------------------------------


def error_message(payload: dict) -> tuple[str, str]:
    """(message, type or code) from any of the error shapes: OpenAI's, vLLM's and Ollama's
    `{"error": {"message", "type", "code"}}`, llama.cpp's (the same keys), vLLM's middleware's
    `{"error": "Unauthorized"}`, and the flat `{"object": "error", "message", "type"}` of some servers."""
    error = payload.get("error", payload)
    if isinstance(error, str):
        return error, ""
    if not isinstance(error, dict):
        return "", ""
    kind = error.get("code") if isinstance(error.get("code"), str) else error.get("type")
    return str(error.get("message") or ""), str(kind or "")


def is_context_refusal(message: str, kind: str) -> bool:
    """vLLM's "maximum context length" refusal, or llama.cpp's exceed_context_size_error."""
    text = f"{message} {kind}".lower()
    return any(sign in text for sign in ("maximum context length", "exceed_context_size", "exceeds the available context size", "context_length_exceeded"))


def server_error(status: int, message: str, kind: str, model: str) -> ModelError | Retry:
    """What an error answer (its `message` and type, by `error_message`) means for the asker: an
    error, or a `Retry` when trying again is safe (429 and 503 after their Retry-After; any other 5xx once)."""
    if status in (401, 403):
        return ModelUnavailable(AUTH_REFUSED)
    if status == 413:
        return GenerationFailed(_PAYLOAD_REFUSED)
    if status == 429 and kind == "insufficient_quota":
        return ModelUnavailable(_QUOTA)  # waiting won't bring it back
    if status in (429, 503):
        return Retry(ModelBusy(BUSY))
    if status >= 500:
        return Retry(GenerationFailed(SERVER_FAILED), most=1)
    if is_context_refusal(message, kind):
        return ContextTooLong(TOO_LONG)
    if status == 404:
        return GenerationFailed(f"The model server no longer serves {model}. Please tell whoever runs this bot.")
    return GenerationFailed(f"The model server could not take this request: {message[:300] or f'HTTP {status}'}.")


class _Malformed(Exception):
    """A chunk that is JSON but not a chat completion chunk."""


def _chunk_text(chunk: dict) -> tuple[str, str | None]:
    """The text and the finish_reason of a chunk's first choice ("" and None for a usage chunk).
    Unknown fields are ignored; known ones of the wrong type are `_Malformed`."""
    choices = chunk.get("choices")
    if choices is None or choices == []:
        return "", None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise _Malformed
    choice = choices[0]
    delta = choice.get("delta") or {}
    reason = choice.get("finish_reason")
    if not isinstance(delta, dict) or not isinstance(reason, str | None):
        raise _Malformed
    content = delta.get("content")
    if not isinstance(content, str | None):
        raise _Malformed
    return content or "", reason


# -- the backend -----------------------------------------------------------------------------


class OpenAIBackend(RemoteBackend):
    """A model on an OpenAI-compatible server, behind the same interface as the local backend. Made
    ready by `await OpenAIBackend.open(settings)`, which checks the server and the model first."""

    source = "openai"

    def __init__(self, settings: OpenAISettings):
        """A backend with its HTTP session (in a running event loop); `open` makes sure the server serves the model."""
        super().__init__(settings)
        self.settings: OpenAISettings = settings
        self.info = ModelInfo(name=settings.model, max_request_bytes=settings.payload_limit, image_size=IMAGE_SIDE)
        # The server's root, where vLLM, SGLang and llama.cpp answer /tokenize.
        self._root = self._base.removesuffix("/v1")
        self._counting = "estimate"  # "server" (messages), "llamacpp" (text), "tokenizer" or "estimate"
        self._image_tokens = IMAGE_TOKENS_ESTIMATE
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer refuses calls from two threads at once
        self._tokenize_context: int | None = None  # the context /tokenize reports, if the model list didn't
        self._scores: bool | None = None  # whether the server returns prompt_logprobs; None: not tried yet

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: OpenAISettings) -> OpenAIBackend:
        """A backend for `settings.model` on the server at `settings.url`, which answered GET /models
        and serves it; `ModelLoadError` saying what to fix otherwise."""
        backend = cls(settings)
        try:
            context = await backend._check_model() or await backend._server_context()
            await backend._choose_counting()
        except BaseException:
            await backend._http.close()
            raise
        backend.info = ModelInfo(
            name=settings.model,
            context_tokens=context or backend._tokenize_context or DEFAULT_CONTEXT_TOKENS,
            max_request_bytes=settings.payload_limit,
            image_size=IMAGE_SIDE,
        )
        backend._reachable = True
        log.info(
            "openai.connected",
            extra={
                "model": settings.model,
                "context_tokens": backend.info.context_tokens,
                "counting": backend._counting,
                "image_tokens": backend._image_tokens,
            },
        )
        return backend

    def _unreachable(self, exc: BaseException) -> str:
        reason = f" ({type(exc).__name__}: {exc})" if str(exc) else f" ({type(exc).__name__})"
        return (
            f"Can't reach the model server at {self._base}{reason}. Check [model] url (the server's /v1 base, e.g. "
            "http://127.0.0.1:8000/v1), that the server is running and has finished loading the model, and that this machine can reach it."
        )

    async def _check_model(self) -> int | None:
        """GET /models: the server answers, takes the key and serves the model; its context length if it says."""
        url = f"{self._base}/models"
        try:
            async with self._http.get(url, timeout=self._quick_timeout()) as response:
                if response.status in (401, 403):
                    raise ModelLoadError(
                        f"The model server at {self._base} refused the bot's API key (HTTP {response.status}). Set OPENAI_API_KEY (or [model] token) "
                        "to the key the server was started with (vllm serve --api-key, llama-server --api-key); Ollama takes any."
                    )
                if response.status != 200:
                    raise ModelLoadError(
                        f"The server at {self._base} answered GET /models with HTTP {response.status}: it isn't an OpenAI-compatible server, "
                        "or not at that address. Check [model] url: it is the server's /v1 base, e.g. http://127.0.0.1:8000/v1."
                    )
                listing = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ModelLoadError(self._unreachable(exc)) from None
        except ValueError:
            listing = None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise ModelLoadError(f"The server at {self._base} answered GET /models without a list of models. Check [model] url: it is the server's /v1 base.")
        models = {str(entry.get("id")): entry for entry in data if isinstance(entry, dict) and entry.get("id")}
        if self.settings.model not in models:
            served = ", ".join(sorted(models)[:20]) or "none"
            raise ModelLoadError(
                f"The model server at {self._base} doesn't serve {self.settings.model or 'the model'} (it serves: {served}). Set [model] model "
                "to one of those, or start the server with the model you want (see the README)."
            )
        context = models[self.settings.model].get("max_model_len")
        return context if isinstance(context, int) and context > 0 else None

    async def _server_context(self) -> int | None:
        """llama.cpp's context (`GET /props`), for a server whose model list doesn't say."""
        try:
            async with self._http.get(f"{self._root}/props", timeout=self._quick_timeout()) as response:
                props = await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        context = settings.get("n_ctx") if isinstance(settings, dict) else None
        return context if isinstance(context, int) and context > 0 else None

    async def _choose_counting(self) -> None:
        """How tokens will be counted: the server's /tokenize if it has one (and, with messages, how
        many tokens it gives an image), else a cached tokenizer, else the estimate."""
        probe = [{"role": "user", "content": "Hi"}]
        answer = await self._quiet_post(f"{self._root}/tokenize", {"model": self.settings.model, "messages": probe, "add_generation_prompt": True})
        if isinstance(answer, dict) and isinstance(answer.get("count"), int):
            self._counting = "server"
            if isinstance(answer.get("max_model_len"), int):
                self._tokenize_context = answer["max_model_len"]
            picture = io.BytesIO()
            Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (127, 127, 127)).save(picture, "PNG")
            blank = ModelImage("blank", picture.getvalue(), "blank.png")
            content = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": data_uri(blank)}}]
            with_image = await self._quiet_post(
                f"{self._root}/tokenize", {"model": self.settings.model, "messages": [{"role": "user", "content": content}], "add_generation_prompt": True}
            )
            if isinstance(with_image, dict) and isinstance(with_image.get("count"), int) and with_image["count"] > answer["count"]:
                self._image_tokens = with_image["count"] - answer["count"]
            return
        answer = await self._quiet_post(f"{self._root}/tokenize", {"content": "Hi"})
        if isinstance(answer, dict) and isinstance(answer.get("tokens"), list):
            self._counting = "llamacpp"
            return
        self._tokenizer = await asyncio.to_thread(_cached_tokenizer, self.settings.model)
        if self._tokenizer is not None:
            self._counting = "tokenizer"
        else:
            log.warning(
                "openai.estimating_tokens",
                extra={"model": self.settings.model, "bytes_per_token": ESTIMATE_BYTES_PER_TOKEN, "image_tokens": IMAGE_TOKENS_ESTIMATE},
            )

    async def _quiet_post(self, url: str, payload: dict) -> object:
        """A start-up probe's JSON answer, or None for anything else (no such endpoint)."""
        try:
            async with self._http.post(url, json=payload, timeout=self._quick_timeout()) as response:
                return await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    # -- the interface -----------------------------------------------------------------------

    async def count_tokens(self, prompt: Chat) -> int:
        self._check_open()
        messages, image_count = _text_messages(prompt), sum(not isinstance(part, str) for message in prompt.messages for part in message.parts)
        if self._counting == "tokenizer":
            text = "".join(str(message["content"]) for message in messages)
            return await asyncio.to_thread(self._count_locally, text) + MESSAGE_TOKENS_ESTIMATE * len(messages) + self._image_tokens * image_count
        if self._counting == "estimate":
            return estimate_tokens(messages, image_count)
        if self._counting == "server":
            payload: dict = {"model": self.settings.model, "messages": messages, **({"add_generation_prompt": True} | continuing(prompt))}
        else:
            payload = {"content": "\n".join(str(message["content"]) for message in messages)}

        async def read(response: aiohttp.ClientResponse) -> int:
            async with response:
                await self._check_status(response)
                answer = await response.json(content_type=None)
            count = answer.get("count") if isinstance(answer, dict) else None
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if isinstance(count, int):
                return count
            if isinstance(tokens, list):
                return len(tokens) + MESSAGE_TOKENS_ESTIMATE * len(messages)
            raise GenerationFailed("The model server's tokenizer gave an answer I couldn't read. Please try again.")

        async with self._tokenizing:
            body = json.dumps(payload).encode()
            return await self._call(f"{self._root}/tokenize", body, read, None, timeout=self._quick_timeout()) + self._image_tokens * image_count

    def _count_locally(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, prompt: Chat) -> list[Part]:
        return render_messages(prompt)

    async def request_bytes(self, prompt: Chat) -> int:
        return (await asyncio.to_thread(within_payload, prompt, self.settings.payload_limit))[1]

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self._check_open()
        body = await asyncio.to_thread(self._body, request)
        loop = asyncio.get_running_loop()
        deadline = None if request.queue_timeout is None else loop.time() + request.queue_timeout
        place = self._line.join()
        try:
            async for queued in self._waiting(place, deadline, request):
                yield queued
            async with AsyncExitStack() as stack:  # however the iteration ends, the HTTP stream is closed

                async def opened(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
                    await self._check_status(response)
                    stack.callback(response.close)
                    self._streams.add(response)
                    stack.callback(self._streams.discard, response)
                    return await stack.enter_async_context(aclosing(server_events(response, self.source)))

                attempt = 0
                while True:
                    try:
                        events = await self._within(self._attempt("/chat/completions", body, opened), deadline, request, False)
                        break
                    except Retry as retry:
                        delay = self._retry_delay(retry, attempt, deadline)
                    attempt += 1
                    log.info("openai.retry", extra={"request": request.label, "attempt": attempt, "delay_s": round(delay, 2)})
                    yield Queued(1)  # still next in, while the server asks to wait
                    await self._within(asyncio.sleep(delay), deadline, request, False)
                deadline = None if request.timeout is None else loop.time() + request.timeout
                yield Started(batch_size=self._line.admitted)
                async for event in self._read(events, request, deadline):
                    yield event
        finally:
            self._line.leave(place)

    async def _read(self, events: AsyncIterator[dict], request: GenerationRequest, deadline: float | None) -> AsyncIterator[StreamEvent]:
        """The reply's events from the chunks of its stream."""
        raw, shown, count, reason, tokens = "", "", 0, None, None
        stops = request.stop_strings
        while True:
            self._check_open()  # aiohttp can't read a connection that close() already shut
            chunk = await self._within(anext(events, None), deadline, request, True)
            if chunk is None:
                break
            if chunk.get("error"):
                message, kind = error_message(chunk)
                log.warning("openai.stream_error", extra={"request": request.label, "error_type": kind})
                if not shown:
                    # The error's own status where it gives one (vLLM refuses some prompts only once streaming).
                    error = chunk.get("error")
                    code = error.get("code") if isinstance(error, dict) else None
                    failure = server_error(code if isinstance(code, int) and 400 <= code < 600 else 500, message, kind, self.settings.model)
                    raise failure.failure if isinstance(failure, Retry) else failure
                break
            try:
                text, finish = _chunk_text(chunk)
            except _Malformed:
                log.warning("openai.malformed_chunk", extra={"request": request.label})
                raise GenerationFailed(UNREADABLE) from None
            usage = chunk.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                tokens = usage["completion_tokens"]
            if reason is not None:
                continue  # after the end, only the usage chunk and [DONE]
            count += bool(text)
            raw += text
            visible, stopped = visible_text(raw, stops, final=finish is not None)
            if len(visible) > len(shown) and visible.startswith(shown):
                yield TextDelta(visible[len(shown) :])
                shown = visible
            if stopped:  # a stop the server doesn't honour: end here, which closes the stream
                yield Finished(text=visible, reason="stop", tokens=count)
                return
            if finish is not None:
                reason = "length" if finish == "length" else "stop"
        if reason is not None:
            yield Finished(text=shown, reason=reason, tokens=count if tokens is None else tokens)
            return
        if self._closed:
            raise self._broken_off("")
        final, _ = visible_text(raw, stops, final=True)
        if not final:
            raise self._broken_off("")
        if len(final) > len(shown) and final.startswith(shown):
            yield TextDelta(final[len(shown) :])
        log.warning("openai.cut", extra={"request": request.label, "chars": len(final)})
        yield Finished(text=final, reason="cut", tokens=count, note=CUT)

    async def score(self, request: ScoreRequest) -> list[float]:
        """Each continuation's log-likelihood from vLLM's `prompt_logprobs`: one request per
        continuation that generates a single token, the tokens scored being those after the
        prompt's own (by /tokenize). `ScoringUnavailable` where the server gives none."""
        self._check_open()
        if self._scores is False or self._counting != "server":
            raise ScoringUnavailable("This model server can't weigh labels.")
        limit = request.time_limit
        deadline = None if limit is None else asyncio.get_running_loop().time() + limit
        chat = request.prompt

        async def answer(response: aiohttp.ClientResponse) -> object:
            async with response:
                await self._check_status(response)
                return await response.json(content_type=None)

        async def weigh(prompt_ids: list, continuation: str) -> float:
            scored = chat.continued(continuation)
            body = {
                "model": self.settings.model,
                "messages": await asyncio.to_thread(lambda: chat_messages(within_payload(scored, self.settings.payload_limit)[0])),
                **continuing(scored),
                "max_tokens": 1,
                "temperature": 0,
                "prompt_logprobs": 0,
            }
            async with self._tokenizing:
                reply = await self._call("/chat/completions", json.dumps(body).encode(), answer, deadline)
            logprobs = reply.get("prompt_logprobs") if isinstance(reply, dict) else None
            if logprobs is None and isinstance(reply, dict):
                choices = reply.get("choices") or [{}]
                logprobs = choices[0].get("prompt_logprobs") if isinstance(choices[0], dict) else None
            if not isinstance(logprobs, list) or not all(isinstance(entry, dict | None) for entry in logprobs):
                self._scores = False
                log.warning("openai.no_prompt_logprobs", extra={"model": self.settings.model})
                raise ScoringUnavailable("This model server can't weigh labels.")
            self._scores = True
            # Each entry maps the prompt's token (the first has none) to its logprob; those past the
            # prompt's own tokens are the continuation's.
            ids = [next(iter(entry), None) if entry else None for entry in logprobs]
            start = 1
            while start < min(len(prompt_ids), len(ids)) and str(prompt_ids[start]) == ids[start]:
                start += 1
            return sum(float(next(iter(entry.values())).get("logprob") or 0.0) for entry in logprobs[start:] if entry)

        try:
            async with asyncio.timeout_at(deadline):
                # The prompt's own tokens, its images included, as the scored requests will have them.
                messages = await asyncio.to_thread(lambda: chat_messages(within_payload(chat, self.settings.payload_limit)[0]))
                payload = {"model": self.settings.model, "messages": messages, **continuing(chat)}
                async with self._tokenizing:
                    tokens = await self._call(f"{self._root}/tokenize", json.dumps(payload).encode(), answer, deadline, timeout=self._quick_timeout())
                prompt_ids = tokens.get("tokens") if isinstance(tokens, dict) else None
                if not isinstance(prompt_ids, list):
                    raise GenerationFailed("The model server's tokenizer gave an answer I couldn't read. Please try again.")
                return list(await asyncio.gather(*(weigh(prompt_ids, text) for text in request.continuations)))
        except TimeoutError:
            raise ModelTimeout.scoring(request) from None

    # -- helpers -----------------------------------------------------------------------------

    def _error_fields(self, payload: dict) -> tuple[str, str]:
        return error_message(payload)

    def _status_error(self, status: int, message: str, kind: str) -> ModelError | Retry:
        return server_error(status, message, kind, self.settings.model)

    def _body(self, request: GenerationRequest) -> bytes:
        """The JSON body for `request`, within the payload budget. CPU-bound."""
        chat, _ = within_payload(request.prompt, self.settings.payload_limit)
        params = request.params
        body: dict = {
            "model": self.settings.model,
            "messages": chat_messages(chat),
            **continuing(chat),
            "max_tokens": params.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.stop_strings:
            body["stop"] = list(dict.fromkeys(request.stop_strings))[:4]  # OpenAI takes 4; the rest are caught here
        if params.do_sample:
            body.update(temperature=params.temperature, top_p=params.top_p)
        else:
            body["temperature"] = 0
        if params.seed is not None:
            body["seed"] = params.seed
        data = json.dumps(body).encode()
        if len(data) > self.settings.payload_limit:
            log.warning("openai.payload_too_large", extra={"request": request.label, "bytes": len(data), "limit": self.settings.payload_limit})
            raise GenerationFailed(TOO_MANY_IMAGES)
        return data


def _cached_tokenizer(model: str) -> Any:
    """The model's own tokenizer if the local Hugging Face cache (or a local directory) has it, else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception:  # not cached, not a tokenizer, no network: all mean "estimate"
        return None
