"""Single-leader mode: which region is primary, whether it may take writes now, when to elect another.

A term is (epoch, primary). The first term's primary is configured; every later epoch's primary is
decided by Paxos on the key "epoch:<n>", so no two regions are ever primary in the same epoch. Every
region tells its peers its term on heartbeats, and a region that hears of a higher epoch adopts it.

The primary takes writes only while it holds a lease: a majority of regions (itself included)
follow its term and hold one of its clock stamps from the last `lease_ms`, which it learns from the
version vectors they stream back. A follower calls an election only after hearing nothing from the
primary for `election_timeout_ms`, longer than the lease: by then an old primary cut off on the other
side of a partition has stopped taking writes. A revived old primary learns the higher epoch from its
peers' first heartbeats and follows; until then its stale lease keeps it from taking writes.

Pure: the caller passes the time (wall-clock milliseconds, the unit of clock stamps) and drives the
election itself.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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


class Role(enum.Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # electing itself, or catching up after winning
    PRIMARY = "primary"


_TRANSITIONS = {
    Role.FOLLOWER: {Role.FOLLOWER, Role.CANDIDATE, Role.PRIMARY},
    Role.CANDIDATE: {Role.FOLLOWER, Role.PRIMARY},
    Role.PRIMARY: {Role.FOLLOWER, Role.PRIMARY},
}


@dataclass(slots=True)
class _Heard:
    term: Term
    holds_ms: int  # the latest of our clock stamps the peer holds (wall ms of our hlc)
    at_ms: int  # when we heard it


class Failover:
    def __init__(self, me: str, term: Term, lease_ms: int, election_timeout_ms: int, now_ms: int) -> None:
        if election_timeout_ms <= lease_ms:
            raise ValueError("the election timeout must be longer than the lease, or two primaries could overlap")
        self.me = me
        self.term = term
        self.lease_ms = lease_ms
        self.election_timeout_ms = election_timeout_ms
        self.role = Role.PRIMARY if term.primary == me else Role.FOLLOWER
        self._heard: dict[str, _Heard] = {}
        self._term_since_ms = now_ms  # when this region started, or adopted its term

    def _to(self, role: Role) -> None:
        if role not in _TRANSITIONS[self.role]:
            raise RuntimeError(f"{self.me}: no transition from {self.role.value} to {role.value}")
        self.role = role

    def heard(self, peer: str, term: Term, holds_ms: int, now_ms: int) -> bool:
        """A peer's heartbeat: its term, and the latest of our stamps it holds. True if we adopted a
        higher term from it."""
        self._heard[peer] = _Heard(term, holds_ms, now_ms)
        return self.adopt(term, now_ms)

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
        if self.role is not Role.PRIMARY:
            return False
        others = [m for m in members if m != self.me]
        fresh = sum(1 for m in others if (h := self._heard.get(m)) is not None
                    and h.term == self.term and h.holds_ms >= now_ms - self.lease_ms)
        return 1 + fresh >= (len(others) + 1) // 2 + 1

    def should_elect(self, now_ms: int) -> bool:
        """Whether this follower has waited long enough for a silent primary to call an election."""
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
