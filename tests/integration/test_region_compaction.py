"""A hot shard's updates are replaced by its snapshot in Redis, in the background, while posts go on."""

from __future__ import annotations

import asyncio

from support import started_region

from mlchat.crdt.msglog import MessageShard
from mlchat.leader.valkey import EmbeddedValkey


def test_a_shard_compacted_while_posts_go_on_keeps_every_message(own_valkey: EmbeddedValkey, tmp_path):
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path, compact_after=5) as region:
            store = region.store
            # One at a time: each post is an update of its own, so the snapshot is stored while later ones are.
            posted = [(await region.post("u1", "lobby", f"message {i}", f"c{i}"))[0] for i in range(12)]
            (name,) = await store.shard_states()
            await asyncio.gather(*region._compacting.values())  # the snapshots being stored, if any are
            snapshot, updates = await store.shard_updates(name)
            assert snapshot is not None and len(updates) <= 12 - region.settings.compact_after
            reloaded = MessageShard("lobby", 2, [snapshot, *updates])
            assert [e.id for e in reloaded.entries()] == [e.id for e in posted]

    asyncio.run(main())
