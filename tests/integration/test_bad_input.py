"""Bad input gets a precise status with a message that says what was wrong, and changes nothing."""

from __future__ import annotations

import time

import grpc
import pytest

from mlchat.geo.client import ChatClient
from mlchat.leader.tokens import TokenSigner
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (rpc, request, expected status, words the message must contain)
BAD_REQUESTS = [
    ("PostMessage", pb.PostMessageRequest(channel="general", body="", client_msg_id="a"), INVALID, "empty"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body=" \n\t ", client_msg_id="a"), INVALID, "empty"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="x" * 4001, client_msg_id="a"), INVALID,
     "too long"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="\U0001F600" * 2100, client_msg_id="a"),
     INVALID, "bytes"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="bell\x07", client_msg_id="a"), INVALID,
     "control"),
    ("PostMessage", pb.PostMessageRequest(channel="", body="hi", client_msg_id="a"), INVALID, "channel"),
    ("PostMessage", pb.PostMessageRequest(channel="Bad Channel", body="hi", client_msg_id="a"), INVALID, "channel"),
    ("PostMessage", pb.PostMessageRequest(channel="c" * 65, body="hi", client_msg_id="a"), INVALID, "channel"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="hi", client_msg_id=""), INVALID,
     "client_msg_id"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="hi", client_msg_id="has space"), INVALID,
     "client_msg_id"),
    ("PostMessage", pb.PostMessageRequest(channel="general", body="hi", client_msg_id="i" * 65), INVALID,
     "client_msg_id"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="Ann", claim_key="k" * 16), INVALID, "username"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="ab", claim_key="k" * 16), INVALID, "username"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="a" * 33, claim_key="k" * 16), INVALID, "username"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="with space", claim_key="k" * 16), INVALID, "username"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="shortkey", claim_key="k" * 15), INVALID, "claim_key"),
    ("ClaimUsername", pb.ClaimUsernameRequest(username="longkey", claim_key="k" * 129), INVALID, "claim_key"),
    ("ListMessages", pb.ListMessagesRequest(channel="general", cursor="not-a-cursor"), INVALID, "cursor"),
    ("ListMessages", pb.ListMessagesRequest(channel="general", limit=501), INVALID, "limit"),
    ("ListMessages", pb.ListMessagesRequest(channel="general", limit=-1), INVALID, "limit"),
    ("ListMessages", pb.ListMessagesRequest(channel="general", causal_token=b"garbage"), INVALID, "causal token"),
    ("ListMessages", pb.ListMessagesRequest(channel="general", causal_token=b"\xff\xfe"), INVALID, "causal token"),
    ("ListMessages", pb.ListMessagesRequest(channel="BAD!"), INVALID, "channel"),
    ("SetStatus", pb.SetStatusRequest(presence=pb.PRESENCE_UNSPECIFIED, text="x"), INVALID, "presence"),
    ("SetStatus", pb.SetStatusRequest(presence=42, text="x"), INVALID, "presence"),
    ("SetStatus", pb.SetStatusRequest(presence=pb.PRESENCE_AWAY, text="t" * 201), INVALID, "status text"),
    ("GetStatus", pb.GetStatusRequest(user_id=""), INVALID, "user_id"),
    ("GetStatus", pb.GetStatusRequest(user_id="u0000000000000000"), grpc.StatusCode.NOT_FOUND, "no user"),
    ("GetUser", pb.GetUserRequest(), INVALID, "user_id or username"),
    ("GetUser", pb.GetUserRequest(user_id="u0000000000000000"), grpc.StatusCode.NOT_FOUND, "no user"),
    ("GetUser", pb.GetUserRequest(username="nobody_here"), grpc.StatusCode.NOT_FOUND, "nobody_here"),
    ("GetUser", pb.GetUserRequest(username="NOT VALID"), INVALID, "username"),
    ("CreatePrivateChannel", pb.CreatePrivateChannelRequest(channel="Bad!"), INVALID, "channel"),
    ("AddChannelMember", pb.ChannelMemberRequest(channel="general", user_id=""), INVALID, "user_id"),
    ("AddChannelMember", pb.ChannelMemberRequest(channel="general", user_id="u0000000000000000"),
     grpc.StatusCode.NOT_FOUND, "not a private channel"),
    ("RemoveChannelMember", pb.ChannelMemberRequest(channel="c" * 65, user_id="u0000000000000000"), INVALID,
     "channel"),
    ("ListChannelMembers", pb.ListChannelMembersRequest(channel="general"), grpc.StatusCode.NOT_FOUND,
     "not a private channel"),
    ("ListChannelMembers", pb.ListChannelMembersRequest(channel="BAD!"), INVALID, "channel"),
]


