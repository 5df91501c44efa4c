"""Locks by key: one holder per key at a time, and nothing kept for a key nobody holds or awaits."""

from __future__ import annotations

import asyncio

import pytest

from mlchat.leader.locks import KeyedLocks


def test_callers_of_one_key_hold_it_in_turn_and_other_keys_are_free() -> None:
    async def main() -> None:
        locks = KeyedLocks()
        order: list[str] = []
        release = asyncio.Event()

        async def hold(key: str, name: str) -> None:
            async with locks.held(key):
                order.append(name)
                if name == "first":
                    await release.wait()

        first = asyncio.create_task(hold("a", "first"))
        second = asyncio.create_task(hold("a", "second"))
        other = asyncio.create_task(hold("b", "other"))
        await other  # not held back by "a"
        assert order == ["first", "other"] and locks.callers("a") == 2  # "second" awaits the lock
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "other", "second"]

    asyncio.run(main())


def test_a_key_nobody_holds_or_awaits_keeps_no_lock() -> None:
    async def main() -> None:
        locks = KeyedLocks()
        async with locks.held("a"):
            assert locks.callers("a") == 1
        assert not locks._locks
        with pytest.raises(RuntimeError):
            async with locks.held("a"):
                raise RuntimeError("the holder failed")
        assert not locks._locks
        started = asyncio.Event()

        async def hold_b() -> None:
            started.set()  # and on, without a pause, to awaiting the lock
            async with locks.held("b"):
                pass

        async with locks.held("b"):
            gave_up = asyncio.create_task(hold_b())
            await started.wait()
            assert locks.callers("b") == 2
            gave_up.cancel()  # a caller cancelled while it awaits the lock
            with pytest.raises(asyncio.CancelledError):
                await gave_up
            assert locks.callers("b") == 1
        assert not locks._locks

    asyncio.run(main())
