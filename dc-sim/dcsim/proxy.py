"""A userspace TCP proxy that makes loopback behave like a WAN (Toxiproxy's toxics are the model).

A `Link` listens on a port and forwards every connection to an upstream address. Each direction of a
link has its own `Toxics`: latency with jitter (applied per chunk, order preserved), a bandwidth cap, a
blackhole (bytes are read and dropped: connections hang, as in a real partition), and it can reset
every connection or go down (refuse new connections, close current ones). Settings change at runtime
and apply at once, to connections already open too.

Directions are named from the link's point of view: `up` carries bytes from the connecting side to
the upstream, `down` carries the replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Toxics:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0  # each chunk's delay is latency +/- up to jitter (never below zero)
    bandwidth_kbps: float = 0.0  # kilobytes per second; 0: unlimited
    blackhole: bool = False

    def delay_s(self, rng: random.Random) -> float:
        jitter = rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.latency_ms + jitter) / 1000


@dataclass
class _Pipe:
    """One direction of one connection: reads, delays in order, writes."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    toxics: dict[str, Toxics]
    direction: str
    rng: random.Random
    counters: dict[str, int]  # the link's, for this direction: bytes "delivered" and "dropped"
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)

    async def read_loop(self) -> None:
        last_due = 0.0
        while data := await self.reader.read(CHUNK):
            toxics = self.toxics[self.direction]
            if toxics.blackhole:
                self.counters["dropped"] += len(data)
                continue
            # A chunk never overtakes the one before it, whatever its jitter.
            last_due = max(last_due, time.monotonic() + toxics.delay_s(self.rng))
            self.queue.put_nowait((last_due, data))
        self.queue.put_nowait((0.0, b""))  # end of stream

    async def write_loop(self) -> None:
        while True:
            due, data = await self.queue.get()
            if not data:
                with contextlib.suppress(OSError):
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            toxics = self.toxics[self.direction]
            if toxics.blackhole:  # partitioned while in flight
                self.counters["dropped"] += len(data)
                continue
            self.writer.write(data)
            await self.writer.drain()
            self.counters["delivered"] += len(data)
            if toxics.bandwidth_kbps:
                await asyncio.sleep(len(data) / (toxics.bandwidth_kbps * 1024))


class Link:
    """A proxy from `listen_port` on 127.0.0.1 to `upstream` with runtime-changeable toxics."""

    def __init__(self, name: str, upstream: tuple[str, int], listen_port: int = 0, seed: int = 0) -> None:
        self.name = name
        self.upstream = upstream
        self.listen_port = listen_port
        self.toxics = {"up": Toxics(), "down": Toxics()}
        self.is_down = False
        self.counters = {d: {"delivered": 0, "dropped": 0} for d in ("up", "down")}
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"link {self.name} already started")
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        self.is_down = False

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.reset()  # every connection ends, and with it the task that serves it
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def set(self, direction: str, **changes: float | bool) -> Toxics:
        self.toxics[direction] = replace(self.toxics[direction], **changes)
        return self.toxics[direction]

    def reset(self) -> None:
        """Reset every open connection (RST to both sides)."""
        for pair in list(self._connections):
            for writer in pair:
                _abort(writer)
        self._connections.clear()

    async def down(self) -> None:
        self.is_down = True
        await self.stop()

    async def up(self) -> None:
        if self._server is None:
            await self.start()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                _abort(c_writer)
                return
            pair = (c_writer, u_writer)
            self._connections.add(pair)
            up = _Pipe(c_reader, u_writer, self.toxics, "up", self._rng, self.counters["up"])
            down = _Pipe(u_reader, c_writer, self.toxics, "down", self._rng, self.counters["down"])
            try:
                # A failure in one pipe (a reset peer) ends the others: the connection is over.
                async with asyncio.TaskGroup() as pipes:
                    for loop in (up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop()):
                        pipes.create_task(loop)
            except* OSError:
                pass
            finally:
                self._connections.discard(pair)
                for writer in pair:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        finally:
            self._tasks.discard(task)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger 0: close sends RST, as a reset peer does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
