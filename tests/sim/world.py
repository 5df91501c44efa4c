"""Deterministic simulation of mlchat's replication, membership and name consensus: every region in one process,
over a simulated network, store and clock, all driven by one seed.

How it maps onto the leader:
- A region is its cores: `Replica` (the CRDT state, with the `RegionClock` vector rules that the leader's
  `Region` uses too), `Membership`, and in strong-names mode a Paxos proposer and acceptor per username. Its store
  (`Disk`) is what the leader keeps in Redis: every change, stored in the step it is made (the leader stores a
  change before it acknowledges or relays it); the clock floor, raised by every write and every status or claim
  stored (as the store's scripts do) and at heartbeats; the vector of others, saved at heartbeats; members;
  acceptor states and Paxos rounds. A crash loses the rest: the cores in memory, streams, proposals in flight.
- Streams are the leader's `Replicate`: a region opens a stream from each member with its own state and its
  cursor of the member's outbox, and the member answers from its outbox after the cursor (if the outbox, trimmed
  to a few entries in some runs, still reaches back that far) or with `delta_for(state)`, then every change on
  its feed (its writes, what it applied that was new, heartbeats with its vector, members and outbox cursor) as
  its `RelayQueue` for that stream lets it through. The outbox is every change stored, each under the next
  stamp; a region stores its cursors of its peers' outboxes at heartbeats, as the leader does. The
  network loses, duplicates, delays and reorders datagrams; the stream layer (TCP's part) numbers a stream's
  messages and delivers them in order or not at all: a gap, or a silence longer than the peer timeout, ends
  the stream and the receiver opens another. Join and the Paxos
  messages are datagrams (unary calls) and face loss, duplication and reordering as they are.
- Each region's wall clock is off by its own skew, up to +/-500 ms.
- Users post (retrying posts whose answer was lost, with the same client_msg_id, in any region), read with
  their causal token, set their status, claim usernames, and create private channels and change their
  members; what each region answered them is recorded.

Invariants, checked at every step and at quiescence (faults healed, every region up, traffic stopped):
no acknowledged message lost; one message per client_msg_id; a status write made after seeing another has the
larger stamp; a read with a causal token sees the user's own writes; no two users ever told a name is theirs
for good (CONFIRMED in async mode, granted by consensus in strong-names mode), and that user owns it in the end;
every region ends with the same digest and the same members.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mlchat.crdt import vector
from mlchat.crdt.claims import Claim, ClaimState, owner
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import StatusValue
from mlchat.crdt.msglog import message_id
from mlchat.crdt.replica import Delta, Relayed, Replica, ReplicaState, carries_changes, combine
from mlchat.geo import paxos
from mlchat.geo.membership import Membership, PeerState, peer_state
from mlchat.geo.relay import RelayQueue

STEP_MS = 10
HEARTBEAT_STEPS = 10
TIMEOUT_STEPS = 30  # the peer timeout: a stream silent this long is ended
RELAY_DELAY_MS = 2 * HEARTBEAT_STEPS * STEP_MS  # as `LeaderSettings.relay_delay_ms`
CLAIM_TIMEOUT_STEPS = 100  # a name proposal that has not decided by then answers UNAVAILABLE
START_MS = 1_700_000_000_000
MAX_SKEW_MS = 500
BUCKET_MS = 1_000  # small time buckets: messages spread over many shards
QUIET_MAX_STEPS = 1_500
USERS = ("alice", "bob", "carol", "dave")
CHANNELS = ("general", "random")
NAMES = ("ann", "ben", "cat")
PRIVATE = ("team", "board")
MODES = ("async", "strong-names")


class InvariantBroken(AssertionError):
    pass


# Messages ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:  # receiver -> sender: open a stream, saying what the receiver holds
    session: int
    receiver: str
    state: ReplicaState
    cursor: str  # of the sender's outbox, as the receiver holds it ("": none)


@dataclass(frozen=True)
class Part:  # sender -> receiver: the seq-th message of a stream
    session: int
    seq: int
    delta: Delta


@dataclass(frozen=True)
class Join:  # newcomer -> any member
    region: str


@dataclass(frozen=True)
class Welcome:  # member -> newcomer: every member it knows, itself included
    members: tuple[str, ...]


Message = Hello | Part | Join | Welcome | paxos.Prepare | paxos.Accept | paxos.Promise | paxos.Accepted


# Regions -----------------------------------------------------------------------------------------------------


@dataclass
class Disk:
    """What a region keeps in Redis: it survives crashes."""

    changes: list[Delta] = field(default_factory=list)  # every change stored, without vectors
    outbox: list[tuple[str, Delta]] = field(default_factory=list)  # (stamp, change with where it came from)
    stamps: int = 0  # outbox stamps issued: the next is Hlc(stamps + 1, 0)
    trimmed: str = ""  # the highest stamp trimmed from the outbox
    cursors: dict[str, str] = field(default_factory=dict)  # peer -> cursor of its outbox, stored at heartbeats
    floor: str = ""
    remote: dict[str, str] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)
    departed: set[str] = field(default_factory=set)
    listed_by: set[str] = field(default_factory=set)
    acceptors: dict[str, str] = field(default_factory=dict)  # key -> AcceptorState.encode()
    rounds: dict[str, int] = field(default_factory=dict)  # key -> the last Paxos round used here


@dataclass
class Inbound:
    session: int
    expected: int = 0
    heard_at: int = 0  # step
    vector: dict[str, str] = field(default_factory=dict)  # what the peer's stream says this region holds
    holds: dict[str, str] = field(default_factory=dict)  # what the peer holds itself, as its last heartbeat said


@dataclass
class Outbound:
    session: int
    relays: RelayQueue
    seq: int = 0


@dataclass
class Proposal:
    """A username claim being decided by consensus, for the user who asked."""

    user: str
    proposer: paxos.Proposer
    deadline: int
    retry_at: int


@dataclass
class Node:
    name: str
    skew_ms: int
    disk: Disk
    replica: Replica | None = None
    membership: Membership | None = None
    inbound: dict[str, Inbound] = field(default_factory=dict)
    outbound: dict[str, Outbound] = field(default_factory=dict)
    cursors: dict[str, str] = field(default_factory=dict)  # peer -> cursor of its outbox held (in memory)
    proposals: dict[str, Proposal] = field(default_factory=dict)
    join_via: str = ""  # a newcomer not yet welcomed: the member it asks

    @property
    def up(self) -> bool:
        return self.replica is not None

    def core(self) -> tuple[Replica, Membership]:
        assert self.replica is not None and self.membership is not None, f"{self.name} is down"
        return self.replica, self.membership


# Clients -----------------------------------------------------------------------------------------------------


@dataclass
class User:
    name: str
    token: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    pending: dict[str, tuple[str, str]] = field(default_factory=dict)  # client_msg_id -> (channel, body)
    acked: set[str] = field(default_factory=set)  # message ids
    claims: list[Claim] = field(default_factory=list)  # async mode: the claims regions took for this user


@dataclass
class Faults:
    cut: set[tuple[str, str]] = field(default_factory=set)  # (from, to) links that carry nothing
    loss: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 3  # steps; datagrams overtake each other freely

    def __str__(self) -> str:
        cut = " ".join(f"{s}>{d}" for s, d in sorted(self.cut)) or "-"
        return f"cut {cut}, loss {self.loss}, duplicate {self.duplicate}, delay 1..{self.max_delay} steps"


class World:
    def __init__(self, seed: int, steps: int) -> None:
        self.seed, self.steps = seed, steps
        self.rng = random.Random(seed)
        self.mode = self.rng.choice(MODES)
        count = self.rng.choice([3, 3, 4, 5])
        self.founders = tuple(f"r{i}" for i in range(count))
        self.joiner = f"r{count}" if self.rng.random() < 0.5 else ""  # joins at runtime
        self.join_step = self.rng.randrange(steps // 4, steps) if self.joiner else -1
        self.step_no = 0
        self.faults = Faults()
        self.nodes: dict[str, Node] = {}
        for name in self.founders:
            disk = Disk(members=set(self.founders) - {name}, listed_by=set(self.founders) - {name})
            self.nodes[name] = Node(name, self.rng.randint(-MAX_SKEW_MS, MAX_SKEW_MS), disk)
            self.start(self.nodes[name])
        self.net: list[tuple[int, int, str, str, Message]] = []  # (due step, seq, from, to, message)
        self.sent = 0
        self.sessions = 0
        self.restart_at: dict[str, int] = {}
        self.outbox_keep = self.rng.choice([2, 10, 10**6])  # entries each outbox keeps: some runs trim hard
        self.catch_ups = {"outbox": 0, "states": 0}
        self.users = {u: User(u) for u in USERS}
        self.acked: dict[str, tuple[str, str, str, str]] = {}  # message id -> (user, channel, client_msg_id, body)
        self.statuses: list[StatusValue] = []  # every status write a region acknowledged
        self.confirmed: dict[str, set[str]] = {}  # name -> users told it is theirs for good
        self.events: list[str] = []

    # Time --------------------------------------------------------------------------------------------------

    def now_ms(self, node: Node) -> int:
        return START_MS + self.step_no * STEP_MS + node.skew_ms

    def log(self, text: str) -> None:
        self.events.append(f"{self.step_no}: {text}")

    # Regions start, crash and store --------------------------------------------------------------------------

    def start(self, node: Node) -> None:
        """Start a region from its disk, as `Region.start` does: the clock at the stored floor, the stored vector
        of others, a fresh pycrdt client id, every stored change loaded."""
        disk = node.disk
        node.membership = Membership(node.name, {m: m for m in sorted(disk.members)}, sorted(disk.departed),
                                     sorted(disk.listed_by))
        node.replica = Replica(node.name, self.rng.getrandbits(32) or 1, frozenset(node.membership.members),
                               BUCKET_MS, disk.floor, disk.remote)
        for change in disk.changes:
            node.replica.apply(change, self.now_ms(node))
        node.replica.take_feed()  # stored already: nothing new for peers
        node.inbound, node.outbound, node.proposals = {}, {}, {}
        node.cursors = dict(disk.cursors)

    def crash(self, node: Node) -> None:
        node.replica = node.membership = None
        node.inbound, node.outbound, node.proposals = {}, {}, {}
        self.log(f"{node.name} crashes")

    def store_and_ship(self, node: Node) -> None:
        """Store every change on the region's feed (raising the floor as the store's scripts do), then send it
        on every stream the region serves."""
        replica, _ = node.core()
        disk = node.disk
        feed = []
        for delta in replica.take_feed():
            data = replace(delta, vector={}, members={}, departed=())
            if carries_changes(data):
                disk.changes.append(data)
                disk.stamps += 1
                stamp = Hlc(disk.stamps, 0).encode()
                relayed = replace(delta.relayed, stamp=stamp) if delta.relayed else Relayed("", None, {}, stamp)
                disk.outbox.append((stamp, replace(data, relayed=relayed)))
                delta = replace(delta, relayed=delta.relayed and relayed)
            feed.append(replace(delta, cursor=outbox_cursor(disk)))
            disk.floor = max([disk.floor, replica.clocks.floor, *(v.hlc for v in delta.statuses),
                              *(c.hlc for c in (*delta.claims, *delta.channels)),
                              *(m.hlc for m in delta.memberships)])
        for peer, out in node.outbound.items():
            inbound = node.inbound.get(peer)
            held = vector.merge(inbound.vector, inbound.holds) if inbound else {}  # `Replicator.peer_vector`
            for delta in out.relays.told(out.relays.next(feed, held, self.now_ms(node))):
                self.send(node.name, peer, Part(out.session, out.seq, delta))
                out.seq += 1

    def catch_up(self, node: Node, hello: Hello) -> list[Delta]:
        """`Replicate`'s catch-up: from the outbox after the receiver's cursor (`Region.delta_since`) if the outbox
        still reaches back that far, else `delta_for`; the last part carries the vector and cursor."""
        replica, _ = node.core()
        cursor = hello.cursor
        if not cursor or cursor < node.disk.trimmed or cursor > outbox_cursor(node.disk):
            self.catch_ups["states"] += 1
            return [replace(replica.delta_for(hello.state), cursor=outbox_cursor(node.disk))]
        self.catch_ups["outbox"] += 1
        lacking = [change for stamp, change in node.disk.outbox if stamp > cursor
                   and change.relayed.source != hello.receiver  # type: ignore[union-attr]
                   and not (change.relayed.origins and vector.covers(hello.state.vector, change.relayed.origins))]  # type: ignore[union-attr]
        return [*combine(lacking), Delta(vector=replica.vector, cursor=outbox_cursor(node.disk))]

    def heartbeat(self, node: Node) -> None:
        """`Region.heartbeat`: store the idle tick as the floor (and the vector of others) first, then tell it."""
        replica, membership = node.core()
        floor = replica.clocks.floor_target(self.now_ms(node))
        node.disk.floor, node.disk.remote = max(node.disk.floor, floor), dict(replica.clocks.remote)
        replica.clocks.floor_saved(floor)
        node.disk.cursors = dict(node.cursors)
        if len(node.disk.outbox) > self.outbox_keep:
            node.disk.trimmed = node.disk.outbox[-self.outbox_keep - 1][0]
            del node.disk.outbox[:-self.outbox_keep]
        replica.feed.append(Delta(vector=replica.vector, members={**membership.members, node.name: node.name},
                                  departed=tuple(sorted(membership.departed)), holds=replica.vector))
        self.store_and_ship(node)

    def admit(self, node: Node, region: str) -> None:
        replica, membership = node.core()
        if membership.admit(region, region):
            node.disk.members.add(region)
            replica.regions = frozenset({node.name, *membership.members})
            self.log(f"{node.name} admits {region}")

    # Network -----------------------------------------------------------------------------------------------

    def send(self, src: str, dst: str, msg: Message) -> None:
        copies = 1 + (self.rng.random() < self.faults.duplicate)
        for _ in range(copies):
            if src != dst and ((src, dst) in self.faults.cut or self.rng.random() < self.faults.loss):
                continue
            self.sent += 1
            due = self.step_no + (0 if src == dst else self.rng.randint(1, self.faults.max_delay))
            self.net.append((due, self.sent, src, dst, msg))

    def deliver_due(self) -> None:
        due = sorted(x for x in self.net if x[0] <= self.step_no)
        self.net = [x for x in self.net if x[0] > self.step_no]
        for _, _, src, dst, msg in due:
            node = self.nodes.get(dst)
            if node is not None and node.up:
                self.receive(node, src, msg)

    def receive(self, node: Node, src: str, msg: Message) -> None:
        replica, membership = node.core()
        if isinstance(msg, Hello):
            current = node.outbound.get(msg.receiver)
            if current is not None and current.session >= msg.session:
                return  # a duplicate, or an older stream's: it opens nothing
            # A newer stream from that peer replaces the old.
            out = node.outbound[msg.receiver] = Outbound(msg.session, RelayQueue(msg.receiver, RELAY_DELAY_MS, 10_000))
            for part in self.catch_up(node, msg):
                self.send(node.name, msg.receiver, Part(msg.session, out.seq, part))
                out.seq += 1
        elif isinstance(msg, Part):
            inbound = node.inbound.get(src)
            if inbound is None or inbound.session != msg.session or msg.seq < inbound.expected:
                return  # an old stream's, or a duplicate
            if msg.seq > inbound.expected:  # a gap: the stream broke
                del node.inbound[src]
                return
            inbound.expected += 1
            inbound.heard_at = self.step_no
            inbound.vector = vector.merge(inbound.vector, msg.delta.vector)
            if msg.delta.members:  # a heartbeat
                inbound.holds = dict(msg.delta.holds)
            replica.apply(msg.delta, self.now_ms(node), src)
            self.store_and_ship(node)
            if msg.delta.cursor:  # applied: this region holds the peer's outbox that far
                node.cursors[src] = max(node.cursors.get(src, ""), msg.delta.cursor)
            left, joined = membership.news(msg.delta.members, msg.delta.departed)
            for region in joined:
                self.admit(node, region)
            if membership.listed(src, msg.delta.members):  # `Region.listed`
                floor = replica.clocks.clock.encode()
                node.disk.floor = max(node.disk.floor, floor)
                replica.clocks.floor_saved(floor)
                node.disk.listed_by.add(src)
        elif isinstance(msg, Join):
            self.admit(node, msg.region)
            self.send(node.name, src, Welcome((node.name, *membership.members)))
        elif isinstance(msg, Welcome):
            if node.join_via:
                node.join_via = ""
                for region in msg.members:
                    self.admit(node, region)
        elif isinstance(msg, paxos.Prepare | paxos.Accept):
            state = paxos.AcceptorState.decode(node.disk.acceptors.get(msg.key))
            if isinstance(msg, paxos.Prepare):
                state, reply = paxos.on_prepare(state, msg, node.name)
            else:
                state, reply = paxos.on_accept(state, msg, node.name)
            node.disk.acceptors[msg.key] = state.encode()  # stored before the reply leaves
            self.send(node.name, msg.ballot[1], reply)
        else:
            self.proposal_reply(node, msg)

    # Regions act -------------------------------------------------------------------------------------------

    def act(self, node: Node) -> None:
        replica, membership = node.core()
        if node.join_via and self.step_no % TIMEOUT_STEPS == 0:  # not welcomed yet: ask again
            self.send(node.name, node.join_via, Join(node.name))
        for peer in membership.members:
            inbound = node.inbound.get(peer)
            silent = (self.step_no - inbound.heard_at) * STEP_MS if inbound else 10**9
            if peer_state(inbound is not None, silent / 1000, TIMEOUT_STEPS * STEP_MS / 1000) is not PeerState.UP:
                self.sessions += 1
                node.inbound[peer] = Inbound(self.sessions, heard_at=self.step_no)
                self.send(node.name, peer, Hello(self.sessions, node.name, replica.state(), node.cursors.get(peer, "")))
        if (self.step_no + int(node.name[1:])) % HEARTBEAT_STEPS == 0:
            self.heartbeat(node)
        for name, p in list(node.proposals.items()):
            if self.step_no >= p.deadline:
                del node.proposals[name]
                self.log(f"{node.name}: claim of {name} for {p.user} times out (UNAVAILABLE)")
            elif self.step_no >= p.retry_at:
                self.broadcast(node, p.proposer.retry())
                node.disk.rounds[p.proposer.key] = p.proposer.ballot[0]
                p.retry_at = self.step_no + self.rng.randint(5, 20)

    def broadcast(self, node: Node, msg: paxos.Prepare | paxos.Accept) -> None:
        for member in msg_members(node):
            self.send(node.name, member, msg)

    # Names by consensus ------------------------------------------------------------------------------------

    def propose_name(self, node: Node, name: str, user: str) -> None:
        """`Region.claim` with `decide`: a name held here is decided already; else Paxos on name:<u>."""
        replica, _ = node.core()
        known = owner(replica.claims_on(name))
        if known is not None:
            self.granted(name, user, known.user_id == user, node)
            return
        if name in node.proposals:
            return  # one proposal per name at a time here (the leader queues the second behind a lock)
        key = f"name:{name}"
        node.disk.rounds[key] = node.disk.rounds.get(key, 0) + 1
        proposer = paxos.Proposer(key, user, node.name, msg_members(node), node.disk.rounds[key])
        node.proposals[name] = Proposal(user, proposer, self.step_no + CLAIM_TIMEOUT_STEPS,
                                        self.step_no + self.rng.randint(10, 30))
        self.broadcast(node, proposer.prepare())

    def proposal_reply(self, node: Node, msg: paxos.Promise | paxos.Accepted) -> None:
        name = msg.key.removeprefix("name:")
        p = node.proposals.get(name)
        if p is None:
            return
        if isinstance(msg, paxos.Promise):
            accept = p.proposer.on_promise(msg)
            if accept is not None:
                self.broadcast(node, accept)
            return
        decided = p.proposer.on_accepted(msg)
        if decided is not None:
            del node.proposals[name]
            replica, _ = node.core()
            if owner(replica.claims_on(name)) is None:
                replica.claim(name, decided, self.now_ms(node))  # `Region._record_claim`
                self.store_and_ship(node)
            self.granted(name, p.user, decided == p.user, node)
        elif p.proposer.phase is paxos.Phase.PREEMPTED:
            p.retry_at = min(p.retry_at, self.step_no + self.rng.randint(1, 10))

    def granted(self, name: str, user: str, ok: bool, node: Node) -> None:
        self.log(f"{node.name}: {name} {'granted to' if ok else 'refused to'} {user}")
        if ok:
            self.told_owner(name, user)

    def told_owner(self, name: str, user: str) -> None:
        told = self.confirmed.setdefault(name, set())
        told.add(user)
        self.require(len(told) == 1, f"{' and '.join(sorted(told))} were all told {name!r} is theirs for good")

    # Clients -----------------------------------------------------------------------------------------------

    def up_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.up and not n.join_via]

    def client_step(self) -> None:
        nodes = self.up_nodes()
        if not nodes or self.rng.random() < 0.5:
            return
        node = self.rng.choice(nodes)
        user = self.users[self.rng.choice(USERS)]
        op = self.rng.random()
        if op < 0.35:
            user.sent += 1
            client_msg_id = f"{user.name}-{user.sent}"
            user.pending[client_msg_id] = (self.rng.choice(CHANNELS), f"{user.name} says {user.sent}")
            self.post(node, user, client_msg_id)
        elif op < 0.5 and user.pending:
            self.post(node, user, self.rng.choice(sorted(user.pending)))
        elif op < 0.65:
            self.read(node, user)
        elif op < 0.8:
            self.set_status(node, user)
        elif op < 0.85:
            self.claim(node, user, self.rng.choice(NAMES))
        elif op < 0.9:
            self.private_channel(node, user)
        else:
            self.poll_claims(node, user)

    def post(self, node: Node, user: User, client_msg_id: str) -> None:
        replica, _ = node.core()
        channel, body = user.pending[client_msg_id]
        entry, retry = replica.post(user.name, channel, body, client_msg_id, self.now_ms(node))
        self.store_and_ship(node)
        self.require(entry.body == body and entry.user_id == user.name, f"retry of {client_msg_id} answered {entry}")
        if self.rng.random() < 0.1:
            return  # the answer is lost: the user will retry
        del user.pending[client_msg_id]
        user.acked.add(entry.id)
        self.acked[entry.id] = (user.name, channel, client_msg_id, body)
        user.token = vector.merge(user.token, replica.clocks.token((entry.region, entry.hlc)))

    def read(self, node: Node, user: User) -> None:
        """A read with the user's causal token: a region whose vector covers it must hold every message the
        user was told is posted (a region that does not cover it makes the read wait: nothing to check)."""
        replica, _ = node.core()
        if not vector.covers(replica.vector, user.token):
            return
        missing = [m for m in user.acked if replica.message(m) is None]
        self.require(not missing, f"{node.name} covers {user.name}'s token {user.token} but lacks their {missing}")
        user.token = vector.merge(user.token, replica.clocks.token())

    def set_status(self, node: Node, user: User) -> None:
        replica, _ = node.core()
        before = replica.status(user.name)
        value = replica.set_status(user.name, self.rng.randint(1, 3), f"{user.name} at {self.step_no}",
                                   self.now_ms(node))
        self.store_and_ship(node)
        self.require(before is None or value.rank > before.rank,
                     f"{node.name} stamped {user.name}'s status {value.hlc}, below the one it showed: {before}")
        self.statuses.append(value)
        user.token = vector.merge(user.token, replica.clocks.token((value.region, value.hlc)))

    def claim(self, node: Node, user: User, name: str) -> None:
        replica, _ = node.core()
        if self.mode == "strong-names":
            self.propose_name(node, name, user.name)
        elif node.core()[1].unacknowledged():
            self.log(f"{node.name}: claim of {name} for {user.name} refused (UNAVAILABLE): not yet listed by "
                     f"{node.core()[1].unacknowledged()}")
        elif not any(c.name == name for c in user.claims):
            user.claims.append(replica.claim(name, user.name, self.now_ms(node)))
            self.store_and_ship(node)

    def private_channel(self, node: Node, user: User) -> None:
        """Create the private channel, or, as a member, add someone or leave (the regions converge on one
        creator and on the last write of every membership)."""
        replica, _ = node.core()
        channel = self.rng.choice(PRIVATE)
        if replica.channel_creator(channel) is None:
            replica.create_channel(channel, user.name, self.now_ms(node))
        elif replica.is_member(channel, user.name):
            other = self.rng.choice(USERS)
            replica.set_member(channel, other, other != user.name, self.now_ms(node))
        self.store_and_ship(node)

    def poll_claims(self, node: Node, user: User) -> None:
        """GetUser in async mode: a claim the region has seen is CONFIRMED only once no earlier one can come."""
        replica, _ = node.core()
        for claim in user.claims:
            if claim in replica.claims_on(claim.name) and replica.claim_state(claim) is ClaimState.CONFIRMED:
                self.told_owner(claim.name, user.name)

    # Faults ------------------------------------------------------------------------------------------------

    def fault_step(self) -> None:
        rng = self.rng
        if self.step_no == self.join_step:
            self.add_joiner()
        for name, at in list(self.restart_at.items()):
            if self.step_no >= at:
                del self.restart_at[name]
                self.start(self.nodes[name])
                self.log(f"{name} restarts")
        if rng.random() > 0.02:
            return
        names = sorted(self.nodes)
        kind = rng.random()
        if kind < 0.25:
            side = set(rng.sample(names, rng.randint(1, len(names) - 1)))
            self.faults.cut = {(s, d) for s in names for d in names if (s in side) != (d in side)}
        elif kind < 0.4:
            self.faults.cut |= {tuple(rng.sample(names, 2)) for _ in range(rng.randint(1, 3))}  # type: ignore[misc]
        elif kind < 0.6:
            self.faults.cut = set()
        elif kind < 0.8:
            up = [n for n in self.nodes.values() if n.up and n.name not in self.restart_at]
            if len(up) > 1:
                node = rng.choice(up)
                self.crash(node)
                self.restart_at[node.name] = self.step_no + rng.randint(1, 80)
        else:
            self.faults.loss = rng.choice([0.0, 0.0, 0.05, 0.2])
            self.faults.duplicate = rng.choice([0.0, 0.05, 0.2])
            self.faults.max_delay = rng.randint(1, 12)
        self.log(f"faults: {self.faults}")

    def add_joiner(self) -> None:
        via = self.rng.choice(self.founders)
        node = Node(self.joiner, self.rng.randint(-MAX_SKEW_MS, MAX_SKEW_MS), Disk(), join_via=via)
        self.nodes[node.name] = node
        self.start(node)
        self.log(f"{node.name} starts, joining through {via}")
        self.send(node.name, via, Join(node.name))

    # The run -----------------------------------------------------------------------------------------------

    def step(self, load: bool) -> None:
        self.step_no += 1
        self.deliver_due()
        for node in list(self.nodes.values()):
            if node.up:
                self.act(node)
        if load:
            self.client_step()

    def run(self) -> None:
        for _ in range(self.steps):
            self.fault_step()
            self.step(load=True)
        self.quiesce()

    def quiesce(self) -> None:
        """Heal everything, restart every region, let users retry what is unanswered; then every region must
        converge to the same state, holding every acknowledged write."""
        self.faults = Faults()
        self.log("faults healed")
        for name in list(self.restart_at):
            del self.restart_at[name]
            self.start(self.nodes[name])
            self.log(f"{name} restarts")
        if self.joiner and self.joiner not in self.nodes:
            self.add_joiner()
        for _ in range(QUIET_MAX_STEPS):
            self.step(load=False)
            for user in self.users.values():
                for client_msg_id in sorted(user.pending):
                    nodes = self.up_nodes()
                    if nodes:
                        self.post(self.rng.choice(nodes), user, client_msg_id)
            if self.converged():
                break
        self.check_final()

    def converged(self) -> bool:
        """Every region up, knowing every other, holding the same state, and its vector covering every write
        (so that a causal token naming any of them is satisfied everywhere)."""
        nodes = list(self.nodes.values())
        if any(not n.up or n.join_via or n.proposals for n in nodes) or any(u.pending for u in self.users.values()):
            return False
        regions = set(self.nodes)
        if any(set(n.core()[1].members) != regions - {n.name} for n in nodes):
            return False
        if len({n.core()[0].digest() for n in nodes}) != 1:
            return False
        writes: dict[str, str] = {}
        for node in nodes:
            writes = vector.merge(writes, node.core()[0].written())
        return all(vector.covers(n.core()[0].vector, writes) for n in nodes)

    def check_final(self) -> None:
        nodes = list(self.nodes.values())
        self.require(self.converged(), "the regions did not converge after the faults stopped")
        pending = {u.name: sorted(u.pending) for u in self.users.values() if u.pending}
        self.require(not pending, f"posts never acknowledged: {pending}")
        for node in nodes:
            replica, _ = node.core()
            missing = [m for m in self.acked if replica.message(m) is None]
            self.require(not missing, f"{node.name} lost acknowledged messages {missing}")
            held = replica.messages()
            sent = {(e.user_id, e.client_msg_id) for e in held}
            self.require(len(sent) == len(held), f"{node.name} holds a message twice")
            strays = [e for e in held if e.id not in self.acked or e.id != message_id(e.user_id, e.channel,
                                                                                       e.client_msg_id)]
            self.require(not strays, f"{node.name} holds messages no one was told of: {strays}")
            for user in USERS:
                written = [v for v in self.statuses if v.user_id == user]
                if written:
                    best = max(written, key=lambda v: v.rank)
                    self.require(replica.status(user) == best, f"{node.name}: {user}'s status is "
                                 f"{replica.status(user)}, not the last written {best}")
            for name, told in self.confirmed.items():
                top = owner(replica.claims_on(name))
                self.require(top is not None and {top.user_id} == told,
                             f"{node.name}: {name!r} is owned by {top}, but {told} was told it is theirs")
        self.log(f"converged: {len(self.acked)} messages, {len(self.statuses)} statuses, names {self.confirmed}")

    # Reports -----------------------------------------------------------------------------------------------

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise InvariantBroken(f"{what}\n{self.report()}")

    def report(self) -> str:
        lines = [f"seed {self.seed}, {self.steps} steps, mode {self.mode}, regions {', '.join(sorted(self.nodes))}"
                 f", now step {self.step_no}; faults: {self.faults}; outboxes keep {self.outbox_keep}, catch-ups "
                 f"{self.catch_ups}"]
        for node in self.nodes.values():
            if node.up:
                replica, membership = node.core()
                lines.append(f"  {node.name} (skew {node.skew_ms} ms): vector {replica.vector}, members "
                             f"{sorted(membership.members)}, {len(replica.messages())} messages")
            else:
                lines.append(f"  {node.name}: down")
        lines += ["events (last 30):", *(f"  {e}" for e in self.events[-30:])]
        lines.append(f"replay: make sim SEED={self.seed} STEPS={self.steps}")
        return "\n".join(lines)


def outbox_cursor(disk: Disk) -> str:
    """Every entry of the outbox stamped at or below it is published (the simulation stores and ships at once)."""
    return Hlc(disk.stamps, 0).encode()


def msg_members(node: Node) -> list[str]:
    _, membership = node.core()
    return sorted({node.name, *membership.members})


def run_seed(seed: int, steps: int, out: Callable[[str], None] = lambda _: None) -> World:
    world = World(seed, steps)
    world.run()
    out(world.events[-1])
    return world
