"""/healthz and /metrics."""

from __future__ import annotations

import re

import aiohttp

from bot.runtime.app import Runtime
from bot.runtime.health import HealthServer
from ground.conversation import Author, ConversationKey
from ground.messages import IncomingMessage


async def test_health_and_metrics(config):
    async with Runtime.open(config) as runtime:
        adapters = {"discord": True}
        server = HealthServer("127.0.0.1", 0, runtime.model, runtime.metrics, lambda: dict(adapters))
        await server.start()
        try:
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{server.port}"
                async with http.get(f"{base}/healthz") as response:
                    assert response.status == 200
                    assert await response.json() == {"ok": True, "model": {"loaded": True, "worker_alive": True}, "adapters": {"discord": True}}
                key = ConversationKey("test", "c1")
                async for _ in runtime.engine.reply(IncomingMessage(key, Author("u1", "Ann"), "hello")):
                    pass
                async for _ in runtime.engine.reply(IncomingMessage(key, Author("u1", "Ann"), "")):
                    pass
                async with http.get(f"{base}/metrics") as response:
                    assert response.status == 200
                    text = await response.text()
                for line in (
                    "idefics_queue_depth 0.0",
                    "idefics_batch_size_count 1.0",
                    "idefics_queue_wait_seconds_count 1.0",
                    "idefics_generation_seconds_count 1.0",
                    "idefics_requests_in_flight 0.0",
                ):
                    assert line in text, line
                tokens = re.search(r"^idefics_generated_tokens_total (\S+)$", text, re.M)
                assert tokens and float(tokens.group(1)) > 0
                assert re.search(r'^idefics_replies_total\{outcome="(stop|length)"\} 1.0$', text, re.M)
                adapters["discord"] = False
                async with http.get(f"{base}/healthz") as response:
                    assert response.status == 503 and (await response.json())["adapters"] == {"discord": False}
                await runtime.model.close()
                async with http.get(f"{base}/healthz") as response:
                    assert response.status == 503 and (await response.json())["model"]["loaded"] is False
        finally:
            await server.stop()
