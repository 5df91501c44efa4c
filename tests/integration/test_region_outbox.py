"""A region's outbox, through the region itself on a real Valkey: what a peer that resumes is sent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support import started_region

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name
from mlchat.crdt.replica import Delta, ReplicaState
from mlchat.leader.region import NAMED_ABOVE
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import past, split_entry
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.leader.wire import from_outbox


def now_ms() -> int:
    return int(time.time() * 1000)


def written_in(region: str, channel: str, count: int) -> tuple[str, bytes]:
    """(shard name, the pycrdt update) of `count` messages of about 100 bytes written in `region`."""
    start = now_ms()
    entries = [LogEntry(message_id("u1", channel, f"m{i}"), channel, "u1", f"{i:03d} " + "x" * 96, f"m{i}",
                        Hlc(start, i).encode(), region) for i in range(count)]
    shard = MessageShard(channel, 7)
    return shard_name(channel, entries[0].hlc, LeaderSettings("r", "", Path()).bucket_ms), shard.add(entries)


def test_a_large_update_is_kept_by_name_and_a_resuming_peer_gets_the_shard(own_valkey: EmbeddedValkey, tmp_path):
    """A catch-up applied from a peer can be a whole shard: the outbox keeps its name, not a copy, and a
    peer that resumes past it is sent what it lacks of that shard."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            store = region.store
            cursor = region.cursor()
            name, update = written_in("eu-west", "lobby", 300)
            assert len(update) > NAMED_ABOVE
            await region.apply(Delta(shard_updates={name: update}), "eu-west")
            kept = [from_outbox(*split_entry(m)) async for m in store.outbox_since(past(cursor))]
            assert [d.shard_updates for d in kept] == [{name: b""}]
            parts = [d async for d in region.delta_since(cursor, "ap-northeast", ReplicaState({}, {}))]
            received = MessageShard("lobby", 9)
            for part in parts:
                for shard, bytes_ in part.shard_updates.items():
                    assert shard == name
                    received.apply(bytes_)
            assert len(received) == 300
            assert parts[-1].cursor == region.cursor() and parts[-1].vector

    asyncio.run(main())
