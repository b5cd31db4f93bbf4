"""A load balancer on 127.0.0.1 in front of several bot processes in Slack's HTTP mode, for tests.

Like a real one, it hands requests to the processes in turn (round-robin) and passes each on as it
came, signature and all. A Slack retry of an event (`X-Slack-Retry-Num`) goes to another process
than the event's first delivery, as it may in production when that process was slow to answer.
"""

from __future__ import annotations

import itertools
import json

import aiohttp
from aiohttp import web

from tests.loopback import serve

# Headers about one hop of the connection, which a proxy doesn't pass on.
_HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding"}


def _event_id(body: bytes) -> str | None:
    """The event_id of an Events API body (slash commands come form-encoded, without one)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed.get("event_id") if isinstance(parsed, dict) else None


class LoadBalancer:
    """`async with LoadBalancer(["http://127.0.0.1:3001", ...]) as balancer:` runs it; `routed` lists
    the backend (its index) each request went to."""

    def __init__(self, backends: list[str]):
        self.backends = backends
        self.routed: list[int] = []
        self._turns = itertools.cycle(range(len(backends)))
        self._first_delivery: dict[str, int] = {}  # event_id -> its first backend
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def __aenter__(self) -> LoadBalancer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _backend_for(self, body: bytes, headers) -> int:
        event_id = _event_id(body)
        first = self._first_delivery.get(event_id) if event_id else None
        if first is not None and "X-Slack-Retry-Num" in headers:
            return (first + 1) % len(self.backends)
        backend = next(self._turns)
        if event_id:
            self._first_delivery.setdefault(event_id, backend)
        return backend

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        backend = self._backend_for(body, request.headers)
        self.routed.append(backend)
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_HEADERS}
        url = self.backends[backend] + request.path_qs
        async with self._session.request(request.method, url, data=body, headers=headers) as response:
            kept = {"Content-Type": response.headers["Content-Type"]} if "Content-Type" in response.headers else {}
            return web.Response(status=response.status, body=await response.read(), headers=kept)
