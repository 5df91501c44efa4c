"""A client of one region's ChatService that signs in and carries the causal token.

Every response's causal token is merged into the one the client holds, and every read sends it, so
a client that moves to another region never reads older state than it has seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mlchat.crdt import vector
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, cluster_pb2, cluster_pb2_grpc


class ChatClient:
    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s
        self.token = ""
        self.user: pb.User | None = None
        self.causal: dict[str, str] = {}
        self._connect(address)

    def _connect(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
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

    def claim(self, username: str, claim_key: str) -> pb.ClaimUsernameResponse:
        resp = self.stub.ClaimUsername(pb.ClaimUsernameRequest(username=username, claim_key=claim_key),
                                       timeout=self.timeout_s)
        self.token, self.user = resp.token, resp.user
        self._seen(resp.causal_token)
        return resp

    def post(self, channel: str, body: str, client_msg_id: str) -> pb.PostMessageResponse:
        resp = self.stub.PostMessage(pb.PostMessageRequest(channel=channel, body=body, client_msg_id=client_msg_id),
                                     metadata=self.metadata, timeout=self.timeout_s)
        self._seen(resp.causal_token)
        return resp

    def list(self, channel: str, cursor: str = "", limit: int = 0, newest_first: bool = False
             ) -> pb.ListMessagesResponse:
        resp = self.stub.ListMessages(
            pb.ListMessagesRequest(channel=channel, cursor=cursor, limit=limit, newest_first=newest_first,
                                   causal_token=self.causal_token), metadata=self.metadata, timeout=self.timeout_s)
        self._seen(resp.causal_token)
        return resp

    def subscribe(self, channel: str, resume_cursor: str = "", timeout_s: float | None = None
                  ) -> Iterator[pb.SubscribeResponse]:
        """The stream of committed messages; cancel it with `.cancel()`."""
        return self.stub.Subscribe(
            pb.SubscribeRequest(channel=channel, resume_cursor=resume_cursor, causal_token=self.causal_token),
            metadata=self.metadata, timeout=timeout_s)

    def set_status(self, presence: int, text: str) -> pb.SetStatusResponse:
        resp = self.stub.SetStatus(pb.SetStatusRequest(presence=presence, text=text), metadata=self.metadata,
                                   timeout=self.timeout_s)
        self._seen(resp.causal_token)
        return resp

    def get_status(self, user_id: str) -> pb.GetStatusResponse:
        resp = self.stub.GetStatus(pb.GetStatusRequest(user_id=user_id, causal_token=self.causal_token),
                                   metadata=self.metadata, timeout=self.timeout_s)
        self._seen(resp.causal_token)
        return resp

    def get_user(self, user_id: str = "", username: str = "") -> pb.GetUserResponse:
        request = (pb.GetUserRequest(username=username, causal_token=self.causal_token) if username
                   else pb.GetUserRequest(user_id=user_id, causal_token=self.causal_token))
        resp = self.stub.GetUser(request, metadata=self.metadata, timeout=self.timeout_s)
        self._seen(resp.causal_token)
        return resp

    def cluster_status(self, with_digest: bool = False) -> cluster_pb2.GetClusterStatusResponse:
        return self.cluster.GetClusterStatus(cluster_pb2.GetClusterStatusRequest(with_digest=with_digest),
                                             metadata=self.metadata, timeout=self.timeout_s)
