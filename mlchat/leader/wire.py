"""Deltas as they travel between regions (`replication.proto`), and as a region keeps them in its outbox."""

from __future__ import annotations

from dataclasses import replace

from mlchat.crdt.claims import Claim
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.replica import Delta, Relayed
from mlchat.v1 import replication_pb2 as rpb


def delta_pb(region: str, delta: Delta) -> rpb.Delta:
    return rpb.Delta(
        from_region=region,
        shards=[rpb.ShardUpdate(shard=name, update=update) for name, update in delta.shard_updates.items()],
        statuses=[rpb.StatusRecord(user_id=v.user_id, presence=v.presence, text=v.text, hlc=v.hlc, region=v.region)
                  for v in delta.statuses],
        claims=[rpb.ClaimRecord(name=c.name, user_id=c.user_id, hlc=c.hlc, region=c.region) for c in delta.claims],
        channels=[rpb.ChannelRecord(channel=c.name, creator_user_id=c.user_id, hlc=c.hlc, region=c.region)
                  for c in delta.channels],
        channel_members=[rpb.MembershipRecord(channel=m.channel, user_id=m.user_id, member=m.member, hlc=m.hlc,
                                              region=m.region) for m in delta.memberships],
        vector=delta.vector, members=delta.members, departed=delta.departed, cursors=delta.cursors,
        holds=delta.holds)


def delta_from_pb(message: rpb.Delta) -> Delta:
    """The delta a message carries (its cursor, which names the sender's outbox, is read by the receiver)."""
    return Delta(
        shard_updates={s.shard: s.update for s in message.shards},
        statuses=tuple(StatusValue(v.user_id, v.presence, v.text, v.hlc, v.region) for v in message.statuses),
        claims=tuple(Claim(c.hlc, c.region, c.user_id, c.name) for c in message.claims),
        channels=tuple(Claim(c.hlc, c.region, c.creator_user_id, c.channel) for c in message.channels),
        memberships=tuple(MemberValue(m.channel, m.user_id, m.member, m.hlc, m.region)
                          for m in message.channel_members),
        vector=dict(message.vector), members=dict(message.members), departed=tuple(message.departed),
        cursors=dict(message.cursors), holds=dict(message.holds))


def outbox_entry(change: Delta, source: str, origins: dict[str, str] | None) -> bytes:
    """A change as the outbox keeps it: `source` is the peer it was applied from ("" for an own write),
    `origins` what `Relayed.origins` says of it."""
    return rpb.OutboxEntry(change=delta_pb("", change), source=source, origins=origins or {},
                           origins_unknown=origins is None).SerializeToString()


def from_outbox(stamp: str, payload: bytes) -> Delta:
    """An outbox entry as the change it keeps, with where it came from (`relayed`)."""
    entry = rpb.OutboxEntry.FromString(payload)
    origins = None if entry.origins_unknown else dict(entry.origins)
    return replace(delta_from_pb(entry.change), relayed=Relayed(entry.source, origins, {}, stamp))
