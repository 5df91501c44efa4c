"""Deterministic simulation of single-leader failover: every region's `Failover` core, driven over a simulated
network that partitions (both ways and one way), loses and delays messages and crashes regions, with elections run
through the real Paxos.

It mirrors `mlchat.leader.leadership`: one global clock; every heartbeat a region streams to each peer its term,
its latest vote and its version vector, in which its own entry is its clock now (so the peer then holds that stamp)
and the others' entries are the latest stamps it holds of them, merged from every peer as `Region.apply` does. The
receiver's own entry is what its lease check counts. A region that `should_elect` runs Paxos on "epoch:<n>" with
its own name; an acceptor first asks `may_vote` and declines as `Consensus.prepare` does; whoever learns the
decision adopts it. A restarted region rebuilds its core from the term and vote it stored; acceptor states, Paxos
rounds and version vectors survive crashes. Each region's clock is set up to +/-500 ms from the true time, and
its stamps are hybrid (past every stamp it holds), as the leader's are. Invariants: one primary per epoch, each
decided by Paxos, and at most one region allowed to write at any instant; once the faults stop, a single writer
emerges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mlchat.crdt.hlc import Hlc
from mlchat.geo.failover import Advertised, Failover, Role, Term
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

ABC = ("a", "b", "c")
ABCDE = ("a", "b", "c", "d", "e")
T1 = Term(1, "a")
MAX_SKEW_MS = 500  # how far apart regions' clocks are set, at most

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
    skew_ms: int = 0  # how far its clock is set from the true time
    stamp: int = 0  # durable (the clock floor): its latest clock stamp, hybrid: past every stamp it holds
    core: Failover | None = None  # None while down
    advertised: Advertised | None = None  # when its own stamps went out, on its own clock (lost in a crash)
    election: Election | None = None


class Sim:
    def __init__(self, members: tuple[str, ...], seed: int, skews_ms: tuple[int, ...] = ()) -> None:
        self.members = members
        self.rng = random.Random(seed)
        self.now = 0  # the true time; each region reads its own clock, `local`
        self.faults = Faults(steps=0)
        skews = skews_ms or (0,) * len(members)
        self.regions = {m: Region(m, T1.encode(), skew_ms=skew) for m, skew in zip(members, skews, strict=True)}
        for r in self.regions.values():
            r.core = Failover(r.name, T1, SIM_LEASE_MS, SIM_TIMEOUT_MS, self.local(r))
            r.advertised = Advertised(keep_ms=4 * SIM_LEASE_MS)
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
            r.stamp = max(r.stamp, *vector.values())  # the hybrid clock absorbs every stamp it sees
            r.core.held(r.holds, self.local(r))  # as `Leadership._observe` does with the region's vector
            assert r.advertised is not None
            holds = vector.get(r.name)
            since = r.advertised.sent_after(Hlc(holds).encode()) if holds else 0
            if r.core.heard(src, msg.term, since, self.local(r), msg.voted):
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
                    if r.core.adopt(Term(e.epoch, decided), self.local(r)):
                        self.adopted(r, "by election")
            if e.proposer.phase is Phase.PREEMPTED:
                e.retry_ms = min(e.retry_ms, self.local(r) + STEP_MS * self.rng.randint(1, 3))

    def may_promise(self, r: Region, msg: Prepare) -> bool:
        """`Leadership._may_promise`: whether the acceptor takes part in this election at all."""
        assert r.core is not None
        vote = r.core.may_vote(int(msg.key.removeprefix("epoch:")), msg.ballot[1], self.members, self.local(r))
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
        if e is not None and self.local(r) >= e.deadline_ms:
            r.election = None
            self.events.append(f"{self.now}: {r.name} fails to elect for epoch {e.epoch}")
            f.election_failed(self.local(r) + self.rng.randrange(1000))
        elif e is not None and self.local(r) >= e.retry_ms:
            self.broadcast(r.name, e.proposer.retry())
            r.rounds[e.proposer.key] = e.proposer.ballot[0]
            e.retry_ms = self.local(r) + RETRY_MS
        elif e is None and f.should_elect(self.members, self.local(r)):
            epoch = f.electing()
            key = f"epoch:{epoch}"
            r.rounds[key] = r.rounds.get(key, 0) + 1  # never two proposers for one key under one round
            p = Proposer(key, r.name, r.name, self.members, r.rounds[key])
            r.election = Election(epoch, p, self.local(r) + ELECTION_MS, self.local(r) + RETRY_MS)
            self.events.append(f"{self.now}: {r.name} (in {f.term.primary}'s epoch {f.term.epoch}) elects for {epoch}")
            self.broadcast(r.name, p.prepare())
        if (self.now // STEP_MS + self.members.index(r.name)) % HEARTBEAT_STEPS == 0:
            assert r.advertised is not None
            r.advertised.mark(Hlc(r.stamp).encode(), self.local(r))  # `Leadership._observe`, before it moves on
            r.stamp = max(r.stamp, self.local(r))
            beat = Beat(f.term, tuple({**r.holds, r.name: r.stamp}.items()), f.voted)
            for peer in self.members:
                if peer != r.name:
                    self.send(r.name, peer, beat)

    def crash_and_restart(self) -> None:
        for r in self.regions.values():
            if r.name in self.faults.down and r.core is not None:
                r.core, r.election = None, None
                self.events.append(f"{self.now}: {r.name} crashes")
            elif r.name not in self.faults.down and r.core is None:
                r.advertised = Advertised(keep_ms=4 * SIM_LEASE_MS)
                r.core = Failover(r.name, Term.decode(r.stored_term), SIM_LEASE_MS, SIM_TIMEOUT_MS, self.local(r),
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
        return [r.name for r in self.regions.values()
                if r.core is not None and r.core.may_write(self.members, self.local(r))]

    def local(self, r: Region) -> int:
        """The time on the region's own clock."""
        return self.now + r.skew_ms

    def lease_left(self, r: Region) -> int:
        """How much longer (ms) a primary holds its lease on what it has heard so far; negative once lapsed
        (how long ago it did), -10 leases if it never did."""
        f, now = r.core, self.local(r)
        assert f is not None
        lo, hi = now - 10 * SIM_LEASE_MS, now + SIM_LEASE_MS  # may_write(lo..t) holds, (t..hi] not
        if not f.may_write(self.members, lo):
            return -10 * SIM_LEASE_MS
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if f.may_write(self.members, mid) else (lo, mid - 1)
        return lo - now

    def closest_overlap(self) -> int:
        """The second-longest lease any primary holds: positive iff two may write now (what Hypothesis aims at)."""
        left = sorted((self.lease_left(r) for r in self.regions.values()
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


    def settle(self) -> None:
        """With nothing lost, cut or slow and every region up: a single writer must emerge, follow the newest epoch,
        and hold for a while."""
        self.run(Faults(steps=0))  # everyone restarts
        stable = 0
        for _ in range(QUIET_MAX_STEPS):
            self.step()
            self.check(check_leases=False)
            terms = {r.core.term for r in self.regions.values() if r.core is not None}
            stable = stable + 1 if len(terms) == 1 and len(self.writers()) == 1 else 0
            if stable >= STABLE_STEPS:
                break
        assert stable >= STABLE_STEPS, f"no single writer {QUIET_MAX_STEPS} steps after the faults stopped\n{self}"
        (writer,) = self.writers()
        assert terms == {Term(max(self.primaries), writer)}, f"{writer} is not the newest epoch's primary\n{self}"


def random_faults(rng: random.Random, members: tuple[str, ...], max_steps: int) -> Faults:
    """One phase of faults, drawn as the property tests draw them."""
    directed = [(s, d) for s in members for d in members if s != d]
    shape = rng.randrange(3)
    if shape == 0:
        both_ways: set[tuple[str, str]] = set()
    elif shape == 1:  # a partial partition: some pairs apart
        both_ways = set(rng.sample(directed, rng.randint(1, 2)))
    else:  # one side from the rest
        side = set(rng.sample(members, rng.randint(1, len(members) - 1)))
        both_ways = {(s, d) for s in side for d in members if d not in side}
    one_way = set(rng.sample(directed, rng.randint(0, 2)))
    down = rng.choice([frozenset()] * 3 + [frozenset({m}) for m in members]
                      + [frozenset(rng.sample(members, rng.randint(0, len(members) // 2 + 1)))])
    return Faults(
        steps=rng.randint(1, max(1, min(120, max_steps))),
        cut=frozenset(both_ways | one_way | {(d, s) for s, d in both_ways}),
        slow=frozenset(rng.sample(directed, rng.randint(0, 3))),
        lag=rng.randint(1, 10),
        loss=rng.choice([0.0, 0.0, 0.0, 0.05, 0.2, 0.5]),
        max_delay=rng.randint(1, 4),
        down=down,
    )


def run_seed(seed: int, steps: int, max_skew_ms: int = MAX_SKEW_MS) -> Sim:
    """A whole faulty run from one seed: `steps` steps of random fault phases, then the faults stop."""
    rng = random.Random(seed)
    members = ABCDE[: rng.choice([3, 5])]
    sim = Sim(members, rng.getrandbits(32), tuple(rng.randint(-max_skew_ms, max_skew_ms) for _ in members))
    while steps > 0:
        phase = random_faults(rng, members, steps)
        sim.run(phase)
        steps -= phase.steps
    sim.run(Faults(steps=3 * SIM_TIMEOUT_MS // STEP_MS))
    sim.settle()
    return sim
