"""The stream of unary calls between a gateway and its core, over real gRPC: a gateway server in front of a core
server that serves PostMessage alone, with commits of the test's own, so that it can hold one, refuse one, or
stop the core."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from mlchat.leader.gateway import core_channel, gateway_server
from mlchat.leader.gateways import GatewayServicer
from mlchat.leader.process import free_port
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, gateway_pb2_grpc

POST = "/mlchat.v1.ChatService/PostMessage"


class Commits:
    """The core's commit of a post: "slow" waits for `release`; "refuse" is refused with a trailer."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)  # by body
        self.cancelled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)  # by body

    async def __call__(self, request: pb.PostMessageRequest, call: Any) -> pb.PostMessageResponse:
        self.started[request.body].set()
        if request.body == "slow":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled[request.body].set()
                raise
        if request.body == "refuse":
            await call.abort(grpc.StatusCode.PERMISSION_DENIED, "not for you",
                             (("retry-after-ms", "7"),))
        token = dict(call.invocation_metadata()).get("authorization", "")
        return pb.PostMessageResponse(message=pb.Message(body=request.body, user_id=token))


async def core_server(socket: Path, commits: Commits) -> grpc.aio.Server:
    server = grpc.aio.server()
    # Only posts come this way: no chat servicer (nor region) behind the rest of the service.
    methods = {POST: (pb.PostMessageRequest, commits)}
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(methods, SimpleNamespace(region=None)),
                                                          server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


@dataclass
class Rig:
    stub: chat_pb2_grpc.ChatServiceStub
    commits: Commits
    socket: Path
    core: grpc.aio.Server
    to_core: grpc.aio.Channel  # the gateway's channel to the core


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[Rig]:
    commits = Commits()
    with tempfile.TemporaryDirectory(prefix="mlgt-") as tmp:
        socket = Path(tmp) / "core.sock"
        channel = core_channel(f"unix:{socket}")
        address = f"127.0.0.1:{free_port()}"
        gateway, relay = gateway_server("us-east", address, channel, None)
        relay.start()
        await gateway.start()
        client = grpc.aio.insecure_channel(address)
        rig = Rig(chat_pb2_grpc.ChatServiceStub(client), commits, socket, await core_server(socket, commits), channel)
        try:
            yield rig
        finally:
            await client.close()
            await gateway.stop(0)
            await relay.stop()
            await channel.close()
            await rig.core.stop(0)


def post(body: str) -> pb.PostMessageRequest:
    return pb.PostMessageRequest(channel="c", body=body, client_msg_id=body)


async def committing(rig: Rig, body: str) -> asyncio.Future[pb.PostMessageResponse]:
    """A post sent, once its commit has started at the core."""
    call = asyncio.ensure_future(rig.stub.PostMessage(post(body)))
    await asyncio.wait_for(rig.commits.started[body].wait(), 10)
    return call


def test_each_post_is_answered_when_committed_not_held_behind_a_slow_one() -> None:
    asyncio.run(_each_post_is_answered_when_committed_not_held_behind_a_slow_one())


async def _each_post_is_answered_when_committed_not_held_behind_a_slow_one() -> None:
    async with running() as rig:
        slow = await committing(rig, "slow")
        fast = await asyncio.wait_for(rig.stub.PostMessage(post("fast"), metadata=(("authorization", "Bearer t"),)), 10)
        assert fast.message.body == "fast"
        assert fast.message.user_id == "Bearer t"  # the client's metadata went with the post
        assert not slow.done()
        rig.commits.release.set()
        assert (await asyncio.wait_for(slow, 10)).message.body == "slow"


def test_a_refusal_reaches_the_client_with_its_status_details_and_trailers() -> None:
    asyncio.run(_a_refusal_reaches_the_client_with_its_status_details_and_trailers())


async def _a_refusal_reaches_the_client_with_its_status_details_and_trailers() -> None:
    async with running() as rig:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rig.stub.PostMessage(post("refuse"))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details() == "not for you"
        assert ("retry-after-ms", "7") in tuple(refused.value.trailing_metadata())


def test_posts_waiting_when_the_core_goes_away_hear_unavailable_and_the_next_post_reconnects() -> None:
    asyncio.run(_posts_waiting_when_the_core_goes_away_hear_unavailable_and_the_next_post_reconnects())


async def _posts_waiting_when_the_core_goes_away_hear_unavailable_and_the_next_post_reconnects() -> None:
    async with running() as rig:
        slow = await committing(rig, "slow")
        await rig.core.stop(0)  # the core goes away, and the stream with it
        with pytest.raises(grpc.aio.AioRpcError) as lost:
            await asyncio.wait_for(slow, 10)
        assert lost.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "lost its core process" in lost.value.details() and "same client_msg_id" in lost.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as away:  # no core: refused at once, not held
            await asyncio.wait_for(rig.stub.PostMessage(post("meanwhile")), 10)
        assert away.value.code() is grpc.StatusCode.UNAVAILABLE

        rig.core = await core_server(rig.socket, rig.commits)  # back
        await asyncio.wait_for(rig.to_core.channel_ready(), 10)  # the gateway's channel reconnects on its own
        assert (await rig.stub.PostMessage(post("again"))).message.body == "again"


def test_a_call_the_core_does_not_serve_is_unimplemented() -> None:
    asyncio.run(_a_call_the_core_does_not_serve_is_unimplemented())


async def _a_call_the_core_does_not_serve_is_unimplemented() -> None:
    async with running() as rig:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rig.stub.ListMessages(pb.ListMessagesRequest(channel="c"))
        assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "ListMessages" in refused.value.details()


def test_a_call_whose_caller_runs_out_of_time_is_cancelled_at_the_core() -> None:
    asyncio.run(_a_call_whose_caller_runs_out_of_time_is_cancelled_at_the_core())


async def _a_call_whose_caller_runs_out_of_time_is_cancelled_at_the_core() -> None:
    async with running() as rig:
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await rig.stub.PostMessage(post("slow"), timeout=0.5)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # As gRPC cancels a handler whose caller is gone: the core stops serving it.
        await asyncio.wait_for(rig.commits.cancelled["slow"].wait(), 10)
        assert (await rig.stub.PostMessage(post("fast"))).message.body == "fast"  # the stream serves on
