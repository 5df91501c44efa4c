"""One region's replicated state in memory, and delta exchange between regions.

A replica holds message-log shards (pycrdt), status registers (LWW), username claims, private channel
records (claims on the channel name) and channel memberships (LWW registers), plus a
version vector: for each origin region, the hlc up to which it holds (the effect of) every write of
that region. A peer describes itself with `state()`; `delta_for(state)` returns what it lacks: pycrdt
deltas against its shard state vectors, and every register value and claim newer than its vector entry
for the value's origin. Applying a delta is idempotent and order-free, and a delta relayed through a
third replica is as good as the original, so replicas that exchange deltas in any order, duplicated
or relayed, end identical. Time comes in as `now_ms`; the pycrdt client id comes in from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pycrdt import merge_updates

from mlchat.crdt import lww, vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state
from mlchat.crdt.digest import state_digest
from mlchat.crdt.hlc import ZERO, Hlc
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name, split_shard_name, winner

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ReplicaState:
    """What a replica holds, as a peer needs to know it to compute a delta."""

    shards: dict[str, bytes]
    vector: dict[str, str]


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


MAX_COMBINED = 200  # merging pycrdt updates is super-linear in their number: keep groups small


def combine(deltas: list[Delta]) -> list[Delta]:
    """Fewer deltas with the same effect, applied in order: consecutive deltas merged, at most
    `MAX_COMBINED` at a time (a later delta's vector covers the earlier ones': it follows them)."""
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
            vector=vector.merge({}, group[-1].vector) if group[-1].vector else {},
            members={r: a for d in group for r, a in d.members.items()},
            departed=tuple(sorted({r for d in group for r in d.departed}))))
    return out


class Replica:
    def __init__(self, region: str, client_id: int, regions: frozenset[str] = frozenset(),
                 bucket_ms: int = HOUR_MS) -> None:
        self.region = region
        self.regions = regions | {region}
        self.clock = ZERO
        self._client_id = client_id
        self._bucket_ms = bucket_ms
        self._shards: dict[str, MessageShard] = {}
        self._messages: dict[str, LogEntry] = {}  # message id -> the copy readers see
        self._statuses: dict[str, StatusValue] = {}
        self._claims: dict[str, set[Claim]] = {}
        self._channels: dict[str, set[Claim]] = {}
        self._members: dict[tuple[str, str], MemberValue] = {}
        self.vector: dict[str, str] = {}

    # Local writes -------------------------------------------------------------------------------

    def _stamp(self, now_ms: int) -> str:
        self.clock = self.clock.tick(now_ms)
        stamp = self.clock.encode()
        self.vector[self.region] = stamp
        return stamp

    def post(self, user_id: str, channel: str, body: str, client_msg_id: str, now_ms: int) -> tuple[LogEntry, bool]:
        """Post a message; return it and whether it was a retry of an earlier post."""
        msg_id = message_id(user_id, channel, client_msg_id)
        existing = self.message(msg_id)
        if existing is not None:
            return existing, True
        entry = LogEntry(msg_id, channel, user_id, body, client_msg_id, self._stamp(now_ms), self.region)
        self._shard(shard_name(channel, entry.hlc, self._bucket_ms)).add([entry])
        self._messages[msg_id] = entry
        return entry, False

    def set_status(self, user_id: str, presence: int, text: str, now_ms: int) -> StatusValue:
        value = StatusValue(user_id, presence, text, self._stamp(now_ms), self.region)
        self._statuses[user_id] = value
        return value

    def claim(self, name: str, user_id: str, now_ms: int) -> Claim:
        claim = Claim(self._stamp(now_ms), self.region, user_id, name)
        self._claims.setdefault(name, set()).add(claim)
        return claim

    def create_channel(self, channel: str, user_id: str, now_ms: int) -> Claim:
        """Record a private channel created by `user_id`, who becomes its first member."""
        record = Claim(self._stamp(now_ms), self.region, user_id, channel)
        self._channels.setdefault(channel, set()).add(record)
        self._members[(channel, user_id)] = MemberValue(channel, user_id, True, record.hlc, self.region)
        return record

    def set_member(self, channel: str, user_id: str, member: bool, now_ms: int) -> MemberValue:
        value = MemberValue(channel, user_id, member, self._stamp(now_ms), self.region)
        self._members[value.key] = value
        return value

    # Reads --------------------------------------------------------------------------------------

    def message(self, msg_id: str) -> LogEntry | None:
        return self._messages.get(msg_id)

    def messages(self, channel: str) -> list[LogEntry]:
        return sorted((e for e in self._messages.values() if e.channel == channel), key=lambda e: e.order_key)

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
        return min(self.vector.get(r, ZERO.encode()) for r in self.regions)

    def claim_state(self, claim: Claim) -> ClaimState:
        return claim_state(claim, self._claims.get(claim.name, ()), self.watermark())

    def digest(self) -> str:
        claims = [c for cs in self._claims.values() for c in cs]
        channels = [c for cs in self._channels.values() for c in cs]
        return state_digest(self._messages.values(), self._statuses.values(), claims, channels, self._members.values())

    # Replication --------------------------------------------------------------------------------

    def state(self) -> ReplicaState:
        return ReplicaState({name: s.state_vector() for name, s in self._shards.items()}, dict(self.vector))

    def delta_for(self, peer: ReplicaState) -> Delta:
        updates = {
            name: shard.delta_since(peer.shards[name]) if name in peer.shards else shard.snapshot()
            for name, shard in self._shards.items()
            if peer.shards.get(name) != shard.state_vector()
        }

        def newer(hlc: str, region: str) -> bool:
            return hlc > peer.vector.get(region, "")

        return Delta(
            shard_updates=updates,
            statuses=tuple(v for v in self._statuses.values() if newer(v.hlc, v.region)),
            claims=tuple(c for cs in self._claims.values() for c in cs if newer(c.hlc, c.region)),
            channels=tuple(c for cs in self._channels.values() for c in cs if newer(c.hlc, c.region)),
            memberships=tuple(m for m in self._members.values() if newer(m.hlc, m.region)),
            vector=dict(self.vector),
        )

    def apply(self, delta: Delta, now_ms: int) -> list[LogEntry]:
        """Merge a peer's delta; return the messages that are new here."""
        added: list[LogEntry] = []
        for name, update in delta.shard_updates.items():
            for entry in self._shard(name).apply(update):
                if self._messages.get(entry.id) is None:
                    added.append(entry)
                self._messages[entry.id] = winner(self._messages.get(entry.id), entry)
        for value in delta.statuses:
            self._statuses[value.user_id] = lww.merge(self._statuses.get(value.user_id), value)  # type: ignore[assignment]
        for claim in delta.claims:
            self._claims.setdefault(claim.name, set()).add(claim)
        for record in delta.channels:
            self._channels.setdefault(record.name, set()).add(record)
        for m in delta.memberships:
            self._members[m.key] = lww.merge(self._members.get(m.key), m)  # type: ignore[assignment]
        self.vector = vector.merge(self.vector, delta.vector)
        if delta.vector:
            self.clock = self.clock.absorb(Hlc.decode(max(delta.vector.values())), now_ms)
        return added

    def _shard(self, name: str) -> MessageShard:
        if name not in self._shards:
            self._shards[name] = MessageShard(split_shard_name(name)[0], self._client_id)
        return self._shards[name]
