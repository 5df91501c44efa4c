"""Locks by key (a shard, a channel), each kept only while someone holds or awaits it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    """One asyncio lock per key. The keys a leader meets over its life (every shard, every channel) are
    unbounded, so a key's lock is dropped once nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> (its lock, callers holding or awaiting it)

    @contextlib.asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        lock, callers = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, callers + 1)
        try:
            async with lock:
                yield
        finally:
            callers = self._locks[key][1] - 1
            if callers:
                self._locks[key] = (lock, callers)
            else:
                del self._locks[key]

    def callers(self, key: str) -> int:
        """How many callers hold or await the lock of `key`."""
        return self._locks[key][1] if key in self._locks else 0
