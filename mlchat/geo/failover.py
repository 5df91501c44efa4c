"""Single-leader mode: which region is primary, whether it may take writes now, when to elect another.

A term is (epoch, primary). The first term's primary is configured; every later epoch's primary is
decided by Paxos on the key "epoch:<n>", so no two regions are ever primary in the same epoch. Every
region tells its peers its term on heartbeats, and a region that hears of a higher epoch adopts it.

The primary takes writes only while it holds a lease: a majority of regions (itself included)
follow its term, have voted in no later election, and hold one of its clock stamps from the last
`lease_ms`, which it learns from the version vectors they stream back. A follower calls an election
only after hearing nothing from the primary for `election_timeout_ms`, longer than the lease. A
region votes (promises, in the election's Paxos) only when no newer stamp of the primary has reached
it, by any path, for a whole lease of its own time, and not within a lease of its own start (what it
reported before a restart may still count); once it has voted it no longer counts toward the old
primary's lease. Every report a voter ever gave the old primary carries a stamp the primary made at
least a lease before the vote, so by the time a majority has elected a new primary the old one (even
alive, across a partition, or hearing some regions one way only) has lost its lease: two regions
never take writes at the same time, given clocks that run at the same rate, however far apart they are
set: the lease counts from when the primary itself sent the stamps (`Advertised`), on its own clock,
never from the stamps' values, which follow the fastest clock in the cluster.
A revived old primary learns the higher epoch from its peers' heartbeats and follows; until then its
stale lease keeps it from taking writes.

Pure: the caller passes the time (wall-clock milliseconds, the unit of clock stamps) and drives the
election itself.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class Term:
    epoch: int
    primary: str

    def encode(self) -> str:
        return f"{self.epoch} {self.primary}"

    @classmethod
    def decode(cls, text: str) -> Term:
        epoch, primary = text.split(" ", 1)
        return cls(int(epoch), primary)


class Advertised:
    """When this region's own version-vector entry moved, on its own clock: a peer that holds stamp X got
    it in a message sent after the last moment the entry was still below X. Stamps are hybrid clock
    values, which absorb faster clocks, so X itself says nothing about this region's own time."""

    def __init__(self, keep_ms: int) -> None:
        self._keep_ms = keep_ms
        self._marks: deque[tuple[str, int]] = deque()  # (own entry, when it was so), oldest first

    def mark(self, entry: str, now_ms: int) -> None:
        """The own entry as it is now (call at least every heartbeat, before it is sent on)."""
        if not self._marks or entry != self._marks[-1][0]:
            self._marks.append((entry, now_ms))
        while len(self._marks) > 1 and self._marks[1][1] < now_ms - self._keep_ms:
            self._marks.popleft()

    def sent_after(self, stamp: str) -> int:
        """A time (this clock) before which no message carrying `stamp` was sent; 0 if too old to tell."""
        below = [at for entry, at in self._marks if entry < stamp]
        return max(below) if below else 0


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # electing itself, or catching up after winning
    PRIMARY = "primary"


_TRANSITIONS = {
    Role.FOLLOWER: {Role.FOLLOWER, Role.CANDIDATE, Role.PRIMARY},
    Role.CANDIDATE: {Role.FOLLOWER, Role.PRIMARY},
    Role.PRIMARY: {Role.FOLLOWER, Role.PRIMARY, Role.CANDIDATE},
}


@dataclass(slots=True)
class _Heard:
    term: Term
    holds_ms: int  # when (our clock) we sent the latest of our stamps the peer holds, at the earliest
    at_ms: int  # when we heard it
    voted: int  # the latest epoch it voted in an election for


