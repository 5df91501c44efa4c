"""Private channels on one region: real leader process, real Redis, gRPC over sockets."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from support import session_redis, wait_until

from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb

DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module", params=["valkey", "cluster"])
def leader_redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs against a leader on one Valkey, then on a three-primary Valkey cluster."""
    return session_redis(request, request.param)


@pytest.fixture
def users(leader, unique) -> Iterator[dict[str, ChatClient]]:
    """Three signed-in users: ann (who creates the channels), bob and cat."""
    clients = {}
    for name in ("ann", "bob", "cat"):
        c = ChatClient(leader.address)
        c.claim(f"{name}_{unique}", f"{name}-key-of-{unique}-0123456789")
        clients[name] = c
    yield clients
    for c in clients.values():
        c.close()


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args)
        if isinstance(result, grpc.Future):  # a stream: the refusal comes with its first item
            next(result)
    return err.value


def state(c: ChatClient) -> tuple[int, int, int, str]:
    s = c.cluster_status(with_digest=True)
    return s.users, s.channels, s.messages, s.state_digest


def subscribers(c: ChatClient) -> int:
    return c.cluster_status().subscribers


def test_only_members_post_list_and_subscribe_and_a_refusal_stores_nothing(users, unique):
    ann, bob = users["ann"], users["bob"]
    created = ann.create_private_channel(unique).channel
    assert (created.channel, created.creator_user_id, created.origin_region) == (unique, ann.user.user_id, "us-east")
    ann.post(unique, "for members only", "m1")
    before = state(ann)
    for err in (refused(bob.post, unique, "let me in", "b1"), refused(bob.list, unique),
                refused(bob.subscribe, unique), refused(bob.list_members, unique)):
        assert err.code() == DENIED, err.details()
        assert f"channel {unique!r} is private" in err.details()
        assert bob.user.user_id in err.details()
    assert state(ann) == before
    assert [m.body for m in ann.list(unique).messages] == ["for members only"]


def test_posts_of_members_and_non_members_at_once_store_exactly_the_members(users, unique):
    """Posts committed together in one batch: the check in the commit refuses only the non-member's."""
    ann, bob = users["ann"], users["bob"]
    ann.create_private_channel(unique)

    def post(i: int) -> grpc.StatusCode:
        author = ann if i % 2 == 0 else bob
        try:
            author.post(unique, f"post {i}", f"p{i}")
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, range(40)))
    assert codes == [grpc.StatusCode.OK if i % 2 == 0 else DENIED for i in range(40)]
    ann.post(unique, "still open to members", "after")
    bodies = [m.body for m in ann.list(unique, limit=100).messages]
    assert sorted(bodies) == sorted([f"post {i}" for i in range(0, 40, 2)] + ["still open to members"])


def test_an_added_member_reads_posts_and_subscribes(users, unique):
    ann, bob = users["ann"], users["bob"]
    ann.create_private_channel(unique)
    ann.post(unique, "welcome", "m1")
    added = ann.add_member(unique, bob.user.user_id).member
    assert added.member and added.user_id == bob.user.user_id and added.origin_region == "us-east"
    assert [m.body for m in bob.list(unique).messages] == ["welcome"]
    live = subscribers(ann)
    stream = bob.subscribe(unique)
    wait_until(lambda: subscribers(ann) > live, 5, "bob's subscription")
    bob.post(unique, "thanks", "b1")
    assert next(stream).message.body == "thanks"
    stream.cancel()
    listed = bob.list_members(unique)
    assert listed.channel.creator_user_id == ann.user.user_id
    assert sorted(m.user_id for m in listed.members) == sorted([ann.user.user_id, bob.user.user_id])


def test_a_removed_member_is_refused_and_their_live_stream_ends(users, unique):
    ann, bob = users["ann"], users["bob"]
    ann.create_private_channel(unique)
    ann.add_member(unique, bob.user.user_id)
    live = subscribers(ann)
    stream = bob.subscribe(unique)
    wait_until(lambda: subscribers(ann) > live, 5, "bob's subscription")
    ann.post(unique, "before", "m1")
    assert next(stream).message.body == "before"
    removed = ann.remove_member(unique, bob.user.user_id).member
    assert not removed.member
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == DENIED and "not a member" in err.value.details()
    ann.post(unique, "after", "m2")
    assert refused(bob.list, unique).code() == DENIED
    assert refused(bob.post, unique, "still here?", "b1").code() == DENIED
    assert [m.user_id for m in ann.list_members(unique).members] == [ann.user.user_id]


