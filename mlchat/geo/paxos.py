"""Single-decree Paxos, one independent instance per key.

Each key ("name:alice", "epoch:7") is its own instance, which chooses at most one value, for good. Every
region is an acceptor and may propose. A proposer runs under a ballot (round, region), compared as a tuple;
ballots are unique as long as a region never runs two proposers for one key under the same round. Phase 1:
Prepare asks every member to promise to refuse lower ballots and to report what it has accepted. Once a
quorum (a strict majority) has promised, phase 2: Accept asks every member to accept a value, which must be
the value accepted under the highest ballot among those promises, or the proposer's own value if none is.
A value is chosen once a quorum has accepted it under one ballot. Any two quorums share an acceptor, so
every later ballot that gets past phase 1 learns the chosen value and can only propose it again.

An acceptor's state must be stored durably before its reply leaves (an acceptor that forgets a promise on
restart breaks safety), and `on_prepare`/`on_accept` for one key must not interleave at one acceptor.
Messages may be lost, duplicated and reordered: a proposer ignores replies that are not for its current
ballot and counts each sender once. A proposer that is refused, or whose caller's timer fires, retries under
a higher round. Progress needs one proposer to run undisturbed for a while, which the caller arranges with
randomised backoff. This module does no I/O and reads no clock.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Ballot = tuple[int, str]  # (round, proposer region); compared as tuples
NULL_BALLOT: Ballot = (0, "")


@dataclass(frozen=True, slots=True)
class AcceptorState:
    """What one acceptor knows about one key; the caller stores it durably before replying."""

    promised: Ballot = NULL_BALLOT
    accepted_ballot: Ballot = NULL_BALLOT
    accepted_value: str | None = None

    def encode(self) -> str:
        return json.dumps(
            {"promised": list(self.promised), "accepted": list(self.accepted_ballot), "value": self.accepted_value},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | None) -> AcceptorState:
        """The state `encode` wrote; a fresh state for None or ""; ValueError for anything else."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
        except ValueError:
            raw = None
        if not isinstance(raw, dict) or raw.keys() != {"promised", "accepted", "value"}:
            raise ValueError(f"not an acceptor state: {text!r}")
        promised, accepted, value = _ballot(raw["promised"]), _ballot(raw["accepted"]), raw["value"]
        if (
            promised is None
            or accepted is None
            or not (value is None or isinstance(value, str))
            or (value is None) != (accepted == NULL_BALLOT)
            or accepted > promised
        ):
            raise ValueError(f"not an acceptor state: {text!r}")
        return cls(promised, accepted, value)


def _ballot(raw: Any) -> Ballot | None:
    if not (isinstance(raw, list) and len(raw) == 2):
        return None
    round_, region = raw
    if type(round_) is not int or not isinstance(region, str):
        return None
    if (round_, region) != NULL_BALLOT and round_ < 1:
        return None
    return round_, region


@dataclass(frozen=True, slots=True)
class Prepare:
    key: str
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Accept:
    key: str
    ballot: Ballot
    value: str


@dataclass(frozen=True, slots=True)
class Promise:
    # Answers the Prepare for (key, ballot). `promised` is the sender's promise after handling it (the higher
    # ballot when not ok); accepted_* is what the sender had accepted.
    key: str
    ballot: Ballot
    sender: str
    ok: bool
    promised: Ballot
    accepted_ballot: Ballot
    accepted_value: str | None


@dataclass(frozen=True, slots=True)
class Accepted:
    # Answers the Accept for (key, ballot).
    key: str
    ballot: Ballot
    sender: str
    ok: bool
    promised: Ballot


def proper(ballot: Ballot) -> bool:
    """Whether a proposer may use `ballot`: a round of at least 1 and a region's name."""
    return ballot[0] >= 1 and bool(ballot[1])


def on_prepare(state: AcceptorState, msg: Prepare, me: str) -> tuple[AcceptorState, Promise]:
    """The acceptor's new state and reply: a promise iff the ballot is at least the one already promised."""
    # Equal ballots are a re-sent Prepare from the same proposer: answering it again changes nothing.
    ok = msg.ballot >= state.promised and proper(msg.ballot)
    if ok:
        state = AcceptorState(msg.ballot, state.accepted_ballot, state.accepted_value)
    return state, Promise(msg.key, msg.ballot, me, ok, state.promised, state.accepted_ballot, state.accepted_value)


def on_accept(state: AcceptorState, msg: Accept, me: str) -> tuple[AcceptorState, Accepted]:
    """The acceptor's new state and reply: accepted iff the ballot is at least the one promised."""
    ok = msg.ballot >= state.promised and proper(msg.ballot)
    if ok:
        state = AcceptorState(msg.ballot, msg.ballot, msg.value)
    return state, Accepted(msg.key, msg.ballot, me, ok, state.promised)


