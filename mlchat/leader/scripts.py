"""Lua scripts run over one pipelined connection of their own.

Every write of a region is one script call. Through redis-py's client a call costs several times the CPU
Redis takes to run it: the connection pool, the retry wrapper, the argument encoder and the reply parser
are Python layers around a few hundred bytes on a socket (about 200 us against 25 us per call, measured on
a 2-core machine). So on a single server reached by TCP or a Unix socket, scripts go over one connection
of their own: each call writes its command at once, hiredis packs it and parses the replies, and Redis
answers in order, so the replies are handed to the callers in the order they called. Several calls in
flight share the connection, where the pool would open one per call.

It keeps redis-py's contract: the same replies (bytes, ints, lists), the same exceptions (errors Redis
returns are mapped by redis-py's own table: NOSCRIPT, LOADING, READONLY...), a script missing from
Redis loaded and the call made again, and one quick retry on a fresh connection when the connection is
lost or cannot be made, so that a Redis restart is ridden over and a call that still fails raises
`ConnectionError` (the region's writes are built for such a retry: a script whose reply was lost finds
its own work done when it runs again). A caller that gives up leaves the connection as it is: its reply is
read and dropped when it comes.

A Redis Cluster, a Sentinel-managed primary and TLS keep redis-py's scripts (`scripts_for`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Sequence
from typing import Any

import hiredis
from redis import asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

RETRY_AFTER_S = 0.01  # as the leader's redis-py client waits before its one retry (`server.redis_client`)

Arg = str | bytes | int | float


class _Replies(asyncio.Protocol):
    """One connection: commands out, replies handed to their callers in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Write a command; the future gets its reply."""
        if self.lost or self._transport is None or self._transport.is_closing():
            raise ConnectionError("connection to Redis lost")
        reply = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        self._transport.write(hiredis.pack_command(tuple(args)))
        return reply

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter = self._waiting.popleft()
            if waiter.done():  # its caller gave up
                continue
            if isinstance(reply, ResponseError):
                waiter.set_exception(BaseParser.parse_error(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ScriptConnection:
    """A pipelined connection to one Redis server, made when first needed and again after it is lost."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None,
                 username: str | None = None, password: str | None = None, db: int = 0) -> None:
        self._where = f"unix://{path}" if path else f"{host}:{port}"
        self._open = (lambda loop: loop.create_unix_connection(_Replies, path)) if path else \
            (lambda loop: loop.create_connection(_Replies, host, port))
        self._hello = [("AUTH", *([username] if username else []), password)] if password else []
        if db:
            self._hello.append(("SELECT", db))
        self._replies: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply; on a lost connection, once more on a fresh one."""
        try:
            return await (await self._connected()).send(args)
        except ConnectionError:
            await asyncio.sleep(RETRY_AFTER_S)
            return await (await self._connected()).send(args)

    async def _connected(self) -> _Replies:
        if self._replies is not None and not self._replies.lost:
            return self._replies
        if self._connecting is None:  # callers that come meanwhile wait on the same attempt
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected_or_not)
        return await asyncio.shield(self._connecting)

    def _connected_or_not(self, attempt: asyncio.Future[_Replies]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._replies = attempt.result()

    async def _connect(self) -> _Replies:
        try:
            _, replies = await self._open(asyncio.get_running_loop())
        except OSError as e:
            raise ConnectionError(f"connecting to Redis at {self._where}: {e}") from e
        try:
            for command in self._hello:
                await replies.send(command)
        except BaseException:
            replies.close()
            raise
        return replies

    def script(self, source: str) -> Script:
        return Script(self, source)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._replies is not None:
            self._replies.close()
            self._replies = None


class Script:
    """A Lua script called by its SHA1, loaded into Redis when Redis does not know it (as redis-py does)."""

    def __init__(self, connection: ScriptConnection, source: str) -> None:
        self._connection = connection
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        call = ("EVALSHA", self._sha, len(keys), *keys, *args)
        try:
            return await self._connection.call(*call)
        except NoScriptError:  # a restarted Redis, or SCRIPT FLUSH
            await self._connection.call("SCRIPT", "LOAD", self._source)
            return await self._connection.call(*call)


def script_connection(client: Any) -> ScriptConnection | None:
    """A `ScriptConnection` to the server `client` talks to, if it is one server reached by TCP or a Unix
    socket without TLS; None for a cluster, a Sentinel-managed primary or TLS (they keep redis-py's)."""
    if not isinstance(client, aioredis.Redis) or type(client.connection_pool) is not ConnectionPool:
        return None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    where: dict[str, Any]
    if pool.connection_class is UnixDomainSocketConnection:
        where = {"path": kwargs["path"]}
    elif pool.connection_class is Connection:
        where = {"host": kwargs.get("host", "localhost"), "port": int(kwargs.get("port", 6379))}
    else:
        return None
    return ScriptConnection(**where, username=kwargs.get("username"), password=kwargs.get("password"),
                            db=int(kwargs.get("db") or 0))
