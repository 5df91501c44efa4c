"""Posts to a channel commit in batches: calls on their way to the queue join the batch being taken."""

from __future__ import annotations

import asyncio

from support import after_turns, started_region, turned

from mlchat.leader.region import GATHER_TURNS, _Arrivals, _Pending
from mlchat.leader.valkey import EmbeddedValkey


def run_posts(valkey: EmbeddedValkey, tmp_path, turns_on_the_way: int) -> tuple[int, list[str], int]:
    """16 posts to one channel: the first at once, the others after `turns_on_the_way` turns of the event loop
    (as a call's request is read and its token checked). Returns (commits, ids committed, messages stored)."""
    async def main() -> tuple[int, list[str], int]:
        async with started_region(valkey.url, tmp_path) as region:
            async def post(i: int) -> str:
                if i:
                    await turned(turns_on_the_way)
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
            posts: list[asyncio.Future] = []
            enough = asyncio.Event()

            def post_one() -> None:  # a new post at every turn of the event loop, until 4 batches are committed
                if region.commits >= 4 or len(posts) >= 100_000:
                    enough.set()
                    return
                posts.append(asyncio.ensure_future(region.post("u1", "lobby", f"m{len(posts)}", f"c{len(posts)}")))
                after_turns(1, post_one)

            post_one()
            await enough.wait()
            assert region.commits >= 4, "a batch was never committed while posts kept coming"
            await asyncio.gather(*posts)
            return region.commits, len(posts)

    commits, posted = asyncio.run(main())
    # Gathered into batches, not committed one by one: the first alone takes a post at each of its turns.
    assert posted > commits + GATHER_TURNS // 2


def test_a_writer_whose_channel_went_quiet_while_it_committed_ends_at_once(own_valkey: EmbeddedValkey, tmp_path):
    """Posts one at a time: nothing came while each was committed, so its writer waits for no more (it would
    only turn the event loop for nothing) and ends within the turns a first batch is allowed."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            for i in range(5):
                await region.post("u1", "lobby", f"message {i}", f"c{i}")
                await turned(GATHER_TURNS + 2)
                assert "lobby" not in region._writers
            assert region.commits == 5

    asyncio.run(main())


def test_a_writer_whose_last_wait_caught_nothing_waits_no_longer_than_a_first_batch(own_valkey: EmbeddedValkey,
                                                                                    tmp_path):
    """Turning the event loop for posts that do not come only burns CPU: after a gathering that caught none, the
    next takes only what comes within the turns a first batch is allowed, and waits again once that is some."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            arrivals = _Arrivals()
            arrivals.caught = False
            region._queue["lobby"] = [_Pending("m1", "u1", "queued while the last batch was committed", "c1")]
            gathering = asyncio.ensure_future(region._gathered("lobby", arrivals))
            await turned(GATHER_TURNS + 2)
            assert gathering.done() and len(gathering.result()) == 1 and not arrivals.caught

            region._queue["lobby"] = [_Pending("m2", "u1", "queued", "c2")]
            on_its_way = _Pending("m3", "u1", "on its way", "c3")
            after_turns(1, lambda: region._queue.setdefault("lobby", []).append(on_its_way))
            assert len(await region._gathered("lobby", arrivals)) == 2 and arrivals.caught

    asyncio.run(main())
