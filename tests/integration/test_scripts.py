"""Scripts over a pipelined connection of their own (`mlchat/leader/scripts.py`), against a real Valkey."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from support import turned, wait_until

from mlchat.leader.scripts import ScriptConnection, script_connection
from mlchat.leader.valkey import EmbeddedValkey

ECHO = "return ARGV[1]"
COUNT = "return redis.call('INCR', KEYS[1])"  # a write: held while Valkey pauses writes
SHAPES = "return {ARGV[1], tonumber(ARGV[2]), false, {ARGV[1]}}"


@pytest.fixture
def unix_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A Valkey of the test's own on a Unix socket only, as a leader's embedded one."""
    server = EmbeddedValkey(tmp_path / "unix-valkey")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def with_scripts(url: str, test: Callable[[ScriptConnection], Awaitable[None]]) -> None:
    """Run `test` with a `ScriptConnection` to the server at `url`, in an event loop of its own."""
    async def main() -> None:
        client = aioredis.Redis.from_url(url)
        scripts = script_connection(client)
        assert scripts is not None
        try:
            await test(scripts)
        finally:
            await scripts.close()
            await client.aclose()
    asyncio.run(main())


def direct(valkey: EmbeddedValkey) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=valkey.port, password=valkey.password)


def script_clients(valkey: EmbeddedValkey, held: bool = False) -> list[dict[str, str]]:
    """The clients Valkey lists whose last command was a script call (`held`: and is held by a pause)."""
    with direct(valkey) as r:
        listing = r.execute_command("CLIENT", "LIST").decode()
    clients = [dict(f.split("=", 1) for f in line.split()) for line in listing.splitlines()]
    return [c for c in clients if c["cmd"] == "evalsha" and (not held or "b" in c["flags"])]


async def held_script(valkey: EmbeddedValkey) -> dict[str, str]:
    """The client whose script call the paused Valkey holds, once there is one."""
    await asyncio.to_thread(wait_until, lambda: script_clients(valkey, held=True), 10, "a script call held")
    return script_clients(valkey, held=True)[0]


@contextlib.asynccontextmanager
async def held_by_valkey(valkey: EmbeddedValkey, call: Awaitable[Any]
                         ) -> AsyncIterator[tuple[asyncio.Future[Any], str]]:
    """`call` started while Valkey pauses writes: (its future, the id of the client Valkey holds it for), once
    Valkey holds it; Valkey takes writes again after."""
    with direct(valkey) as r:
        r.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            future = asyncio.ensure_future(call)
            yield future, (await held_script(valkey))["id"]
        finally:
            r.execute_command("CLIENT", "UNPAUSE")


@pytest.mark.parametrize("server", ["own_valkey", "unix_valkey"])
def test_a_script_answers_as_redis_py_does_over_tcp_and_unix_sockets(server, request):
    valkey: EmbeddedValkey = request.getfixturevalue(server)

    async def test(scripts: ScriptConnection) -> None:
        ours = await scripts.script(SHAPES)(keys=["k"], args=["héllo", 7])
        async with aioredis.Redis.from_url(valkey.url) as client:
            theirs = await client.register_script(SHAPES)(keys=["k"], args=["héllo", 7])
        assert ours == theirs == ["héllo".encode(), 7, None, ["héllo".encode()]]
    with_scripts(valkey.url, test)


