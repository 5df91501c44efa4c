"""A userspace TCP proxy that makes loopback behave like a WAN (Toxiproxy's toxics are the model).

A `Link` listens on a port and forwards every connection to an upstream address. Each direction of a
link has its own `Toxics`: latency with jitter (applied per chunk, order preserved), a bandwidth cap,
and a blackhole. A blackholed direction holds its bytes and stops reading, so senders' buffers fill
and connections hang as on a real partition; when it heals, the held bytes flow on in order, as TCP
retransmission would deliver them (dropping bytes from the middle of a stream is not something a
network does to TCP). A link can also reset every connection or go down (refuse new connections,
close current ones). Settings change at runtime and apply at once, to connections already open too.

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
MAX_IN_FLIGHT = 256 * 1024  # bytes a direction of a connection holds before it stops reading


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
    link: Link
    direction: str
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)
    queued: int = 0  # bytes read and not yet written
    room: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_loop(self) -> None:
        last_due = 0.0
        while True:
            await self.link.passable(self.direction)
            data = await self.reader.read(CHUNK)
            if not data:
                break
            # A chunk never overtakes the one before it, whatever its jitter.
            last_due = max(last_due, time.monotonic() + self.link.toxics[self.direction].delay_s(self.link.rng))
            self.queue.put_nowait((last_due, data))
            self.queued += len(data)
            # Like a network path, hold only so much in flight: past it, stop reading, so that a
            # slow link pushes back on the sender instead of buffering without end.
            while self.queued > MAX_IN_FLIGHT:
                self.room.clear()
                await self.room.wait()
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
            await self.link.passable(self.direction)  # partitioned while in flight: hold it
            self.writer.write(data)
            await self.writer.drain()
            self.link.delivered[self.direction] += len(data)
            self.queued -= len(data)
            self.room.set()
            toxics = self.link.toxics[self.direction]
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
        self.delivered = {"up": 0, "down": 0}  # bytes
        self.rng = random.Random(seed)
        self._changed = asyncio.Event()  # replaced by a fresh one at every change of toxics
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
        return self.set_toxics(direction, replace(self.toxics[direction], **changes))

    def set_toxics(self, direction: str, toxics: Toxics) -> Toxics:
        self.toxics[direction] = toxics
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return toxics

    async def passable(self, direction: str) -> None:
        """Return once `direction` is not blackholed."""
        while self.toxics[direction].blackhole:
            await self._changed.wait()

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
            up = _Pipe(c_reader, u_writer, self, "up")
            down = _Pipe(u_reader, c_writer, self, "down")
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