def safe_value(promises: Iterable[Promise], own: str) -> str:
    """The only value a proposer may send after these promises: the one accepted under the highest ballot
    among them, else `own`."""
    best: Ballot = NULL_BALLOT
    value = own
    for p in promises:
        if p.accepted_value is not None and p.accepted_ballot > best:
            best, value = p.accepted_ballot, p.accepted_value
    return value


class Phase(enum.Enum):
    PREPARING = enum.auto()  # Prepare sent, collecting promises
    ACCEPTING = enum.auto()  # Accept sent, collecting acceptances
    DECIDED = enum.auto()  # a quorum accepted; final
    PREEMPTED = enum.auto()  # an acceptor refused: a higher ballot exists; retry() to go on


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PREPARING: frozenset({Phase.ACCEPTING, Phase.PREEMPTED, Phase.PREPARING}),
    Phase.ACCEPTING: frozenset({Phase.DECIDED, Phase.PREEMPTED, Phase.PREPARING}),
    Phase.PREEMPTED: frozenset({Phase.PREPARING}),
    Phase.DECIDED: frozenset(),
}


class Proposer:
    """Drives one attempt to get `value` chosen for `key`, among `members` (region names, this one included).

    The caller sends every returned message to every member (this one included, through the same path),
    feeds back the replies, and calls `retry` when preempted or when its own timer fires.
    """

    def __init__(self, key: str, value: str, me: str, members: Iterable[str], round_: int = 1) -> None:
        self.members = frozenset(members)
        if me not in self.members:
            raise ValueError(f"proposer {me!r} must be one of the members {sorted(self.members)}")
        if round_ < 1:
            raise ValueError(f"round must be at least 1, not {round_}")
        self.key = key
        self.value = value
        self.me = me
        self.quorum = len(self.members) // 2 + 1
        self.phase = Phase.PREPARING
        self.ballot: Ballot = (round_, me)
        self.decided: str | None = None
        self.highest_seen: Ballot = NULL_BALLOT  # the largest ballot any reply for this key reported
        self._promises: dict[str, Promise] = {}
        self._accepted: set[str] = set()
        self._proposal: str | None = None

    def prepare(self) -> Prepare:
        """The Prepare for the current ballot (again, if the caller re-sends it)."""
        if self.phase is not Phase.PREPARING:
            raise RuntimeError(f"no Prepare to send in phase {self.phase.name}")
        return Prepare(self.key, self.ballot)

    def on_promise(self, p: Promise) -> Accept | None:
        """The Accept to send once a quorum of distinct members has promised this ballot, else None."""
        if not self._heard(p.key, p.sender, p.promised, p.accepted_ballot):
            return None
        if p.ballot != self.ballot or self.phase is not Phase.PREPARING:
            return None
        if not p.ok:
            self._to(Phase.PREEMPTED)
            return None
        self._promises.setdefault(p.sender, p)
        if len(self._promises) < self.quorum:
            return None
        self._proposal = safe_value(self._promises.values(), self.value)
        self._to(Phase.ACCEPTING)
        return Accept(self.key, self.ballot, self._proposal)

    def on_accepted(self, a: Accepted) -> str | None:
        """The decided value once a quorum of distinct members has accepted this ballot, else None."""
        if not self._heard(a.key, a.sender, a.promised):
            return None
        if a.ballot != self.ballot or self.phase is not Phase.ACCEPTING:
            return None
        if not a.ok:
            self._to(Phase.PREEMPTED)
            return None
        self._accepted.add(a.sender)
        if len(self._accepted) < self.quorum:
            return None
        self._to(Phase.DECIDED)
        self.decided = self._proposal
        return self.decided

    def retry(self) -> Prepare:
        """Start over under a round above every round seen so far; the Prepare to send."""
        self._to(Phase.PREPARING)
        self.ballot = (max(self.ballot[0], self.highest_seen[0]) + 1, self.me)
        self._promises.clear()
        self._accepted.clear()
        self._proposal = None
        return Prepare(self.key, self.ballot)

    def _heard(self, key: str, sender: str, *ballots: Ballot) -> bool:
        # Any reply for this key from a member tells of ballots to outbid, even a stale one.
        if key != self.key or sender not in self.members:
            return False
        self.highest_seen = max(self.highest_seen, *ballots)
        return True

    def _to(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"proposer for {self.key!r}: illegal transition {self.phase.name} -> {phase.name}")
        self.phase = phase
