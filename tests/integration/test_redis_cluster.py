"""A region on Redis Cluster: a real local cluster of three Valkey primaries, real leader processes
started with `--redis redis+cluster://...`, gRPC over sockets."""

from __future__ import annotations

import grpc
import pytest
import redis
from redis.crc import key_slot
from support import all_bodies, wait_until

from dcsim.sessions import claimed
from mlchat.geo.client import ChatClient
from mlchat.leader.keys import COPIES
from mlchat.leader.process import LeaderProcess
from mlchat.leader.valkey import EmbeddedValkey, EmbeddedValkeyCluster
from mlchat.v1 import chat_pb2 as pb

FAST = ("--user-rate", "0", "--heartbeat-ms", "100", "--peer-timeout-ms", "600")


def _node_keys(cluster: EmbeddedValkeyCluster) -> list[set[bytes]]:
    keys = []
    for url in cluster.node_urls():
        with redis.Redis.from_url(url) as node:
            keys.append(set(node.scan_iter(count=1000)))
    return keys


def test_the_cluster_has_three_primaries_each_owning_slots(own_cluster):
    with redis.Redis.from_url(own_cluster.node_urls()[0]) as node:
        slots = node.execute_command("CLUSTER SLOTS")
        info = node.execute_command("CLUSTER INFO")
    assert len(slots) == 3 and sum(end - start + 1 for start, end, *_ in slots) == 16384
    assert info["cluster_state"] == "ok" and int(info["cluster_size"]) == 3


def test_a_leader_serves_through_the_cluster_and_its_keys_spread_over_every_primary(own_cluster, tmp_path):
    channels = [f"room{i}" for i in range(24)]
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=own_cluster.url, extra_args=FAST).start()
    try:
        with ChatClient(leader.address) as c:
            user = c.claim("spread_ann", "spread-claim-key-0001").user
            c.set_status(pb.PRESENCE_ONLINE, "on a cluster")
            for ch in channels:
                for i in range(3):
                    c.post(ch, f"{ch} m{i}", f"{ch}-{i}")
            assert c.post("room0", "room0 m1", "room0-1").duplicate
            c.create_private_channel("secret_room")
            c.post("secret_room", "hidden", "s1")
            assert [all_bodies(c, ch) for ch in channels] == [[f"{ch} m{i}" for i in range(3)] for ch in channels]
            newest = c.list("room5", newest_first=True, limit=2).messages
            assert [m.body for m in newest] == ["room5 m2", "room5 m1"]
            assert c.get_status(user.user_id).status.text == "on a cluster"
            assert c.get_user(username="spread_ann").user.claim_state == pb.CLAIM_STATE_CONFIRMED
            status = c.cluster_status(with_digest=True)
            assert (status.users, status.channels, status.messages) == (1, 25, 73)
    finally:
        leader.stop()
    per_node = _node_keys(own_cluster)
    for keys in per_node:  # every primary holds message logs, and copies of the region-wide keys
        assert any(k.startswith(b"c:{room") for k in keys)
        assert any(k.startswith(b"meta:hlc:{") for k in keys) and any(k.startswith(b"shards:{") for k in keys)
    every = set().union(*per_node)
    assert not {b"meta:hlc", b"shards", b"channels", b"users"} & every  # no single-Redis names
    with redis.RedisCluster.from_url(own_cluster.node_urls()[0]) as client:
        tags = {t.decode() for t in client.smembers(COPIES)}
    assert {k.decode().partition("{")[2].rstrip("}") for k in every if k.startswith(b"meta:hlc:{")} <= tags


@pytest.mark.parametrize("what", ["leader", "cluster"])
def test_nothing_acknowledged_is_lost_when_the_leader_or_every_primary_is_killed(own_cluster, tmp_path, what):
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=own_cluster.url).start()
    try:
        with ChatClient(leader.address, timeout_s=5) as c:
            user = c.claim("durable_bea", "durable-claim-key-0002").user
            c.set_status(pb.PRESENCE_BUSY, "before the crash")
            acked = [c.post(f"ch{i % 5}", f"m{i}", f"id{i}").message for i in range(40)]
            before = c.cluster_status(with_digest=True).state_digest
        leader.kill()
        if what == "cluster":
            own_cluster.kill()  # SIGKILL every primary: their AOFs hold every acknowledged write
            own_cluster.restart()
        leader.start()
        with ChatClient(leader.address, timeout_s=5) as c:
            assert c.claim("durable_bea", "durable-claim-key-0002").user.claim_hlc == user.claim_hlc
            for k in range(5):
                assert all_bodies(c, f"ch{k}") == [f"m{i}" for i in range(k, 40, 5)]
            retry = c.post("ch2", "m7", "id7")
            assert retry.duplicate and retry.message.id == acked[7].id
            assert c.get_status(user.user_id).status.text == "before the crash"
            assert c.cluster_status(with_digest=True).state_digest == before
            # The clock floor, merged from every primary's copy, keeps the clock from going back.
            assert c.post("ch0", "after", "id-after").message.hlc > max(m.hlc for m in acked)
    finally:
        leader.stop()


