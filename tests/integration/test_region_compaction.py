"""A hot shard's updates are replaced by its snapshot in Redis, in the background, while posts go on."""

from __future__ import annotations

import asyncio
import time

from mlchat.crdt.msglog import MessageShard
from mlchat.leader.region import Region
from mlchat.leader.server import redis_client
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import Store
from mlchat.leader.valkey import EmbeddedValkey


def test_a_shard_compacted_while_posts_go_on_keeps_every_message(own_valkey: EmbeddedValkey, tmp_path):
    settings = LeaderSettings("us-east", "127.0.0.1:0", tmp_path, compact_after=5)

    async def main() -> None:
        store = Store(redis_client(own_valkey.url))
        region = Region(settings, store, 1, lambda: int(time.time() * 1000))
        try:
            await region.start()
            # One at a time: each post is an update of its own, so the snapshot is stored while later ones are.
            posted = [(await region.post("u1", "lobby", f"message {i}", f"c{i}"))[0] for i in range(12)]
            (name,) = await store.shard_states()
            await asyncio.gather(*region._compacting.values())  # the snapshots being stored, if any are
            snapshot, updates = await store.shard_updates(name)
            assert snapshot is not None and len(updates) <= 12 - settings.compact_after
            reloaded = MessageShard("lobby", 2, [snapshot, *updates])
            assert [e.id for e in reloaded.entries()] == [e.id for e in posted]
        finally:
            await store.close()

    asyncio.run(main())
