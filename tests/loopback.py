"""A small HTTP server on 127.0.0.x for tests, which records every request it gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

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
