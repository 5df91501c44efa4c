"""The client API of one region, end to end: real leader process, real Redis, gRPC over sockets."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from support import session_redis, wait_until

from mlchat.geo.client import ChatClient
from mlchat.leader.tokens import TokenSigner
from mlchat.v1 import chat_pb2 as pb


@pytest.fixture(scope="module", params=["valkey", "cluster"])
def leader_redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs against a leader on one Valkey, then on a three-primary Valkey cluster."""
    return session_redis(request, request.param)


def test_claim_returns_a_confirmed_user_and_a_token(leader, unique):
    with ChatClient(leader.address) as c:
        resp = c.claim(f"ann_{unique}", "a-secret-claim-key-1")
        assert resp.user.username == f"ann_{unique}"
        assert resp.user.claim_state == pb.CLAIM_STATE_CONFIRMED  # a lone region confirms at once
        assert resp.user.claim_region == "us-east"
        assert resp.token and resp.token_expires_at_ms > time.time() * 1000
        assert c.get_user(username=f"ann_{unique}").user.user_id == resp.user.user_id


def test_claim_retry_with_same_key_is_idempotent_and_other_key_is_refused(leader, unique):
    with ChatClient(leader.address) as a, ChatClient(leader.address) as b:
        first = a.claim(f"bob_{unique}", "bobs-secret-key-123")
        again = a.claim(f"bob_{unique}", "bobs-secret-key-123")
        assert again.user.user_id == first.user.user_id
        assert again.user.claim_hlc == first.user.claim_hlc
        before = a.cluster_status(with_digest=True)
        with pytest.raises(grpc.RpcError) as err:
            b.claim(f"bob_{unique}", "someone-elses-key-456")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "taken" in err.value.details()
        after = a.cluster_status(with_digest=True)
        assert (after.users, after.state_digest) == (before.users, before.state_digest)


def test_post_then_list_oldest_first(client, unique):
    for i in range(5):
        client.post(unique, f"message {i}", f"m{i}")
    page = client.list(unique)
    assert [m.body for m in page.messages] == [f"message {i}" for i in range(5)]
    assert all(m.origin_region == "us-east" and m.user_id == client.user.user_id for m in page.messages)
    assert [m.hlc for m in page.messages] == sorted(m.hlc for m in page.messages)


def test_retry_returns_the_original_and_stores_nothing_new(client, unique):
    first = client.post(unique, "hello", "retry-1")
    second = client.post(unique, "hello", "retry-1")
    assert not first.duplicate and second.duplicate
    assert second.message == first.message
    assert [m.id for m in client.list(unique).messages] == [first.message.id]


