"""Sharing one model fairly: a token bucket per user, and turn-taking within a conversation."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `per_minute` requests on average, up to `burst` at once.

    Buckets that have filled up again are forgotten, so memory follows the active users only.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._calls = 0

    def acquire(self, key: Hashable) -> float:
        """Take one request for `key`. Returns 0 if allowed, else the seconds until it would be."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._calls += 1
        if self._calls % 1024 == 0:
            self._forget_idle(now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate if self.rate else math.inf

    def _forget_idle(self, now: float) -> None:
        full = [key for key, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]


class ConversationTurns:
    """One request at a time per conversation, in arrival order.

    With `latest_wins`, a request that was overtaken while it waited (a newer message of the same
    conversation arrived) learns so when its turn comes, and can step aside for the newer one.
    """

    def __init__(self, latest_wins: bool = False):
        self.latest_wins = latest_wins
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._holders: Counter[Hashable] = Counter()
        self._arrivals: Counter[Hashable] = Counter()

    @asynccontextmanager
    async def turn(self, key: Hashable, message: bool = True):
        """Wait for this conversation's turn; yields True if a newer message overtook this one.
        Housekeeping (`message=False`, e.g. a reset) waits its turn without overtaking anyone."""
        if message:
            self._arrivals[key] += 1
        number = self._arrivals[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._holders[key] += 1
        try:
            async with lock:
                yield self.latest_wins and self._arrivals[key] != number
        finally:
            self._holders[key] -= 1
            if not self._holders[key]:
                del self._holders[key], self._locks[key], self._arrivals[key]
