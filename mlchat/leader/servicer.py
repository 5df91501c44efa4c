"""gRPC servicers: decode the request, check the token, call the Region, encode the answer.

Domain errors become `context.abort(status, message)`; a Redis outage becomes UNAVAILABLE. Nothing
here decides protocol logic.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import redis.exceptions

from mlchat.crdt.claims import Claim
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry
from mlchat.errors import InvalidArgument, MlchatError, PermissionDenied, ResourceExhausted
from mlchat.geo.failover import Term
from mlchat.geo.modes import describe
from mlchat.leader import limits
from mlchat.leader.region import Committed, LiveAfter, Region, UserView, encode_cursor
from mlchat.leader.tokens import Principal, TokenSigner, bearer
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, cluster_pb2, cluster_pb2_grpc

if TYPE_CHECKING:
    from mlchat.leader.writes import Writes

log = logging.getLogger(__name__)
PEER_PREFIX = "region:"  # the subject of a region's token
# Trailers of SubscribeUntilLive: the stream cursor past which messages are live, and the subscriber's user id.
LIVE_AFTER = "x-mlchat-live-after"
SUBSCRIBER = "x-mlchat-subscriber"


def _status_code(err: MlchatError) -> grpc.StatusCode:
    return grpc.StatusCode[err.grpc_status]


# Storage that is down or moving: the call may succeed later. On Redis Cluster, a primary that is down
# or slots being served by no node (CLUSTERDOWN, TRYAGAIN); behind Sentinel, an old primary that a
# failover turned into a read-only replica.
_STORAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                   redis.exceptions.BusyLoadingError, redis.exceptions.ClusterError,
                   redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError,
                   redis.exceptions.ReadOnlyError)


async def _abort_for(err: BaseException, context: grpc.aio.ServicerContext, region: str) -> None:
    if isinstance(err, ResourceExhausted) and err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(max(1, round(err.retry_after_s * 1000)))),))
    if isinstance(err, MlchatError):
        await context.abort(_status_code(err), str(err))
    if isinstance(err, _STORAGE_ERRORS):
        log.warning("storage unavailable: %s", err)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"region {region} cannot reach its storage; retry")
    raise err


def _check_size(request: Any) -> None:
    limits.request_size(request.ByteSize())


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_size(request)
            return await method(self, request, context)
        except (MlchatError, *_STORAGE_ERRORS) as err:
            await _abort_for(err, context, self.region.name)

    return wrapper


def streaming(method: Callable[..., AsyncIterator[Any]], limit_size: bool = True
              ) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if limit_size:
                _check_size(request)
            async for item in method(self, request, context):
                yield item
        except (MlchatError, *_STORAGE_ERRORS) as err:
            await _abort_for(err, context, self.region.name)

    return wrapper


def message_pb(entry: LogEntry) -> pb.Message:
    return pb.Message(id=entry.id, channel=entry.channel, user_id=entry.user_id, body=entry.body,
                      client_msg_id=entry.client_msg_id, hlc=entry.hlc, origin_region=entry.region,
                      created_at_ms=Hlc.decode(entry.hlc).wall_ms, cursor=encode_cursor(entry.order_key))


def subscribe_response(item: Committed) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(message=message_pb(item.entry), stream_cursor=item.stream_id,
                                causal_token=item.causal_token)


def status_pb(user_id: str, value: StatusValue | None) -> pb.Status:
    if value is None:
        return pb.Status(user_id=user_id)
    return pb.Status(user_id=user_id, presence=value.presence, text=value.text, hlc=value.hlc,
                     origin_region=value.region, updated_at_ms=Hlc.decode(value.hlc).wall_ms)


def user_pb(view: UserView) -> pb.User:
    return pb.User(user_id=view.user_id, username=view.username, claim_state=int(view.state),
                   claim_region=view.claim.region, claim_hlc=view.claim.hlc)


def channel_pb(record: Claim) -> pb.PrivateChannel:
    return pb.PrivateChannel(channel=record.name, creator_user_id=record.user_id, hlc=record.hlc,
                             origin_region=record.region, created_at_ms=Hlc.decode(record.hlc).wall_ms)


def member_pb(value: MemberValue) -> pb.ChannelMember:
    return pb.ChannelMember(user_id=value.user_id, member=value.member, hlc=value.hlc, origin_region=value.region)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Authenticator:
    """Verifies bearer tokens, remembering the good ones (a client sends the same token on every call),
    and holds each user to its rate limit."""

    CACHE_SIZE = 10_000

    def __init__(self, signer: TokenSigner, limiter: limits.RateLimiter | None = None) -> None:
        self.signer = signer
        self.limiter = limiter or limits.RateLimiter(0, 0)
        self._verified: dict[str, Principal] = {}

    def principal(self, context: grpc.aio.ServicerContext, peer: bool = False) -> Principal:
        """The caller: a user, or with `peer` one of the cluster's regions (their tokens name a region).
        A user over its rate limit gets RESOURCE_EXHAUSTED, with a `retry-after-ms` trailer."""
        principal = self._verify(bearer(context.invocation_metadata()))
        if principal.user_id.startswith(PEER_PREFIX) != peer:
            raise PermissionDenied("replication takes a region's token" if peer
                                   else "a region's token cannot act as a user: call ClaimUsername")
        if not peer and (wait_s := self.limiter.wait_s(principal.user_id, time.monotonic())) > 0:
            raise ResourceExhausted(f"user {principal.user_id} is over its limit of {self.limiter.rate:g} calls a "
                                    f"second (bursts of {self.limiter.burst}): retry in {wait_s * 1000:.0f} ms",
                                    retry_after_s=wait_s)
        return principal

    def _verify(self, token: str) -> Principal:
        now = wall_ms()
        known = self._verified.get(token)
        if known is not None and known.expires_at_ms > now:
            return known
        principal = self.signer.verify(token, now)
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = principal
        return principal


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, region: Region, auth: Authenticator, writes: Writes) -> None:
        self.region = region
        self.auth = auth
        self.writes = writes

    async def _read_after(self, token: bytes, context: grpc.aio.ServicerContext) -> None:
        await self.region.wait_for(token, context.time_remaining())

    @unary
    async def ClaimUsername(self, request, context):
        name = limits.username(request.username)
        key = limits.claim_key(request.claim_key)

        def respond(view: UserView, causal_token: bytes) -> pb.ClaimUsernameResponse:
            token, principal = self.auth.signer.issue(view.user_id, view.username, wall_ms())
            return pb.ClaimUsernameResponse(user=user_pb(view), token=token,
                                            token_expires_at_ms=principal.expires_at_ms, causal_token=causal_token)

        return await self.writes.run("ClaimUsername", request, context,
                                     lambda: self.writes.claim(name, key, context.time_remaining()),
                                     lambda view: view.claim, respond)

    @unary
    async def PostMessage(self, request, context):
        me = self.auth.principal(context)
        channel, body = limits.channel(request.channel), limits.body(request.body)
        client_msg_id = limits.client_msg_id(request.client_msg_id)
        return await self.writes.run(
            "PostMessage", request, context, lambda: self.region.post(me.user_id, channel, body, client_msg_id),
            lambda posted: posted[0],
            lambda posted, token: pb.PostMessageResponse(message=message_pb(posted[0]), duplicate=posted[1],
                                                         causal_token=token))

    @unary
    async def ListMessages(self, request, context):
        me = self.auth.principal(context)
        channel = limits.channel(request.channel)
        limit = limits.page_size(request.limit)
        await self._read_after(request.causal_token, context)
        page = await self.region.page(me.user_id, channel, request.cursor, limit, request.newest_first)
        messages = [message_pb(e) for e in page.entries]
        return pb.ListMessagesResponse(messages=messages, next_cursor=messages[-1].cursor if messages else "",
                                       subscribe_cursor=page.stream_id, causal_token=self.region.causal_token())

    @streaming
    async def Subscribe(self, request, context):
        async for response in self._subscribe(request, context, live=True):
            yield response

    @streaming
    async def SubscribeUntilLive(self, request, context):
        """Subscribe, ending where the live messages begin: served to the region's gateways only, which send
        the live ones from their own feed of the channel. The trailers say where that is, and who the user is."""
        async for response in self._subscribe(request, context, live=False):
            yield response

    async def _subscribe(self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext, live: bool
                         ) -> AsyncIterator[pb.SubscribeResponse]:
        me = self.auth.principal(context)
        channel = limits.channel(request.channel)
        await self._read_after(request.causal_token, context)
        async for item in self.region.subscribe(me.user_id, channel, request.resume_cursor, live):
            if isinstance(item, LiveAfter):
                context.set_trailing_metadata(((LIVE_AFTER, item.stream_id), (SUBSCRIBER, me.user_id)))
            else:
                yield subscribe_response(item)

    @unary
    async def SetStatus(self, request, context):
        me = self.auth.principal(context)
        if request.presence not in pb.Presence.values() or request.presence == pb.PRESENCE_UNSPECIFIED:
            raise InvalidArgument(f"presence {request.presence} is invalid: use ONLINE, AWAY, BUSY or OFFLINE")
        text = limits.status_text(request.text)
        return await self.writes.run(
            "SetStatus", request, context, lambda: self.region.set_status(me.user_id, request.presence, text),
            lambda winner: winner,
            lambda winner, token: pb.SetStatusResponse(status=status_pb(me.user_id, winner), causal_token=token))

    @unary
    async def CreatePrivateChannel(self, request, context):
        me = self.auth.principal(context)
        channel = limits.channel(request.channel)
        return await self.writes.run(
            "CreatePrivateChannel", request, context, lambda: self.region.create_channel(me.user_id, channel),
            lambda record: record,
            lambda record, token: pb.CreatePrivateChannelResponse(channel=channel_pb(record), causal_token=token))

    async def _set_member(self, method: str, member: bool, request: Any, context: grpc.aio.ServicerContext
                          ) -> pb.ChannelMemberResponse:
        me = self.auth.principal(context)
        channel = limits.channel(request.channel)
        if not request.user_id:
            raise InvalidArgument("user_id is required")
        return await self.writes.run(
            method, request, context, lambda: self.region.set_member(me.user_id, channel, request.user_id, member),
            lambda value: value,  # no stamp when the user never was a member: nothing was written
            lambda value, token: pb.ChannelMemberResponse(member=member_pb(value), causal_token=token))

    @unary
    async def AddChannelMember(self, request, context):
        return await self._set_member("AddChannelMember", True, request, context)

    @unary
    async def RemoveChannelMember(self, request, context):
        return await self._set_member("RemoveChannelMember", False, request, context)

    @unary
    async def ListChannelMembers(self, request, context):
        me = self.auth.principal(context)
        channel = limits.channel(request.channel)
        await self._read_after(request.causal_token, context)
        record, members = await self.region.channel_members(me.user_id, channel)
        return pb.ListChannelMembersResponse(channel=channel_pb(record), members=[member_pb(m) for m in members],
                                             causal_token=self.region.causal_token())

    @unary
    async def GetStatus(self, request, context):
        self.auth.principal(context)
        if not request.user_id:
            raise InvalidArgument("user_id is required")
        await self._read_after(request.causal_token, context)
        value = await self.region.status(request.user_id)
        return pb.GetStatusResponse(status=status_pb(request.user_id, value), causal_token=self.region.causal_token())

    @unary
    async def GetUser(self, request, context):
        self.auth.principal(context)
        key = request.WhichOneof("key")
        if key is None:
            raise InvalidArgument("give user_id or username")
        await self._read_after(request.causal_token, context)
        if key == "username":
            view = await self.region.user_by_name(limits.username(request.username))
        else:
            view = await self.region.user(request.user_id)
        return pb.GetUserResponse(user=user_pb(view), causal_token=self.region.causal_token())

    @unary
    async def RefreshToken(self, request, context):
        me = self.auth.principal(context)
        token, fresh = self.auth.signer.issue(me.user_id, me.username, wall_ms())
        return pb.RefreshTokenResponse(token=token, token_expires_at_ms=fresh.expires_at_ms)


class ClusterServicer(cluster_pb2_grpc.ClusterServiceServicer):
    def __init__(self, region: Region, auth: Authenticator, peers: Callable[[], list[cluster_pb2.PeerStatus]],
                 term: Callable[[], Term | None]) -> None:
        self.region = region
        self.auth = auth
        self.peers = peers
        self.term = term

    @unary
    async def GetClusterStatus(self, request, context):
        self.auth.principal(context)
        users, channels, messages = await self.region.store.counts()
        settings = self.region.settings
        term = self.term()
        return cluster_pb2.GetClusterStatusResponse(
            primary=term.primary if term else "", epoch=term.epoch if term else 0,
            region=self.region.name, mode=describe(settings.mode, settings.sync_acks), users=users, channels=channels,
            messages=messages, hlc=self.region.clocks.clock.encode(), subscribers=self.region.subscriber_count(),
            peers=self.peers(),
            state_digest=await self.region.digest() if request.with_digest else "")
