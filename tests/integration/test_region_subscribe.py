"""A region's live subscriptions, through the region itself on a real Valkey."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from support import started_region

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name
from mlchat.crdt.replica import Delta
from mlchat.leader.region import Committed, Region
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import stream_id_key
from mlchat.leader.valkey import EmbeddedValkey


def committed(stream_id: str, body: str) -> Committed:
    hlc = Hlc(int(time.time() * 1000), 0).encode()
    entry = LogEntry(message_id("u1", "lobby", body), "lobby", "u1", body, body, hlc, "eu-west")
    return Committed(entry, stream_id, b"")


def test_live_messages_published_out_of_stream_order_all_reach_a_subscriber(own_valkey: EmbeddedValkey, tmp_path):
    """A message can be published after one later in the channel's stream (a commit in doubt is published when
    its doubt is resolved). Both are live messages, and both must reach the subscriber."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            check_access = region.check_access

            async def published_once_subscribed(channel: str, user_id: str) -> None:
                # The subscription joins the fan-out before it checks access: publish from there, in its order.
                await check_access(channel, user_id)
                region.fanout.publish("lobby", committed("1700000000002-0", "later in the stream"))
                region.fanout.publish("lobby", committed("1700000000001-0", "earlier in the stream"))

            region.check_access = published_once_subscribed  # type: ignore[method-assign]
            stream = region.subscribe("u1", "lobby", "")
            got = [await asyncio.wait_for(anext(stream), 5), await asyncio.wait_for(anext(stream), 5)]
            assert [c.entry.body for c in got] == ["later in the stream", "earlier in the stream"]
            await stream.aclose()

    asyncio.run(main())


async def live_subscription(region: Region, channel: str) -> tuple[AsyncIterator[Committed], asyncio.Task]:
    """A subscription to `channel` (from now on), once it takes live messages; and the task awaiting its first."""
    live = asyncio.Event()
    last_stream_id = region.store.last_stream_id

    async def live_from_here(channel: str) -> str:  # where the subscription's live messages begin
        last = await last_stream_id(channel)
        live.set()
        return last

    region.store.last_stream_id = live_from_here  # type: ignore[method-assign]
    stream = region.subscribe("u1", channel, "")
    first = asyncio.create_task(anext(stream))
    await asyncio.wait_for(live.wait(), 5)
    region.store.last_stream_id = last_stream_id  # type: ignore[method-assign]
    return stream, first


def from_a_peer(body: str, ms_ago: int = 0) -> tuple[str, bytes]:
    """(shard name, pycrdt update) of one message of "lobby" written in eu-west `ms_ago` ms ago."""
    client_msg_id = "".join(c if c.isalnum() else "-" for c in body)
    entry = LogEntry(message_id("u2", "lobby", client_msg_id), "lobby", "u2", body, client_msg_id,
                     Hlc(int(time.time() * 1000) - ms_ago, 0).encode(), "eu-west")
    name = shard_name("lobby", entry.hlc, LeaderSettings("r", "", Path()).bucket_ms)
    return name, MessageShard("lobby", 7).add([entry])


