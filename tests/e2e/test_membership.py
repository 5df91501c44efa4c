"""Regions joining and leaving a running cluster, end to end under dc-sim."""

from __future__ import annotations

from pathlib import Path

import grpc
from support import wait_until

from dcsim import cli as dcsim
from dcsim import sessions
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import cluster_pb2


def _client(state: dict, region: str, user: str) -> ChatClient:
    """Signed in: once a region joined, every region takes claims again when the newcomer counts it in."""
    c = ChatClient(state["regions"][region]["endpoints"][region], timeout_s=10)
    assert sessions.claimed(c, user, f"{user}-claim-key-0123456789")
    return c


def _status_text(c: ChatClient, user_id: str) -> str:
    try:
        return c.get_status(user_id).status.text
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e  # the user's claim has not arrived yet
        return ""


def _peers(c: ChatClient) -> dict[str, int]:
    return {p.region: p.state for p in c.cluster_status().peers}


def test_a_region_joins_catches_up_and_another_leaves(tmp_path: Path):
    run_dir = tmp_path / "run"
    dcsim.up(run_dir, ("us-east", "eu-west", "ap-northeast"), None, None)
    try:
        state = dcsim.control(run_dir, {"command": "status"})
        east = _client(state, "us-east", "member_east")
        for i in range(30):
            east.post("history", f"before the join {i}", f"h{i}")
        east.set_status(pb.PRESENCE_ONLINE, "here before the join")

        dcsim.control(run_dir, {"command": "add", "region": "ap-southeast"})
        state = dcsim.control(run_dir, {"command": "status"})
        newcomer = _client(state, "ap-southeast", "member_new")
        # It learned every member from the one it joined through, and caught up on the history.
        wait_until(lambda: set(_peers(newcomer)) == {"us-east", "eu-west", "ap-northeast"}, 15, "all members known")
        wait_until(lambda: len(newcomer.list("history", limit=100).messages) == 30, 20, "the history")
        # Users and statuses come in the catch-up's last part, after the shards.
        wait_until(lambda: _status_text(newcomer, east.user.user_id) == "here before the join", 20, "the status")
        # Every member learned of it (the others through gossip) and receives its writes.
        newcomer.post("history", "hello from the newcomer", "n1")
        for region in ("us-east", "eu-west", "ap-northeast"):
            reader = _client(state, region, "member_reader")
            wait_until(lambda r=reader: "ap-southeast" in _peers(r), 15, f"{region} knows the newcomer")
            wait_until(lambda r=reader: len(r.list("history", limit=100).messages) == 31, 20,
                       f"{region} has the newcomer's message")

        # eu-west leaves: the others stop following it and stop waiting for its clock.
        dcsim.control(run_dir, {"command": "leave", "region": "eu-west"})
        wait_until(lambda: "eu-west" not in _peers(east), 10, "eu-west gone from us-east")
        wait_until(lambda: "eu-west" not in _peers(newcomer), 10, "eu-west gone from the newcomer")
        claim = _client(state, "us-east", "after_the_leave").user
        wait_until(lambda: east.get_user(user_id=claim.user_id).user.claim_state == pb.CLAIM_STATE_CONFIRMED,
                   15, "a claim confirmed without the departed region")
        assert all(s == cluster_pb2.PEER_STATE_UP for s in _peers(east).values())
    finally:
        dcsim.down(run_dir)
