"""How a region takes a peer's stream: what arrived while it was applying goes in one group, cut at heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support import turned

from mlchat.leader.replication import in_groups
from mlchat.v1 import replication_pb2 as rpb


def change(n: int) -> rpb.Delta:
    return rpb.Delta(from_region="a", vector={"a": f"{n:02}"})


def heartbeat(n: int) -> rpb.Delta:
    return rpb.Delta(from_region="a", vector={"a": f"{n:02}"}, members={"a": "a:1"}, cursor=f"e:{n:02}")


async def stream(*items: rpb.Delta | BaseException) -> AsyncIterator[rpb.Delta]:
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


async def groups_of(messages: AsyncIterator[rpb.Delta], limit: int = 100) -> list[list[rpb.Delta]]:
    return [group async for group in in_groups(messages, limit)]


def test_what_arrived_while_the_group_before_was_applied_is_one_group_ended_by_each_heartbeat():
    messages = [change(1), change(2), heartbeat(3), change(4), heartbeat(5), heartbeat(6), change(7)]
    groups = asyncio.run(groups_of(stream(*messages)))
    assert groups == [messages[:3], messages[3:5], messages[5:6], messages[6:]]


def test_a_group_never_holds_more_than_was_read_ahead():
    messages = [change(n) for n in range(10)]
    groups = asyncio.run(groups_of(stream(*messages), limit=3))
    assert [m for g in groups for m in g] == messages
    assert max(map(len, groups)) == 3


def test_a_stream_that_fails_hands_on_what_came_before_then_the_failure():
    async def consume() -> tuple[list[list[rpb.Delta]], Exception]:
        got = []
        with pytest.raises(TimeoutError) as failure:
            async for group in in_groups(stream(change(1), change(2), TimeoutError("silent too long"))):
                got.append(group)
        return got, failure.value

    groups, failure = asyncio.run(consume())
    assert groups == [[change(1), change(2)]]
    assert str(failure) == "silent too long"


def test_a_stream_whose_call_is_cancelled_under_it_ends_with_an_error_the_follower_reconnects_on():
    async def consume() -> tuple[list[list[rpb.Delta]], Exception]:
        got = []
        with pytest.raises(ConnectionError) as failure:
            async for group in in_groups(stream(change(1), asyncio.CancelledError())):
                got.append(group)
        return got, failure.value

    groups, failure = asyncio.run(consume())
    assert groups == [[change(1)]]
    assert "cancelled" in str(failure)


def test_a_consumer_that_stops_stops_the_reading():
    async def forever() -> AsyncIterator[rpb.Delta]:
        n = 0
        while True:
            n += 1
            yield change(n)  # never waits: the reader stops only on its full queue

    async def consume_one() -> list[asyncio.Task]:
        groups = in_groups(forever(), limit=5)
        await anext(groups)
        readers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await groups.aclose()
        await asyncio.wait(readers, timeout=5)
        return readers

    readers = asyncio.run(consume_one())
    assert len(readers) == 1 and readers[0].cancelled()


def test_the_reading_ahead_holds_at_most_its_bytes_but_for_one_larger_message():
    """Messages are read ahead only while those held (waiting, or in the group being applied) fit the byte
    limit: the next one received waits for room. One larger than the limit is still taken, alone."""
    small, large = change(1), rpb.Delta(from_region="a", vector={"a": "09"}, cursor="x" * 500)
    budget = 3 * small.ByteSize()

    async def consume() -> list[tuple[list[rpb.Delta], int]]:
        read = 0

        async def counted() -> AsyncIterator[rpb.Delta]:
            nonlocal read
            for message in [small] * 6 + [large, small]:
                read += 1
                yield message

        seen = []
        async for group in in_groups(counted(), limit=100, limit_bytes=budget):
            await turned(1)  # one turn: a reader that may read on reads all it may, never waiting otherwise
            seen.append((group, read))
        return seen

    seen = asyncio.run(consume())
    assert [m for group, _ in seen for m in group] == [small] * 6 + [large, small]
    assert all(sum(m.ByteSize() for m in group) <= budget or group == [large] for group, _ in seen)
    # While the first group (three small ones, the whole budget) is applied, the fourth is received and waits.
    assert seen[0] == ([small] * 3, 4)
