"""In-process fan-out of committed messages to subscribers.

Each subscriber has a bounded buffer. Publishing never waits: a subscriber whose buffer is full is
marked overflowed and woken, and its stream ends with RESOURCE_EXHAUSTED, so one slow reader never
stalls the writers or the other readers. `close_all` ends every subscription cleanly (at shutdown).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscription(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.overflowed = False
        self.closed = False
        self._items: deque[T] = deque()
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> None:
        if len(self._items) >= self.capacity:
            self.overflowed = True
        else:
            self._items.append(item)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next_batch(self) -> list[T]:
        """Wait for items; an empty list means the subscription is over (closed or overflowed)."""
        while not self._items and not (self.closed or self.overflowed):
            self._wake.clear()
            await self._wake.wait()
        if self.overflowed or (self.closed and not self._items):
            return []
        batch = list(self._items)
        self._items.clear()
        return batch


class Fanout(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._subs: dict[str, set[Subscription[T]]] = {}
        self._closing = False

    @contextmanager
    def subscribe(self, topic: str) -> Iterator[Subscription[T]]:
        sub: Subscription[T] = Subscription(self._capacity)
        if self._closing:
            sub.close()
        self._subs.setdefault(topic, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(topic, set())
            subs.discard(sub)
            if not subs:
                self._subs.pop(topic, None)

    def publish(self, topic: str, item: T) -> None:
        for sub in self._subs.get(topic, ()):
            sub.offer(item)

    def has_subscribers(self, topic: str) -> bool:
        return topic in self._subs

    def close(self, topic: str) -> None:
        """End every subscription of `topic` cleanly."""
        for sub in self._subs.get(topic, ()):
            sub.close()

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def close_all(self) -> None:
        self._closing = True
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
