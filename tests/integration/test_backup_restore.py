"""Backup and restore end to end: a backup taken while a region takes posts, restored into fresh
storage (one Valkey, or a Redis Cluster of three Valkey primaries), whose leader then catches up from
its peer with what was written after the backup."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
from support import cluster_ports, wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.backup import connect
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.server import redis_client
from mlchat.leader.store import Store
from mlchat.leader.valkey import EmbeddedValkey, EmbeddedValkeyCluster
from mlchat.v1 import chat_pb2 as pb

FAST = ("--user-rate", "0", "--heartbeat-ms", "100", "--peer-timeout-ms", "600")
CHANNELS = ("lobby", "news", "ops")  # one on each primary of a three-primary cluster


def mlchat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlchat", *args], capture_output=True, text=True, timeout=60)


def signed_in(address: str, user: str) -> ChatClient:
    c = ChatClient(address, timeout_s=10)
    c.claim(user, f"{user}-claim-key-0123456789")
    return c


def takes_claims(address: str, user: str) -> bool:
    """Whether the region takes `user`'s claim now (one that a member just joined refuses claims until the newcomer
    counts it in, which the newcomer's next heartbeat tells)."""
    try:
        signed_in(address, user).close()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return True


def state(address: str) -> tuple[str, int, int, int]:
    """The region's state digest (messages, statuses, claims, channels), and its users, channels and messages."""
    with signed_in(address, "state_reader") as c:
        status = c.cluster_status(with_digest=True)
        return status.state_digest, status.users, status.channels, status.messages


def bodies(address: str) -> list[str]:
    with signed_in(address, "body_reader") as c:
        return [m.body for ch in CHANNELS for m in c.list(ch, limit=500).messages]


class Poster(threading.Thread):
    """Posts numbered messages round the channels until stopped."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = signed_in(address, "poster")
        self.posted: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            n = len(self.posted)
            self.client.post(CHANNELS[n % len(CHANNELS)], f"message {n}", f"m{n}")
            self.posted.append(f"message {n}")

    def stop(self) -> list[str]:
        self.stopping.set()
        self.join(30)
        self.client.close()
        return self.posted


@dataclass
class Storage:
    """Where us-east keeps its state (None: an embedded Valkey in its --data-dir, which the backup
    finds), and the empty storage its backup is restored into, with that storage's primaries."""

    source: str | None
    target: str
    target_nodes: list[str]

    def backup_args(self, leader: LeaderProcess) -> tuple[str, ...]:
        return ("--redis", self.source) if self.source else ("--data-dir", str(leader.data_dir))


@pytest.fixture(params=["valkey", "cluster"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "valkey":
        target = request.getfixturevalue("own_valkey")
        yield Storage(None, target.url, [target.url])
        return
    source = request.getfixturevalue("own_cluster")
    fresh = EmbeddedValkeyCluster(tmp_path / "restored-cluster", cluster_ports())
    fresh.start()
    try:
        yield Storage(source.url, fresh.url, fresh.node_urls())
    finally:
        fresh.stop()


def counts(url: str) -> tuple[int, int, int]:
    """(users, channels, messages) as a leader on `url` counts them: through the region-wide keys."""
    async def read() -> tuple[int, int, int]:
        store = Store(redis_client(url))
        try:
            return await store.counts()
        finally:
            await store.close()
    return asyncio.run(read())


def test_a_region_restored_from_a_backup_taken_while_it_served_catches_up(tmp_path: Path, storage: Storage):
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32))
    common = (*FAST, "--secret-file", str(secret))
    east_port = free_port()
    east = LeaderProcess("us-east", tmp_path / "east", redis_url=storage.source, port=east_port,
                         extra_args=common).start()
    west = LeaderProcess("eu-west", tmp_path / "west", extra_args=(*common, "--join", east.address))
    try:
        west.start()
        # (the claim of a user the test signs in as below: claimed again with its key, it is the same user)
        wait_until(lambda: takes_claims(east.address, "status_before"), 15, "us-east counted in by the newcomer")
        poster = Poster(east.address)
        poster.start()
        wait_until(lambda: len(poster.posted) >= 150, 30, "posts before the backup")
        with signed_in(east.address, "status_before") as c:
            c.set_status(pb.PRESENCE_BUSY, "in the backup")
        backup = tmp_path / "us-east.backup"
        taken = mlchat("backup", *storage.backup_args(east), "--out", str(backup))
        assert taken.returncode == 0, taken.stderr
        in_backup = len(poster.posted)  # at least this many were acknowledged before the backup ended
        wait_until(lambda: len(poster.posted) >= in_backup + 100, 30, "posts after the backup")
        posted = poster.stop()
        with signed_in(east.address, "status_after") as c:  # written after the backup: must come back too
            c.set_status(pb.PRESENCE_AWAY, "after the backup")
        wait_until(lambda: state(east.address) == state(west.address), 30, "eu-west holding all of us-east")
        before = state(east.address)
        east.stop()  # us-east's storage is lost

        restored = mlchat("restore", "--in", str(backup), "--redis", storage.target)
        assert restored.returncode == 0, restored.stderr
        again = mlchat("restore", "--in", str(backup), "--redis", storage.target)
        assert again.returncode != 0 and "restore only into an empty one" in again.stderr, again.stderr
        with connect(storage.target) as store:
            held = sum(store.zcard(f"c:{{{ch}}}:z") for ch in CHANNELS)
            assert 150 <= held < len(posted), (held, len(posted))  # the backup's, the rest comes by replication
            before_user = signed_in(west.address, "status_before").user
            assert store.exists("s:" + before_user.user_id, "n:status_before", "u:" + before_user.user_id) == 3
        # Read as a leader reads them (every copy, on a cluster): the users claimed before the backup
        # (poster, status_before), every channel, and every message the data holds.
        assert counts(storage.target) == (2, len(CHANNELS), held)
        for url in storage.target_nodes:  # every primary got its slots' keys
            with redis.Redis.from_url(url) as node:
                assert any(node.scan_iter(match="c:{*", count=1000)), url

        east = LeaderProcess("us-east", tmp_path / "east-restored", redis_url=storage.target, port=east_port,
                             extra_args=(*common, "--join", west.address)).start()
        wait_until(lambda: state(east.address) == state(west.address) == before, 30, "us-east caught up")
        seen = bodies(east.address)
        assert sorted(seen) == sorted(posted) and len(set(seen)) == len(seen)
        with signed_in(east.address, "status_reader") as c:
            user = c.get_user(username="status_after").user.user_id
            assert c.get_status(user).status.text == "after the backup"
    finally:
        east.stop()
        west.stop()


