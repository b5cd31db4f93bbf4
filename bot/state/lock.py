"""The lock on a conversation within one process: one holder at a time, in arrival order.

The stores build `hold_conversation` on it (PostgreSQL adds a lock that other processes respect), and
that hold is the only lock a conversation has."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class ConversationLocks:
    """One holder at a time per conversation, served in arrival order (asyncio.Lock is FIFO).
    Nothing is kept for a conversation nobody holds or waits for."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._holders: Counter[Hashable] = Counter()

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._holders[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._holders[key] -= 1
            if not self._holders[key]:
                del self._holders[key], self._locks[key]
