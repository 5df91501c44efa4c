"""Single-leader failover core: terms, leases, election timeouts and the role table, then every region's core
driven over a simulated network that partitions (both ways and one way), loses and delays messages and crashes
regions, with elections run through the real Paxos.

The simulation mirrors `mlchat.leader.leadership`: one global clock moving a heartbeat interval per step; a
heartbeat from A to B carries A's term, A's clock stamp (B's version vector then holds it) and the latest of B's
stamps that A holds, which is what B's lease check counts. A follower that `should_elect` runs Paxos on
"epoch:<n>" with its own name; whoever learns the decision adopts it. A restarted region rebuilds its core from
the term it stored; acceptor states, Paxos rounds and version vectors survive crashes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
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
    assert not b.should_elect(1000 + TIMEOUT_MS)
    assert b.should_elect(1001 + TIMEOUT_MS)
    b.heard("a", T1, 0, 2500)
    assert not b.should_elect(2500 + TIMEOUT_MS) and b.should_elect(2501 + TIMEOUT_MS)
    b.heard("c", T1, 0, 4000)  # another follower is no news of the primary
    assert b.should_elect(2501 + TIMEOUT_MS)
    assert not core("a").should_elect(10**9)  # the primary never elects


def test_a_higher_term_from_a_heartbeat_demotes_the_primary_and_promotes_the_named_region():
    a, c = core("a"), core("c")
    assert a.heard("b", Term(2, "c"), 0, 100)
    assert a.role is Role.FOLLOWER and a.term == Term(2, "c")
    assert not a.may_write(ABC, 100)
    assert c.heard("b", Term(2, "c"), 0, 100)
    assert c.role is Role.PRIMARY and c.term == Term(2, "c")
    assert not c.should_elect(10**9)
    # The adopted term's silence counts from when it was adopted.
    assert not a.should_elect(100 + TIMEOUT_MS) and a.should_elect(101 + TIMEOUT_MS)


def test_lower_and_equal_terms_are_ignored():
    a = core("a", Term(3, "a"))
    for term in (Term(2, "b"), Term(3, "b"), Term(3, "a"), Term(1, "z")):
        assert not a.heard("b", term, 0, 100)
        assert not a.adopt(term, 100)
        assert a.role is Role.PRIMARY and a.term == Term(3, "a")
    b = core("b", Term(3, "a"), now_ms=0)
    assert not b.adopt(Term(3, "b"), 5000)  # an equal epoch names no new primary
    assert b.role is Role.FOLLOWER and b.should_elect(5000)  # nor restarts the timeout


def test_illegal_transitions_raise():
    a = core("a")
    with pytest.raises(RuntimeError):
        a.electing()  # the primary does not elect
    assert a.role is Role.PRIMARY
    b = core("b")
    assert b.electing() == 2
    with pytest.raises(RuntimeError):
        b.electing()  # one election at a time
    assert b.role is Role.CANDIDATE
    with pytest.raises(RuntimeError):
        b._to(Role.CANDIDATE)


def test_election_outcomes():
    b = core("b")
    assert b.electing() == 2 and b.role is Role.CANDIDATE
    assert not b.should_elect(10**9)  # a candidate is already electing
    b.election_failed(3000)
    assert b.role is Role.FOLLOWER
    assert not b.should_elect(3000 + TIMEOUT_MS) and b.should_elect(3001 + TIMEOUT_MS)
    b.election_failed(9000)  # not a candidate: nothing to undo, no timer moved
    assert b.role is Role.FOLLOWER and b.should_elect(3001 + TIMEOUT_MS)
    b.electing()
    assert b.adopt(Term(2, "b"), 4000) and b.role is Role.PRIMARY  # won
    c = core("c")
    c.electing()
    assert c.adopt(Term(2, "b"), 4000) and c.role is Role.FOLLOWER  # lost to b
    d = core("d")
    d.electing()
    assert d.heard("b", Term(2, "b"), 0, 4000) and d.role is Role.FOLLOWER  # told by a heartbeat mid-election


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

STEP_MS = 100  # the heartbeat interval, and the clock's step
ELECTION_MS = 2000  # an election gives up (election_failed) after this long undecided
RETRY_MS = 1000  # a proposer's timer: Prepare again under a higher round
QUIET_MAX_STEPS = 600  # reliable steps allowed for a single writer to emerge
STABLE_STEPS = 2 * LEASE_MS // STEP_MS  # and for how long it must then hold


@dataclass(frozen=True, slots=True)
class Beat:
    term: Term  # the sender's
    sent_ms: int  # the sender's clock stamp, which the receiver then holds
    holds_ms: int  # the latest of the receiver's stamps the sender holds (from the receiver's earlier beats)


Message = Beat | Prepare | Accept | Promise | Accepted


@dataclass(frozen=True, slots=True)
class Faults:
    """What the network and the regions do for `steps` heartbeat intervals."""

    steps: int
    cut: frozenset[tuple[str, str]] = frozenset()  # (from, to) links that lose everything
    loss: float = 0.0  # chance that any other message is lost
    max_delay: int = 1  # a message takes 1..max_delay steps, FIFO per link
    down: frozenset[str] = frozenset()  # crashed regions (they restart when a later phase leaves them out)

    def __str__(self) -> str:
        cut = " ".join(f"{s}>{d}" for s, d in sorted(self.cut)) or "-"
        return (f"{self.steps} steps: cut {cut}, loss {self.loss}, delay 1..{self.max_delay}, "
                f"down {''.join(sorted(self.down)) or '-'}")


RELIABLE = Faults(steps=QUIET_MAX_STEPS)


@dataclass
class Election:
    epoch: int
    proposer: Proposer
    deadline_ms: int
    retry_ms: int


@dataclass
class Region:
    name: str
    stored_term: str  # durable, like `Store.save_term`
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
            r.core = Failover(r.name, T1, LEASE_MS, TIMEOUT_MS, self.now)
        self.net: list[tuple[int, int, str, str, Message]] = []  # (deliver at, seq, from, to, message)
        self.seq = 0
        self.link_free: dict[tuple[str, str], int] = {}  # FIFO: nothing overtakes on one link
        self.primaries: dict[int, str] = {1: "a"}  # every term any region ever held, epoch -> primary
        self.acceptances: dict[str, dict[Ballot, dict[str, str]]] = {}  # key -> ballot -> acceptor -> value
        self.events: list[str] = []

    # Network

    def send(self, src: str, dst: str, msg: Message) -> None:
        if src != dst and ((src, dst) in self.faults.cut or self.rng.random() < self.faults.loss):
            return
        at = max(self.now + STEP_MS * self.rng.randint(1, self.faults.max_delay), self.link_free.get((src, dst), 0))
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
            r.holds[src] = max(r.holds.get(src, 0), msg.sent_ms)
            if r.core.heard(src, msg.term, msg.holds_ms, self.now):
                self.adopted(r, f"from {src}'s heartbeat")
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

    def adopted(self, r: Region, how: str) -> None:
        assert r.core is not None
        term = r.core.term
        r.stored_term = term.encode()
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
        elif e is None and f.should_elect(self.now):
            epoch = f.electing()
            key = f"epoch:{epoch}"
            r.rounds[key] = r.rounds.get(key, 0) + 1  # never two proposers for one key under one round
            p = Proposer(key, r.name, r.name, self.members, r.rounds[key])
            r.election = Election(epoch, p, self.now + ELECTION_MS, self.now + RETRY_MS)
            self.events.append(f"{self.now}: {r.name} (following {f.term.primary}) elects for epoch {epoch}")
            self.broadcast(r.name, p.prepare())
        for peer in self.members:
            if peer != r.name:
                self.send(r.name, peer, Beat(f.term, self.now, r.holds.get(peer, 0)))

    def crash_and_restart(self) -> None:
        for r in self.regions.values():
            if r.name in self.faults.down and r.core is not None:
                r.core, r.election = None, None
                self.events.append(f"{self.now}: {r.name} crashes")
            elif r.name not in self.faults.down and r.core is None:
                r.core = Failover(r.name, Term.decode(r.stored_term), LEASE_MS, TIMEOUT_MS, self.now)
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
        if check_leases:
            writers = self.writers()
            assert len(writers) <= 1, f"{' and '.join(writers)} may all write at {self.now} ms\n{self}"

    def __str__(self) -> str:
        lines = ["regions:"]
        for r in self.regions.values():
            if r.core is None:
                lines.append(f"  {r.name}: down (stored {r.stored_term!r})")
                continue
            heard = ", ".join(f"{p}: epoch {h.term.epoch} of {h.term.primary} holds {h.holds_ms} at {h.at_ms}"
                              for p, h in sorted(r.core._heard.items()))
            lines.append(f"  {r.name}: {r.core.role.value} of epoch {r.core.term.epoch} ({r.core.term.primary});"
                         f" heard {heard}")
        return "\n".join(lines + ["events (last 40):"] + [f"  {e}" for e in self.events[-40:]])


links = {n: [(s, d) for s in ABCDE[:n] for d in ABCDE[:n] if s != d] for n in (3, 5)}


@st.composite
def faults(draw: st.DrawFn, members: tuple[str, ...]) -> Faults:
    side = draw(st.sets(st.sampled_from(members), max_size=len(members) - 1), label="partitioned side")
    both_ways = {(s, d) for s in members for d in members if (s in side) != (d in side)}
    one_way = draw(st.sets(st.sampled_from(links[len(members)]), max_size=3), label="one-way cuts")
    return Faults(
        steps=draw(st.integers(1, 40)),
        cut=frozenset(both_ways | one_way),
        loss=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])),
        max_delay=draw(st.integers(1, 4)),
        down=frozenset(draw(st.sets(st.sampled_from(members), max_size=len(members) // 2 + 1))),
    )


def start(data: st.DataObject) -> tuple[Sim, list[Faults]]:
    members = ABCDE[: data.draw(st.sampled_from([3, 5]), label="regions")]
    sim = Sim(members, data.draw(st.integers(0, 2**32), label="seed"))
    schedule = data.draw(st.lists(faults(members), min_size=1, max_size=6), label="schedule")
    return sim, schedule


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_one_primary_per_epoch_and_at_most_one_writer_at_any_instant(data):
    sim, schedule = start(data)
    for phase in schedule:
        sim.run(phase)
    sim.run(Faults(steps=3 * TIMEOUT_MS // STEP_MS))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_single_writer_emerges_once_the_faults_stop(data):
    sim, schedule = start(data)
    for phase in schedule:
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
