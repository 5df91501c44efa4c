"""The embedded Valkey a leader starts: password required, loopback only, started again if it dies."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis
from support import wait_until

from mlchat.leader.valkey import EmbeddedValkey


def test_it_refuses_clients_without_its_password(own_valkey):
    assert redis.Redis.from_url(own_valkey.url).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=own_valkey.port).ping()
    conf = own_valkey.data_dir / "valkey-auth.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    assert own_valkey.password not in Path(f"/proc/{own_valkey.pid}/cmdline").read_text()


def test_it_listens_on_loopback_only(own_valkey):
    bind = redis.Redis.from_url(own_valkey.url).config_get("bind")["bind"]
    assert bind.split() == ["127.0.0.1"]


def test_restarted_after_a_crash_it_holds_what_it_had(own_valkey):
    client = redis.Redis.from_url(own_valkey.url)
    client.set("kept", "yes")
    os.kill(own_valkey.pid, 9)
    wait_until(lambda: not own_valkey.alive(), 5, "the server gone")
    own_valkey.restart()
    assert redis.Redis.from_url(own_valkey.url).get("kept") == b"yes"


def test_started_again_on_its_data_after_a_crash_it_takes_over_its_socket_directory(tmp_path):
    """A server killed before it removed its socket directory leaves it behind; the next one on the same data
    takes it over, so crashes do not pile directories up, and a clean stop removes it."""
    first = EmbeddedValkey(tmp_path / "data")
    first.start()
    first.kill()
    assert first.socket.parent.is_dir()  # left behind
    second = EmbeddedValkey(tmp_path / "data")
    assert second.socket.parent == first.socket.parent
    second.start()
    try:
        assert redis.Redis.from_url(second.url).ping()
    finally:
        second.stop()
    assert not second.socket.parent.exists()
