"""Hybrid logical clock.

An HLC timestamp is (wall_ms, counter): close to physical time, yet ordered so that an event that has
seen another always gets a larger timestamp. `tick` stamps a local event; `absorb` folds in a remote
timestamp, so a write made after seeing another write (in any region) sorts after it. Timestamps are
encoded as fixed-width strings that sort like the timestamps themselves (pycrdt mangles integers
above 2**53, and Redis compares strings cheaply). Callers pass `now_ms`: this module reads no clock.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

WALL_DIGITS = 13  # milliseconds since the epoch, good until the year 2286
COUNTER_DIGITS = 6
MAX_COUNTER = 10**COUNTER_DIGITS - 1
ENCODED_LENGTH = WALL_DIGITS + 1 + COUNTER_DIGITS
_ENCODED = re.compile(rf"^\d{{{WALL_DIGITS}}}\.\d{{{COUNTER_DIGITS}}}$")


@dataclass(frozen=True, order=True, slots=True)
class Hlc:
    wall_ms: int
    counter: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.wall_ms < 10**WALL_DIGITS and 0 <= self.counter <= MAX_COUNTER):
            raise ValueError(f"HLC out of range: {self.wall_ms}.{self.counter}")

    def encode(self) -> str:
        return f"{self.wall_ms:0{WALL_DIGITS}d}.{self.counter:0{COUNTER_DIGITS}d}"

    @classmethod
    def decode(cls, text: str) -> Hlc:
        return _decoded(text)

    def tick(self, now_ms: int) -> Hlc:
        """The timestamp of a local event that happens after this one."""
        if now_ms > self.wall_ms:
            return Hlc(now_ms, 0)
        return self._next(self.wall_ms, self.counter)

    def absorb(self, remote: Hlc, now_ms: int) -> Hlc:
        """The timestamp of receiving `remote`: larger than both it and this clock."""
        wall = max(self.wall_ms, remote.wall_ms, now_ms)
        if wall == self.wall_ms == remote.wall_ms:
            return self._next(wall, max(self.counter, remote.counter))
        if wall == self.wall_ms:
            return self._next(wall, self.counter)
        if wall == remote.wall_ms:
            return self._next(wall, remote.counter)
        return Hlc(wall, 0)

    def previous(self) -> Hlc:
        """The largest timestamp below this one."""
        if self.counter:
            return Hlc(self.wall_ms, self.counter - 1)
        return Hlc(self.wall_ms - 1, MAX_COUNTER) if self.wall_ms else self

    @staticmethod
    def _next(wall_ms: int, counter: int) -> Hlc:
        # A full counter moves into the next millisecond rather than wrapping.
        if counter >= MAX_COUNTER:
            return Hlc(wall_ms + 1, 0)
        return Hlc(wall_ms, counter + 1)


ZERO = Hlc(0, 0)


@functools.lru_cache(maxsize=4096)
def _decoded(text: str) -> Hlc:
    """A timestamp is decoded several times on its way (its shard, the vector, the response to its write),
    and an `Hlc` is immutable: the last few thousand are kept."""
    if not _ENCODED.match(text):
        raise ValueError(f"not an HLC timestamp: {text!r}")
    wall, counter = text.split(".")
    return Hlc(int(wall), int(counter))


def is_encoded_hlc(text: str) -> bool:
    return bool(_ENCODED.match(text))