def test_a_channels_messages_are_published_in_stream_order_across_its_shards(own_valkey: EmbeddedValkey, tmp_path):
    """A peer's message of the hour before and a post of this hour go to different shards of one channel. The
    peer's is stored first, so it is earlier in the channel's stream; the post, committed while the peer's
    message is stored but not yet published, must not reach subscribers before it. Otherwise a subscriber that
    received only the post, and resumes from its cursor, would never get the peer's message."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            store = region.store
            stored, publish = asyncio.Event(), asyncio.Event()
            apply = store.apply

            async def stored_then_held(*args, **kwargs):  # the peer's message is in the stream, not yet published
                new = await apply(*args, **kwargs)
                stored.set()
                await publish.wait()
                return new

            store.apply = stored_then_held  # type: ignore[method-assign]
            stream, first = await live_subscription(region, "lobby")
            name, update = from_a_peer("from a peer, an hour ago", ms_ago=3_600_000)
            applying = asyncio.create_task(region.apply(Delta(shard_updates={name: update}), "eu-west"))
            await asyncio.wait_for(stored.wait(), 5)

            loaded, storing = asyncio.Event(), asyncio.Event()
            shard_updates, post = store.shard_updates, store.post

            async def loaded_noted(shard: str):  # the post's shard, this hour's, is loaded first
                held = await shard_updates(shard)
                loaded.set()
                return held

            def storing_noted(*args, **kwargs):
                storing.set()
                return post(*args, **kwargs)

            store.shard_updates, store.post = loaded_noted, storing_noted  # type: ignore[method-assign]
            posting = asyncio.create_task(region.post("u1", "lobby", "posted this hour", "m-now"))
            await asyncio.wait_for(loaded.wait(), 5)
            # From the load, the post's writer went on as far as it could before this task runs: to the channel's
            # lock, where it waits for the peer's message to be published; or, were there no lock, into storing
            # the post, which is then answered and published first.
            if storing.is_set():
                await asyncio.wait_for(posting, 5)
            publish.set()
            await asyncio.wait_for(asyncio.gather(applying, posting), 5)

            got = [await asyncio.wait_for(first, 5), await asyncio.wait_for(anext(stream), 5)]
            assert [c.entry.body for c in got] == ["from a peer, an hour ago", "posted this hour"]
            assert stream_id_key(got[0].stream_id) < stream_id_key(got[1].stream_id)
            await stream.aclose()

    asyncio.run(main())


async def applied_in_doubt(region: Region, stored: bool) -> None:
    """Apply a peer's message "from a peer" of "lobby" while the connection to Redis breaks: after Redis ran
    the script (`stored`, its reply lost) or before. Then the peer's resend, applied as usual."""
    apply = region.store.apply

    async def broken(*args, **kwargs):
        if stored:
            await apply(*args, **kwargs)
        raise redis.exceptions.ConnectionError("the connection broke")

    name, update = from_a_peer("from a peer")
    region.store.apply = broken  # type: ignore[method-assign]
    with pytest.raises(redis.exceptions.ConnectionError):
        await region.apply(Delta(shard_updates={name: update}), "eu-west")
    region.store.apply = apply  # type: ignore[method-assign]
    await region.apply(Delta(shard_updates={name: update}), "eu-west")


def test_a_peers_messages_stored_by_an_apply_whose_reply_was_lost_reach_subscribers(own_valkey: EmbeddedValkey,
                                                                                   tmp_path):
    """Redis stored a peer's message, and the reply was lost: the apply is in doubt, and the peer's resend adds
    nothing (the shard reloaded from Redis has it). Once the region finds the change stored, at its next
    heartbeat, subscribers get the message."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            stream, first = await live_subscription(region, "lobby")
            await applied_in_doubt(region, stored=True)
            await region.heartbeat()
            assert (await asyncio.wait_for(first, 5)).entry.body == "from a peer"
            await stream.aclose()

    asyncio.run(main())


def test_a_peers_messages_that_an_apply_in_doubt_did_not_store_are_published_once_by_the_resend(
        own_valkey: EmbeddedValkey, tmp_path):
    """The connection broke before Redis ran the apply's script: the peer's resend stores the message and
    publishes it, and resolving the doubt at the next heartbeat publishes nothing more."""
    async def main() -> None:
        async with started_region(own_valkey.url, tmp_path) as region:
            stream, first = await live_subscription(region, "lobby")
            await applied_in_doubt(region, stored=False)
            assert (await asyncio.wait_for(first, 5)).entry.body == "from a peer"
            await region.heartbeat()
            await region.post("u1", "lobby", "posted after", "m-after")
            assert (await asyncio.wait_for(anext(stream), 5)).entry.body == "posted after"  # not the peer's again
            await stream.aclose()

    asyncio.run(main())
