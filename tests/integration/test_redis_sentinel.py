"""A region on Sentinel-managed Redis: a real Valkey primary and replica, three real Sentinels (the
same bundled binary in sentinel mode), and a leader started with `--redis redis+sentinel://...` that
keeps serving, with nothing acknowledged lost, when the primary is killed and a Sentinel promotes the
replica."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from support import wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.server import SentinelUrl
from mlchat.leader.valkey import EmbeddedValkey, binary, dying_with_parent
from mlchat.v1 import chat_pb2 as pb

SERVICE = "region"
SENTINEL_PASSWORD = "sentinel-password-for-tests"


class Sentinel:
    """`valkey-server CONF --sentinel` watching `SERVICE` on the primary at `primary_port`."""

    def __init__(self, home: Path, primary_port: int, password: str) -> None:
        self.home, self.port = home, free_port()
        home.mkdir(parents=True)
        conf = home / "sentinel.conf"  # Sentinel rewrites it: its own file, mode 600 (passwords)
        conf.touch(mode=0o600)
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {home}\nlogfile {home / 'sentinel.log'}\n"
            f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel auth-pass {SERVICE} {password}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\nsentinel failover-timeout {SERVICE} 10000\n")
        self.proc = subprocess.Popen(dying_with_parent([str(binary()), str(conf), "--sentinel"]),
                                     stdin=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, password=SENTINEL_PASSWORD, decode_responses=True)

    def primary(self) -> dict:
        return self.client.execute_command("SENTINEL", "MASTER", SERVICE)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.client.close()


def _ready(sentinels: list[Sentinel]) -> bool:
    try:
        return all(int(s.primary()["num-other-sentinels"]) == 2 and int(s.primary()["num-slaves"]) == 1
                   for s in sentinels)
    except (redis.ConnectionError, redis.ResponseError):
        return False


@pytest.fixture
def sentinel_region(tmp_path: Path) -> Iterator[tuple[EmbeddedValkey, EmbeddedValkey, list[Sentinel]]]:
    primary = EmbeddedValkey(tmp_path / "primary", port=free_port())
    primary.start()
    replica = EmbeddedValkey(tmp_path / "replica", port=free_port(), password=primary.password,
                             extra_conf=f"replicaof 127.0.0.1 {primary.port}\nmasterauth {primary.password}\n")
    sentinels: list[Sentinel] = []
    try:
        replica.start()
        sentinels = [Sentinel(tmp_path / f"sentinel{i}", primary.port, primary.password) for i in range(3)]
        wait_until(lambda: _ready(sentinels), 30, "three Sentinels that know each other and the replica")
        yield primary, replica, sentinels
    finally:
        for s in sentinels:
            s.stop()
        replica.stop()
        primary.stop()


def _url(password: str, sentinels: list[Sentinel]) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
    return f"redis+sentinel://:{password}@{hosts}/{SERVICE}?sentinel_password={SENTINEL_PASSWORD}"


def _post(client: ChatClient, i: int) -> bool:
    """Post message i (a retry of it is harmless); False while storage is unavailable."""
    try:
        client.post("general", f"m{i}", f"id{i}")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return True


def test_the_sentinel_url_names_sentinels_service_and_passwords():
    url = SentinelUrl.parse("redis+sentinel://:p%40ss@10.0.0.5:26379,[::1]:26380/chat?sentinel_password=s")
    assert url == SentinelUrl((("10.0.0.5", 26379), ("::1", 26380)), "chat", "p@ss", "s")
    for bad in ("redis+sentinel://h:1", "redis+sentinel://h/chat", "redis://h:1/chat"):
        with pytest.raises(ValueError):
            SentinelUrl.parse(bad)


def test_a_leader_on_sentinel_keeps_serving_across_a_failover_and_loses_nothing_acknowledged(
        sentinel_region, tmp_path):
    primary, replica, sentinels = sentinel_region
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=_url(primary.password, sentinels),
                           extra_args=("--user-rate", "0")).start()
    try:
        with ChatClient(leader.address, timeout_s=5) as c:
            user = c.claim("sentinel_ann", "sentinel-claim-key-01").user
            c.set_status(pb.PRESENCE_ONLINE, "before failover")
            for i in range(30):
                assert _post(c, i)
            # Replication to the replica is asynchronous: what the primary acknowledged reaches the
            # replica a moment later. Wait for it here, as `min-replicas-to-write` would bound it.
            with redis.Redis(port=primary.port, password=primary.password) as p:
                assert p.execute_command("WAIT", 1, 5000) == 1
            primary.kill()
            wait_until(lambda: int(sentinels[0].primary()["port"]) == replica.port, 30,
                       "a Sentinel promotes the replica")
            wait_until(lambda: _post(c, 30), 30, "the leader writes to the promoted replica")
            bodies = [m.body for m in c.list("general", limit=100).messages]
            assert bodies == [f"m{i}" for i in range(31)]
            assert c.get_status(user.user_id).status.text == "before failover"
            assert c.claim("sentinel_ann", "sentinel-claim-key-01").user.user_id == user.user_id
    finally:
        leader.stop()
    with redis.Redis(port=replica.port, password=replica.password, decode_responses=True) as r:
        assert r.info("replication")["role"] == "master"


def mlchat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlchat", *args], capture_output=True, text=True, timeout=60)


def test_a_backup_reads_the_primary_the_sentinels_name(sentinel_region, tmp_path):
    primary, _, sentinels = sentinel_region
    url = _url(primary.password, sentinels)
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=url, extra_args=("--user-rate", "0")).start()
    try:
        with ChatClient(leader.address, timeout_s=5) as c:
            c.claim("sentinel_bo", "sentinel-claim-key-02")
            for i in range(5):
                assert _post(c, i)
        backup = tmp_path / "region.backup"
        taken = mlchat("backup", "--redis", url, "--out", str(backup))
        assert taken.returncode == 0, taken.stderr
    finally:
        leader.stop()
    fresh = EmbeddedValkey(tmp_path / "fresh", port=free_port())
    fresh.start()
    try:
        restored = mlchat("restore", "--in", str(backup), "--redis", fresh.url)
        assert restored.returncode == 0, restored.stderr
        with redis.Redis.from_url(fresh.url) as r:
            assert r.zcard("c:{general}:z") == 5
    finally:
        fresh.stop()
    refused = mlchat("backup", "--redis", "redis+sentinel://127.0.0.1:1", "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and "names no service" in refused.stderr and "Traceback" not in refused.stderr
