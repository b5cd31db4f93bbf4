"""A small HTTP server on 127.0.0.x for tests, which records every request it gets."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Awaitable, Callable
from typing import Self

from aiohttp import web
from PIL import Image

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(app: web.Application, host: str = "127.0.0.1", **runner_options) -> tuple[web.AppRunner, int]:
    """Start `app` on `host` at a free port; returns the runner (to clean up) and the port."""
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class LoopbackServer:
    def __init__(self, routes: dict[str, Handler], host: str = "127.0.0.1", cancel_on_disconnect: bool = False):
        """`cancel_on_disconnect`: a handler is cancelled when its client hangs up (to notice it)."""
        self.routes = routes
        self.host = host
        self.cancel_on_disconnect = cancel_on_disconnect
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> LoopbackServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner, self.port = await serve(app, self.host, handler_cancellation=self.cancel_on_disconnect)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._runner.cleanup()

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="not found")
        return await handler(request)


class FakeModelServer:
    """What the fake model servers share: their `LoopbackServer`, entered and left with them (leaving
    sets `release`, so held replies end); `wait_for` whatever the routes `_record`; and the images of
    the data: URIs they are sent, checked and kept in `images_seen`."""

    def __init__(self, routes: dict[str, Handler]):
        self.release = asyncio.Event()
        self.images_seen: list[tuple[str, bytes]] = []  # (media type, bytes), in the order they came
        self._changed = asyncio.Condition()
        self.server = LoopbackServer(routes, cancel_on_disconnect=True)

    async def __aenter__(self) -> Self:
        await self.server.__aenter__()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release.set()
        await self.server.__aexit__(*exc_info)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` holds; it is checked whenever the server records something."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def _record(self, change: Callable[[], None]) -> None:
        async with self._changed:
            change()
            self._changed.notify_all()

    def _data_image(self, uri: str, record: bool = True) -> str | None:
        """What is wrong with the image of a data: URI, if anything; with `record` it is kept in `images_seen`."""
        kind, _, data = uri[len("data:") :].partition(";base64,")
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as image:
                image.load()
        except (binascii.Error, OSError) as exc:
            return f"invalid image: {exc}"
        if record:
            self.images_seen.append((kind, raw))
        return None


async def stream_oversized(request: web.Request, head: bytes, total: int, content_type: str, sent: Callable[[int], None]) -> web.StreamResponse:
    """A body of `total` bytes (`head`, then zeros) in 1 MiB chunks, without a Content-Length: a file
    larger than it claims. `sent(count)` is told the bytes written so far after each chunk; the
    response ends quietly when the client stops reading."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk, count = head + bytes(max(0, 1024 * 1024 - len(head))), 0
    try:
        while count < total:
            await response.write(chunk)
            count += len(chunk)
            sent(count)
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response
