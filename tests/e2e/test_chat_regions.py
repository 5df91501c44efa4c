"""`mlchat chat` against a dc-sim cluster: switching region, and a username lost to a concurrent claim."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_process import ChatProcess

from dcsim import cli as dcsim


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    dcsim.up(run_dir, ("us-east", "eu-west"), None, None)
    try:
        yield run_dir
    finally:
        dcsim.down(run_dir)


def _chat(run_dir: Path, tmp_path: Path, user: str, at: str) -> ChatProcess:
    return ChatProcess(user, tmp_path / f"{user}-{at}.key", "--dcsim", str(run_dir), "--at", at, "--region", at)


def test_switching_region_keeps_reading_own_writes_and_live_messages(run_dir: Path, tmp_path: Path):
    # A slow WAN: the switch reaches eu-west about when the post does, so only the causal token
    # makes the read after the switch certain to hold it.
    usual = dcsim.control(run_dir, {"command": "status"})["paths"]["us-east->eu-west"]["latency_ms"]
    dcsim.control(run_dir, {"command": "latency", "a": "us-east", "b": "eu-west", "ms": 300})
    alice, bob = _chat(run_dir, tmp_path, "alice", "us-east"), _chat(run_dir, tmp_path, "bob", "us-east")
    try:
        alice.send("/join travel", "written at home", "/region eu-west", "/history 5")
        alice.wait_for(r"^\* now talking to eu-west$")
        alice.wait_for(r"^\[\d\d:\d\d:\d\d\] #travel alice@us-east: written at home$")
        # Its subscription moved too: a message committed in us-east arrives through eu-west.
        bob.send("/join travel", "bob stayed home")
        alice.wait_for(r"^\[\d\d:\d\d:\d\d\] #travel bob@us-east \(\+\d+ ms\): bob stayed home$")
        alice.send("written abroad")
        alice.wait_for(r"^\[\d\d:\d\d:\d\d\] #travel alice@eu-west \(\+\d+ ms\): written abroad$")
        assert alice.finish() == "" and bob.finish() == ""
    finally:
        alice.stop()
        bob.stop()
        dcsim.control(run_dir, {"command": "latency", "a": "us-east", "b": "eu-west", "ms": usual})


def test_a_username_lost_to_a_concurrent_claim_is_told_and_another_taken(run_dir: Path, tmp_path: Path):
    dcsim.control(run_dir, {"command": "partition", "a": "us-east", "b": "eu-west"})
    east = _chat(run_dir, tmp_path, "carol", "us-east")
    try:
        east.wait_for(r"^\* signed in as carol in us-east \(claim PROVISIONAL\)$")
        west = _chat(run_dir, tmp_path, "carol", "eu-west")
        try:
            west.wait_for(r"^\* signed in as carol in eu-west \(claim PROVISIONAL\)$")
            dcsim.control(run_dir, {"command": "heal"})
            # The earlier claim (us-east's, made first) wins in every region.
            east.wait_for(r"^\* your username carol is confirmed")
            west.wait_for(r"^\* your username carol was lost to a concurrent claim in region us-east; "
                          r"pick another with /name$")
            west.send("/name carol_eu")
            west.wait_for(r"^\* signed in as carol_eu in eu-west \(claim PROVISIONAL\)$")
            west.wait_for(r"^\* your username carol_eu is confirmed")
            assert west.finish() == ""
        finally:
            west.stop()
        assert east.finish() == ""
    finally:
        east.stop()
        dcsim.control(run_dir, {"command": "heal"})
