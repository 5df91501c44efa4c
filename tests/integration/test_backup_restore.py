"""Backup and restore end to end: a backup taken while a region takes posts, restored into a fresh
Valkey, whose leader then catches up from its peer with what was written after the backup."""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from pathlib import Path

import redis
from support import wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.v1 import chat_pb2 as pb

FAST = ("--user-rate", "0", "--heartbeat-ms", "100", "--peer-timeout-ms", "600")
CHANNELS = ("lobby", "ops", "random")


def mlchat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlchat", *args], capture_output=True, text=True, timeout=60)


def signed_in(address: str, user: str) -> ChatClient:
    c = ChatClient(address, timeout_s=10)
    c.claim(user, f"{user}-claim-key-0123456789")
    return c


def digest(address: str) -> str:
    with signed_in(address, "digest_reader") as c:
        return c.cluster_status(with_digest=True).state_digest


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


def test_a_region_restored_from_a_backup_taken_while_it_served_catches_up(tmp_path: Path, own_valkey: EmbeddedValkey):
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32))
    common = (*FAST, "--secret-file", str(secret))
    east_port = free_port()
    # us-east on an embedded Valkey: the backup finds it through its --data-dir.
    east = LeaderProcess("us-east", tmp_path / "east", port=east_port, extra_args=common).start()
    west = LeaderProcess("eu-west", tmp_path / "west", extra_args=(*common, "--join", east.address))
    try:
        west.start()
        poster = Poster(east.address)
        poster.start()
        wait_until(lambda: len(poster.posted) >= 150, 30, "posts before the backup")
        with signed_in(east.address, "status_before") as c:
            c.set_status(pb.PRESENCE_BUSY, "in the backup")
        backup = tmp_path / "us-east.backup"
        taken = mlchat("backup", "--data-dir", str(east.data_dir), "--out", str(backup))
        assert taken.returncode == 0, taken.stderr
        in_backup = len(poster.posted)  # at least this many were acknowledged before the backup ended
        wait_until(lambda: len(poster.posted) >= in_backup + 100, 30, "posts after the backup")
        posted = poster.stop()
        with signed_in(east.address, "status_after") as c:  # written after the backup: must come back too
            c.set_status(pb.PRESENCE_AWAY, "after the backup")
        wait_until(lambda: digest(east.address) == digest(west.address), 30, "eu-west holding all of us-east")
        before = digest(east.address)
        east.stop()  # us-east's storage is lost

        restored = mlchat("restore", "--in", str(backup), "--redis", own_valkey.url)
        assert restored.returncode == 0, restored.stderr
        again = mlchat("restore", "--in", str(backup), "--redis", own_valkey.url)
        assert again.returncode != 0 and "restore only into an empty one" in again.stderr, again.stderr
        store = redis.Redis.from_url(own_valkey.url)
        held = sum(store.zcard(f"c:{{{ch}}}:z") for ch in CHANNELS)
        assert 150 <= held < len(posted), (held, len(posted))  # the backup's, the rest comes by replication
        assert store.exists("s:" + signed_in(west.address, "status_before").user.user_id)

        east = LeaderProcess("us-east", tmp_path / "east-restored", redis_url=own_valkey.url, port=east_port,
                             extra_args=(*common, "--join", west.address)).start()
        wait_until(lambda: digest(east.address) == digest(west.address) == before, 30, "us-east caught up")
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
