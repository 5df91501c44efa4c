"""A region's hybrid logical clock and version vector: what it promises peers and clients.

The vector says, for each origin region, the hlc up to which every write of that region is held here.
Other regions' entries grow as their deltas are applied. The region's own entry is a promise about
itself, and it must hold across a crash:

- every own write stamped at or below it is committed: stamps issued but not yet settled hold it
  back (a write being stored may still fail, or be overtaken by a later stamp that commits first);
- no write after a restart will ever be stamped at or below it: the entry never passes the clock
  floor the caller has stored. A restarted region's clock starts at that floor, so a promise made
  before a crash (a claim confirmed against this region's watermark, a status that must lose to a
  later one) is never broken by a stamp issued after it.

The caller owns time and storage: it passes `now_ms`, says which stamps are stored (`settle`, and
`floor_saved` after it stores the floor), and stores `floor_target()` before it advertises an idle
tick. Nothing here reads a clock or touches a disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mlchat.crdt import vector
from mlchat.crdt.hlc import ZERO, Hlc


class RegionClock:
    def __init__(self, region: str, floor: str = "", remote: Mapping[str, str] | None = None) -> None:
        self.region = region
        self.clock = Hlc.decode(floor) if floor else ZERO
        self.floor = floor  # the highest stamp the caller has stored as the clock floor
        self.last_settled = floor  # writes of an earlier run may reach up to the floor
        self.remote = {r: h for r, h in (remote or {}).items() if r != region}
        self._unsettled: set[str] = set()

    def stamp(self, now_ms: int) -> str:
        """A fresh stamp for a local write; it holds the vector back until it is settled."""
        stamp = self.tick(now_ms)
        self._unsettled.add(stamp)
        return stamp

    def tick(self, now_ms: int) -> str:
        """A fresh stamp that does not hold the vector back: it names the outbox entries of what is applied
        from peers, not a write of this region."""
        self.clock = self.clock.tick(now_ms)
        return self.clock.encode()

    def settle(self, stamps: Iterable[str], stored: bool = True) -> None:
        """The writes stamped so are committed (stored with the clock floor raised to their stamps, as
        every write's storage step does) or, with `stored=False`, failed."""
        stamps = list(stamps)
        self._unsettled.difference_update(stamps)
        if stamps and stored:
            self.last_settled = max(self.last_settled, *stamps)
            self.floor = max(self.floor, *stamps)

    def absorb(self, remote_vector: Mapping[str, str], now_ms: int) -> None:
        """A peer's vector arrived with its delta (applied): hold what it covers, and move the clock past it."""
        self.remote = vector.merge(self.remote, {r: h for r, h in remote_vector.items() if r != self.region})
        if remote_vector:
            self.clock = self.clock.absorb(Hlc.decode(max(remote_vector.values())), now_ms)

    def witness(self, stamps: Iterable[str], now_ms: int) -> None:
        """Stamps of what was applied from peers: the clock moves past them, so that a write made after reading
        them is stamped above them, even before a vector covering them arrives (a catch-up's parts carry none)."""
        top = max(stamps, default="")
        if top:
            self.clock = self.clock.absorb(Hlc.decode(top), now_ms)

    def floor_target(self, now_ms: int) -> str:
        """Move the clock on when idle (so that peers' watermarks of this region move too); return the
        floor to store before the vector is advertised again."""
        if not self._unsettled:
            self.clock = self.clock.tick(now_ms)
        return self.clock.encode()

    def floor_saved(self, floor: str) -> None:
        self.floor = max(self.floor, floor)

    @property
    def vector(self) -> dict[str, str]:
        return {**self.remote, self.region: self.own}

    @property
    def own(self) -> str:
        """The region's own entry of `vector`."""
        below = Hlc.decode(min(self._unsettled)).previous() if self._unsettled else self.clock
        return min(below.encode(), self.floor or ZERO.encode())

    def token(self, *seen: tuple[str, str]) -> dict[str, str]:
        """The vector a causal token carries, with the (origin, hlc) of writes a response carries. The
        own entry stops at the last write: idle ticks beyond it hold nothing to read, and a region that
        dies before it ships a tick must not leave tokens no one can satisfy."""
        current = dict(self.remote)
        if self.last_settled:
            # min(own, last_settled), without decoding stamps in the common case: the last settled write is at
            # or below the clock and the floor, so only an unsettled stamp below it holds it back.
            lowest = min(self._unsettled, default=None)
            current[self.region] = (self.last_settled if lowest is None or self.last_settled < lowest
                                    else Hlc.decode(lowest).previous().encode())
        return vector.merge(current, dict(seen))

    def watermark(self, regions: Iterable[str]) -> str:
        """The hlc up to which every one of `regions`' writes is known here."""
        current = self.vector
        return min(current.get(r, ZERO.encode()) for r in regions)