def test_concurrent_retries_create_one_message(client, unique):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: client.post(unique, "once", "same-id"), range(32)))
    assert len({r.message.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert len(client.list(unique).messages) == 1


def test_reusing_a_client_msg_id_for_another_body_is_refused(client, unique):
    client.post(unique, "original", "dup-id")
    with pytest.raises(grpc.RpcError) as err:
        client.post(unique, "something else", "dup-id")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert [m.body for m in client.list(unique).messages] == ["original"]


def test_paging_forward_and_newest_first_cover_everything_once(client, unique):
    bodies = [f"b{i:02d}" for i in range(23)]
    for i, body in enumerate(bodies):
        client.post(unique, body, f"p{i}")
    forward, cursor = [], ""
    while True:
        page = client.list(unique, cursor=cursor, limit=5)
        if not page.messages:
            break
        forward += [m.body for m in page.messages]
        cursor = page.next_cursor
    assert forward == bodies

    backward, cursor = [], ""
    while True:
        page = client.list(unique, cursor=cursor, limit=4, newest_first=True)
        if not page.messages:
            break
        backward += [m.body for m in page.messages]
        cursor = page.next_cursor
    assert backward == bodies[::-1]


def _collect(stream, into: list, count: int, done: threading.Event) -> None:
    try:
        for event in stream:
            into.append(event)
            if len(into) >= count:
                break
    except grpc.RpcError:
        pass
    finally:
        done.set()


def test_subscriber_sees_new_messages_within_milliseconds(client, unique):
    stream = client.subscribe(unique)
    got: list = []
    done = threading.Event()
    threading.Thread(target=_collect, args=(stream, got, 20, done), daemon=True).start()
    # The subscription is live once the server holds it; wait on a condition, not a sleep.
    _wait_subscribed(client)
    sent_at = {}
    for i in range(20):
        sent_at[f"s{i}"] = time.monotonic()
        client.post(unique, f"live {i}", f"s{i}")
    assert done.wait(10), f"only {len(got)} of 20 messages arrived"
    stream.cancel()
    assert [e.message.body for e in got] == [f"live {i}" for i in range(20)]
    assert len({e.stream_cursor for e in got}) == 20


def _wait_subscribed(client: ChatClient) -> None:
    wait_until(lambda: client.cluster_status().subscribers >= 1, 5, "a live subscription")


def test_resume_from_cursor_has_no_gap_and_no_duplicate(client, unique):
    for i in range(3):
        client.post(unique, f"before {i}", f"r{i}")
    page = client.list(unique)
    # Messages committed after the page was read, while nobody is subscribed.
    for i in range(3, 6):
        client.post(unique, f"after {i}", f"r{i}")
    got: list = []
    done = threading.Event()
    stream = client.subscribe(unique, resume_cursor=page.subscribe_cursor)
    threading.Thread(target=_collect, args=(stream, got, 5, done), daemon=True).start()
    wait_until(lambda: len(got) >= 3)
    for i in range(6, 8):
        client.post(unique, f"live {i}", f"r{i}")
    assert done.wait(10)
    stream.cancel()
    assert [e.message.body for e in got] == ["after 3", "after 4", "after 5", "live 6", "live 7"]

    # Resuming from the middle of what was streamed gives the rest, exactly once.
    resumed: list = []
    done2 = threading.Event()
    stream2 = client.subscribe(unique, resume_cursor=got[1].stream_cursor)
    threading.Thread(target=_collect, args=(stream2, resumed, 3, done2), daemon=True).start()
    assert done2.wait(10)
    stream2.cancel()
    assert [e.message.body for e in resumed] == ["after 5", "live 6", "live 7"]


def test_status_last_writer_wins_and_is_readable_by_others(leader, client, unique):
    client.set_status(pb.PRESENCE_BUSY, "in a meeting")
    latest = client.set_status(pb.PRESENCE_ONLINE, "back")
    assert latest.status.text == "back" and latest.status.origin_region == "us-east"
    with ChatClient(leader.address) as other:
        other.claim(f"viewer_{unique}", "viewer-secret-key-1")
        seen = other.get_status(client.user.user_id).status
        assert (seen.presence, seen.text, seen.hlc) == (pb.PRESENCE_ONLINE, "back", latest.status.hlc)


def test_status_of_a_user_who_never_set_one_is_empty(client):
    status = client.get_status(client.user.user_id).status
    assert status.presence == pb.PRESENCE_UNSPECIFIED and status.hlc == ""


def test_cluster_status_counts_and_digest(client, unique):
    before = client.cluster_status(with_digest=True)
    client.post(unique, "counted", "c1")
    after = client.cluster_status(with_digest=True)
    assert after.region == "us-east" and after.mode == "async"
    assert after.messages == before.messages + 1
    assert after.channels >= 1 and after.users >= 1
    assert after.state_digest != before.state_digest
    assert after.state_digest == client.cluster_status(with_digest=True).state_digest
    assert after.hlc > before.hlc


def test_causal_token_is_returned_and_accepted(client, unique):
    resp = client.post(unique, "x", "ct1")
    assert resp.causal_token.startswith(b"us-east=")
    assert client.list(unique).messages  # the client sends its token with every read


def test_health_and_reflection_are_served(leader):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(leader.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mlchat.v1.ChatService", "mlchat.v1.ClusterService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"mlchat.v1.ChatService", "mlchat.v1.ClusterService", "grpc.health.v1.Health"} <= names


def test_a_token_is_refreshed_for_a_later_expiry_but_an_expired_one_is_not(leader, client):
    fresh = client.refresh()
    assert fresh.token and client.token == fresh.token
    assert fresh.token_expires_at_ms > int(time.time() * 1000) + 23 * 3600 * 1000  # a full lifetime again
    client.list("general")  # the fresh token works
    own_secret = (leader.data_dir / "cluster-secret").read_bytes().strip()
    expired, _ = TokenSigner(own_secret, ttl_ms=1000).issue(client.user.user_id, "x", int(time.time() * 1000) - 5000)
    client.token = expired
    with pytest.raises(grpc.RpcError) as refused:
        client.refresh()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired" in refused.value.details()
