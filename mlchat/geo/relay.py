"""What a region's stream to one peer carries, and when: its own changes at once, relays only when needed.

A region streams to each peer its own writes and whatever it applied from others that was new to it, so that
a change reaches every region by any path that works (A to C through B while A-C is cut). In a healthy full
mesh the direct path has delivered a change before any relay of it does, and relaying everything at once
triples a cluster's WAN traffic (each of n regions receives each message n-1 times). So, per stream:

- the region's own changes, and changes whose origins are not known, go at once;
- a change the peer sent us, or that only the peer wrote, is never sent back: the peer holds it. Only the
  vector's entries for its origins go, which tell the peer at once that this region holds it too (sync acks,
  claim confirmation and causal tokens wait on that);
- any other relay is held for `delay_ms`, then dropped if the peer's vector (as it last told this region)
  covers it, else sent. A peer cut off from a change's origin therefore gets it from here, late.

Every message carries the sender's vector, which the receiver adopts as a promise that it holds what the
vector covers. While relays are held, the vector told the peer is capped, per origin, at what this region held
of that origin before the oldest held change arrived, so it never covers a change the peer was not sent.

Pure: the caller passes `now_ms` and the peer's vector, and sends what comes back, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from mlchat.crdt import vector
from mlchat.crdt.replica import Delta, Relayed


class RelayQueue:
    def __init__(self, peer: str, delay_ms: int, capacity: int) -> None:
        self.peer = peer
        self.delay_ms = delay_ms
        self.capacity = capacity  # held relays beyond it go out at once: memory stays bounded
        self._held: deque[tuple[int, Delta]] = deque()  # (due, delta), in feed order

    @property
    def held(self) -> int:
        return len(self._held)

    def next(self, feed: list[Delta], peer_vector: dict[str, str], now_ms: int) -> list[Delta]:
        """What to send now, in order, given the changes that arrived on the feed since the last call."""
        out = self._released(peer_vector, now_ms)
        for delta in feed:
            relayed = delta.relayed
            if relayed is None or relayed.origins is None:
                out.append(delta)
            elif self._held_by_peer(relayed):  # an acknowledgement: the vector's entries for its origins
                out.append(Delta(vector={o: h for o, h in delta.vector.items() if o in relayed.origins}))
            else:
                if self.delay_ms <= 0:
                    out.append(delta)
                else:
                    self._held.append((now_ms + self.delay_ms, delta))
        while len(self._held) > self.capacity:
            out.append(self._held.popleft()[1])
        cap = self._cap() if out and self._held else {}
        return [self._capped(d, cap) for d in out]

    def _held_by_peer(self, relayed: Relayed) -> bool:
        return relayed.source == self.peer or set(relayed.origins or ()) <= {self.peer}

    def _released(self, peer_vector: dict[str, str], now_ms: int) -> list[Delta]:
        """From the oldest on, held relays that the peer holds by now (dropped) or that are due (sent): a
        later one never overtakes an earlier one, and each call looks only at what it takes out."""
        out = []
        while self._held:
            due, delta = self._held[0]
            if vector.covers(peer_vector, delta.relayed.origins or {}):  # type: ignore[union-attr]
                self._held.popleft()
            elif due <= now_ms:
                out.append(self._held.popleft()[1])
            else:
                break
        return out

    def _cap(self) -> dict[str, str]:
        """Per origin of a held relay, the most the vector told the peer may say of it: what this region
        held of that origin before the held relay arrived."""
        cap: dict[str, str] = {}
        for _, held in self._held:
            relayed = held.relayed
            for origin in relayed.origins or ():  # type: ignore[union-attr]
                before = relayed.before.get(origin, "")  # type: ignore[union-attr]
                if origin not in cap or before < cap[origin]:
                    cap[origin] = before
        return cap

    @staticmethod
    def _capped(delta: Delta, cap: dict[str, str]) -> Delta:
        """`delta` with a vector that covers nothing still held from the peer."""
        if not cap or not delta.vector or not any(r in cap and h > cap[r] for r, h in delta.vector.items()):
            return delta
        capped = {r: min(h, cap[r]) if r in cap else h for r, h in delta.vector.items()}
        return replace(delta, vector={r: h for r, h in capped.items() if h})