def test_members_add_anyone_remove_only_themselves_and_the_creator_removes_anyone(users, unique):
    ann, bob, cat = users["ann"], users["bob"], users["cat"]
    ann.create_private_channel(unique)
    err = refused(bob.add_member, unique, cat.user.user_id)  # bob is not a member
    assert err.code() == DENIED and "only members" in err.details()
    ann.add_member(unique, bob.user.user_id)
    bob.add_member(unique, cat.user.user_id)  # a member adds anyone
    err = refused(bob.remove_member, unique, cat.user.user_id)
    assert err.code() == DENIED and "only the creator" in err.details()
    err = refused(bob.remove_member, unique, ann.user.user_id)
    assert err.code() == DENIED
    assert not cat.remove_member(unique, cat.user.user_id).member.member  # a member leaves
    assert not ann.remove_member(unique, bob.user.user_id).member.member  # the creator removes anyone
    assert [m.user_id for m in ann.list_members(unique).members] == [ann.user.user_id]
    # The creator may leave, and come back: the channel stays theirs.
    ann.remove_member(unique, ann.user.user_id)
    assert refused(ann.list, unique).code() == DENIED
    assert ann.add_member(unique, ann.user.user_id).member.member
    assert ann.list(unique).messages == []


def test_adding_a_member_again_or_removing_a_non_member_stores_nothing(users, unique):
    ann, bob, cat = users["ann"], users["bob"], users["cat"]
    ann.create_private_channel(unique)
    first = ann.add_member(unique, bob.user.user_id).member
    before = state(ann)
    assert ann.add_member(unique, bob.user.user_id).member == first
    never = ann.remove_member(unique, cat.user.user_id).member
    assert (never.user_id, never.member, never.hlc) == (cat.user.user_id, False, "")
    assert state(ann) == before


def test_creating_a_channel_again_is_a_retry_for_the_creator_and_refused_for_others(users, unique):
    ann, bob = users["ann"], users["bob"]
    first = ann.create_private_channel(unique).channel
    before = state(ann)
    assert ann.create_private_channel(unique).channel == first
    err = refused(bob.create_private_channel, unique)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and ann.user.user_id in err.details()
    assert state(ann) == before


def test_a_channel_with_public_messages_cannot_become_private(users, unique):
    ann = users["ann"]
    ann.post(unique, "public already", "m1")
    before = state(ann)
    err = refused(ann.create_private_channel, unique)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "public messages" in err.details()
    assert state(ann) == before
    err = refused(ann.add_member, unique, users["bob"].user.user_id)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "not a private channel" in err.details()


def test_a_subscriber_of_an_empty_public_channel_is_cut_off_when_it_becomes_private(users, unique):
    ann, bob = users["ann"], users["bob"]
    live = subscribers(ann)
    stream = bob.subscribe(unique)
    wait_until(lambda: subscribers(ann) > live, 5, "bob's subscription")
    ann.create_private_channel(unique)
    ann.post(unique, "secret", "m1")
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == DENIED


def test_membership_calls_with_bad_input_get_precise_statuses_and_store_nothing(users, unique):
    ann = users["ann"]
    ann.create_private_channel(unique)
    before = state(ann)
    cases = [
        (ann.add_member, (unique, "u0000000000000000"), grpc.StatusCode.NOT_FOUND, "no user"),
        (ann.remove_member, (unique, "u0000000000000000"), grpc.StatusCode.NOT_FOUND, "no user"),
        (ann.add_member, (unique, ""), grpc.StatusCode.INVALID_ARGUMENT, "user_id"),
        (ann.add_member, ("Bad Channel", users["bob"].user.user_id), grpc.StatusCode.INVALID_ARGUMENT, "channel"),
        (ann.create_private_channel, ("",), grpc.StatusCode.INVALID_ARGUMENT, "channel"),
        (ann.list_members, ("c" * 65,), grpc.StatusCode.INVALID_ARGUMENT, "channel"),
        (ann.list_members, (f"{unique}-nope",), grpc.StatusCode.NOT_FOUND, "not a private channel"),
    ]
    for call, args, code, words in cases:
        err = refused(call, *args)
        assert err.code() == code, (args, err.details())
        assert words in err.details(), (args, err.details())
    assert state(ann) == before


def test_a_user_sets_only_their_own_status(users):
    ann, bob = users["ann"], users["bob"]
    # The request names no user: the status set is always the caller's, from the token.
    assert "user_id" not in pb.SetStatusRequest.DESCRIPTOR.fields_by_name
    set_by_bob = bob.set_status(pb.PRESENCE_BUSY, "mine").status
    assert set_by_bob.user_id == bob.user.user_id
    assert ann.get_status(ann.user.user_id).status.hlc == ""  # ann has none, and still has none
    assert ann.get_status(bob.user.user_id).status.text == "mine"
