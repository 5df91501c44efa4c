"""A data directory belongs to one leader at a time: a second one refuses to start on it, saying why, and a
leader killed with SIGKILL does not keep its successor out."""

from __future__ import annotations

from pathlib import Path

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess


def test_a_second_leader_on_a_data_directory_in_use_refuses_to_start(tmp_path: Path) -> None:
    with LeaderProcess("us-east", tmp_path / "data") as first:
        second = LeaderProcess("us-east", tmp_path / "data")
        second.spawn()
        assert second.proc is not None
        assert second.proc.wait(30) != 0
        assert f"is in use by another leader (pid {first.proc.pid})" in second.log_tail()
        with ChatClient(first.address) as c:  # the first serves on, its storage untouched
            c.claim("still_here", "data-dir-claim-key-0001")
            assert c.post("lobby", "after the refusal", "m1").message.body == "after the refusal"


def test_a_leader_killed_with_sigkill_lets_the_next_one_start_on_its_data(tmp_path: Path) -> None:
    first = LeaderProcess("us-east", tmp_path / "data").start()
    with ChatClient(first.address) as c:
        c.claim("kept_user", "data-dir-claim-key-0002")
        c.post("lobby", "before the kill", "m1")
    first.kill()
    with LeaderProcess("us-east", tmp_path / "data") as second, ChatClient(second.address) as c:
        c.claim("kept_user", "data-dir-claim-key-0002")
        assert [m.body for m in c.list("lobby").messages] == ["before the kill"]
