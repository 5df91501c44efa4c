"""A leader's log: one line per event naming its region, from the level chosen on the command line."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from support import wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess
from mlchat.leader.valkey import EmbeddedValkey

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) eu-west [\w.]+: ")
BANNER = "mlchat leader eu-west serving on"  # on stdout, for whoever started the leader


def log_lines(leader: LeaderProcess) -> list[str]:
    return [line for line in (leader.data_dir / "leader.log").read_text().splitlines() if not line.startswith(BANNER)]


def levels(lines: list[str]) -> set[str]:
    return {line.split(" ", 2)[1] for line in lines}


def test_every_line_names_the_region_and_the_level_can_follow_the_command(tmp_path: Path) -> None:
    # The launcher asks for WARNING before `leader`; the leader's own --log-level wins.
    with LeaderProcess("eu-west", tmp_path / "leader", log_level="WARNING",
                       extra_args=("--log-level", "DEBUG")) as leader:
        pass
    lines = log_lines(leader)
    assert lines and all(LINE.match(line) for line in lines), "\n".join(lines)
    assert {"DEBUG", "INFO"} <= levels(lines)
    assert any(" server: leader serving on 127.0.0.1:" in line for line in lines)


def test_warning_level_logs_warnings_only(own_valkey: EmbeddedValkey, tmp_path: Path) -> None:
    with LeaderProcess("eu-west", tmp_path / "leader", redis_url=own_valkey.url, log_level="WARNING") as leader:
        own_valkey.stop()
        with ChatClient(leader.address) as c, pytest.raises(grpc.RpcError) as refused:
            c.claim("storage_down", "storage-down-claim-key-01")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: any(" WARNING eu-west servicer: storage unavailable: " in line
                               for line in log_lines(leader)), what="the warning logged")
    lines = log_lines(leader)
    assert all(LINE.match(line) for line in lines), "\n".join(lines)
    assert levels(lines) <= {"WARNING", "ERROR", "CRITICAL"}
