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
Redis loaded and the call made again, the URL's credentials, database, client name, keepalive and
timeouts (redis-py's defaults: 5 s to connect, 5 s for a reply), and one quick retry on a fresh
connection when the connection is lost, cannot be made or times out, so that a Redis restart is ridden
over and a call that still fails raises `ConnectionError` or `TimeoutError` (the region's writes are
built for such a retry: a script whose reply was lost finds its own work done when it runs again). A
caller that gives up leaves the connection as it is: its reply is read and dropped when it comes. A
Redis that answers nothing for the timeout is taken for hung or gone: the connection is dropped, and
every call waiting on it fails (calls share it, so one stuck reply would hold up all that follow).

A Redis Cluster, a Sentinel-managed primary and TLS keep redis-py's scripts (`scripts_for`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import hiredis
from redis import asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import Connection, ConnectionPool, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# As the leader's redis-py client waits before its one retry (`server.redis_client`: an exponential
# backoff from 10 ms, doubled for the first retry).
RETRY_AFTER_S = 0.02

Arg = str | bytes | int | float
Opener = Callable[[asyncio.AbstractEventLoop, Callable[[], asyncio.Protocol]], Coroutine[Any, Any, Any]]


class _Replies(asyncio.Protocol):
    """One connection: commands out, replies handed to their callers in order."""

    def __init__(self, timeout_s: float | None) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()  # (reply, sent)
        self._timeout_s = timeout_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Write a command; the future gets its reply."""
        command = hiredis.pack_command(tuple(args))  # first: an argument it cannot pack queues nothing
        if self.lost or self._transport is None or self._transport.is_closing():
            raise ConnectionError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        self._waiting.append((reply, loop.time()))
        self._transport.write(command)
        if self._timeout_s and self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout_s, self._overdue)
        return reply

    def _overdue(self) -> None:
        """Drop the connection if Redis has not answered the oldest call in time; else look again when it is due."""
        self._watchdog = None
        if not self._waiting or self._timeout_s is None:
            return
        loop = asyncio.get_running_loop()
        left = self._waiting[0][1] + self._timeout_s - loop.time()
        if left > 0:
            self._watchdog = loop.call_later(left, self._overdue)
        else:
            self._drop(RedisTimeoutError(f"Redis did not answer a script call within {self._timeout_s:g} s"))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                self._drop(ConnectionError(f"Redis sent a reply nobody asked for: {reply!r:.200}"))
                return
            waiter, _ = self._waiting.popleft()
            if waiter.done():  # its caller gave up
                continue
            if isinstance(reply, ResponseError):
                waiter.set_exception(BaseParser.parse_error(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop(ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _drop(self, error: RedisError) -> None:
        """Close the connection; every call waiting on it fails with `error`."""
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            waiter, _ = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(type(error)(*error.args))  # one each: a raised exception gathers its traceback
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class ScriptConnection:
    """A pipelined connection to one Redis server, made when first needed and again after it is lost."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None,
                 username: str | None = None, password: str | None = None, db: int = 0,
                 client_name: str | None = None, timeout_s: float | None = 5.0, connect_timeout_s: float | None = 5.0,
                 keepalive: bool = False) -> None:
        self._where = f"unix://{path}" if path else f"{host}:{port}"
        self._open: Opener = ((lambda loop, protocol: loop.create_unix_connection(protocol, path)) if path else
                              (lambda loop, protocol: loop.create_connection(protocol, host, port)))
        self._hello: list[tuple[Arg, ...]] = []
        if password:
            self._hello.append(("AUTH", *([username] if username else []), password))
        if db:
            self._hello.append(("SELECT", db))
        if client_name:
            self._hello.append(("CLIENT", "SETNAME", client_name))
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._keepalive = keepalive and not path
        self._replies: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None
        self._closed = False

    async def call(self, *args: Arg) -> Any:
        """Send one command and return its reply; on a lost connection or a timeout, once more on a fresh one."""
        try:
            return await (await self._connected()).send(args)
        except (ConnectionError, RedisTimeoutError):
            if self._closed:
                raise
            await asyncio.sleep(RETRY_AFTER_S)
            return await (await self._connected()).send(args)

    async def _connected(self) -> _Replies:
        if self._closed:
            raise ConnectionError("the script connection to Redis is closed")
        if self._replies is not None and not self._replies.lost:
            return self._replies
        attempt = self._connecting
        if attempt is None:  # callers that come meanwhile wait on the same attempt
            attempt = self._connecting = asyncio.ensure_future(self._connect())
            attempt.add_done_callback(self._connected_or_not)
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            if attempt.cancelled():  # by `close`, not by this caller's own cancellation
                raise ConnectionError("the script connection to Redis was closed while connecting") from None
            raise

    def _connected_or_not(self, attempt: asyncio.Future[_Replies]) -> None:
        self._connecting = None
        if attempt.cancelled() or attempt.exception() is not None:
            return
        if self._closed:  # closed while the attempt was finishing
            attempt.result().close()
        else:
            self._replies = attempt.result()

    async def _connect(self) -> _Replies:
        try:
            transport, replies = await asyncio.wait_for(
                self._open(asyncio.get_running_loop(), lambda: _Replies(self._timeout_s)), self._connect_timeout_s)
        except OSError as e:
            raise ConnectionError(f"connecting to Redis at {self._where}: {e}") from e
        except TimeoutError:
            raise RedisTimeoutError(f"connecting to Redis at {self._where}: no answer within "
                               f"{self._connect_timeout_s:g} s") from None
        if self._keepalive:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
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
        self._closed = True
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
    """A `ScriptConnection` to the server `client` talks to, with its settings, if it is one server reached by
    TCP or a Unix socket without TLS; None for a cluster, a Sentinel-managed primary or TLS (they keep
    redis-py's)."""
    if not isinstance(client, aioredis.Redis) or type(client.connection_pool) is not ConnectionPool:
        return None
    pool = client.connection_pool
    if pool.connection_class not in (Connection, UnixDomainSocketConnection):
        return None
    conn = pool.connection_class(**pool.connection_kwargs)  # redis-py's reading of the URL, and its defaults
    where = {"path": conn.path} if pool.connection_class is UnixDomainSocketConnection else \
        {"host": conn.host, "port": int(conn.port)}
    return ScriptConnection(**where, username=conn.username, password=conn.password, db=int(conn.db or 0),
                            client_name=conn.client_name, timeout_s=conn.socket_timeout,
                            connect_timeout_s=conn.socket_connect_timeout,
                            keepalive=bool(getattr(conn, "socket_keepalive", False)))
