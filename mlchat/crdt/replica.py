"""One region's replicated state in memory, and delta exchange between regions.

A replica holds message-log shards (pycrdt), status registers (LWW), username claims, private
channel records (claims on the channel name) and channel memberships (LWW registers), plus a
version vector (`RegionClock`): for each origin region, the hlc up to which it holds (the effect of)
every write of that region. A peer describes itself with `state()`; `delta_for(state)` returns what
it lacks: pycrdt deltas against its shard state vectors, and every register value and claim newer
than its vector entry for the value's origin (`wanted`, the rule the leader's `Region` follows too).
Applying a delta is idempotent and order-free, and a delta relayed through a third replica is as
good as the original, so replicas that exchange deltas in any order, duplicated or relayed, end
identical. Every change (a write, or what an applied delta brought that was new) is appended to
`feed` as the delta peers need, as the leader publishes it. Time comes in as `now_ms`; the pycrdt
client id comes in from the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from pycrdt import merge_updates

from mlchat.crdt import lww, vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state
from mlchat.crdt.digest import state_digest
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name, split_shard_name, winner
from mlchat.crdt.regionclock import RegionClock

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ReplicaState:
    """What a replica holds, as a peer needs to know it to compute a delta."""

    shards: dict[str, bytes]
    vector: dict[str, str]


@dataclass(frozen=True)
class Relayed:
    """Where a change this region applied from a peer came from, as its stream to a third region needs
    to know it (`mlchat.geo.relay`); never sent."""

    source: str  # the peer it was applied from
    origins: dict[str, str] | None  # origin -> the highest stamp of a change it carries; None: not known
    before: dict[str, str]  # this region's vector just before it was applied
    stamp: str = ""  # the stamp of its entries in this region's outbox


@dataclass(frozen=True)
class Delta:
    shard_updates: dict[str, bytes] = field(default_factory=dict)
    statuses: tuple[StatusValue, ...] = ()
    claims: tuple[Claim, ...] = ()
    channels: tuple[Claim, ...] = ()  # private channel records
    memberships: tuple[MemberValue, ...] = ()
    # The sender's vector: after applying the delta the receiver holds everything it covers.
    vector: dict[str, str] = field(default_factory=dict)
    # Membership as the sender knows it (heartbeats carry it): region -> address, and who left.
    members: dict[str, str] = field(default_factory=dict)
    departed: tuple[str, ...] = ()
    relayed: Relayed | None = None  # set on what a region applied from a peer that was new to it
    # The sender's outbox cursor: every entry of its outbox stamped at or below it has reached the receiver
    # once this delta (and every one before it on the stream) has.
    cursor: str = ""
    # On heartbeats, region -> the cursor of that region's outbox the sender holds (opaque: "EPOCH:STAMP").
    cursors: dict[str, str] = field(default_factory=dict)
    # On heartbeats, what the sender holds: `vector` as the sender's own state has it, where a stream may tell
    # the receiver less (see `mlchat.geo.relay`).
    holds: dict[str, str] = field(default_factory=dict)


def carries_changes(delta: Delta) -> bool:
    """Whether a delta changes state (a heartbeat carries only the sender's vector and members)."""
    return bool(delta.shard_updates or delta.statuses or delta.claims or delta.channels or delta.memberships)


def origins(stamped: Iterable[LogEntry | StatusValue | Claim | MemberValue]) -> dict[str, str]:
    """For each origin region, the highest stamp among `stamped`."""
    out: dict[str, str] = {}
    for item in stamped:
        if item.hlc > out.get(item.region, ""):
            out[item.region] = item.hlc
    return out


def wanted(hlc: str, origin: str, peer_vector: dict[str, str]) -> bool:
    """Whether a peer with `peer_vector` lacks a register value or claim stamped `hlc` in `origin`."""
    return hlc > peer_vector.get(origin, "")


MAX_COMBINED = 200  # merging pycrdt updates is super-linear in their number: keep groups small


def combine(deltas: list[Delta]) -> list[Delta]:
    """Fewer deltas with the same effect, applied in order: consecutive deltas merged, at most
    `MAX_COMBINED` at a time, each with the merge of their vectors (a delta may tell only the entries that
    moved, and the whole group's content travels with the one message)."""
    out = []
    for start in range(0, len(deltas), MAX_COMBINED):
        group = deltas[start:start + MAX_COMBINED]
        updates: dict[str, list[bytes]] = {}
        for d in group:
            for name, update in d.shard_updates.items():
                updates.setdefault(name, []).append(update)
        out.append(Delta(
            shard_updates={n: u[0] if len(u) == 1 else merge_updates(*u) for n, u in updates.items()},
            statuses=tuple(v for d in group for v in d.statuses),
            claims=tuple(c for d in group for c in d.claims),
            channels=tuple(c for d in group for c in d.channels),
            memberships=tuple(m for d in group for m in d.memberships),
            vector=functools.reduce(vector.merge, (d.vector for d in group), {}),
            members={r: a for d in group for r, a in d.members.items()},
            departed=tuple(sorted({r for d in group for r in d.departed})),
            cursor=max(d.cursor for d in group),
            cursors={r: c for d in group for r, c in d.cursors.items()},
            holds=functools.reduce(vector.merge, (d.holds for d in group), {})))
    return out


class Replica:
    def __init__(self, region: str, client_id: int, regions: frozenset[str] = frozenset(),
                 bucket_ms: int = HOUR_MS, floor: str = "", remote: dict[str, str] | None = None) -> None:
        self.region = region
        self.regions = regions | {region}
        self.clocks = RegionClock(region, floor, remote)
        self.feed: list[Delta] = []  # every change, in order, for peers (and storage) to take
        self._client_id = client_id
        self._bucket_ms = bucket_ms
        self._shards: dict[str, MessageShard] = {}
        self._messages: dict[str, LogEntry] = {}  # message id -> the copy readers see
        self._statuses: dict[str, StatusValue] = {}
        self._claims: dict[str, set[Claim]] = {}
        self._channels: dict[str, set[Claim]] = {}
        self._members: dict[tuple[str, str], MemberValue] = {}

    @property
    def vector(self) -> dict[str, str]:
        return self.clocks.vector

    # Local writes: each is stored at once (its stamp settles as it is made) -------------------------

    def _write(self, now_ms: int) -> str:
        stamp = self.clocks.stamp(now_ms)
        self.clocks.settle([stamp])
        return stamp

    def post(self, user_id: str, channel: str, body: str, client_msg_id: str, now_ms: int) -> tuple[LogEntry, bool]:
        """Post a message; return it and whether it was a retry of an earlier post."""
        msg_id = message_id(user_id, channel, client_msg_id)
        existing = self.message(msg_id)
        if existing is not None:
            return existing, True
        entry = LogEntry(msg_id, channel, user_id, body, client_msg_id, self._write(now_ms), self.region)
        name = shard_name(channel, entry.hlc, self._bucket_ms)
        self._messages[msg_id] = entry
        self.feed.append(Delta(shard_updates={name: self._shard(name).add([entry])}, vector=self.vector))
        return entry, False

    def set_status(self, user_id: str, presence: int, text: str, now_ms: int) -> StatusValue:
        value = StatusValue(user_id, presence, text, self._write(now_ms), self.region)
        self._statuses[user_id] = value
        self.feed.append(Delta(statuses=(value,), vector=self.vector))
        return value

    def claim(self, name: str, user_id: str, now_ms: int) -> Claim:
        claim = Claim(self._write(now_ms), self.region, user_id, name)
        self._claims.setdefault(name, set()).add(claim)
        self.feed.append(Delta(claims=(claim,), vector=self.vector))
        return claim

    def create_channel(self, channel: str, user_id: str, now_ms: int) -> Claim:
        """Record a private channel created by `user_id`, who becomes its first member."""
        record = Claim(self._write(now_ms), self.region, user_id, channel)
        member = MemberValue(channel, user_id, True, record.hlc, self.region)
        self._channels.setdefault(channel, set()).add(record)
        self._members[member.key] = member
        self.feed.append(Delta(channels=(record,), memberships=(member,), vector=self.vector))
        return record

    def set_member(self, channel: str, user_id: str, member: bool, now_ms: int) -> MemberValue:
        value = MemberValue(channel, user_id, member, self._write(now_ms), self.region)
        self._members[value.key] = value
        self.feed.append(Delta(memberships=(value,), vector=self.vector))
        return value

    # Reads --------------------------------------------------------------------------------------

    def message(self, msg_id: str) -> LogEntry | None:
        return self._messages.get(msg_id)

    def messages(self, channel: str | None = None) -> list[LogEntry]:
        """A channel's messages (every channel's, without one), in read order."""
        return sorted((e for e in self._messages.values() if channel is None or e.channel == channel),
                      key=lambda e: e.order_key)

    def status(self, user_id: str) -> StatusValue | None:
        return self._statuses.get(user_id)

    def claims_on(self, name: str) -> set[Claim]:
        return set(self._claims.get(name, ()))

    def channel_creator(self, channel: str) -> Claim | None:
        return min(self._channels.get(channel, ()), default=None)

    def is_member(self, channel: str, user_id: str) -> bool:
        value = self._members.get((channel, user_id))
        return value is not None and value.member

    def watermark(self) -> str:
        """The hlc up to which every region's writes are known here."""
        return self.clocks.watermark(self.regions)

    def claim_state(self, claim: Claim) -> ClaimState:
        return claim_state(claim, self._claims.get(claim.name, ()), self.watermark())

    def written(self) -> dict[str, str]:
        """For each origin region, the stamp of the latest of its writes held here."""
        return origins([*self._messages.values(), *self._statuses.values(), *self._all_claims(),
                        *self._members.values()])

    def _all_claims(self) -> list[Claim]:
        """Username claims and private channel records."""
        return [c for claims in (self._claims, self._channels) for cs in claims.values() for c in cs]

    def digest(self) -> str:
        claims = [c for cs in self._claims.values() for c in cs]
        channels = [c for cs in self._channels.values() for c in cs]
        return state_digest(self._messages.values(), self._statuses.values(), claims, channels, self._members.values())

    # Replication --------------------------------------------------------------------------------

    def state(self) -> ReplicaState:
        return ReplicaState({name: s.state_vector() for name, s in self._shards.items()}, dict(self.vector))

    def delta_for(self, peer: ReplicaState) -> Delta:
        current = self.vector  # first, as the leader does: what follows covers at least this
        updates = {
            name: shard.delta_since(peer.shards[name]) if name in peer.shards else shard.snapshot()
            for name, shard in self._shards.items()
            if peer.shards.get(name) != shard.state_vector()
        }
        return Delta(
            shard_updates=updates,
            statuses=tuple(v for v in self._statuses.values() if wanted(v.hlc, v.region, peer.vector)),
            claims=tuple(c for cs in self._claims.values() for c in cs if wanted(c.hlc, c.region, peer.vector)),
            channels=tuple(c for cs in self._channels.values() for c in cs if wanted(c.hlc, c.region, peer.vector)),
            memberships=tuple(m for m in self._members.values() if wanted(m.hlc, m.region, peer.vector)),
            vector=current,
        )

    def apply(self, delta: Delta, now_ms: int, source: str = "") -> list[LogEntry]:
        """Merge a delta from the peer `source`; return the messages that are new here. What was new goes
        on the feed."""
        before_vector = self.vector
        added: list[LogEntry] = []
        integrated: list[LogEntry] = []  # every entry new to a shard (a second copy of a message too)
        new_updates = {}
        known = True  # whether the origins of everything new are known (see `Relayed`)
        for name, update in delta.shard_updates.items():
            shard = self._shard(name)
            before = shard.state_vector()
            entries = shard.apply(update)
            if entries or shard.state_vector() != before:
                new_updates[name] = update
                known = known and bool(entries)
            integrated += entries
            for entry in entries:
                if self._messages.get(entry.id) is None:
                    added.append(entry)
                self._messages[entry.id] = winner(self._messages.get(entry.id), entry)
        statuses = []
        for value in delta.statuses:
            merged = lww.merge(self._statuses.get(value.user_id), value)
            if merged != self._statuses.get(value.user_id):
                self._statuses[value.user_id] = merged  # type: ignore[assignment]
                statuses.append(value)
        claims = [c for c in delta.claims if c not in self._claims.get(c.name, ())]
        for claim in claims:
            self._claims.setdefault(claim.name, set()).add(claim)
        channels = [c for c in delta.channels if c not in self._channels.get(c.name, ())]
        for record in channels:
            self._channels.setdefault(record.name, set()).add(record)
        memberships = []
        for m in delta.memberships:
            merged = lww.merge(self._members.get(m.key), m)
            if merged != self._members.get(m.key):
                self._members[m.key] = merged  # type: ignore[assignment]
                memberships.append(m)
        self.clocks.absorb(delta.vector, now_ms)
        self.clocks.witness([x.hlc for x in (*integrated, *statuses, *claims, *channels, *memberships)], now_ms)
        if new_updates or statuses or claims or channels or memberships:
            stamped = origins([*integrated, *statuses, *claims, *channels, *memberships]) if known else None
            self.feed.append(Delta(shard_updates=new_updates, statuses=tuple(statuses), claims=tuple(claims),
                                   channels=tuple(channels), memberships=tuple(memberships), vector=self.vector,
                                   relayed=Relayed(source, stamped, before_vector)))
        return added

    def take_feed(self) -> list[Delta]:
        feed, self.feed = self.feed, []
        return feed

    def _shard(self, name: str) -> MessageShard:
        if name not in self._shards:
            self._shards[name] = MessageShard(split_shard_name(name)[0], self._client_id)
        return self._shards[name]
