"""Single-leader failover core: terms, leases, election timeouts and the role table, then every region's core
driven over a simulated network that partitions (both ways and one way), loses and delays messages and crashes
regions, with elections run through the real Paxos.

The simulation mirrors `mlchat.leader.leadership`: one global clock; every heartbeat a region streams to each
peer its term, its latest vote and its version vector, in which its own entry is its clock now (so the peer then
holds that stamp) and the others' entries are the latest stamps it holds of them, merged from every peer as
`Region.apply` does. The receiver's own entry is what its lease check counts. A region that `should_elect` runs
Paxos on "epoch:<n>" with its own name; an acceptor first asks `may_vote` and declines as `Consensus.prepare`
does; whoever learns the decision adopts it. A restarted region rebuilds its core from the term and vote it
stored; acceptor states, Paxos rounds and version vectors survive crashes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings, target
from hypothesis import strategies as st

from mlchat.geo.failover import Failover, Role, Term
from mlchat.geo.paxos import (
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Phase,
    Prepare,
    Promise,
    Proposer,
    on_accept,
    on_prepare,
)

LEASE_MS = 1000
TIMEOUT_MS = 2000  # the shell's choice: twice the lease
ABC = ("a", "b", "c")
ABCDE = ("a", "b", "c", "d", "e")
T1 = Term(1, "a")


def core(me: str, term: Term = T1, now_ms: int = 0) -> Failover:
    return Failover(me, term, LEASE_MS, TIMEOUT_MS, now_ms)


# Unit behaviour ----------------------------------------------------------------------------------------


def test_the_configured_primary_starts_primary_and_the_others_follow():
    assert core("a").role is Role.PRIMARY
    assert core("b").role is core("c").role is Role.FOLLOWER
    assert core("b").term == T1


def test_the_primary_writes_only_while_a_majority_holds_a_fresh_stamp_of_its_term():
    a = core("a")
    assert not a.may_write(ABC, 0)  # nobody has reported yet
    assert a.may_write(["a"], 0)  # alone, it is its own majority
    a.heard("b", T1, 500, 600)
    assert a.may_write(ABC, 600) and a.may_write(ABC, 1500)  # 500 is within the lease until 1500
    assert not a.may_write(ABC, 1501)
    assert not a.may_write(ABCDE, 600)  # one of four others is not a majority of five
    a.heard("d", T1, 550, 600)
    assert a.may_write(ABCDE, 1500) and not a.may_write(ABCDE, 1501)
    a.heard("z", T1, 1400, 1500)  # not a member: does not count
    assert not a.may_write(ABCDE, 1501)


def test_only_peers_following_this_very_term_count_for_the_lease():
    a = core("a", Term(3, "a"))
    a.heard("b", Term(2, "c"), 900, 1000)  # b still follows an older term
    assert not a.may_write(ABC, 1000)
    a.heard("c", Term(3, "a"), 900, 1000)
    assert a.may_write(ABC, 1000)


def test_the_lease_lapses_when_the_peers_stamps_get_old_and_comes_back_with_fresh_ones():
    a = core("a")
    a.heard("b", T1, 100, 200)
    a.heard("c", T1, 100, 200)
    assert a.may_write(ABC, 1100)
    assert not a.may_write(ABC, 1101)  # still heard from recently, but only of old stamps
    a.heard("c", T1, 1050, 1101)
    assert a.may_write(ABC, 1101) and not a.may_write(ABC, 2051)


def test_a_follower_elects_only_after_a_full_timeout_of_silence_from_the_primary():
    b = core("b", now_ms=1000)  # a region that starts counts from its start
    assert not b.should_elect(ABC, 1000 + TIMEOUT_MS)
    assert b.should_elect(ABC, 1001 + TIMEOUT_MS)
    b.heard("a", T1, 0, 2500)
    assert not b.should_elect(ABC, 2500 + TIMEOUT_MS) and b.should_elect(ABC, 2501 + TIMEOUT_MS)
    b.heard("c", T1, 0, 4000)  # another follower is no news of the primary
    assert b.should_elect(ABC, 2501 + TIMEOUT_MS)


def test_a_primary_elects_only_after_failing_to_renew_its_lease_for_a_full_timeout():
    a = core("a")
    a.heard("b", T1, 900, 1000)
    assert not a.should_elect(ABC, 1000)  # holds its lease (until 1900)
    assert not a.should_elect(ABC, 1900)  # as it is asked every heartbeat
    assert not a.should_elect(ABC, 1900 + TIMEOUT_MS)
    assert a.should_elect(ABC, 1901 + TIMEOUT_MS)
    assert a.electing() == 2 and a.role is Role.CANDIDATE


def test_a_higher_term_from_a_heartbeat_demotes_the_primary_and_promotes_the_named_region():
    a, c = core("a"), core("c")
    a.heard("b", T1, 0, 50)
    assert a.heard("b", Term(2, "c"), 0, 100)
    assert a.role is Role.FOLLOWER and a.term == Term(2, "c")
    assert not a.may_write(ABC, 100)
    assert c.heard("b", Term(2, "c"), 0, 100)
    assert c.role is Role.PRIMARY and c.term == Term(2, "c")
    c.heard("b", Term(2, "c"), 100, 200)
    assert c.may_write(ABC, 200)
    # The adopted term's silence counts from when it was adopted.
    assert not a.should_elect(ABC, 100 + TIMEOUT_MS) and a.should_elect(ABC, 101 + TIMEOUT_MS)


def test_lower_and_equal_terms_are_ignored():
    a = core("a", Term(3, "a"))
    for term in (Term(2, "b"), Term(3, "b"), Term(3, "a"), Term(1, "z")):
        assert not a.heard("b", term, 0, 100)
        assert not a.adopt(term, 100)
        assert a.role is Role.PRIMARY and a.term == Term(3, "a")
    b = core("b", Term(3, "a"), now_ms=0)
    assert not b.adopt(Term(3, "b"), 5000)  # an equal epoch names no new primary
    assert b.role is Role.FOLLOWER and b.should_elect(ABC, 5000)  # nor restarts the timeout


def test_illegal_transitions_raise():
    b = core("b")
    assert b.electing() == 2
    with pytest.raises(RuntimeError):
        b.electing()  # one election at a time
    assert b.role is Role.CANDIDATE and b.term == T1
    with pytest.raises(RuntimeError):
        b._to(Role.CANDIDATE)
    for role in Role:  # the table's one illegal move is the one above
        for to in Role:
            f = core("b")
            f.role = role
            if (role, to) == (Role.CANDIDATE, Role.CANDIDATE):
                with pytest.raises(RuntimeError):
                    f._to(to)
            else:
                f._to(to)
                assert f.role is to


def test_election_outcomes():
    b = core("b")
    assert b.electing() == 2 and b.role is Role.CANDIDATE
    assert not b.should_elect(ABC, 10**9)  # a candidate is already electing
    b.election_failed(3000)
    assert b.role is Role.FOLLOWER
    assert not b.should_elect(ABC, 3000 + TIMEOUT_MS) and b.should_elect(ABC, 3001 + TIMEOUT_MS)
    b.election_failed(9000)  # not a candidate: nothing to undo, no timer moved
    assert b.role is Role.FOLLOWER and b.should_elect(ABC, 3001 + TIMEOUT_MS)
    b.electing()
    assert b.adopt(Term(2, "b"), 4000) and b.role is Role.PRIMARY  # won
    c = core("c")
    c.electing()
    assert c.adopt(Term(2, "b"), 4000) and c.role is Role.FOLLOWER  # lost to b
    d = core("d")
    d.electing()
    assert d.heard("b", Term(2, "b"), 0, 4000) and d.role is Role.FOLLOWER  # told by a heartbeat mid-election


def test_a_follower_votes_only_once_no_new_stamp_of_its_primary_came_for_a_lease():
    b = core("b")
    b.held({"a": 900}, 1000)  # a stamp of a's reaches b (directly or through another region)
    b.held({"a": 900}, 1500)  # the same stamp again is no news
    assert not b.may_vote(2, "c", ABC, 1999) and b.voted == 0
    assert b.may_vote(2, "a", ABC, 1999)  # the primary renewing itself moves no one
    assert b.may_vote(2, "c", ABC, 2000) and b.voted == 2
    assert b.may_vote(1, "c", ABC, 0)  # an epoch already decided: promising changes nothing


def test_a_region_does_not_vote_within_a_lease_of_its_start():
    # What it reported before a restart may still count toward the primary's lease.
    fresh = core("b", now_ms=5000)
    assert not fresh.may_vote(2, "c", ABC, 5999)
    assert fresh.may_vote(2, "c", ABC, 6000)


def test_a_primary_votes_against_itself_only_without_its_lease():
    a = core("a")
    a.heard("b", T1, 900, 1000)
    assert not a.may_vote(2, "c", ABC, 1900)
    assert a.may_vote(2, "c", ABC, 1901) and a.voted == 2


def test_votes_for_a_later_epoch_end_the_lease():
    a = core("a")
    a.heard("b", T1, 900, 1000, voted=2)  # b follows a, but has voted in the election for epoch 2
    assert not a.may_write(ABC, 1000)
    a.heard("c", T1, 900, 1000, voted=1)
    assert a.may_write(ABC, 1000)
    assert a.may_vote(2, "c", ABC, 5000)  # a voted against itself itself
    a.heard("c", T1, 4900, 5000)
    assert not a.may_write(ABC, 5000)
    restarted = Failover("a", T1, LEASE_MS, TIMEOUT_MS, 6000, voted=2)  # the vote is stored
    restarted.heard("c", T1, 5900, 6000)
    assert restarted.voted == 2 and not restarted.may_write(ABC, 6000)


@pytest.mark.parametrize("timeout_ms", [LEASE_MS, LEASE_MS - 1, 0])
def test_the_election_timeout_must_exceed_the_lease(timeout_ms):
    with pytest.raises(ValueError):
        Failover("a", T1, LEASE_MS, timeout_ms, 0)
    assert Failover("a", T1, LEASE_MS, LEASE_MS + 1, 0).role is Role.PRIMARY


@given(st.integers(), st.text())
def test_term_encode_decode_round_trip(epoch, primary):
    term = Term(epoch, primary)
    assert Term.decode(term.encode()) == term


def test_terms_order_by_epoch_first():
    assert Term(1, "z") < Term(2, "a") < Term(2, "b")


# Simulated regions ---------------------------------------------------------------------------------------

STEP_MS = 100  # the clock's step, and the shortest a message takes
HEARTBEAT_STEPS = 3  # every region streams its term and vector to every peer this often (staggered)
SIM_LEASE_MS = 6 * HEARTBEAT_STEPS * STEP_MS  # six heartbeats, and twelve for the election timeout, as in the
SIM_TIMEOUT_MS = 2 * SIM_LEASE_MS  # default settings
ELECTION_MS = 3000  # an election gives up (election_failed) after this long undecided
RETRY_MS = 1000  # a proposer's timer: Prepare again under a higher round
QUIET_MAX_STEPS = 600  # reliable steps allowed for a single writer to emerge
STABLE_STEPS = 2 * SIM_LEASE_MS // STEP_MS  # and for how long it must then hold


@dataclass(frozen=True, slots=True)
class Beat:
    term: Term  # the sender's
    vector: tuple[tuple[str, int], ...]  # region -> the latest of its clock stamps the sender holds (its own: now)
    voted: int  # the latest epoch the sender voted in an election for


Message = Beat | Prepare | Accept | Promise | Accepted


@dataclass(frozen=True, slots=True)
class Faults:
    """What the network and the regions do for `steps` clock steps."""

    steps: int
    cut: frozenset[tuple[str, str]] = frozenset()  # (from, to) links that lose everything
    slow: frozenset[tuple[str, str]] = frozenset()  # (from, to) links whose messages take `lag` steps longer
    lag: int = 0
    loss: float = 0.0  # chance that any other message is lost
    max_delay: int = 1  # a message takes 1..max_delay steps, FIFO per link
    down: frozenset[str] = frozenset()  # crashed regions (they restart when a later phase leaves them out)

    def __str__(self) -> str:
        def links(ls: frozenset[tuple[str, str]]) -> str:
            return " ".join(f"{s}>{d}" for s, d in sorted(ls)) or "-"

        return (f"{self.steps} steps: cut {links(self.cut)}, {self.lag} steps slower {links(self.slow)}, "
                f"loss {self.loss}, delay 1..{self.max_delay}, down {''.join(sorted(self.down)) or '-'}")


@dataclass
class Election:
    epoch: int
    proposer: Proposer
    deadline_ms: int
    retry_ms: int


@dataclass
class Region:
    name: str
    stored_term: str  # durable, like `Store.save_term`: the term followed, and the latest epoch voted for
    stored_voted: int = 0
    acceptors: dict[str, str] = field(default_factory=dict)  # durable: key -> AcceptorState.encode()
    rounds: dict[str, int] = field(default_factory=dict)  # durable: the last Paxos round used per key
    holds: dict[str, int] = field(default_factory=dict)  # durable: the version vector, peer -> latest stamp
    core: Failover | None = None  # None while down
    election: Election | None = None


class Sim:
    def __init__(self, members: tuple[str, ...], seed: int) -> None:
        self.members = members
        self.rng = random.Random(seed)
        self.now = 0
        self.faults = Faults(steps=0)
        self.regions = {m: Region(m, T1.encode()) for m in members}
        for r in self.regions.values():
            r.core = Failover(r.name, T1, SIM_LEASE_MS, SIM_TIMEOUT_MS, self.now)
        self.net: list[tuple[int, int, str, str, Message]] = []  # (deliver at, seq, from, to, message)
        self.seq = 0
        self.link_free: dict[tuple[str, str], int] = {}  # FIFO: nothing overtakes on one link
        self.primaries: dict[int, str] = {1: "a"}  # every term any region ever held, epoch -> primary
        self.acceptances: dict[str, dict[Ballot, dict[str, str]]] = {}  # key -> ballot -> acceptor -> value
        self.events: list[str] = []
        self.overlap = -10**9  # the largest `closest_overlap` so far

    # Network

    def send(self, src: str, dst: str, msg: Message) -> None:
        if src != dst and ((src, dst) in self.faults.cut or self.rng.random() < self.faults.loss):
            return
        steps = self.rng.randint(1, self.faults.max_delay) + (self.faults.lag if (src, dst) in self.faults.slow else 0)
        at = max(self.now + STEP_MS * steps, self.link_free.get((src, dst), 0))
        self.link_free[(src, dst)] = at
        self.seq += 1
        self.net.append((at, self.seq, src, dst, msg))

    def broadcast(self, src: str, msg: Message) -> None:
        for m in self.members:
            self.send(src, m, msg)

    def deliver_due(self) -> None:
        due = sorted(x for x in self.net if x[0] <= self.now)
        self.net = [x for x in self.net if x[0] > self.now]
        for _, _, src, dst, msg in due:
            r = self.regions[dst]
            if r.core is not None:  # a crashed region hears nothing
                self.receive(r, src, msg)

    def receive(self, r: Region, src: str, msg: Message) -> None:
        assert r.core is not None
        if isinstance(msg, Beat):
            vector = dict(msg.vector)
            for origin, stamp in vector.items():  # merged, as `Region.apply` does: stamps travel any path
                if origin != r.name:
                    r.holds[origin] = max(r.holds.get(origin, 0), stamp)
            r.core.held(r.holds, self.now)  # as `Leadership._observe` does with the region's vector
            if r.core.heard(src, msg.term, vector.get(r.name, 0), self.now, msg.voted):
                self.adopted(r, f"from {src}'s heartbeat")
        elif isinstance(msg, Prepare) and not self.may_promise(r, msg):
            pass  # declined, as `Consensus.prepare` does: no answer, and the acceptor's state untouched
        elif isinstance(msg, Prepare | Accept):
            state = AcceptorState.decode(r.acceptors.get(msg.key))
            if isinstance(msg, Prepare):
                state, reply = on_prepare(state, msg, r.name)
            else:
                state, reply = on_accept(state, msg, r.name)
                if reply.ok:
                    self.acceptances.setdefault(msg.key, {}).setdefault(msg.ballot, {})[r.name] = msg.value
            r.acceptors[msg.key] = state.encode()  # stored before the reply leaves
            self.send(r.name, msg.ballot[1], reply)
        elif r.election is not None:
            e = r.election
            if isinstance(msg, Promise):
                accept = e.proposer.on_promise(msg)
                if accept is not None:
                    self.broadcast(r.name, accept)
            else:
                decided = e.proposer.on_accepted(msg)
                if decided is not None:
                    r.election = None
                    self.events.append(f"{self.now}: {r.name} learns epoch {e.epoch} is {decided}'s")
                    if r.core.adopt(Term(e.epoch, decided), self.now):
                        self.adopted(r, "by election")
            if e.proposer.phase is Phase.PREEMPTED:
                e.retry_ms = min(e.retry_ms, self.now + STEP_MS * self.rng.randint(1, 3))

    def may_promise(self, r: Region, msg: Prepare) -> bool:
        """`Leadership._may_promise`: whether the acceptor takes part in this election at all."""
        assert r.core is not None
        vote = r.core.may_vote(int(msg.key.removeprefix("epoch:")), msg.ballot[1], self.members, self.now)
        r.stored_voted = r.core.voted  # stored before the answer leaves
        return vote

    def adopted(self, r: Region, how: str) -> None:
        assert r.core is not None
        term = r.core.term
        r.stored_term, r.stored_voted = term.encode(), r.core.voted
        self.events.append(f"{self.now}: {r.name} adopts epoch {term.epoch} of {term.primary} {how}")
        held = self.primaries.setdefault(term.epoch, term.primary)
        assert held == term.primary, f"epoch {term.epoch} has two primaries, {held} and {term.primary}\n{self}"

    # Regions

    def act(self, r: Region) -> None:
        f = r.core
        assert f is not None
        e = r.election
        if e is not None and self.now >= e.deadline_ms:
            r.election = None
            self.events.append(f"{self.now}: {r.name} fails to elect for epoch {e.epoch}")
            f.election_failed(self.now + self.rng.randrange(1000))
        elif e is not None and self.now >= e.retry_ms:
            self.broadcast(r.name, e.proposer.retry())
            r.rounds[e.proposer.key] = e.proposer.ballot[0]
            e.retry_ms = self.now + RETRY_MS
        elif e is None and f.should_elect(self.members, self.now):
            epoch = f.electing()
            key = f"epoch:{epoch}"
            r.rounds[key] = r.rounds.get(key, 0) + 1  # never two proposers for one key under one round
            p = Proposer(key, r.name, r.name, self.members, r.rounds[key])
            r.election = Election(epoch, p, self.now + ELECTION_MS, self.now + RETRY_MS)
            self.events.append(f"{self.now}: {r.name} (in {f.term.primary}'s epoch {f.term.epoch}) elects for {epoch}")
            self.broadcast(r.name, p.prepare())
        if (self.now // STEP_MS + self.members.index(r.name)) % HEARTBEAT_STEPS == 0:
            beat = Beat(f.term, tuple({**r.holds, r.name: self.now}.items()), f.voted)
            for peer in self.members:
                if peer != r.name:
                    self.send(r.name, peer, beat)

    def crash_and_restart(self) -> None:
        for r in self.regions.values():
            if r.name in self.faults.down and r.core is not None:
                r.core, r.election = None, None
                self.events.append(f"{self.now}: {r.name} crashes")
            elif r.name not in self.faults.down and r.core is None:
                r.core = Failover(r.name, Term.decode(r.stored_term), SIM_LEASE_MS, SIM_TIMEOUT_MS, self.now,
                                  voted=r.stored_voted)
                self.events.append(f"{self.now}: {r.name} restarts in epoch {r.core.term.epoch}")

    def step(self) -> None:
        self.now += STEP_MS
        self.deliver_due()
        for r in self.regions.values():
            if r.core is not None:
                self.act(r)

    def run(self, faults: Faults, check_leases: bool = True) -> None:
        self.faults = faults
        self.events.append(f"{self.now}: {faults}")
        self.crash_and_restart()
        for _ in range(faults.steps):
            self.step()
            self.check(check_leases)

    # Invariants

    def writers(self) -> list[str]:
        return [r.name for r in self.regions.values() if r.core is not None and r.core.may_write(self.members,
                                                                                                    self.now)]

    def lease_left(self, f: Failover) -> int:
        """How much longer (ms) a primary holds its lease on what it has heard so far; negative once lapsed
        (how long ago it did), -10 leases if it never did."""
        lo, hi = self.now - 10 * SIM_LEASE_MS, self.now + SIM_LEASE_MS  # may_write(lo..t) holds, (t..hi] not
        if not f.may_write(self.members, lo):
            return -10 * SIM_LEASE_MS
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if f.may_write(self.members, mid) else (lo, mid - 1)
        return lo - self.now

    def closest_overlap(self) -> int:
        """The second-longest lease any primary holds: positive iff two may write now (what Hypothesis aims at)."""
        left = sorted((self.lease_left(r.core) for r in self.regions.values()
                       if r.core is not None and r.core.role is Role.PRIMARY), reverse=True)
        return left[1] if len(left) > 1 else -10**9

    def check(self, check_leases: bool) -> None:
        quorum = len(self.members) // 2 + 1
        for key, by_ballot in self.acceptances.items():
            chosen = {v for by in by_ballot.values() if len(by) >= quorum for v in by.values()}
            assert len(chosen) <= 1, f"Paxos chose {sorted(chosen)} for {key}\n{self}"
            epoch = int(key.split(":")[1])
            if chosen and epoch in self.primaries:
                assert chosen == {self.primaries[epoch]}, f"{key}: {self.primaries[epoch]} is not {chosen}\n{self}"
        for epoch, primary in self.primaries.items():
            if epoch > 1:  # every later primary was decided by Paxos
                assert any(len(by) >= quorum and primary in by.values()
                           for by in self.acceptances.get(f"epoch:{epoch}", {}).values()), f"{epoch}\n{self}"
        self.overlap = max(self.overlap, self.closest_overlap())
        if check_leases:
            writers = self.writers()
            assert len(writers) <= 1, f"{' and '.join(writers)} may all write at {self.now} ms\n{self}"

    def __str__(self) -> str:
        lines = ["regions:"]
        for r in self.regions.values():
            if r.core is None:
                lines.append(f"  {r.name}: down (stored {r.stored_term!r})")
                continue
            heard = ", ".join(f"{p}: epoch {h.term.epoch} of {h.term.primary} holds {h.holds_ms} voted {h.voted}"
                              f" at {h.at_ms}" for p, h in sorted(r.core._heard.items()))
            lines.append(f"  {r.name}: {r.core.role.value} of epoch {r.core.term.epoch} ({r.core.term.primary}),"
                         f" voted {r.core.voted}; heard {heard}")
        return "\n".join(lines + ["events (last 40):"] + [f"  {e}" for e in self.events[-40:]])


@dataclass(frozen=True)
class Scenario:
    members: tuple[str, ...]
    seed: int  # for the loss and delay of each message, and the election backoffs
    schedule: tuple[Faults, ...]


@st.composite
def faults(draw: st.DrawFn, members: tuple[str, ...]) -> Faults:
    directed = [(s, d) for s in members for d in members if s != d]
    both_ways = draw(st.one_of(
        st.just(set()),
        st.sets(st.sampled_from(directed), min_size=1, max_size=2),  # a partial partition: some pairs apart
        st.sets(st.sampled_from(members), min_size=1, max_size=len(members) - 1).map(  # one side from the rest
            lambda side: {(s, d) for s in side for d in members if d not in side}),
    ))
    return Faults(
        steps=draw(st.integers(1, 120)),
        cut=frozenset(draw(st.just(set()) | st.sets(st.sampled_from(directed), max_size=2)) | both_ways
                      | {(d, s) for s, d in both_ways}),
        slow=draw(st.just(frozenset()) | st.frozensets(st.sampled_from(directed), min_size=1, max_size=3)),
        lag=draw(st.integers(1, 10)),
        loss=draw(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.2, 0.5])),
        max_delay=draw(st.integers(1, 4)),
        down=draw(st.sampled_from([frozenset()] * 3 + [frozenset({m}) for m in members])
                  | st.frozensets(st.sampled_from(members), max_size=len(members) // 2 + 1)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    members = ABCDE[: draw(st.sampled_from([3, 5]))]
    return Scenario(members, draw(st.integers(0, 2**32)),
                    tuple(draw(st.lists(faults(members), min_size=1, max_size=6))))


# Schedules that have had a and another region writing at once. c, cut off from the primary a, elects itself
# with b's vote; b follows c at once, but its last report to a, holding a's stamp of a moment ago, keeps a's
# lease alive, and b's next report never reaches a.
A_VOTER_SWITCHES = Scenario(ABC, 0, (
    Faults(steps=36, cut=frozenset({("a", "c"), ("c", "a")})),
    Faults(steps=40, cut=frozenset({("a", "c"), ("c", "a"), ("b", "a")})),
))
# b vouches for a's lease, crashes, restarts having heard from no one, and votes for c at once.
A_VOTER_RESTARTS = Scenario(ABC, 0, (
    Faults(steps=36, cut=frozenset({("a", "c"), ("c", "a")})),
    Faults(steps=1, cut=frozenset({("a", "c"), ("c", "a")}), down=frozenset({"b"})),
    Faults(steps=40, cut=frozenset({("a", "c"), ("c", "a"), ("b", "a")})),
))
# b never hears from a directly, but holds a's recent stamps through c and reports them to a: it votes for d,
# while its last report before the vote, slow to reach a, still counts towards a's lease.
A_VOTER_HEARS_THE_PRIMARY_SECONDHAND = Scenario(ABCDE, 0, (
    Faults(steps=20, cut=frozenset({("a", "d"), ("d", "a")}), down=frozenset({"b", "e"})),
    Faults(steps=60, cut=frozenset({("a", "b"), ("a", "d"), ("d", "a"), ("a", "e"), ("e", "a")}),
           slow=frozenset({("b", "a"), ("c", "a"), ("c", "d")}), lag=10),
))


@settings(max_examples=150, deadline=None)
@example(A_VOTER_SWITCHES)
@example(A_VOTER_RESTARTS)
@example(A_VOTER_HEARS_THE_PRIMARY_SECONDHAND)
@given(scenarios())
def test_one_primary_per_epoch_and_at_most_one_writer_at_any_instant(scenario):
    sim = Sim(scenario.members, scenario.seed)
    try:
        for phase in scenario.schedule:
            sim.run(phase)
        sim.run(Faults(steps=3 * SIM_TIMEOUT_MS // STEP_MS))
    finally:
        target(max(sim.overlap, -10 * SIM_LEASE_MS), label="second-longest lease held by a primary (ms)")


@settings(max_examples=60, deadline=None)
@example(A_VOTER_SWITCHES)
@example(A_VOTER_RESTARTS)
@example(A_VOTER_HEARS_THE_PRIMARY_SECONDHAND)
@given(scenarios())
def test_a_single_writer_emerges_once_the_faults_stop(scenario):
    sim = Sim(scenario.members, scenario.seed)
    for phase in scenario.schedule:
        sim.run(phase, check_leases=False)  # the test above checks the leases
    sim.run(Faults(steps=0))  # everyone restarts; from now on nothing is lost, cut or slow
    stable = 0
    for _ in range(QUIET_MAX_STEPS):
        sim.step()
        sim.check(check_leases=False)
        terms = {r.core.term for r in sim.regions.values() if r.core is not None}
        stable = stable + 1 if len(terms) == 1 and len(sim.writers()) == 1 else 0
        if stable >= STABLE_STEPS:
            break
    assert stable >= STABLE_STEPS, f"no single writer {QUIET_MAX_STEPS} steps after the faults stopped\n{sim}"
    (writer,) = sim.writers()
    assert terms == {Term(max(sim.primaries), writer)}  # the newest epoch's primary, which everyone follows
