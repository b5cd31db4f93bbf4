"""What every remote backend shares: images as data URIs within a body budget, the line of requests
waiting for a place at the server, retries that never show anything twice, error answers (each
backend says what its server means by them), server-sent events, and the HTTP session's lifecycle.
`model.tgi` (text-generation-inference) and `model.openai` (any OpenAI-compatible server) build on it.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import functools
import hashlib
import io
import json
import logging
import random
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from PIL import Image, UnidentifiedImageError

from ground.images import ModelImage
from model.pictures import decode
from model.service import GenerationFailed, GenerationRequest, ModelBusy, ModelError, ModelService, ModelTimeout, ModelUnavailable, Queued

log = logging.getLogger(__name__)

T = TypeVar("T")

QUICK_CALL_S = 30.0  # model lists and token counts answer at once on a healthy server
ERROR_BODY_BYTES = 64 * 1024
# IDEFICS' image processor squashes every image to this square, so an image at most this large on
# each side loses nothing the model sees.
MODEL_IMAGE_SIDE = 224
JSON_HEADERS = {"Content-Type": "application/json"}

BUSY = "The model server is busy right now; please try again in a moment."
UNREACHABLE = "I can't reach the model server right now; please try again in a few minutes."
AUTH_REFUSED = "The model server refused my credentials, so I can't answer right now. Please tell whoever runs this bot."
SERVER_FAILED = "Sorry, the model server hit an error while answering this one. Please try again."
SHUTTING_DOWN = "The bot is shutting down; your request was not answered."
TOO_MANY_IMAGES = "These images are more than the model server takes in one request. Please send fewer images at a time."
UNREADABLE = "The model server sent a reply I couldn't read. Please try again."


@dataclass(frozen=True)
class RemoteSettings:
    """Where a model server is and how this process uses it."""

    url: str
    token: str | None = field(default=None, repr=False)  # sent as "Authorization: Bearer ..."
    max_concurrency: int = 16  # requests at the server at once; the rest wait here
    max_queue: int = 64  # requests waiting here beyond this many are told "busy" at once
    max_retries: int = 3
    retry_backoff_s: float = 0.5  # before the first retry; doubles each time. The server's Retry-After wins.
    connect_timeout_s: float = 10.0
    payload_limit: int = 2_000_000  # bytes in a request body: what the server (or a proxy before it) takes
    # What the engine reserves for a reply ([generation] max_new_tokens): with it, the context the
    # engine fits conversations into keeps prompts within the server's input limit too.
    reply_tokens: int = 512


# -- images ----------------------------------------------------------------------------------


def mime(image: ModelImage) -> str:
    """The image's media type, read from its bytes."""
    try:
        with Image.open(io.BytesIO(image.data)) as picture:
            return Image.MIME.get(picture.format or "", "application/octet-stream")
    except UnidentifiedImageError:
        return "application/octet-stream"


def data_uri(image: ModelImage) -> str:
    """The image as a data URI, its type read from its bytes."""
    return f"data:{mime(image)};base64,{base64.b64encode(image.data).decode('ascii')}"