def test_calls_in_flight_together_each_get_their_own_reply(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        echo = connection.script(ECHO)
        replies = await asyncio.gather(*(echo(args=[f"call {i}"]) for i in range(500)))
        assert replies == [f"call {i}".encode() for i in range(500)]

    with_scripts(own_valkey.url, test)


def test_a_script_redis_does_not_know_is_loaded_and_the_call_answered(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        echo = connection.script(ECHO)
        assert await echo(args=["before"]) == b"before"
        with direct(own_valkey) as r:
            r.script_flush()
        assert await echo(args=["after the flush"]) == b"after the flush"

    with_scripts(own_valkey.url, test)


def test_errors_redis_returns_are_raised_as_redis_py_raises_them(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        with pytest.raises(redis.exceptions.ResponseError, match="boom"):
            await connection.script("return redis.error_reply('ERR boom')")()
        with pytest.raises(redis.exceptions.ReadOnlyError):
            await connection.script("return redis.error_reply('READONLY not now')")()
        assert await connection.script(ECHO)(args=["still answering"]) == b"still answering"

    with_scripts(own_valkey.url, test)


def test_a_caller_that_gives_up_leaves_the_next_callers_reply_to_them(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        count, echo = connection.script(COUNT), connection.script(ECHO)
        assert await count(keys=["given-up"]) == 1
        async with held_by_valkey(own_valkey, count(keys=["given-up"])) as (given_up, _):
            behind = asyncio.ensure_future(echo(args=["mine"]))  # pipelined behind the held write
            given_up.cancel()
        assert await behind == b"mine"
        with direct(own_valkey) as r:
            assert int(r.get("given-up")) == 2  # the write ran; its reply was read and dropped
        assert await count(keys=["given-up"]) == 3

    with_scripts(own_valkey.url, test)


def test_a_call_whose_connection_is_cut_is_made_again_on_a_fresh_one(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        count = connection.script(COUNT)
        assert await count(keys=["cut"]) == 1
        async with held_by_valkey(own_valkey, count(keys=["cut"])) as (call, held):
            with direct(own_valkey) as r:
                r.execute_command("CLIENT", "KILL", "ID", held)  # before the paused write ran
        assert await call == 2  # ran once: on the new connection
        [fresh] = script_clients(own_valkey)
        assert fresh["id"] != held

    with_scripts(own_valkey.url, test)


def test_calls_fail_with_connection_error_while_redis_is_down_and_answer_once_it_is_back(own_valkey):
    async def test(scripts: ScriptConnection) -> None:
        echo = scripts.script(ECHO)
        assert await echo(args=["up"]) == b"up"
        await asyncio.to_thread(own_valkey.stop)
        with pytest.raises(redis.exceptions.ConnectionError):
            await echo(args=["down"])
        await asyncio.to_thread(own_valkey.start)
        assert await echo(args=["back"]) == b"back"  # and Redis, restarted, learnt the script again
    with_scripts(own_valkey.url, test)


def test_an_argument_it_cannot_send_fails_that_call_alone(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        echo = connection.script(ECHO)
        with pytest.raises(TypeError):
            await echo(args=[None])  # type: ignore[list-item]
        assert await asyncio.gather(echo(args=["a"]), echo(args=["b"])) == [b"a", b"b"]

    with_scripts(own_valkey.url, test)


def test_a_redis_that_does_not_answer_times_out_and_answers_again_once_it_does(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        echo = connection.script(ECHO)
        assert await echo(args=["before"]) == b"before"
        os.kill(own_valkey.pid or 0, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(redis.exceptions.TimeoutError):
                await asyncio.gather(echo(args=["stuck"]), echo(args=["behind it"]))
            waited = asyncio.get_running_loop().time() - started
            assert 0.6 <= waited < 3  # the URL's 0.3 s, and as much again for the retry on a fresh connection
        finally:
            os.kill(own_valkey.pid or 0, signal.SIGCONT)
        assert await echo(args=["after"]) == b"after"

    with_scripts(own_valkey.url + "?socket_timeout=0.3&socket_connect_timeout=0.3", test)


def test_closing_fails_the_calls_in_flight_and_connects_no_more(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        count = connection.script(COUNT)
        assert await count(keys=["closing"]) == 1
        async with held_by_valkey(own_valkey, count(keys=["closing"])) as (in_flight, held):
            await connection.close()
            with pytest.raises(redis.exceptions.ConnectionError):
                await in_flight
        # Not connected again (Valkey may not have seen the closed connection go yet).
        assert [c["id"] for c in script_clients(own_valkey) if c["id"] != held] == []
        with pytest.raises(redis.exceptions.ConnectionError):
            await count(keys=["closing"])

    with_scripts(own_valkey.url, test)


def test_closing_while_connecting_fails_the_waiting_calls_with_connection_error(own_valkey):
    async def test(connection: ScriptConnection) -> None:
        calls = [asyncio.ensure_future(connection.script(ECHO)(args=[str(i)])) for i in range(3)]
        await turned(1)  # each call is now waiting on the one connection attempt
        await connection.close()
        for call in calls:
            with pytest.raises(redis.exceptions.ConnectionError):
                await call

    with_scripts(own_valkey.url, test)


def test_a_wrong_password_is_an_authentication_error(own_valkey):
    async def main() -> None:
        scripts = ScriptConnection(port=own_valkey.port or 0, password="not-the-password")
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await scripts.script(ECHO)(args=["x"])
        finally:
            await scripts.close()
    asyncio.run(main())


def test_the_database_of_the_url_is_the_one_scripts_write_to(own_valkey):
    async def test(scripts: ScriptConnection) -> None:
        assert await scripts.script(COUNT)(keys=["in-db-3"]) == 1
        with direct(own_valkey) as r:
            assert r.get("in-db-3") is None
            r.execute_command("SELECT", 3)
            assert r.get("in-db-3") == b"1"
    with_scripts(own_valkey.url + "/3", test)


def test_clusters_sentinels_and_tls_keep_redis_pys_scripts():
    async def main() -> None:
        clients = [RedisCluster(host="127.0.0.1", port=7000),
                   Sentinel([("127.0.0.1", 26379)]).master_for("mymaster"),
                   aioredis.Redis.from_url("rediss://127.0.0.1:6380")]
        try:
            assert [script_connection(c) for c in clients] == [None, None, None]
            for url in ("unix:///tmp/valkey.sock", "redis://127.0.0.1:6379/0"):
                async with aioredis.Redis.from_url(url) as client:
                    assert isinstance(script_connection(client), ScriptConnection)
        finally:
            for c in clients:
                await c.aclose()
    asyncio.run(main())
