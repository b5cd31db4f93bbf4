"""Per-user token buckets: the interface the engine's admission takes from, and the buckets of one
process's memory (PostgreSQL keeps shared ones: `bot.state.postgres.SharedRateLimiter`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RequestBuckets(Protocol):
    """Token buckets per key: `take(key)` is 0 if a request may go now, else the seconds until one may."""

    async def take(self, key: str) -> float: ...


class RateLimiter:
    """A token bucket per key, in this process's memory: `per_minute` requests on average, up to
    `burst` at once.

    Buckets that have filled up again are forgotten, so memory follows the active users only.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._calls = 0

    async def take(self, key: str) -> float:
        """`acquire`, as `RequestBuckets` (buckets kept elsewhere, like `bot.state.postgres.SharedRateLimiter`)."""
        return self.acquire(key)

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
