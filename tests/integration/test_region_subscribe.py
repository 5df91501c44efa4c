"""A region's live subscriptions, through the region itself on a real Valkey."""

from __future__ import annotations

import asyncio
import time

from support import started_region

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.msglog import LogEntry, message_id
from mlchat.leader.region import Committed
from mlchat.leader.valkey import EmbeddedValkey


def committed(stream_id: str, body: str) -> Committed:
    hlc = Hlc(int(time.time() * 1000), 0).encode()
    entry = LogEntry(message_id("u1", "lobby", body), "lobby", "u1", body, body, hlc, "eu-west")
    return Committed(entry, stream_id, b"")


def test_live_messages_published_out_of_stream_order_all_reach_a_subscriber(own_valkey: EmbeddedValkey, tmp_path):
    """Two commits to one channel in different shards (a peer's message of an earlier hour, a post of this
    one) do not wait on each other: the later one in the channel's stream may be published first. Both
    are live messages, and both must reach the subscriber."""
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