def test_restore_refuses_a_region_that_holds_data_and_a_truncated_backup(tmp_path: Path, own_valkey: EmbeddedValkey):
    source = redis.Redis.from_url(own_valkey.url)
    source.set("meta:hlc", "x")
    backup = tmp_path / "b"
    assert mlchat("backup", "--redis", own_valkey.url, "--out", str(backup)).returncode == 0
    refused = mlchat("restore", "--in", str(backup), "--redis", own_valkey.url)
    assert refused.returncode != 0 and "holds 1 keys" in refused.stderr

    cut = tmp_path / "cut"
    cut.write_bytes(backup.read_bytes()[:-12])
    source.flushall()
    truncated = mlchat("restore", "--in", str(cut), "--redis", own_valkey.url)
    assert truncated.returncode != 0 and "not a readable backup" in truncated.stderr, truncated.stderr
    assert source.dbsize() == 0  # nothing half restored

    fresh = tmp_path / "fresh"
    assert mlchat("restore", "--in", str(backup), "--data-dir", str(fresh)).returncode == 0
    assert mlchat("restore", "--in", str(backup), "--data-dir", str(fresh)).returncode != 0  # not fresh any more
    server = EmbeddedValkey(fresh / "valkey")
    server.start()
    try:
        assert redis.Redis.from_url(server.url).get("meta:hlc") == b"x"
    finally:
        server.stop()


def test_a_backup_is_restored_only_into_the_kind_of_redis_it_was_taken_from(tmp_path: Path, own_valkey: EmbeddedValkey,
                                                                          own_cluster: EmbeddedValkeyCluster):
    single, cluster = tmp_path / "single.backup", tmp_path / "cluster.backup"
    redis.Redis.from_url(own_valkey.url).set("meta:hlc", "x")
    with connect(own_cluster.url) as client:
        client.set("meta:hlc:{0}", "x")
    assert mlchat("backup", "--redis", own_valkey.url, "--out", str(single)).returncode == 0
    assert mlchat("backup", "--redis", own_cluster.url, "--out", str(cluster)).returncode == 0
    redis.Redis.from_url(own_valkey.url).flushall()
    with connect(own_cluster.url) as client:
        client.flushall(target_nodes=client.PRIMARIES)

    onto_cluster = mlchat("restore", "--in", str(single), "--redis", own_cluster.url)
    assert onto_cluster.returncode != 0, onto_cluster.stderr
    assert "taken from a region on one Redis and the target is a Redis Cluster" in onto_cluster.stderr
    assert own_cluster.password not in onto_cluster.stderr
    onto_single = mlchat("restore", "--in", str(cluster), "--redis", own_valkey.url)
    assert onto_single.returncode != 0, onto_single.stderr
    assert "taken from a region on a Redis Cluster and the target is one Redis" in onto_single.stderr
    with connect(own_cluster.url) as client:  # nothing half restored
        assert client.dbsize(target_nodes=client.PRIMARIES) == 0
    assert redis.Redis.from_url(own_valkey.url).dbsize() == 0