def _on_node(index: int, of: int = 3) -> str:
    """A channel name whose keys live on primary `index` (slots split evenly, in order)."""
    low, high = index * 16384 // of, (index + 1) * 16384 // of - 1
    return next(name for i in range(10_000) if low <= key_slot((name := f"room{i}").encode()) <= high)


def test_calls_answer_unavailable_while_a_primary_is_down_and_succeed_once_it_is_back(own_cluster, tmp_path):
    down, up = _on_node(1), _on_node(2)
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=own_cluster.url, extra_args=FAST).start()
    key = "primary-down-claim-key1"
    try:
        with ChatClient(leader.address, timeout_s=5) as c:
            c.claim("primary_down", key)
            for ch in (down, up):
                c.post(ch, "before", "b")
            own_cluster.nodes[1].kill()
            codes = set()
            for i in range(5):
                try:
                    c.post(down, f"during {i}", f"d{i}")
                    codes.add(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.add(e.code())
            assert codes == {grpc.StatusCode.UNAVAILABLE}  # a precise status, never UNKNOWN
        # Started with no gRPC channel open here: forking this process while gRPC polls can crash the
        # child between fork and exec.
        own_cluster.nodes[1].start()
        with ChatClient(leader.address, timeout_s=5) as c:
            assert claimed(c, "primary_down", key, 30), "a token once the primary is back"

            def posted() -> bool:
                try:
                    c.post(down, "after", "a")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    return False
                return True

            wait_until(posted, 30, "a post to the restarted primary")
            c.post(up, "after", "a")
            assert [m.body for m in c.list(down).messages] == ["before", "after"]
            assert [m.body for m in c.list(up).messages] == ["before", "after"]
    finally:
        leader.stop()


def test_a_region_on_a_cluster_and_one_on_a_single_valkey_converge(own_cluster, tmp_path):
    single = EmbeddedValkey(tmp_path / "single", port=None)
    single.start()
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    east = LeaderProcess("us-east", tmp_path / "east", redis_url=own_cluster.url)
    west = LeaderProcess("eu-west", tmp_path / "west", redis_url=single.url)
    east.extra_args = (*FAST, "--secret-file", str(secret), "--peer", f"eu-west={west.address}")
    west.extra_args = (*FAST, "--secret-file", str(secret), "--peer", f"us-east={east.address}")
    try:
        east.start()
        with ChatClient(east.address) as c:  # written before eu-west runs: reaches it by catch-up
            c.claim("conv_east", "conv-claim-key-east1")
            c.set_status(pb.PRESENCE_ONLINE, "east")
            for i in range(10):
                c.post(f"x{i % 4}", f"east {i}", f"e{i}")
        west.start()
        with ChatClient(west.address) as w, ChatClient(east.address) as e:
            e.claim("conv_east", "conv-claim-key-east1")  # the same user again: a token
            assert claimed(w, "conv_west", "conv-claim-key-west1", 20), "eu-west takes claims"
            for i in range(10):
                w.post(f"x{i % 4}", f"west {i}", f"w{i}")

            def same() -> bool:
                a, b = e.cluster_status(with_digest=True), w.cluster_status(with_digest=True)
                return a.messages == b.messages == 20 and a.users == b.users == 2 and a.state_digest == b.state_digest

            wait_until(same, 20, "both regions hold the same state")
    finally:
        west.stop()
        east.stop()
        single.stop()


@pytest.mark.parametrize("mode", ["strong-names", "single-leader"])
def test_consensus_modes_keep_acceptor_state_and_term_on_the_cluster(own_cluster, tmp_path, mode, unique):
    """Paxos acceptor state (WATCH/MULTI on one key, WAITAOF on its primary) and the term, on a cluster (its
    own: a region's members and term from other tests would make it wait for regions that do not run)."""
    valkey_cluster = own_cluster
    extra = ("--mode", mode, *(("--primary", "us-east") if mode == "single-leader" else ()))
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=valkey_cluster.url, extra_args=extra).start()
    try:
        with ChatClient(leader.address) as c:
            first = c.claim(f"px_{unique}", "paxos-claim-key-0001").user
            assert first.claim_state == pb.CLAIM_STATE_CONFIRMED
            c.post(f"px{unique}", "before", "p1")
        leader.kill()
        leader.start()
        with ChatClient(leader.address) as c:
            assert c.claim(f"px_{unique}", "paxos-claim-key-0001").user.claim_hlc == first.claim_hlc
            with pytest.raises(grpc.RpcError) as err:
                c.claim(f"px_{unique}", "another-claim-key-0002")
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            c.post(f"px{unique}", "after", "p2")
            assert [m.body for m in c.list(f"px{unique}").messages] == ["before", "after"]
    finally:
        leader.stop()
    with redis.RedisCluster.from_url(valkey_cluster.node_urls()[0]) as client:
        assert client.exists(f"px:name:px_{unique}")
