"""Acknowledged writes survive leader and Redis restarts; shutdown is graceful; nothing is left behind."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from support import all_bodies, pid_alive, wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, descendants
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc

KEY = "durable-claim-key-0001"


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_leader_restart_loses_nothing_and_keeps_deduplication(own_valkey, tmp_path, how):
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=own_valkey.url).start()
    try:
        with ChatClient(leader.address) as c:
            user = c.claim("durable_ann", KEY).user
            c.set_status(pb.PRESENCE_BUSY, "before restart")
            acked = [c.post("general", f"m{i}", f"id{i}").message for i in range(50)]
        leader.stop() if how == "sigterm" else leader.kill()
        leader.start()
        with ChatClient(leader.address) as c:
            again = c.claim("durable_ann", KEY).user
            assert again.user_id == user.user_id and again.claim_hlc == user.claim_hlc
            assert all_bodies(c, "general") == [f"m{i}" for i in range(50)]
            retry = c.post("general", "m7", "id7")
            assert retry.duplicate and retry.message.id == acked[7].id
            assert c.get_status(user.user_id).status.text == "before restart"
            # The clock never goes back across a restart.
            assert c.post("general", "after", "id-after").message.hlc > acked[-1].hlc
    finally:
        leader.stop()


def test_redis_crash_loses_no_acknowledged_message(own_valkey, tmp_path):
    with LeaderProcess("us-east", tmp_path / "leader", redis_url=own_valkey.url) as leader, \
            ChatClient(leader.address, timeout_s=3) as c:
        c.claim("crash_ann", KEY)
        for i in range(30):
            c.post("general", f"m{i}", f"id{i}")
        own_valkey.kill()  # SIGKILL: no chance to flush anything more
        with pytest.raises(grpc.RpcError) as err:
            c.post("general", "during outage", "id-outage")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        own_valkey.start()
        # The leader reconnects by itself; the failed post may be retried with the same id.
        wait_until(lambda: _try_list(c))
        assert all_bodies(c, "general") == [f"m{i}" for i in range(30)]
        assert not c.post("general", "during outage", "id-outage").duplicate
        assert c.post("general", "m3", "id3").duplicate


def _try_list(c: ChatClient) -> bool:
    try:
        c.list("general", limit=1)
        return True
    except grpc.RpcError:
        return False


def test_sigterm_ends_streams_cleanly_and_loses_no_acknowledged_post(own_valkey, tmp_path):
    leader = LeaderProcess("us-east", tmp_path / "leader", redis_url=own_valkey.url).start()
    outcome: dict[str, object] = {}
    with ChatClient(leader.address) as c:
        c.claim("shutdown_ann", KEY)
        stream = c.subscribe("general")
        wait_until(lambda: c.cluster_status().subscribers == 1)

        def drain() -> None:
            try:
                outcome["received"] = sum(1 for _ in stream)
                outcome["code"] = stream.code()
            except grpc.RpcError as e:
                outcome["code"] = e.code()

        reader = threading.Thread(target=drain)
        reader.start()
        acked: list[str] = []
        stop_posting = threading.Event()

        def post_until_stopped(n: int) -> None:
            i = 0
            while not stop_posting.is_set():
                try:
                    c.post("general", f"w{n}-{i}", f"w{n}-{i}")
                    acked.append(f"w{n}-{i}")
                except grpc.RpcError:
                    return
                i += 1

        with ThreadPoolExecutor(4) as pool:
            for n in range(4):
                pool.submit(post_until_stopped, n)
            wait_until(lambda: len(acked) >= 40)
            code = leader.stop()
            stop_posting.set()
        reader.join(10)
        assert code == 0
        assert outcome["code"] == grpc.StatusCode.OK, outcome
    leader.start()
    try:
        with ChatClient(leader.address) as c:
            c.claim("shutdown_ann", KEY)
            stored = set(all_bodies(c, "general"))
            assert set(acked) <= stored, f"lost {len(set(acked) - stored)} acknowledged posts"
    finally:
        leader.stop()


def test_embedded_valkey_keeps_data_in_the_data_dir_and_dies_with_the_leader(tmp_path):
    data = tmp_path / "region"
    leader = LeaderProcess("us-east", data).start()
    try:
        with ChatClient(leader.address) as c:
            c.claim("embedded_ann", KEY)
            c.post("general", "kept", "k1")
        assert (data / "valkey" / "appendonlydir").is_dir()
        valkey_pid = _child_pid(leader.proc.pid)
        leader.kill()  # SIGKILL: the leader cannot stop its Valkey itself
        wait_until(lambda: not pid_alive(valkey_pid))
        leader.start()
        with ChatClient(leader.address) as c:
            c.claim("embedded_ann", KEY)
            assert all_bodies(c, "general") == ["kept"]
        valkey_pid = _child_pid(leader.proc.pid)
    finally:
        leader.stop()
    assert not pid_alive(valkey_pid)


def _child_pid(parent: int) -> int:
    (child,) = descendants(parent)
    return child


def test_slow_subscriber_is_cut_off_without_stalling_others(own_valkey, tmp_path):
    args = ("--subscriber-buffer", "20")
    with LeaderProcess("us-east", tmp_path / "leader", redis_url=own_valkey.url, extra_args=args) as leader, \
            ChatClient(leader.address) as c:
        c.claim("slow_ann", KEY)
        # Never read until the end. A fixed 64 KiB receive window (no BDP probing, which on loopback
        # grows it to megabytes) makes the slowness reach the server after a few messages.
        slow_channel = grpc.insecure_channel(leader.address, options=[("grpc.http2.bdp_probe", 0)])
        slow = chat_pb2_grpc.ChatServiceStub(slow_channel).Subscribe(
            pb.SubscribeRequest(channel="general"), metadata=c.metadata, timeout=30)
        fast_got: list[str] = []
        fast = c.subscribe("general")
        done = threading.Event()

        def read_fast() -> None:
            for event in fast:
                fast_got.append(event.message.body)
                if len(fast_got) == 300:
                    done.set()
                    return

        threading.Thread(target=read_fast, daemon=True).start()
        wait_until(lambda: c.cluster_status().subscribers == 2)
        body = "x" * 3900  # large, so that gRPC's own flow-control windows fill quickly
        for i in range(300):
            c.post("general", f"{i}:{body}", f"s{i}")
        assert done.wait(20), f"fast subscriber got {len(fast_got)} of 300"
        fast.cancel()
        received = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in slow:
                received += 1
        slow_channel.close()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume" in err.value.details()
        assert received < 300


