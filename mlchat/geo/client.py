"""A client of a cluster's ChatService that signs in, carries the causal token, and fails over.

Every response's causal token is merged into the one the client holds, and every read sends it, so
a client that moves to another region never reads older state than it has seen.

Given several regions, the client measures the round trip to each (a health check), talks to the
nearest, and when a call fails with UNAVAILABLE or runs out of time it moves to the next nearest
and sends the same call again. Every write can be repeated safely: a post carries its
client_msg_id, a claim its claim key, and a status is the same value written again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlchat.crdt import vector
from mlchat.errors import InvalidArgument
from mlchat.tls import client_channel
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, cluster_pb2, cluster_pb2_grpc

T = TypeVar("T")
FAIL_OVER_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def round_trip_s(address: str, tries: int = 3, timeout_s: float = 2.0, tls_ca: Path | bytes | None = None) -> float:
    """The best of a few health-check round trips to `address`; infinity if it does not answer."""
    best = float("inf")
    with client_channel(address, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(tries):
            start = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            except grpc.RpcError:
                return best
            best = min(best, time.perf_counter() - start)
    return best


def nearest_first(rtts: Mapping[str, float]) -> list[str]:
    """Regions by measured round trip, nearest first (ties by name, so the order is stable)."""
    return sorted(rtts, key=lambda region: (rtts[region], region))


class ChatClient:
    def __init__(self, address: str | Mapping[str, str], timeout_s: float = 10.0,
                 tls_ca: Path | bytes | None = None) -> None:
        """`address`: one region's HOST:PORT, or region -> HOST:PORT to pick the nearest and fail over.
        `tls_ca`: the CA (a PEM file or its bytes) that signed the leaders' certificates, to talk TLS."""
        self.timeout_s = timeout_s
        self.tls_ca = tls_ca.read_bytes() if isinstance(tls_ca, Path) else tls_ca
        self.token = ""
        self.user: pb.User | None = None
        self.causal: dict[str, str] = {}
        self.regions = {"": address} if isinstance(address, str) else dict(address)
        if len(self.regions) == 1:
            self.order = list(self.regions)
        else:
            self.order = nearest_first({r: round_trip_s(a, tls_ca=self.tls_ca) for r, a in self.regions.items()})
        self.region = self.order[0]
        self._connect(self.regions[self.region])

    def _call(self, call: Callable[[], T]) -> T:
        """Run `call`; on UNAVAILABLE or a deadline, run it again on the next nearest region, and so on."""
        tried = {self.region}
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                untried = [r for r in self.order if r not in tried]
                if e.code() not in FAIL_OVER_ON or not untried:  # type: ignore[attr-defined]
                    raise
                self.region = untried[0]
                tried.add(self.region)
                self.move_to(self.regions[self.region])

    def _connect(self, address: str) -> None:
        self.address = address
        self.channel = client_channel(address, self.tls_ca)
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.cluster = cluster_pb2_grpc.ClusterServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    @property
    def causal_token(self) -> bytes:
        return vector.encode_token(self.causal)

    def _seen(self, token: bytes) -> None:
        self.causal = vector.merge(self.causal, vector.decode_token(token))

    def move_to(self, address: str) -> None:
        """Talk to another region from now on, keeping the token and what this client has seen."""
        self.close()
        self._connect(address)

    def use_region(self, region: str) -> None:
        """Talk to `region` from now on (failing over to the others, nearest first), keeping the token."""
        if region not in self.regions:
            known = ", ".join(r for r in self.order if r) or "one address, without its region"
            raise InvalidArgument(f"unknown region {region!r}: this client was given {known}")
        self.order = [region, *(r for r in self.order if r != region)]
        self.region = region
        self.move_to(self.regions[region])

    def claim(self, username: str, claim_key: str) -> pb.ClaimUsernameResponse:
        resp = self._call(lambda: self.stub.ClaimUsername(
            pb.ClaimUsernameRequest(username=username, claim_key=claim_key), timeout=self.timeout_s))
        self.token, self.user = resp.token, resp.user
        self._seen(resp.causal_token)
        return resp

    def post(self, channel: str, body: str, client_msg_id: str) -> pb.PostMessageResponse:
        resp = self._call(lambda: self.stub.PostMessage(
            pb.PostMessageRequest(channel=channel, body=body, client_msg_id=client_msg_id),
            metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def list(self, channel: str, cursor: str = "", limit: int = 0, newest_first: bool = False
             ) -> pb.ListMessagesResponse:
        resp = self._call(lambda: self.stub.ListMessages(
            pb.ListMessagesRequest(channel=channel, cursor=cursor, limit=limit, newest_first=newest_first,
                                   causal_token=self.causal_token), metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def subscribe(self, channel: str, resume_cursor: str = "", timeout_s: float | None = None
                  ) -> Iterator[pb.SubscribeResponse]:
        """The stream of committed messages; cancel it with `.cancel()`."""
        return self.stub.Subscribe(
            pb.SubscribeRequest(channel=channel, resume_cursor=resume_cursor, causal_token=self.causal_token),
            metadata=self.metadata, timeout=timeout_s)

    def set_status(self, presence: int, text: str) -> pb.SetStatusResponse:
        resp = self._call(lambda: self.stub.SetStatus(pb.SetStatusRequest(presence=presence, text=text),
                                                      metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def get_status(self, user_id: str) -> pb.GetStatusResponse:
        resp = self._call(lambda: self.stub.GetStatus(
            pb.GetStatusRequest(user_id=user_id, causal_token=self.causal_token),
            metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def get_user(self, user_id: str = "", username: str = "") -> pb.GetUserResponse:
        request = (pb.GetUserRequest(username=username, causal_token=self.causal_token) if username
                   else pb.GetUserRequest(user_id=user_id, causal_token=self.causal_token))
        resp = self._call(lambda: self.stub.GetUser(request, metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def create_private_channel(self, channel: str) -> pb.CreatePrivateChannelResponse:
        resp = self._call(lambda: self.stub.CreatePrivateChannel(
            pb.CreatePrivateChannelRequest(channel=channel), metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def add_member(self, channel: str, user_id: str) -> pb.ChannelMemberResponse:
        return self._set_member("AddChannelMember", channel, user_id)

    def remove_member(self, channel: str, user_id: str) -> pb.ChannelMemberResponse:
        return self._set_member("RemoveChannelMember", channel, user_id)

    def _set_member(self, method: str, channel: str, user_id: str) -> pb.ChannelMemberResponse:
        # The method is looked up at each try: a failover changes the stub.
        resp = self._call(lambda: getattr(self.stub, method)(
            pb.ChannelMemberRequest(channel=channel, user_id=user_id), metadata=self.metadata,
            timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def list_members(self, channel: str) -> pb.ListChannelMembersResponse:
        resp = self._call(lambda: self.stub.ListChannelMembers(
            pb.ListChannelMembersRequest(channel=channel, causal_token=self.causal_token),
            metadata=self.metadata, timeout=self.timeout_s))
        self._seen(resp.causal_token)
        return resp

    def refresh(self) -> pb.RefreshTokenResponse:
        """Trade the token for a fresh one before it expires."""
        resp = self._call(lambda: self.stub.RefreshToken(pb.RefreshTokenRequest(), metadata=self.metadata,
                                                         timeout=self.timeout_s))
        self.token = resp.token
        return resp

    def cluster_status(self, with_digest: bool = False) -> cluster_pb2.GetClusterStatusResponse:
        return self.cluster.GetClusterStatus(cluster_pb2.GetClusterStatusRequest(with_digest=with_digest),
                                             metadata=self.metadata, timeout=self.timeout_s)
