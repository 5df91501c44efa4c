"""The replication endpoint of one leader: who may open it, and what a newcomer receives first."""

from __future__ import annotations

import secrets
import time

import grpc
import pytest

from mlchat.crdt.msglog import MessageShard
from mlchat.leader.servicer import PEER_PREFIX
from mlchat.leader.tokens import TokenSigner
from mlchat.v1 import replication_pb2 as rpb
from mlchat.v1 import replication_pb2_grpc


def _catch_up(leader, token: str | None) -> list[rpb.Delta]:
    """The parts of the catch-up a region with nothing receives: up to the one that carries the vector."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    parts = []
    with grpc.insecure_channel(leader.address) as channel:
        stream = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(
            rpb.ReplicateRequest(region="eu-west"), metadata=metadata, timeout=10)
        try:
            for part in stream:
                parts.append(part)
                if part.vector:
                    return parts
        finally:
            stream.cancel()
    raise AssertionError("the catch-up ended without a vector")


def _region_token(leader, region: str = "eu-west") -> str:
    secret = (leader.data_dir / "cluster-secret").read_bytes().strip()
    token, _ = TokenSigner(secret).issue(PEER_PREFIX + region, region, int(time.time() * 1000))
    return token


def test_a_new_region_first_receives_everything(leader, client, unique):
    client.post(unique, "already here", "r1")
    client.set_status(1, "around")
    parts = _catch_up(leader, _region_token(leader))
    assert {p.from_region for p in parts} == {"us-east"}
    assert all(len(p.shards) <= 1 for p in parts)  # one shard per message
    assert any(s.shard.startswith(f"{unique}/") for p in parts for s in p.shards)
    assert any(v.user_id == client.user.user_id and v.text == "around" for p in parts for v in p.statuses)
    assert any(c.user_id == client.user.user_id for p in parts for c in p.claims)
    assert parts[-1].vector["us-east"]


def test_a_peer_that_reads_slowly_is_told_its_backlog(leader, client, unique):
    # A small fixed receive window (no BDP probing): not reading soon stops the sender.
    with grpc.insecure_channel(leader.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stream = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(
            rpb.ReplicateRequest(region="eu-west"),
            metadata=(("authorization", f"Bearer {_region_token(leader)}"),), timeout=60)
        try:
            while not next(stream).vector:  # the catch-up
                pass
            for i in range(2000):  # about 8 MB: more than the buffers between the two
                client.post(unique, secrets.token_hex(2000), f"b{i}")
            backlogs = []
            received = 0
            shards: dict[str, MessageShard] = {}
            for message in stream:  # until every post has arrived and nothing waits any more
                backlogs.append(message.backlog)
                for part in message.shards:
                    if part.shard.startswith(f"{unique}/"):
                        shard = shards.setdefault(part.shard, MessageShard(unique, client_id=7))
                        received += len(shard.apply(part.update))
                if received == 2000 and message.backlog == 0:
                    break
        finally:
            stream.cancel()
    assert max(backlogs) > 0  # it was told it lagged, and (the loop ended) that it caught up


def test_only_the_clusters_regions_may_replicate(leader, client):
    for token, code in [(None, grpc.StatusCode.UNAUTHENTICATED),
                        (client.token, grpc.StatusCode.PERMISSION_DENIED),
                        (TokenSigner(b"another-cluster-secret").issue(PEER_PREFIX + "x", "x", 0)[0],
                         grpc.StatusCode.UNAUTHENTICATED)]:
        with pytest.raises(grpc.RpcError) as err:
            _catch_up(leader, token)
        assert err.value.code() == code


def test_a_region_token_cannot_act_as_a_user(leader):
    from mlchat.v1 import chat_pb2 as pb
    from mlchat.v1 import chat_pb2_grpc

    with grpc.insecure_channel(leader.address) as channel, pytest.raises(grpc.RpcError) as err:
        chat_pb2_grpc.ChatServiceStub(channel).PostMessage(
            pb.PostMessageRequest(channel="general", body="hi", client_msg_id="x"),
            metadata=(("authorization", f"Bearer {_region_token(leader)}"),), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