def data_uri_bytes(image: ModelImage) -> int:
    """The length of `data_uri(image)`, without encoding it."""
    return len(f"data:{mime(image)};base64,") + 4 * -(-len(image.data) // 3)


@functools.lru_cache(maxsize=32)
def compact(image: ModelImage, side: int = MODEL_IMAGE_SIDE, squash: bool = True) -> ModelImage:
    """`image` in fewer bytes: at most `side` pixels on each side, as a JPEG of quality 90; `image`
    itself if that is no smaller. `squash`: each side is cut on its own (IDEFICS' processor squashes
    every image to a square anyway); else the aspect ratio is kept. CPU-bound: call it off the loop."""
    picture = decode(image)
    width, height = picture.size
    scale = min(1.0, side / width, side / height)
    size = (min(width, side), min(height, side)) if squash else (max(1, round(width * scale)), max(1, round(height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    if len(data) >= len(image.data):
        return image
    return ModelImage(hashlib.sha256(data).hexdigest(), data, image.name)


# -- answers ---------------------------------------------------------------------------------


class Retry(Exception):
    """An answer that is safe to retry; `failure` is what the asker gets when retries run out.
    `wait`: the server's Retry-After; `most`: how many retries this kind of answer gets at most."""

    def __init__(self, failure: ModelError, wait: float | None = None, most: int | None = None):
        super().__init__(str(failure))
        self.failure = failure
        self.wait = wait
        self.most = most


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay in seconds, or an HTTP date), if it has one."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def error_payload(response: aiohttp.ClientResponse) -> dict:
    """The JSON object of an error answer (bounded), or {} for anything else (a proxy's HTML page)."""
    body = await response.content.read(ERROR_BODY_BYTES)
    try:
        payload = json.loads(body)
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


async def server_events(response: aiohttp.ClientResponse, source: str) -> AsyncGenerator[dict, None]:
    """The JSON payloads of a server-sent event stream, in order, until `data: [DONE]` or the end.
    Comment lines (keep-alives) and other fields are skipped; a connection that breaks just ends the
    stream (the caller sees no final event); a payload that isn't a JSON object is a `GenerationFailed`."""
    data: list[str] = []
    try:
        async for raw in response.content:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line:
                if line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                continue
            if not data:
                continue
            text, data = "\n".join(data), []
            if text.strip() == "[DONE]":
                return
            try:
                payload = json.loads(text)
            except ValueError:
                payload = None
            if not isinstance(payload, dict):
                log.warning(f"{source}.unreadable_event", extra={"bytes": len(text)})
                raise GenerationFailed(UNREADABLE)
            yield payload
    except aiohttp.ClientError as exc:
        log.warning(f"{source}.stream_broken", extra={"error": type(exc).__name__})


# -- waiting for a place at the server -------------------------------------------------------


@dataclass(eq=False)
class _Place:
    position: int = 0  # 0 once admitted
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Line:
    """At most `limit` requests at the server at once; the others wait their turn in arrival order.
    A place that is given up passes straight to the first in line."""

    def __init__(self, limit: int, max_waiting: int):
        self.limit = limit
        self.max_waiting = max_waiting
        self.admitted = 0
        self._waiting: deque[_Place] = deque()

    def join(self) -> _Place:
        place = _Place()
        if self.admitted < self.limit and not self._waiting:
            self.admitted += 1
            return place
        if len(self._waiting) >= self.max_waiting:
            raise ModelBusy("I'm busy with other requests right now; please try again in a moment.")
        self._waiting.append(place)
        place.position = len(self._waiting)
        return place

    def leave(self, place: _Place) -> None:
        if place in self._waiting:
            self._waiting.remove(place)
        elif self._waiting:
            first = self._waiting.popleft()
            first.position = 0
            first.changed.set()
        else:
            self.admitted -= 1
        for position, waiting in enumerate(self._waiting, start=1):
            if waiting.position != position:
                waiting.position = position
                waiting.changed.set()

    def wake_all(self) -> None:
        for place in self._waiting:
            place.changed.set()


# -- the backend -----------------------------------------------------------------------------


class RemoteBackend(ModelService):
    """The HTTP side of a backend whose model runs on a server: the session, the line, retries,
    time limits, and closing the streams in flight. `source` names it in logs."""

    source = "remote"

    def __init__(self, settings: RemoteSettings):
        self.settings = settings
        self._base = settings.url.rstrip("/")
        self._line = Line(settings.max_concurrency, settings.max_queue)
        self._tokenizing = asyncio.Semaphore(settings.max_concurrency)
        headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
        self._http = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=settings.max_concurrency * 2),  # streams, and token counts
        )
        self._reachable = False
        self._closed = False
        self._streams: set[aiohttp.ClientResponse] = set()  # replies being read

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._line.wake_all()  # those waiting for a place hear that the bot stops
        # Break the streams in flight, so their askers are told why. Closing the session alone doesn't
        # wake a reader: aiohttp's protocol lets go of the response before the connection is lost.
        for response in self._streams:
            response.content.set_exception(aiohttp.ClientConnectionError("the bot is shutting down"))
        await self._http.close()

    def health(self) -> dict[str, bool]:
        return {"connected": not self._closed, "server_reachable": self._reachable}

    def _quick_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=QUICK_CALL_S, sock_connect=self.settings.connect_timeout_s)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelUnavailable(SHUTTING_DOWN)

    def _broken_off(self, shown: str) -> ModelError:
        if self._closed:
            return ModelUnavailable(SHUTTING_DOWN)
        if shown:
            return GenerationFailed("The connection to the model server broke off in the middle of the reply. Please send your message again.")
        return GenerationFailed("The model server closed the connection before answering. Please try again.")

    async def _waiting(self, place: _Place, deadline: float | None, request: GenerationRequest) -> AsyncIterator[Queued]:
        """The place's positions while it waits for the server, ending when it is admitted. Position 1
        goes to the server next, as on the local backend, whose 1 goes into the next batch."""
        shown = 0
        while place.position:
            place.changed.clear()
            shown = place.position
            yield Queued(shown)
            await self._within(place.changed.wait(), deadline, request, False)
            self._check_open()
        if shown != 1:
            yield Queued(1)

    @staticmethod
    async def _within(awaitable: Awaitable[T], deadline: float | None, request: GenerationRequest, started: bool) -> T:
        """Await under the request's current time limit (a timeout spanning a `yield` would fire in the asker's task)."""
        if deadline is None:
            return await awaitable
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                return await awaitable
        except TimeoutError:
            if limit.expired():
                raise ModelTimeout.after(request, started) from None
            raise

    async def _attempt(
        self,
        path: str,
        body: bytes,
        opened: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> T:
        """POST the JSON `body` once and hand the response to `opened`. `Retry` when nothing came
        back that anyone could see (refused, timed out, dropped before answering) or `opened` said so."""
        self._check_open()
        try:
            options: dict[str, Any] = {"timeout": timeout} if timeout else {}
            url = path if "://" in path else f"{self._base}{path}"  # a path under the base, or a URL of the server's own
            response = await self._http.post(url, data=body, headers=JSON_HEADERS, **options)
        except aiohttp.ClientConnectionError as exc:
            # Refused, timed out, or dropped before any answer (a stale pooled connection to a
            # restarted server): nothing was generated for anyone to see.
            self._reachable = False
            log.warning(f"{self.source}.unreachable", extra={"error": type(exc).__name__})
            raise Retry(ModelUnavailable(UNREACHABLE)) from None
        except aiohttp.ClientError:
            raise self._broken_off("") from None
        self._reachable = True
        try:
            return await opened(response)
        except BaseException:
            response.close()
            raise

    @abc.abstractmethod
    def _error_fields(self, payload: dict) -> tuple[str, str]:
        """(message, type) of an error answer's JSON object, as this server writes them ("" if absent)."""

    @abc.abstractmethod
    def _status_error(self, status: int, message: str, kind: str) -> ModelError | Retry:
        """What an error answer with HTTP `status` means for the asker, as this server means it: an
        error, or a `Retry` (of the error the asker gets if retries run out) where trying again is safe."""

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        """Raise for a response that isn't 200: `Retry` when trying again is safe (after the server's
        Retry-After for 429 and 503), else the asker's error."""
        if response.status == 200:
            return
        message, kind = self._error_fields(await error_payload(response))
        log.warning(f"{self.source}.refused", extra={"status": response.status, "error_type": kind})
        log.debug(f"{self.source}.refused_detail", extra={"status": response.status, "error": message[:300]})
        failure = self._status_error(response.status, message, kind)
        if isinstance(failure, Retry) and response.status in (429, 503):
            failure.wait = retry_after(response.headers.get("Retry-After"))
        raise failure

    def _retry_delay(self, retry: Retry, attempt: int, deadline: float | None) -> float:
        """How long to wait before retry number `attempt + 1`; raises the failure when retries, or the
        asker's `deadline`, run out."""
        delay = retry.wait if retry.wait is not None else self.settings.retry_backoff_s * 2**attempt * random.uniform(1, 1.5)
        most = self.settings.max_retries if retry.most is None else min(retry.most, self.settings.max_retries)
        if attempt >= most or (deadline is not None and asyncio.get_running_loop().time() + delay > deadline):
            raise retry.failure
        return delay

    async def _call(
        self,
        path: str,
        body: bytes,
        opened: Callable[[aiohttp.ClientResponse], Awaitable[T]],
        deadline: float | None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> T:
        """`_attempt`, retried what is safe to retry with exponential backoff or the server's
        Retry-After, as long as the retries and the asker's `deadline` allow."""
        attempt = 0
        while True:
            try:
                return await self._attempt(path, body, opened, timeout)
            except Retry as retry:
                delay = self._retry_delay(retry, attempt, deadline)
            attempt += 1
            log.info(f"{self.source}.retry", extra={"path": path, "attempt": attempt, "delay_s": round(delay, 2)})
            await asyncio.sleep(delay)
