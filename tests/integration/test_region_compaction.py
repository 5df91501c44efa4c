"""A hot shard's updates are replaced by its snapshot in Redis, in the background, while posts go on."""

from __future__ import annotations

import asyncio

from support import started_region

from mlchat.crdt.msglog import MessageShard
from mlchat.leader.region import COMPACT_RATIO
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


def test_a_hot_shards_size_is_what_redis_holds_of_it_through_compactions_and_reloads(own_valkey: EmbeddedValkey,
                                                                                   tmp_path):
    """`hot_shard_sizes` (the mlchat_hot_shard_bytes metric) is counted as updates are stored and compacted, not
    by encoding each shard at every scrape: it must still be the bytes Redis holds of the shard."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path, compact_after=5) as region:
            store = region.store

            async def held_in_redis() -> list[int]:  # of each hot shard (posts may fall on both sides of an hour)
                held = []
                for name in region._shards:
                    snapshot, updates = await store.shard_updates(name)
                    held.append(len(snapshot or b"") + sum(map(len, updates)))
                return held

            for i in range(12):
                await region.post("u1", "lobby", f"message {i}", f"c{i}")
                await asyncio.gather(*region._compacting.values())
                assert region.hot_shard_sizes() == await held_in_redis()
            assert any([(await store.shard_updates(name))[0] for name in await store.shard_states()])  # compacted
            for name in await store.shard_states():
                region._dropped(name)
            await region.post("u1", "lobby", "after a reload", "c-reload")
            assert region.hot_shard_sizes() == await held_in_redis()

    asyncio.run(main())


def test_a_large_shard_is_snapshotted_once_its_updates_weigh_enough_not_at_every_few(own_valkey: EmbeddedValkey,
                                                                                     tmp_path):
    """A snapshot costs the whole shard: a large one waits until the updates since weigh 1/COMPACT_RATIO of it,
    not only `compact_after` updates, so each message is snapshotted a bounded number of times however large the
    hour's shard grows."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path, compact_after=5) as region:
            store = region.store
            await region.post("u1", "lobby", "x" * 60_000, "big")  # the first snapshot (at 5 updates) holds it
            for i in range(4):
                await region.post("u1", "lobby", f"message {i}", f"c{i}")
            await asyncio.gather(*region._compacting.values())
            (name,) = await store.shard_states()
            first, updates = await store.shard_updates(name)
            assert first is not None and len(first) > 60_000 and updates == []
            posts, weighed = 0, 0  # small posts since the snapshot, and what their updates weighed before the last
            while (await store.shard_updates(name))[0] == first:
                assert posts < 5_000, "the shard was never snapshotted again"
                weighed = sum(map(len, (await store.shard_updates(name))[1]))
                await region.post("u1", "lobby", f"small {posts}", f"s{posts}")
                posts += 1
                await asyncio.gather(*region._compacting.values())
            assert posts > 5 * 10  # far more than compact_after
            assert weighed * COMPACT_RATIO < len(first)  # not due before the last post
            snapshot, updates = await store.shard_updates(name)
            reloaded = MessageShard("lobby", 2, [snapshot, *updates])
            assert len(reloaded) == 5 + posts

    asyncio.run(main())
