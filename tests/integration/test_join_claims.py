"""A region that joins at runtime takes username claims only once every member counts it in: until then a member
may confirm a claim against a watermark that leaves the newcomer out, which a claim stamped by the newcomer's
clock (maybe behind) could beat."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import grpc
from support import wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.servicer import PEER_PREFIX
from mlchat.leader.tokens import TokenSigner
from mlchat.v1 import replication_pb2 as rpb
from mlchat.v1 import replication_pb2_grpc

FAST = ("--user-rate", "0", "--heartbeat-ms", "100", "--peer-timeout-ms", "600")


def _claim_refusal(address: str, name: str) -> str:
    """Why a region refuses a claim (UNAVAILABLE), or "" if it takes it."""
    with ChatClient(address, timeout_s=5) as c:
        try:
            c.claim(name, f"{name}-claim-key-0123456789")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            return e.details()
    return ""


def test_a_newcomer_takes_claims_once_every_member_counts_it_in(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32))
    ghost = f"127.0.0.1:{free_port()}"  # a member that never answers
    with LeaderProcess("us-east", tmp_path / "east",
                       extra_args=(*FAST, "--secret-file", str(secret), "--peer", f"ap-northeast={ghost}")) as east:
        # us-east was configured with the ghost, so it takes claims (before anyone joins: a newcomer's join
        # makes it wait until the newcomer counts it in).
        assert _claim_refusal(east.address, "early_east") == ""
        with LeaderProcess("eu-west", tmp_path / "west",
                           extra_args=(*FAST, "--secret-file", str(secret), "--join", east.address)) as west:
            # The newcomer learned of the ghost from us-east.
            assert "ap-northeast" in _claim_refusal(west.address, "early_west")
            wait_until(lambda: "us-east" not in _claim_refusal(west.address, "probe_west"), 10,
                       "us-east listing the newcomer")
            assert "ap-northeast" in _claim_refusal(west.address, "still_west")

            # The ghost leaves for good: nobody is left to wait for.
            signer = TokenSigner(secret.read_bytes().strip())
            token, _ = signer.issue(PEER_PREFIX + "ops", "ops", int(time.time() * 1000))
            with grpc.insecure_channel(east.address) as channel:
                replication_pb2_grpc.ReplicationServiceStub(channel).Leave(
                    rpb.LeaveRequest(region="ap-northeast"), metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10)
            wait_until(lambda: _claim_refusal(west.address, "late_west") == "", 10, "the newcomer taking claims")
