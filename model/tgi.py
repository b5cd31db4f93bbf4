"""The remote backend: IDEFICS served by text-generation-inference (TGI), over HTTP.

TGI serves IDEFICS v1 and its successors Idefics2, Idefics3 and SmolVLM; `/info` names the model, and
the prompt is written in that family's format (v1's instruct format, or the chat format of the later
ones' templates: model/instruct.py).

The prompt goes to TGI as one string, each image inline as a markdown data URI
(`![](data:image/png;base64,...)`), within the server's request size limit (--payload-limit); the
reply streams back from `POST /generate_stream` as server-sent events, one per token. The server
batches requests from every bot process itself; this backend keeps at most `max_concurrency` of this process's requests there at once, and the rest wait
here in arrival order (with their position reported). Retries happen only where nothing can be
shown twice: the server couldn't be reached, or said it was overloaded, before sending any token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import TypeVar, cast

import aiohttp

from ground.images import ModelImage
from model.instruct import CHAT_FORMAT_STARTS, render_chat_format, render_instruct
from model.markers import image_markers
from model.remote import (
    AUTH_REFUSED,
    BUSY,
    SERVER_FAILED,
    TOO_MANY_IMAGES,
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
    END_OF_UTTERANCE,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    Chat,
    CountedPrompt,
    Finished,
    GenerationFailed,
    GenerationRequest,
    ImageSlot,
    ModelBusy,
    ModelError,
    ModelInfo,
    ModelLoadError,
    ModelTimeout,
    ModelUnavailable,
    Part,
    Prompt,
    PromptItem,
    ScoreRequest,
    Started,
    StreamEvent,
    TextDelta,
    continued,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# TGI reads `![](...)` in the prompt as an image to fetch; in text people typed it is written apart.
_IMAGE_MARKUP, _INERT_MARKUP = "![](", "![ ]("
# The tokens that end a reply. TGI checks the length limit before them, so one that is also the
# max_new_tokens-th token comes with finish_reason "length", though the reply is complete.
_END_TOKENS = (END_OF_UTTERANCE, "</s>")
# What one image costs in the context of each later family, as the server's processor cuts it (at most
# 4 x 4 tiles and the global image, each its <image> tokens and markers): an estimate from the published
# processor settings, since the server's tokenizer is asked about text only. Too high rather than too low.
_IMAGE_TOKENS = {"smolvlm": 17 * (64 + 2) + 4, "idefics3": 17 * (169 + 2) + 4, "idefics2": 5 * (64 + 2)}
# The longest edge their processors scale images to (intake keeps no more than that).
LONGEST_EDGE = {"smolvlm": 2048, "idefics3": 1456, "idefics2": 980}


def served_family(model_id: str) -> str | None:
    """The later family a served model belongs to, by its name ("smolvlm", "idefics3", "idefics2"),
    or None for IDEFICS v1."""
    name = model_id.lower()
    return next((family for family in CHAT_FORMAT_STARTS if family in name), None)


# What a request body holds besides `inputs`: the generation parameters, with room for stop strings.
_PARAMETERS_BYTES = 1024

_TOO_LONG = "Your message is too long for the model server to read. Please shorten it."
_PAYLOAD_REFUSED = (
    "The model server refused a request this large (HTTP 413). Please send fewer images at a time; whoever "
    "runs the bot can raise the server's --payload-limit, or set [model] payload_limit to match it."
)


@dataclass(frozen=True)
class TGISettings(RemoteSettings):
    """Where the TGI server is (its root address) and how this process uses it."""


# -- the prompt, as TGI takes it -------------------------------------------------------------


_Image = TypeVar("_Image", ModelImage, ImageSlot)


def _parts(prompt: Sequence[str | _Image]) -> list[str | _Image]:
    """Runs of text and the images between them. Text items are stripped of spaces and joined as
    IDEFICS' processor does, and image markup in them is disarmed. (Anything that isn't text is
    an image: the engine counts tokens with references to stored images in their place.)"""
    parts: list[str | _Image] = []
    text = ""
    for item in prompt:
        if isinstance(item, str):
            text += item.strip(" ")
            continue
        if text:
            parts.append(text.replace(_IMAGE_MARKUP, _INERT_MARKUP))
            text = ""
        parts.append(item)
    if text:
        parts.append(text.replace(_IMAGE_MARKUP, _INERT_MARKUP))
    return parts


def render_inputs(prompt: Prompt, uri: Callable[[ModelImage], str] = data_uri) -> str:
    """The `inputs` string for TGI: the text, with every image inline as `![](<uri(image)>)`."""
    return "".join(part if isinstance(part, str) else f"![]({uri(part)})" for part in _parts(prompt))


def inputs_bytes(prompt: Prompt) -> int:
    """The size of `inputs` as JSON in the request body, its images sent as they are. (A data URI
    has nothing JSON escapes, so each adds exactly its length.)"""
    text = json.dumps(render_inputs(prompt, lambda image: ""))
    uris = sum(data_uri_bytes(part) for part in prompt if isinstance(part, ModelImage))
    return len(text.encode()) + uris


def within_payload(prompt: Prompt, limit: int) -> tuple[list[PromptItem], int]:
    """`prompt` as it travels under a body limit of `limit` bytes, and the body's size: its images
    as they are if they fit, else all of them compacted. Dropping parts of a prompt never makes it
    larger, so the engine can search for the longest history that fits. CPU-bound."""
    size = inputs_bytes(prompt) + _PARAMETERS_BYTES
    if size <= limit:
        return list(prompt), size
    compacted = [compact(part) if isinstance(part, ModelImage) else part for part in prompt]
    return compacted, inputs_bytes(compacted) + _PARAMETERS_BYTES


def counted_text(prompt: CountedPrompt) -> str:
    """The text IDEFICS' processor tokenizes for `prompt`, minus the <s> that /tokenize adds: each
    image as its marker tokens, consecutive images sharing the <fake_token_around_image> between them."""
    pieces: list[str] = []
    last_was_image = False
    for part in _parts(prompt):
        if isinstance(part, str):
            pieces.append(part)
        else:
            pieces.append(image_markers(last_was_image))
        last_was_image = not isinstance(part, str)
    return "".join(pieces)


# -- talking to the server -------------------------------------------------------------------


def server_error(error_type: str, message: str, status: int | None = None) -> ModelError:
    """The asker's error for an error TGI reported, as an HTTP status or as an event in the stream.

    TGI answers overload with 429 ("overloaded"), bad input with 422 ("validation"), a failure in
    the model with 424 ("generation"), a body over its --payload-limit with 413 (in plain text), and
    a stream that the model ended without its last token with "incomplete_generation_stream"."""
    if status in (401, 403):
        return ModelUnavailable(AUTH_REFUSED)
    if status == 413:
        return GenerationFailed(_PAYLOAD_REFUSED)
    if status in (429, 503) or error_type == "overloaded":
        return ModelBusy(BUSY)
    if status == 422 or error_type == "validation":
        if "inputs" in message and "tokens" in message:
            return GenerationFailed(_TOO_LONG)
        return GenerationFailed(f"The model server could not take this request: {message or 'it gave no reason'}.")
    if status == 424 or error_type == "generation":
        return GenerationFailed(SERVER_FAILED)
    if error_type == "incomplete_generation_stream":
        return GenerationFailed("The model server stopped in the middle of the reply. Please send your message again.")
    code = f" (HTTP {status})" if status else ""
    return GenerationFailed(f"The model server answered with an error{code}. Please try again later.")


# -- the backend -----------------------------------------------------------------------------


class TGIBackend(RemoteBackend):
    """IDEFICS on a text-generation-inference server, behind the same interface as the local backend.
    Made ready by `await TGIBackend.open(settings)`, which checks the server first."""

    source = "tgi"

    def __init__(self, settings: TGISettings):
        """A backend with its HTTP session (in a running event loop); `open` makes sure the server answers."""
        super().__init__(settings)
        self.info = ModelInfo(name=settings.url, max_request_bytes=settings.payload_limit)
        self._max_stops = 4  # TGI's default max_stop_sequences, until /info says otherwise
        self._family: str | None = None  # the served model's later family (None: IDEFICS v1), from /info

    def _error_fields(self, payload: dict) -> tuple[str, str]:
        return str(payload.get("error", "")), str(payload.get("error_type", ""))

    def _status_error(self, status: int, message: str, kind: str) -> ModelError | Retry:
        failure = server_error(kind, message, status)
        return Retry(failure) if status in (429, 503) else failure

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, settings: TGISettings) -> TGIBackend:
        """A backend for the server at `settings.url`, which answered and serves a tokenizer that knows
        IDEFICS's tokens; `ModelLoadError` saying what to fix otherwise."""
        backend = cls(settings)
        try:
            info = await backend._server_info()
            await backend._check_tokenizer(info)
        except BaseException:
            await backend._http.close()
            raise
        backend._reachable = True
        return backend

    async def _startup_call(self, method: str, path: str, payload: dict | None, purpose: str) -> object:
        """One start-up call, its JSON answer (None if it isn't JSON). What can go wrong becomes a
        `ModelLoadError` that says what to do; `purpose` says why the bot needs this endpoint."""
        try:
            async with self._http.request(method, f"{self._base}{path}", json=payload, timeout=self._quick_timeout()) as response:
                if response.status in (401, 403):
                    raise ModelLoadError(self._auth_refused(response.status))
                if response.status != 200:
                    raise ModelLoadError(f"The server at {self._base} answered {method} {path} with HTTP {response.status}. {purpose}")
                return await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ModelLoadError(self._unreachable(exc)) from None
        except ValueError:
            return None

    async def _server_info(self) -> dict:
        not_tgi = (
            "It isn't a text-generation-inference server, or not at that address. Check [model] url: it is the "
            "server's root address, e.g. http://127.0.0.1:8080."
        )
        info = await self._startup_call("GET", "/info", None, not_tgi)
        if not isinstance(info, dict) or not isinstance(info.get("model_id"), str) or not isinstance(info.get("max_total_tokens"), int):
            raise ModelLoadError(f"The server at {self._base} answered GET /info without a model_id and max_total_tokens. {not_tgi}")
        return info

    async def _check_tokenizer(self, info: dict) -> None:
        """Refuse anything but the IDEFICS line: its tokenizer has the image and end-of-utterance tokens.
        Idefics2/3 and SmolVLM, which share them, are told apart by name."""
        model_id, url = info["model_id"], self._base
        serve_idefics = (
            "Launch TGI with --model-id HuggingFaceM4/idefics-9b-instruct, HuggingFaceM4/Idefics3-8B-Llama3 or "
            'HuggingFaceTB/SmolVLM-Instruct (see "Scaling out" in the README), or set [model] backend = "local".'
        )
        self._family = served_family(model_id)
        tokens = await self._startup_call(
            "POST",
            "/tokenize",
            {"inputs": FAKE_IMAGE_TOKEN + IMAGE_TOKEN + END_OF_UTTERANCE},
            "The bot needs POST /tokenize to fit conversations into the model's context: use a recent TGI release, "
            "as in the README, with the model's fast tokenizer.",
        )
        texts = {token.get("text") for token in tokens if isinstance(token, dict)} if isinstance(tokens, list) else set()
        if not {FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE} <= texts:
            raise ModelLoadError(
                f"The TGI server at {url} serves {model_id}, which is not an IDEFICS model (its tokenizer has no "
                f"{IMAGE_TOKEN} and {END_OF_UTTERANCE} tokens). {serve_idefics}"
            )
        max_total = info["max_total_tokens"]
        max_input = info.get("max_input_tokens", info.get("max_input_length", max_total - 1))
        self.info = ModelInfo(
            name=model_id,
            context_tokens=min(max_total, max_input + self.settings.reply_tokens),
            max_request_bytes=self.settings.payload_limit,
            family=self._family or "idefics",
            image_longest_edge=LONGEST_EDGE.get(self._family or ""),
        )
        self._max_stops = info.get("max_stop_sequences", self._max_stops)
        server_limit = info.get("max_concurrent_requests")
        if isinstance(server_limit, int) and 0 < server_limit < self._line.limit:
            # More would only be refused with 429; waiting here keeps the arrival order and positions.
            self._line.limit = server_limit
        log.info(
            "tgi.connected",
            extra={"model": model_id, "context_tokens": self.info.context_tokens, "max_concurrency": self._line.limit, "version": info.get("version")},
        )

    def _unreachable(self, exc: BaseException | None) -> str:
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None and str(exc) else ""
        return (
            f"Can't reach the TGI server at {self._base}{reason}. Check [model] url, that the server is running and has "
            f"finished loading the model (GET {self._base}/info answers once it has), and that this machine can reach it."
        )

    def _auth_refused(self, status: int) -> str:
        return (
            f"The TGI server at {self._base} refused the bot's credentials (HTTP {status}). Set [model] token (or the "
            "TGI_TOKEN environment variable) to the key the server was started with (text-generation-launcher --api-key)."
        )

    # -- the interface -----------------------------------------------------------------------

    def render(self, prompt: Chat) -> list[Part]:
        if self._family is None:
            return render_instruct(prompt)
        return render_chat_format(prompt, CHAT_FORMAT_STARTS[self._family])

    def _items(self, prompt: Chat) -> list[PromptItem]:
        """The rendered prompt of a request, whose images are `ModelImage`s."""
        return cast("list[PromptItem]", self.render(prompt))

    async def count_tokens(self, prompt: Chat) -> int:
        # The text the model sees, images as their marker tokens: counted by the server's own
        # tokenizer without sending any image. A fit measures a different suffix of the
        # conversation each time, so there is nothing worth caching.
        self._check_open()

        async def read(response: aiohttp.ClientResponse) -> int:
            async with response:
                await self._check_status(response)
                tokens = await response.json(content_type=None)
            if not isinstance(tokens, list):
                raise GenerationFailed("The model server's tokenizer gave an answer I couldn't read. Please try again.")
            return len(tokens)

        rendered = self.render(prompt)
        if self._family is None:
            text, images = counted_text(rendered), 0
        else:  # the text, and each image at its estimated cost
            text, images = "".join(part for part in _parts(rendered) if isinstance(part, str)), sum(not isinstance(part, str) for part in rendered)
        async with self._tokenizing:
            body = json.dumps({"inputs": text}).encode()
            tokens = await self._call("/tokenize", body, read, deadline=None, timeout=self._quick_timeout())
        return tokens + images * _IMAGE_TOKENS.get(self._family or "", 0)

    async def request_bytes(self, prompt: Chat) -> int:
        return (await asyncio.to_thread(within_payload, self._items(prompt), self.settings.payload_limit))[1]

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self._check_open()
        body = await asyncio.to_thread(self._body, request)
        loop = asyncio.get_running_loop()
        deadline = None if request.queue_timeout is None else loop.time() + request.queue_timeout
        started = False
        place = self._line.join()
        try:
            async for queued in self._waiting(place, deadline, request):
                yield queued
            async with AsyncExitStack() as stack:  # however the iteration ends, the HTTP stream is closed

                async def opened(response: aiohttp.ClientResponse) -> tuple[AsyncIterator[dict], dict | None]:
                    await self._check_status(response)
                    events = server_events(response, self.source)
                    first = await anext(events, None)
                    if first is not None and first.get("error_type") == "overloaded":
                        raise Retry(ModelBusy(BUSY))
                    stack.callback(response.close)
                    self._streams.add(response)
                    stack.callback(self._streams.discard, response)
                    await stack.enter_async_context(aclosing(events))
                    return events, first

                events, payload = await self._within(self._call("/generate_stream", body, opened, deadline), deadline, request, started)
                raw, shown, count = "", "", 0
                stops = (END_OF_UTTERANCE, *request.stop_strings)
                while True:
                    if payload is None:
                        raise self._broken_off(shown)
                    if "error" in payload:
                        log.warning("tgi.stream_error", extra={"request": request.label, "error_type": payload.get("error_type")})
                        raise server_error(str(payload.get("error_type", "")), str(payload["error"]))
                    if not started:
                        started = True
                        deadline = None if request.timeout is None else loop.time() + request.timeout
                        yield Started(batch_size=self._line.admitted)
                    count += 1
                    token = payload.get("token") or {}
                    if not token.get("special"):
                        raw += str(token.get("text", ""))
                    final = payload.get("generated_text") is not None
                    text, stopped = visible_text(raw, stops, final=final)
                    if len(text) > len(shown) and text.startswith(shown):
                        yield TextDelta(text[len(shown) :])
                        shown = text
                    if final or stopped:
                        details = payload.get("details") or {}
                        ended = stopped or (token.get("special") and token.get("text") in _END_TOKENS)
                        reason = "length" if final and details.get("finish_reason") == "length" and not ended else "stop"
                        yield Finished(text=text, reason=reason, tokens=int(details.get("generated_tokens", count)))
                        return
                    self._check_open()  # aiohttp can't read a connection that close() already shut
                    payload = await self._within(anext(events, None), deadline, request, started)
        finally:
            self._line.leave(place)

    async def score(self, request: ScoreRequest) -> list[float]:
        """Each continuation's log-likelihood from TGI's prefill details (`decoder_input_details`):
        one /generate call per continuation, generating a single token, which the server batches.
        The tokens scored are those after the prompt's own (by /tokenize); were the two to differ
        earlier, the extra prompt tokens would add the same amount to every continuation."""
        self._check_open()
        limit = request.time_limit
        deadline = None if limit is None else asyncio.get_running_loop().time() + limit

        async def answer(response: aiohttp.ClientResponse) -> object:
            async with response:
                await self._check_status(response)
                return await response.json(content_type=None)

        async def call(path: str, body: dict) -> object:
            async with self._tokenizing:
                return await self._call(path, json.dumps(body).encode(), answer, deadline, timeout=None if path == "/generate" else self._quick_timeout())

        async def weigh(items: list[PromptItem], prompt_ids: list, continuation: str) -> float:
            parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": True}
            inputs = await asyncio.to_thread(lambda: render_inputs(continued(items, continuation)))
            reply = await call("/generate", {"inputs": inputs, "parameters": parameters})
            prefill = reply.get("details", {}).get("prefill") if isinstance(reply, dict) else None
            if not isinstance(prefill, list) or not all(isinstance(token, dict) for token in prefill):
                raise GenerationFailed("The model server's answer had no prefill details, so I couldn't weigh the labels. Please try again.")
            start = 0
            while start < min(len(prompt_ids), len(prefill)) and prompt_ids[start] == prefill[start].get("id"):
                start += 1
            return sum(float(token.get("logprob") or 0.0) for token in prefill[max(start, 1) :])

        try:
            async with asyncio.timeout_at(deadline):
                items = self._items(request.prompt)
                tokens = await call("/tokenize", {"inputs": counted_text(items)})
                if not isinstance(tokens, list):
                    raise GenerationFailed("The model server's tokenizer gave an answer I couldn't read. Please try again.")
                prompt_ids = [token.get("id") if isinstance(token, dict) else None for token in tokens]
                return list(await asyncio.gather(*(weigh(items, prompt_ids, text) for text in request.continuations)))
        except TimeoutError:
            raise ModelTimeout.scoring(request) from None

    # -- helpers -----------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> bytes:
        """The JSON body for `request`, within the server's payload limit. CPU-bound."""
        prompt, _ = within_payload(self._items(request.prompt), self.settings.payload_limit)
        body = json.dumps({"inputs": render_inputs(prompt), "parameters": self._parameters(request)}).encode()
        if len(body) > self.settings.payload_limit:
            log.warning("tgi.payload_too_large", extra={"request": request.label, "bytes": len(body), "limit": self.settings.payload_limit})
            raise GenerationFailed(TOO_MANY_IMAGES)
        return body

    def _parameters(self, request: GenerationRequest) -> dict:
        params = request.params
        stops = list(dict.fromkeys((END_OF_UTTERANCE, *request.stop_strings)))
        parameters = {
            "max_new_tokens": params.max_new_tokens,
            "stop": stops[: self._max_stops],  # the rest are still caught here, as the text streams
            "repetition_penalty": params.repetition_penalty,
            "details": True,
            "return_full_text": False,
        }
        # TGI samples as soon as temperature or top_p is given, so greedy requests leave them out;
        # it refuses top_p = 1, which means "no nucleus filtering" anyway.
        if params.do_sample:
            parameters.update(do_sample=True, temperature=params.temperature)
            if params.top_p < 1:
                parameters["top_p"] = params.top_p
        return parameters
