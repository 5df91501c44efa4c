"""Posts to a channel commit in batches: calls on their way to the queue join the batch being taken."""

from __future__ import annotations

import asyncio

from support import started_region

from mlchat.leader.valkey import EmbeddedValkey


def run_posts(valkey: EmbeddedValkey, tmp_path, turns_on_the_way: int) -> tuple[int, list[str], int]:
    """16 posts to one channel: the first at once, the others after `turns_on_the_way` turns of the event loop
    (as a call's request is read and its token checked). Returns (commits, ids committed, messages stored)."""
    async def main() -> tuple[int, list[str], int]:
        async with started_region(valkey.url, tmp_path) as region:
            async def post(i: int) -> str:
                if i:
                    for _ in range(turns_on_the_way):
                        await asyncio.sleep(0)  # one turn of the event loop, not a wait
                return (await region.post("u1", "lobby", f"message {i}", f"c{i}"))[0].id

            ids = await asyncio.gather(*(post(i) for i in range(16)))
            return region.commits, ids, len((await region.store.page("lobby", "", 100, False, "u1")).entries)

    return asyncio.run(main())


def test_posts_still_on_their_way_join_the_batch_and_commit_in_one_round_trip(own_valkey: EmbeddedValkey, tmp_path):
    commits, ids, stored = run_posts(own_valkey, tmp_path, turns_on_the_way=3)
    assert (len(set(ids)), stored) == (16, 16)
    assert commits == 1


def test_a_batch_waits_no_longer_than_the_turns_it_is_allowed(own_valkey: EmbeddedValkey, tmp_path):
    # Posts that take longer than GATHER_TURNS turns to arrive go in a later batch: a busy loop never holds a
    # commit back for long.
    commits, ids, stored = run_posts(own_valkey, tmp_path, turns_on_the_way=100)
    assert (len(set(ids)), stored) == (16, 16)
    assert commits == 2


def test_a_busy_channel_whose_posts_never_stop_coming_still_commits(own_valkey: EmbeddedValkey, tmp_path):
    """While posts keep coming, a batch gathers them, but for GATHER_MAX_S at most: it is committed all the same."""
    async def main() -> tuple[int, int]:
        async with started_region(own_valkey.url, tmp_path) as region:
            posts = []
            while region.commits < 4:  # a new post at every turn of the event loop
                assert len(posts) < 100_000, "a batch was never committed while posts kept coming"
                posts.append(asyncio.ensure_future(region.post("u1", "lobby", f"m{len(posts)}", f"c{len(posts)}")))
                await asyncio.sleep(0)
            await asyncio.gather(*posts)
            return region.commits, len(posts)

    commits, posted = asyncio.run(main())
    assert posted > 10 * commits  # gathered into batches, not committed one by one
