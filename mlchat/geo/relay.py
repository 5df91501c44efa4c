"""What a region's stream to one peer carries, and when: its own changes at once, relays only when needed.

A region streams to each peer its own writes and whatever it applied from others that was new to it, so that
a change reaches every region by any path that works (A to C through B while A-C is cut). In a healthy full
mesh the direct path has delivered a change before any relay of it does, and relaying everything at once
triples a cluster's WAN traffic (each of n regions receives each message n-1 times). So, per stream:

- the region's own changes, and changes whose origins are not known, go at once (paced: see below);
- a change the peer sent us, or that only the peer wrote, is never sent back: the peer holds it. Only the
  vector's entries for its origins go, which tell the peer at once that this region holds it too (sync acks,
  claim confirmation and causal tokens wait on that);
- any other relay is held for `delay_ms`, then dropped if the peer holds it (as it last told this region:
  the vectors its stream told, and what its heartbeats say it holds, `Delta.holds`), else sent. A peer cut
  off from a change's origin therefore gets it from here, late.

Every message carries the sender's vector, which the receiver adopts as a promise that it holds what the
vector covers; it merges what it is told, in order, so a message need only carry the entries that moved
since the last one on its stream (`told`). While relays are held, the vector told the peer is capped, per
origin, at what this region held of that origin before the oldest held change arrived, so it never covers a
change the peer was not sent. The same goes for the sender's outbox cursor (`Delta.cursor`, told on
heartbeats), which the peer resumes from after a restart: it stays below every held relay's outbox stamp.
Since the peer holds back the vector it tells this region the same way, what a relay is checked against
is what the peer says it holds on heartbeats; with its told vector alone, both regions holding a change as
a relay for each other would each wait on the other, and both send it.

What goes out is paced (`pace_ms`, `ack_delay_ms`; see `_paced`): a busy stream sends fewer, larger
messages.

Pure: the caller passes `now_ms` and the peer's vector, and sends what comes back, in order.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import replace

from mlchat.crdt import vector
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.replica import Delta, Relayed, carries_changes


class RelayQueue:
    def __init__(self, peer: str, delay_ms: int, capacity: int, pace_ms: int = 0, ack_delay_ms: int = 0,
                 outcomes: Counter[tuple[str, str]] | None = None) -> None:
        self.peer = peer
        self.delay_ms = delay_ms
        self.capacity = capacity  # held relays beyond it go out at once: memory stays bounded
        self.pace_ms = pace_ms
        self.ack_delay_ms = ack_delay_ms
        self._waiting: list[Delta] = []  # what waits to be sent (see `_paced`)
        self._due: int | None = None  # when it goes
        self._sent_ms = -pace_ms  # when the stream last sent changes
        self._held: deque[tuple[int, int, Delta]] = deque()  # (number, due, delta), in feed order
        self._number = 0
        # Per origin, the smallest `before` among held relays of it, first, then the smallest among those
        # held after that one, and so on: (number, before) with `before` increasing (a sliding-window minimum).
        self._caps: dict[str, deque[tuple[int, str]]] = {}
        self._stamps: deque[tuple[int, str]] = deque()  # the same for held relays' outbox stamps
        self._told: dict[str, str] = {}  # the vector as this stream told it the peer
        self._told_cursor = ""
        # Counted into, per (peer, outcome): relays held that were "sent", or "dropped" (the peer held them).
        self.outcomes: Counter[tuple[str, str]] = Counter() if outcomes is None else outcomes

    @property
    def held(self) -> int:
        return len(self._held)

    def next(self, feed: list[Delta], peer_vector: dict[str, str], now_ms: int) -> list[Delta]:
        """What to send now, in order, given the changes that arrived on the feed since the last call. Each
        goes out with its vector capped below what is held at that point, so that no message covers a
        change that only a later one carries (a relay pushed out past capacity goes after newer changes)."""
        out = self._released(peer_vector, now_ms)
        for delta in feed:
            relayed = delta.relayed
            if relayed is None or relayed.origins is None:
                out.append(self._capped(delta))
            elif self._held_by_peer(relayed):  # an acknowledgement: the vector's entries for its origins
                out.append(self._capped(Delta(vector={o: h for o, h in delta.vector.items() if o in relayed.origins},
                                              cursor=delta.cursor)))
            elif self.delay_ms <= 0:
                out.append(self._capped(delta))
            else:
                self._hold(now_ms + self.delay_ms, delta)
                while len(self._held) > self.capacity:
                    out.append(self._capped(self._pop()))
                    self.outcomes[self.peer, "sent"] += 1
        return self._paced(out, now_ms)

    def wait_ms(self, now_ms: int) -> int | None:
        """How long until what waits to be sent is due (None: nothing waits); the caller then calls `next` with
        what the feed has by then, if anything."""
        return None if self._due is None else max(0, self._due - now_ms)

    def _paced(self, out: list[Delta], now_ms: int) -> list[Delta]:
        """`out` after what still waits, if it is due. A stream sends at most one message every `pace_ms`:
        changes that come sooner after the one before wait until then and go together, so a busy stream sends
        fewer, larger messages, and every hop (gRPC, the WAN, the peer's apply) pays per message, not per
        change. What only acknowledges (vector entries) waits up to `ack_delay_ms` for a change to ride with:
        in a busy mesh, half of what a stream sends would otherwise say only "I hold it". A heartbeat goes at
        once, with whatever waits."""
        for delta in out:
            if delta.members:
                due = now_ms
            elif carries_changes(delta):
                due = max(now_ms, self._sent_ms + self.pace_ms)
            else:
                due = now_ms + self.ack_delay_ms
            self._due = due if self._due is None else min(self._due, due)
        out = self._waiting + out
        if out and now_ms < (self._due or 0):
            self._waiting = out
            return []
        if any(map(carries_changes, out)):  # only changes set the pace: a heartbeat or an acknowledgement
            self._sent_ms = now_ms          # sent alone must not shift when the next change may go
        self._waiting, self._due = [], None
        return out

    def told(self, deltas: list[Delta]) -> list[Delta]:
        """`deltas`, about to be sent in order, each with only the vector entries the stream has not told yet,
        and the cursor on heartbeats only (where it moved): the peer stores it once a heartbeat anyway."""
        out = []
        for delta in deltas:
            moved = {r: h for r, h in delta.vector.items() if self._told.get(r) != h}
            self._told.update(moved)
            cursor = delta.cursor if delta.members and delta.cursor > self._told_cursor else ""
            self._told_cursor = max(self._told_cursor, cursor)
            out.append(delta if len(moved) == len(delta.vector) and cursor == delta.cursor
                       else replace(delta, vector=moved, cursor=cursor))
        return out

    def _held_by_peer(self, relayed: Relayed) -> bool:
        return relayed.source == self.peer or set(relayed.origins or ()) <= {self.peer}

    def _released(self, peer_vector: dict[str, str], now_ms: int) -> list[Delta]:
        """From the oldest on, held relays that the peer holds by now (dropped) or that are due (sent): a
        later one never overtakes an earlier one, and each call looks only at what it takes out."""
        out = []
        while self._held:
            _, due, delta = self._held[0]
            if vector.covers(peer_vector, delta.relayed.origins or {}):  # type: ignore[union-attr]
                self._pop()
                self.outcomes[self.peer, "dropped"] += 1
            elif due <= now_ms:
                out.append(self._capped(self._pop()))
                self.outcomes[self.peer, "sent"] += 1
            else:
                break
        return out

    def _hold(self, due: int, delta: Delta) -> None:
        number, self._number = self._number, self._number + 1
        self._held.append((number, due, delta))
        relayed = delta.relayed
        for origin in relayed.origins or ():  # type: ignore[union-attr]
            _slide_in(self._caps.setdefault(origin, deque()), number, relayed.before.get(origin, ""))  # type: ignore[union-attr]
        if relayed.stamp:  # type: ignore[union-attr]
            _slide_in(self._stamps, number, relayed.stamp)  # type: ignore[union-attr]

    def _pop(self) -> Delta:
        """Take out the oldest held relay."""
        number, _, delta = self._held.popleft()
        for origin in delta.relayed.origins or ():  # type: ignore[union-attr]
            if not _slide_out(self._caps[origin], number):
                del self._caps[origin]
        _slide_out(self._stamps, number)
        return delta

    def _capped(self, delta: Delta) -> Delta:
        """`delta` with a vector that covers nothing held now, and a cursor below every held relay."""
        if self._stamps and delta.cursor >= self._stamps[0][1]:
            delta = replace(delta, cursor=Hlc.decode(self._stamps[0][1]).previous().encode())
        if not self._caps or not delta.vector:
            return delta
        cap = {origin: window[0][1] for origin, window in self._caps.items()}
        if not any(r in cap and h > cap[r] for r, h in delta.vector.items()):
            return delta
        capped = {r: min(h, cap[r]) if r in cap else h for r, h in delta.vector.items()}
        return replace(delta, vector={r: h for r, h in capped.items() if h})


def _slide_in(window: deque[tuple[int, str]], number: int, value: str) -> None:
    """Add held relay `number`'s value to a sliding-window minimum: its first item is the smallest value held."""
    while window and window[-1][1] >= value:
        window.pop()
    window.append((number, value))


def _slide_out(window: deque[tuple[int, str]], number: int) -> int:
    """Take out held relay `number`, the oldest; return what the window still holds."""
    if window and window[0][0] == number:
        window.popleft()
    return len(window)
