"""A message form read off the network within bounds, whatever the client sends.

- The whole body is bounded (part headers and empty parts count, chunked bodies too), and so are the
  number of parts and the time the body may take; a refusal comes as soon as a bound is passed.
- A malformed body (no boundary, garbage, a part cut short, nothing at all) is a 400 that says so.
- The memory uploads in flight hold is one budget for all requests (`UploadBudget`): a request
  reserves what it may hold before reading a byte, waits its turn briefly, or is told the bot is busy.
  An image part is kept once (its chunks joined into one `bytes`), handed to the image intake without
  a copy, and dropped here as it is handed over. Once the form is read, the reservation shrinks to
  the images' bytes; it is given back when every image has been handed over (or the message is
  done with).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import cast

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ground.messages import Attachment

_CHUNK = 64 * 1024
_NAME_CHARS = 100
# Up to the first part's body: a preamble (browsers send none) and the first part's headers.
_BEFORE_THE_FIRST_PART = 64 * 1024

_malloc_trim = None
with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere there is nothing to ask
    _malloc_trim = ctypes.CDLL(None).malloc_trim


def give_memory_back() -> None:
    """Hand the allocator's free pages back to the system. glibc keeps in its heaps what a burst of
    uploads leaves behind once freed (hundreds of MB, for good) unless asked; asking takes a few ms."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class FormRefused(Exception):
    """A form that won't be read: `status` and a message the page shows as it is."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FormLimits:
    """What one message form may be. `what_fits` says it in words for refusals."""

    max_bytes: int  # the whole body, part headers included
    max_parts: int
    max_text_bytes: int
    max_image_bytes: int
    timeout_s: float
    what_fits: str

    def reservation(self, body: int) -> int:
        """What a form of `body` bytes may hold: its bytes, and one image more while that image's
        chunks are joined."""
        return body + min(body, self.max_image_bytes)


class UploadBudget:
    """Bytes that uploads in flight may hold, shared by every request. Reservations are granted in
    the order asked; one that can't be granted within `wait_s` is refused (the bot is busy)."""

    def __init__(self, total: int, wait_s: float):
        self.total = total
        self.free = total
        self.wait_s = wait_s
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def reserve(self, size: int) -> Reservation:
        """`size` bytes (at most `total`), or `FormRefused(503)` after waiting `wait_s`."""
        size = min(size, self.total)
        if not self._waiting and size <= self.free:
            self.free -= size
            return Reservation(self, size)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.wait_s)
        except (TimeoutError, asyncio.CancelledError) as stopped:
            if granted.done() and not granted.cancelled():
                self._give_back(size)  # granted just as the wait ended
            else:
                self._waiting.remove(entry)
                self._grant()  # those behind it may fit now
            if isinstance(stopped, asyncio.CancelledError):
                raise
            raise FormRefused(503, "I'm busy taking in other people's images right now; please send that again in a moment.") from None
        return Reservation(self, size)

    def _give_back(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, granted = self._waiting.popleft()
            self.free -= size
            granted.set_result(None)


@dataclass
class Reservation:
    """Part of an `UploadBudget`, given back once by `release`."""

    budget: UploadBudget
    size: int

    def keep(self, size: int) -> None:
        """Give back all but `size` bytes (what turned out to be held)."""
        if size < self.size:
            given, self.size = self.size - size, size
            self.budget._give_back(given)

    def release(self) -> None:
        self.keep(0)


@dataclass
class _File:
    name: str
    size: int
    content_type: str | None
    data: bytes | None


@dataclass
class Form:
    """A message form as read: its text and files, and the memory they hold."""

    text: str
    reservation: Reservation
    files: list[_File] = field(default_factory=list)

    def attachments(self) -> list[Attachment]:
        """The files as attachments: each hands its bytes over once, and the form lets go of them."""
        return [Attachment(name=file.name, read=self._handing_over(file), size=file.size, content_type=file.content_type) for file in self.files]

    def _handing_over(self, file: _File):
        async def read(max_bytes: int) -> bytes:
            data, file.data = file.data or b"", None
            if all(other.data is None for other in self.files):
                self.reservation.release()
            return data

        return read

    def release(self) -> None:
        """Done with the message: whatever wasn't handed over is dropped."""
        for file in self.files:
            file.data = None
        self.reservation.release()


async def read_form(request: web.Request, limits: FormLimits, budget: UploadBudget) -> Form:
    """The text and files of a multipart message form, read within `limits` and `budget`; raises
    `FormRefused`."""
    if request.content_type != "multipart/form-data":
        raise FormRefused(415, "Send messages as multipart/form-data, as the chat page does.")
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes:
        raise FormRefused(413, f"That message is {declared / 2**20:.1f} MB; {limits.what_fits}.")
    body = min(declared if declared is not None else limits.max_bytes, limits.max_bytes)
    reservation = await budget.reserve(limits.reservation(body))
    form = Form("", reservation)
    try:
        try:
            async with asyncio.timeout(limits.timeout_s):
                await _read_parts(request, limits, form)
            reservation.keep(sum(len(file.data or b"") for file in form.files))
        except TimeoutError:
            raise FormRefused(408, f"That message took longer than {limits.timeout_s:g} s to arrive; please send it again.") from None
        except (ValueError, HttpProcessingError):
            raise FormRefused(
                400, "That message's form is malformed (cut short, or not multipart as declared); please send it again from the chat page."
            ) from None
        except ConnectionError:  # the client went away mid-body: nobody reads the answer
            raise FormRefused(400, "That message was cut off before its end; please send it again.") from None
    except BaseException:  # whatever ends the read, mapped or not, drops what the form holds, once
        form.release()
        raise
    return form


class _Bounded:
    """The request body as aiohttp's multipart reader reads it, refused as soon as more than `limit`
    bytes have come in: a preamble, part headers and empty parts count, and a chunked body too."""

    def __init__(self, body: StreamReader, limit: int, what_fits: str):
        self._body = body
        self.limit = limit
        self._what_fits = what_fits
        self._taken = 0  # bytes the reader has taken (what came in beyond that is only buffered)

    def _took(self, data: bytes) -> bytes:
        self._taken += len(data)
        if self._taken > self.limit:
            raise FormRefused(413, f"That message is too big; {self._what_fits}.")
        return data

    async def read(self, n: int = -1) -> bytes:
        return self._took(await self._body.read(n))

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        return self._took(await self._body.readline(max_line_length=max_line_length))

    def at_eof(self) -> bool:
        return self._body.at_eof()

    def unread_data(self, data: bytes) -> None:
        self._taken -= len(data)
        self._body.unread_data(data)


async def _read_parts(request: web.Request, limits: FormLimits, form: Form) -> None:
    body = _Bounded(request.content, _BEFORE_THE_FIRST_PART, limits.what_fits)
    reader = MultipartReader(request.headers, cast(StreamReader, body))  # the methods the reader uses
    parts = 0
    async for part in reader:
        parts += 1
        body.limit = limits.max_bytes
        if parts > limits.max_parts:
            raise FormRefused(413, f"That message has too many parts; {limits.what_fits}.")
        if not isinstance(part, BodyPartReader):
            raise FormRefused(400, "Nested multipart forms aren't accepted.")
        if part.name == "text":
            data, size = await _read_part(part, limits.max_text_bytes)
            if size > limits.max_text_bytes:
                raise FormRefused(413, f"That message is too long; keep it under {limits.max_text_bytes // 1024} KB of text.")
            form.text = data.decode("utf-8", "replace")
        elif part.name == "image":
            data, size = await _read_part(part, limits.max_image_bytes)
            name = PurePath((part.filename or "image").replace("\\", "/")).name[:_NAME_CHARS] or "image"
            # Over the limit: only its size is kept, for the intake's refusal.
            form.files.append(_File(name, size, part.headers.get("Content-Type"), data if size <= limits.max_image_bytes else b""))
        else:
            await _read_part(part, 0)


async def _read_part(part: BodyPartReader, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes of a part, as one `bytes`, and its whole size (the rest is read and dropped)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        else:
            chunks.clear()
    return b"".join(chunks), size