def _state(client: ChatClient) -> tuple[int, int, int, str]:
    s = client.cluster_status(with_digest=True)
    return s.users, s.channels, s.messages, s.state_digest


@pytest.mark.parametrize(("rpc", "request_", "code", "words"), BAD_REQUESTS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_precise_status_and_changes_nothing(client, rpc, request_, code, words):
    before = _state(client)
    with pytest.raises(grpc.RpcError) as err:
        getattr(client.stub, rpc)(request_, metadata=client.metadata, timeout=5)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert _state(client) == before


def test_bad_resume_cursor_is_refused(client, unique):
    stream = client.subscribe(unique, resume_cursor="12-x")
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == INVALID and "resume_cursor" in err.value.details()


def test_oversized_request_is_refused(client):
    before = _state(client)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.PostMessage(pb.PostMessageRequest(channel="general", body="x" * 70_000, client_msg_id="big"),
                                metadata=client.metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than the 65536 bytes" in err.value.details()
    assert _state(client) == before


def _post_with_token(leader, token: str | None) -> grpc.RpcError:
    metadata = () if token is None else (("authorization", token),)
    with grpc.insecure_channel(leader.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.PostMessage(pb.PostMessageRequest(channel="general", body="hi", client_msg_id="t"),
                             metadata=metadata, timeout=5)
    return err.value


def test_missing_malformed_forged_and_expired_tokens_are_unauthenticated(leader, client):
    before = _state(client)
    now = int(time.time() * 1000)
    own_secret = (leader.data_dir / "cluster-secret").read_bytes().strip()
    forged, _ = TokenSigner(b"another-cluster-secret").issue(client.user.user_id, "x", now)
    expired, _ = TokenSigner(own_secret, ttl_ms=1000).issue(client.user.user_id, "x", now - 5000)
    tampered = client.token[:-3] + ("AAA" if not client.token.endswith("AAA") else "BBB")
    cases = {
        None: "missing",
        "Basic abc": "Bearer",
        "Bearer nonsense": "malformed token",
        f"Bearer {forged}": "signature",
        f"Bearer {tampered}": "signature",
        f"Bearer {expired}": "expired",
    }
    for token, words in cases.items():
        err = _post_with_token(leader, token)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (token, err.details())
        assert words in err.details(), (token, err.details())
    assert _state(client) == before


def test_every_call_but_claim_requires_a_token(leader):
    with grpc.insecure_channel(leader.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        calls = [
            (stub.PostMessage, pb.PostMessageRequest(channel="c", body="b", client_msg_id="i")),
            (stub.ListMessages, pb.ListMessagesRequest(channel="c")),
            (stub.SetStatus, pb.SetStatusRequest(presence=pb.PRESENCE_ONLINE)),
            (stub.GetStatus, pb.GetStatusRequest(user_id="u1")),
            (stub.GetUser, pb.GetUserRequest(user_id="u1")),
            (stub.CreatePrivateChannel, pb.CreatePrivateChannelRequest(channel="c")),
            (stub.AddChannelMember, pb.ChannelMemberRequest(channel="c", user_id="u1")),
            (stub.RemoveChannelMember, pb.ChannelMemberRequest(channel="c", user_id="u1")),
            (stub.ListChannelMembers, pb.ListChannelMembersRequest(channel="c")),
        ]
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            next(stub.Subscribe(pb.SubscribeRequest(channel="c"), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_causal_token_this_region_cannot_satisfy_fails_by_the_deadline(client, unique):
    token = b"ap-southeast=9999999999999.000000"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ListMessages(pb.ListMessagesRequest(channel=unique, causal_token=token),
                                 metadata=client.metadata, timeout=0.5)
    assert time.monotonic() - started < 5
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
