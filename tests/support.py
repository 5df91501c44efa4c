"""Helpers shared by the test tiers: waiting on conditions, looking at processes, a region in the test's process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from dcsim import cli as dcsim
from mlchat.leader.process import free_port
from mlchat.leader.region import Region
from mlchat.leader.server import redis_client
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import Store


@contextlib.contextmanager
def dcsim_run(run_dir: Path, regions: tuple[str, ...], **up: Any) -> Iterator[dict]:
    """`dcsim up` in `run_dir` (its status, with `run_dir` added), and `dcsim down` after."""
    state = dcsim.up(run_dir, regions, None, None, **up)
    state["run_dir"] = run_dir
    try:
        yield state
    finally:
        dcsim.down(run_dir)


@contextlib.asynccontextmanager
async def started_region(redis_url: str, data_dir: Path, **settings: Any) -> AsyncIterator[Region]:
    """A region "us-east" of one leader in this process, on the Redis at `redis_url`, started; its store
    closed after. `settings`: of `LeaderSettings`, beyond its region, address and data directory."""
    store = Store(redis_client(redis_url))
    region = Region(LeaderSettings("us-east", "127.0.0.1:0", data_dir, **settings), store, 1,
                    lambda: int(time.time() * 1000))
    try:
        await region.start()
        yield region
    finally:
        await store.close()


def after_turns(turns: int, then: Callable[[], object]) -> None:
    """Call `then` once the running event loop has gone round `turns` more times: work that is on its way (a
    call's request being read, its token checked), scheduled rather than slept for."""
    if turns:
        asyncio.get_running_loop().call_soon(after_turns, turns - 1, then)
    else:
        then()


def turned(turns: int) -> asyncio.Future[None]:
    """A future done once the running event loop has gone round `turns` more times."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    after_turns(turns, lambda: done.set_result(None))
    return done


def wait_until(condition: Callable[[], bool], deadline_s: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test if it does not within `deadline_s`."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline_s}s")
        time.sleep(0.01)


def all_bodies(client: Any, channel: str) -> list[str]:
    """Every message body of a channel, oldest first, read page by page through a `ChatClient`."""
    bodies, cursor = [], ""
    while page := client.list(channel, cursor=cursor, limit=500).messages:
        bodies += [m.body for m in page]
        cursor = page[-1].cursor
    return bodies


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample's value, 0 if it is absent (a counter not yet touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def cluster_ports(primaries: int = 3) -> list[tuple[int, int]]:
    """(client port, cluster bus port) for each primary of a local Redis Cluster."""
    return [(free_port(), free_port()) for _ in range(primaries)]


def flush(url: str) -> None:
    """Empty a Redis, or every primary of a Redis Cluster (`redis+cluster://`)."""
    import redis
    from redis.cluster import RedisCluster

    from mlchat.leader.server import CLUSTER_SCHEME

    if url.startswith(CLUSTER_SCHEME):
        with RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):]) as cluster:
            cluster.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        with redis.Redis.from_url(url) as client:
            client.flushall()


def session_redis(request: Any, kind: str) -> str:
    """From a fixture's `request`: the URL of the session's single Redis ("valkey") or of its
    three-primary Redis Cluster ("cluster")."""
    if kind == "valkey":
        return str(request.getfixturevalue("redis_url"))
    return str(request.getfixturevalue("valkey_cluster").url)
