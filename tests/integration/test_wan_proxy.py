"""The WAN proxy over real loopback sockets: delay, order, bandwidth, partitions, resets."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable

import pytest

from dcsim.proxy import Link


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        await _close(writer)

    return await asyncio.start_server(echo, "127.0.0.1", 0)


def run(scenario: Callable[[Link], Awaitable[None]]) -> None:
    """Run `scenario` against a link in front of an echo server."""

    async def main() -> None:
        server = await _echo_server()
        link = Link("test", ("127.0.0.1", server.sockets[0].getsockname()[1]))
        await link.start()
        try:
            await scenario(link)
        finally:
            await link.stop()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


async def _connect(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", link.listen_port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.monotonic()
    writer.write(b"ping")
    await writer.drain()
    await reader.readexactly(4)
    return (time.monotonic() - started) * 1000


def test_round_trip_matches_the_configured_delay_within_ten_percent():
    async def scenario(link: Link) -> None:
        link.set("up", latency_ms=20)
        link.set("down", latency_ms=20)
        reader, writer = await _connect(link)
        rtts = [await _round_trip(reader, writer) for _ in range(20)]
        await _close(writer)
        assert 40 <= statistics.median(rtts) <= 44, rtts

    run(scenario)


def test_byte_order_is_preserved_under_jitter():
    payload = bytes(i % 251 for i in range(300_000))

    async def scenario(link: Link) -> None:
        link.set("up", latency_ms=5, jitter_ms=5)
        link.set("down", latency_ms=5, jitter_ms=5)
        reader, writer = await _connect(link)

        async def send() -> None:
            for i in range(0, len(payload), 1000):  # many small chunks, each with its own jitter
                writer.write(payload[i:i + 1000])
                await writer.drain()

        sender = asyncio.create_task(send())
        received = await reader.readexactly(len(payload))
        await sender
        await _close(writer)
        assert received == payload

    run(scenario)


def test_large_transfer_arrives_intact_under_a_bandwidth_cap():
    payload = bytes(range(256)) * 2048  # 512 KiB

    async def scenario(link: Link) -> None:
        link.set("down", bandwidth_kbps=1024)  # 1 MiB/s: the echo back takes about half a second
        reader, writer = await _connect(link)
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        received = await reader.readexactly(len(payload))
        elapsed = time.monotonic() - started
        await _close(writer)
        assert received == payload
        assert elapsed >= 0.4, f"the cap did not hold: {elapsed:.2f}s"

    run(scenario)


def test_partition_stops_traffic_within_100ms_and_heal_restores_it():
    async def scenario(link: Link) -> None:
        reader, writer = await _connect(link)
        assert await _round_trip(reader, writer) < 100
        link.set("up", blackhole=True)
        link.set("down", blackhole=True)
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.1)
        link.set("up", blackhole=False)
        link.set("down", blackhole=False)
        # The connection hung but survives, its stream intact: what was held arrives, then the rest.
        assert await asyncio.wait_for(reader.readexactly(4), 1) == b"held"
        assert await asyncio.wait_for(_round_trip(reader, writer), 1) < 100
        await _close(writer)

    run(scenario)


def test_one_way_partition_is_one_way():
    async def main() -> None:
        received = bytearray()
        arrived = asyncio.Condition()  # notified as `received` grows

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"tick")  # the server speaks first
            await writer.drain()
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(100):
                    async with arrived:
                        received.extend(data)
                        arrived.notify_all()
            await _close(writer)

        async def until_received(data: bytes, deadline_s: float = 2.0) -> None:
            async with arrived:
                await asyncio.wait_for(arrived.wait_for(lambda: data in received), deadline_s)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        link = Link("test", ("127.0.0.1", server.sockets[0].getsockname()[1]))
        await link.start()
        try:
            link.set("down", blackhole=True)  # server -> client cut; client -> server flows
            reader, writer = await _connect(link)
            writer.write(b"hello")
            await writer.drain()
            await until_received(b"hello")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.2)
            await _close(writer)

            link.set("down", blackhole=False)
            link.set("up", blackhole=True)  # client -> server cut; server -> client flows
            reader, writer = await _connect(link)
            assert await asyncio.wait_for(reader.readexactly(4), 1) == b"tick"
            writer.write(b"held")
            await writer.drain()
            with pytest.raises(TimeoutError):
                await until_received(b"held", deadline_s=0.2)
            link.set("up", blackhole=False)
            writer.write(b"after")
            await writer.drain()
            await until_received(b"after")
            assert bytes(received).endswith(b"heldafter")
            await _close(writer)
        finally:
            await link.stop()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_reset_and_down():
    async def scenario(link: Link) -> None:
        reader, writer = await _connect(link)
        assert await _round_trip(reader, writer) < 100
        link.reset()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await _round_trip(reader, writer)
        await _close(writer)

        await link.down()
        with pytest.raises(OSError):
            await _connect(link)
        await link.up()
        reader, writer = await _connect(link)
        assert await _round_trip(reader, writer) < 100
        await _close(writer)

    run(scenario)
