"""Admission: whether the engine takes a new request now. Not while shutting down, and not faster
than a person's token bucket allows; requests taken are counted, so a shutdown can wait for them."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.metrics import Metrics
from bot.state.rates import RequestBuckets
from ground.conversation import Author

_RESTARTING = "I'm shutting down for a moment; please send that again in a minute."


class Admission:
    """Takes requests in, or says why not; tracks those in flight so that `drain` can wait for them."""

    def __init__(self, metrics: Metrics, max_message_chars: int, rates: RequestBuckets | None):
        """`rates`: the per-user token buckets (None: no rate limit)."""
        self.metrics = metrics
        self.max_message_chars = max_message_chars
        self.rates = rates
        self.closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def too_long(self, *texts: str) -> str | None:
        """A refusal for text longer than [conversation] max_message_chars, before anything reads it
        (no pattern, no tokenizer), or None."""
        length = sum(map(len, texts))
        if length <= self.max_message_chars:
            return None
        self.metrics.error("too_long")
        return f"Your message is too long for me: it has {length:,} characters and I can read about {self.max_message_chars:,}. Please shorten it."

    async def refusal(self, platform: str, author: Author | None) -> str | None:
        """Why a request can't be taken now (shutting down, or too many from this person), or None.
        Without an `author` (a resumed reply) no rate limit applies."""
        if self.closing:
            self.metrics.error("shutting_down")
            return _RESTARTING
        wait = await self.rates.take(f"{platform}:{author.id}") if self.rates and author else 0
        if wait:
            self.metrics.error("rate_limited")
            return f"You're sending requests faster than I can answer. Please try again in {math.ceil(wait)} s."
        return None

    @asynccontextmanager
    async def tracked(self) -> AsyncIterator[None]:
        """While inside, the request counts as in flight."""
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for those in flight; True if all finished."""
        self.closing = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
