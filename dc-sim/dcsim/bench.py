"""The WAN proxy's own cost with no toxics, against direct loopback in the same run.

Latency: round trips of 64 bytes to an echo server, direct and through one proxy link (each round trip
crosses the link once in each direction). Throughput: a one-way bulk transfer, direct and proxied.
As in a dc-sim run, the servers, the proxy and the client are three processes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection

from dcsim.proxy import Link

ROUND_TRIPS = 2000
BULK_BYTES = 256 * 1024 * 1024


async def _serve_echo() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _serve_sink() -> asyncio.Server:
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(b"%d\n" % total)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(sink, "127.0.0.1", 0)


async def _round_trips(port: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"x" * 64
    out = []
    for _ in range(ROUND_TRIPS):
        t = time.perf_counter()
        writer.write(payload)
        await reader.readexactly(len(payload))
        out.append((time.perf_counter() - t) * 1000)
    writer.close()
    return out


async def _bulk(port: int) -> float:
    """MiB/s of a one-way transfer, measured until the receiver confirms it has everything."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"x" * (1 << 20)
    t = time.perf_counter()
    for _ in range(BULK_BYTES // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    confirmed = int(await reader.readline())
    elapsed = time.perf_counter() - t
    writer.close()
    assert confirmed == BULK_BYTES, confirmed
    return BULK_BYTES / (1 << 20) / elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _servers(ports: Connection) -> None:
    async def run() -> None:
        echo, sink = await _serve_echo(), await _serve_sink()
        ports.send((echo.sockets[0].getsockname()[1], sink.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()  # until terminated

    asyncio.run(run())


def _client(echo_port: int, sink_port: int, results: Connection) -> None:
    async def run() -> None:
        latencies = await _round_trips(echo_port)
        results.send((latencies, await _bulk(sink_port)))

    asyncio.run(run())


def _measure(echo_port: int, sink_port: int) -> tuple[list[float], float]:
    mine, theirs = multiprocessing.Pipe()
    client = multiprocessing.Process(target=_client, args=(echo_port, sink_port, theirs))
    client.start()
    result: tuple[list[float], float] = mine.recv()
    client.join()
    return result


async def main() -> None:
    mine, theirs = multiprocessing.Pipe()
    servers = multiprocessing.Process(target=_servers, args=(theirs,), daemon=True)
    servers.start()
    echo_port, sink_port = mine.recv()
    echo_link = Link("bench-echo", ("127.0.0.1", echo_port))
    sink_link = Link("bench-sink", ("127.0.0.1", sink_port))
    await echo_link.start()
    await sink_link.start()
    try:
        direct, direct_mib = await asyncio.to_thread(_measure, echo_port, sink_port)
        proxied, proxied_mib = await asyncio.to_thread(_measure, echo_link.listen_port, sink_link.listen_port)
    finally:
        await echo_link.stop()
        await sink_link.stop()
        servers.terminate()
    added = pct(proxied, .5) - pct(direct, .5)
    print("| measure | through the proxy | direct loopback (same run) | ratio |\n|---|---|---|---|")
    print(f"| round trip, 64 B | p50 {pct(proxied, .5):.3f} ms, p99 {pct(proxied, .99):.3f} ms | "
          f"p50 {pct(direct, .5):.3f} ms, p99 {pct(direct, .99):.3f} ms | "
          f"+{added:.3f} ms per round trip, +{added / 2:.3f} ms per hop at p50 (target <= 0.5 ms) |")
    print(f"| one-way bulk transfer, {BULK_BYTES >> 20} MiB | {proxied_mib:.0f} MiB/s | {direct_mib:.0f} MiB/s | "
          f"{proxied_mib / direct_mib:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
