"""The optional HTTP endpoint: /healthz (model loaded, worker alive, adapters connected) and
/metrics (Prometheus)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bot.metrics import Metrics
from model.service import ModelService

log = logging.getLogger(__name__)


class HealthUnavailable(Exception):
    """The endpoint can't listen where the config says; the message says where and what to change."""


class HealthServer:
    """Serves health and metrics on `host:port` while the bot runs."""

    def __init__(self, host: str, port: int, model: ModelService, metrics: Metrics, adapters: Callable[[], dict[str, bool]]):
        self.host, self.port = host, port
        self.model, self.metrics, self.adapters = model, metrics, adapters
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise HealthUnavailable(
                f"The health endpoint can't listen on {self.host}:{self.port} ({exc.strerror or exc}). Another program "
                "(or another idefics-bot) may be using that port: choose a free one in [health] port, or set "
                "[health] enabled = false."
            ) from None
        self.port = self._runner.addresses[0][1]  # the real one when 0 was asked for
        log.info("health.listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        model = self.model.health()
        adapters = self.adapters()
        healthy = all(model.values()) and all(adapters.values())
        return web.json_response({"ok": healthy, "model": model, "adapters": adapters}, status=200 if healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