class Failover:
    def __init__(self, me: str, term: Term, lease_ms: int, election_timeout_ms: int, now_ms: int,
                 voted: int = 0) -> None:
        if election_timeout_ms <= lease_ms:
            raise ValueError("the election timeout must be longer than the lease, or two primaries could overlap")
        self.me = me
        self.term = term
        self.lease_ms = lease_ms
        self.election_timeout_ms = election_timeout_ms
        self.role = Role.PRIMARY if term.primary == me else Role.FOLLOWER
        self._heard: dict[str, _Heard] = {}
        self._term_since_ms = now_ms  # when this region started, or adopted its term
        self.voted = voted  # the latest epoch this region voted in an election for (stored by the caller)
        self._started_ms = now_ms
        self._newest: dict[str, tuple[int, int]] = {}  # region -> (its newest stamp held here, when it came)

    def _to(self, role: Role) -> None:
        if role not in _TRANSITIONS[self.role]:
            raise RuntimeError(f"{self.me}: no transition from {self.role.value} to {role.value}")
        self.role = role

    def heard(self, peer: str, term: Term, holds_ms: int, now_ms: int, voted: int = 0) -> bool:
        """A peer's heartbeat: its term, since when (`Advertised.sent_after`) it holds our stamps, and the
        latest epoch it voted for. True if we adopted a higher term from it."""
        self._heard[peer] = _Heard(term, holds_ms, now_ms, voted)
        return self.adopt(term, now_ms)

    def held(self, stamps: Mapping[str, int], now_ms: int) -> None:
        """The newest clock stamp (wall ms) of each region that this region holds, by any path: its
        version vector."""
        for region, stamp in stamps.items():
            if stamp > self._newest.get(region, (-1, 0))[0]:
                self._newest[region] = (stamp, now_ms)

    def adopt(self, term: Term, now_ms: int) -> bool:
        """Follow `term` if it is newer than ours (a heartbeat told us, or an election decided it)."""
        if term.epoch <= self.term.epoch:
            return False
        self.term = term
        self._term_since_ms = now_ms
        self._to(Role.PRIMARY if term.primary == self.me else Role.FOLLOWER)
        return True

    def may_write(self, members: Iterable[str], now_ms: int) -> bool:
        """Whether this region is the primary and holds its lease now."""
        if self.role is not Role.PRIMARY or self.voted > self.term.epoch:
            return False
        others = [m for m in members if m != self.me]
        fresh = sum(1 for m in others if (h := self._heard.get(m)) is not None and h.term == self.term
                    and h.voted <= self.term.epoch and h.holds_ms >= now_ms - self.lease_ms)
        return 1 + fresh >= (len(others) + 1) // 2 + 1

    def may_vote(self, epoch: int, candidate: str, members: Iterable[str], now_ms: int) -> bool:
        """Whether to promise in `candidate`'s election for `epoch`; if so, the vote is recorded (store
        it before answering). No while the primary this region follows is alive (heard within a lease),
        or while it is that primary and holds its lease, unless the candidate is that primary."""
        if epoch <= self.term.epoch or candidate == self.term.primary:
            # Decided already (promising cannot change the outcome), or the primary renewing itself:
            # a vote that moves the primary nowhere cannot make two of them.
            self.voted = max(self.voted, epoch)
            return True
        if self.role is Role.PRIMARY:
            alive = self.may_write(members, now_ms)
        else:
            newest = self._newest.get(self.term.primary)
            alive = newest is not None and now_ms - newest[1] < self.lease_ms
        if alive or now_ms - self._started_ms < self.lease_ms:
            return False
        self.voted = max(self.voted, epoch)
        return True

    def should_elect(self, members: Iterable[str], now_ms: int) -> bool:
        """Whether to call an election: as a follower, after the primary was silent for the election
        timeout; as the primary, after it could not renew its lease for as long (its followers may
        have voted in an election no one won)."""
        if self.role is Role.PRIMARY:
            if self.may_write(members, now_ms):
                self._term_since_ms = now_ms
                return False
            return now_ms - self._term_since_ms > self.election_timeout_ms
        if self.role is not Role.FOLLOWER:
            return False
        primary = self._heard.get(self.term.primary)
        last = max(self._term_since_ms, primary.at_ms if primary is not None else self._term_since_ms)
        return now_ms - last > self.election_timeout_ms

    def electing(self) -> int:
        """Become a candidate; return the epoch to elect a primary for."""
        self._to(Role.CANDIDATE)
        return self.term.epoch + 1

    def election_failed(self, now_ms: int) -> None:
        """No decision (no majority in time): wait a full timeout again before the next try."""
        if self.role is Role.CANDIDATE:
            self._to(Role.FOLLOWER)
            self._term_since_ms = now_ms
