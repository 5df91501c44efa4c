"""A gateway process: one of a region's front processes, serving clients on the region's address beside its core.

A region run with `--processes N` is its core process (the leader, which alone talks to Redis and to
other regions) and N-1 gateways, all listening on the same address (SO_REUSEPORT: the kernel spreads
clients' connections over them). A gateway holds no state: it terminates the client's connection (and
TLS), and passes each call to the core over a Unix socket, unparsed (but for a subscription's channel).
Unary calls (posts, history, statuses, users...) travel in batches on one stream (`CallRelay`), so that
the core pays its gRPC cost per batch rather than per call. A subscription is started by the core
(checked, its causal token waited for, its backlog sent) and then fed from the gateway's one feed of the
channel (`Feeds`), so that the core sends a message once per gateway, not once per subscriber. Health
checks are passed on as they are. The core checks tokens, limits and input, as for the calls it takes
itself, and each call's status, details and trailers come back to the client unchanged.

The gateway dies with its core (parent-death signal) and is started again by it if it dies alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from mlchat import tls
from mlchat.errors import MlchatError
from mlchat.leader import limits
from mlchat.leader.fanout import Fanout, Subscription
from mlchat.leader.process import on_termination
from mlchat.leader.region import cut_off, is_live
from mlchat.leader.servicer import LIVE_AFTER, SUBSCRIBER
from mlchat.v1 import chat_pb2, cluster_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
READY_LINE = "mlchat gateway serving"  # printed once on stdout: the core waits for it
BATCH_BYTES = 4 * 1024 * 1024  # a batch between gateway and core is cut past this size
# Their unary calls go to the core in batches (health's are passed on as they are).
RELAYED_SERVICES = (chat_pb2.DESCRIPTOR.services_by_name["ChatService"],
                    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"])
SUBSCRIBE_METHOD = "/mlchat.v1.ChatService/Subscribe"
UNTIL_LIVE_METHOD = "/mlchat.v1.GatewayService/SubscribeUntilLive"
MAY_READ_METHOD = "/mlchat.v1.GatewayService/MayRead"
# Transport headers of the client's call: the gateway's own call to the core sets its own.
_NOT_PASSED = ("user-agent", "te", "content-type", "grpc-")


def in_batches(items: list[M]) -> Iterator[list[M]]:
    """`items` in runs of about BATCH_BYTES at most (one larger item alone), in order: a message between gateway
    and core stays well within what the other side reads (limits.MAX_PEER_STATE_BYTES)."""
    batch: list[M] = []
    size = 0
    for item in items:
        if batch and size + item.ByteSize() > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item.ByteSize()
    if batch:
        yield batch


def passed_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The client's call metadata, to send on with the call to the core."""
    return tuple((m.key, m.value) for m in context.invocation_metadata() or ()
                 if not m.key.startswith(_NOT_PASSED) and not m.key.startswith(":"))


async def _pass_back(err: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext, region: str) -> NoReturn:
    """End the client's call as the core ended the gateway's."""
    if err.trailing_metadata():
        context.set_trailing_metadata(tuple(err.trailing_metadata()))
    details = err.details() or ""
    if err.code() is grpc.StatusCode.UNAVAILABLE and not details.startswith("region "):
        # gRPC's own (the core is not there): say what that means to the client.
        details = f"region {region} cannot reach its core process ({details}); retry"
    await context.abort(err.code(), details)


class CallRelay:
    """Passes unary calls to the core on one stream, as many to a message as are waiting, and answers each
    caller with its own outcome as soon as the core sends it. A caller that goes away (or runs out of time)
    takes its call back, or has the core cancel it, as gRPC would a call to the core. If the stream breaks,
    every call waiting on it hears UNAVAILABLE (it may have taken effect: a post retried with the same
    client_msg_id is answered as a duplicate), and the next call opens a new stream."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub, region: str) -> None:
        self._stub = stub
        self._region = region
        self._ids = itertools.count(1)
        self._queue: dict[int, gateway_pb2.PassedCall] = {}  # not sent yet, by id
        self._cancelled: list[int] = []  # sent, and to be cancelled
        self._waiting: dict[int, asyncio.Future[gateway_pb2.CallOutcome]] = {}
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send())

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender

    async def call(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        call_id = next(self._ids)
        future: asyncio.Future[gateway_pb2.CallOutcome] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        self._queue[call_id] = gateway_pb2.PassedCall(
            id=call_id, method=method, request=request, time_remaining_s=context.time_remaining(),
            metadata=[gateway_pb2.CallMetadata(key=k, value=v) for k, v in passed_metadata(context)
                      if isinstance(v, str)])
        self._wake.set()
        try:
            outcome = await future
        except asyncio.CancelledError:
            if self._queue.pop(call_id, None) is None:
                self._cancelled.append(call_id)
                self._wake.set()
            raise
        finally:
            self._waiting.pop(call_id, None)
        if outcome.trailing_metadata:
            context.set_trailing_metadata(tuple((m.key, m.value) for m in outcome.trailing_metadata))
        if outcome.code:
            await context.abort(_CODES[outcome.code], outcome.details)
        return outcome.response

    async def _send(self) -> None:
        while True:
            while not self._queue:  # a stream is opened for calls only: a core that is down is not retried in a loop
                self._wake.clear()
                self._cancelled.clear()  # no stream: nothing sent is still running
                await self._wake.wait()
            try:
                failure = await self._stream()
            except Exception as err:  # whatever it was, the calls waiting hear of it, and the next call goes on
                log.exception("the stream of calls to the core failed")
                failure = str(err)
            self._fail_waiting(failure)

    async def _stream(self) -> str:
        """Send calls on one stream until it ends; return why it did."""
        stream = self._stub.Calls()
        reader = asyncio.create_task(self._read(stream))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            while not reader.done():
                self._wake.clear()
                while (self._queue or self._cancelled) and not reader.done():
                    taken, self._queue = list(self._queue.values()), {}
                    cancelled, self._cancelled = self._cancelled, []
                    for batch in in_batches(taken) if taken else [[]]:
                        await stream.write(gateway_pb2.CallBatch(calls=batch, cancelled=cancelled))
                        cancelled = []
                await self._wake.wait()
            err = None if reader.cancelled() else reader.exception()
            if isinstance(err, grpc.aio.AioRpcError):
                return err.details() or err.code().name
            return str(err) if err else "the core process closed the stream"
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as err:
            return (err.details() or err.code().name) if isinstance(err, grpc.aio.AioRpcError) else str(err)
        finally:
            reader.cancel()
            stream.cancel()

    async def _read(self, stream: Any) -> None:
        async for message in stream:
            for outcome in message.outcomes:
                future = self._waiting.get(outcome.id)
                if future is not None and not future.done():
                    future.set_result(outcome)

    def _fail_waiting(self, failure: str) -> None:
        self._queue.clear()
        self._cancelled.clear()
        unavailable = gateway_pb2.CallOutcome(
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            details=f"region {self._region} lost its core process while the call was on its way ({failure}): it "
                    "may have taken effect or not; retry it (a post with the same client_msg_id)")
        for future in self._waiting.values():
            if not future.done():
                future.set_result(unavailable)


_CODES = {code.value[0]: code for code in grpc.StatusCode}

# What a gateway's subscribers of a channel are sent: a message (its stream cursor, and the SubscribeResponse
# encoded once for all of them), or None where who may read the channel changed.
FeedItem = tuple[str, bytes] | None


class Feed:
    """One channel's live messages from the core, for the subscribers that joined it: each gets its own bounded
    buffer, as on the core. Its subscribers are its own: a feed that ended sends nothing to those of the next."""

    def __init__(self, channel: str, capacity: int) -> None:
        self.channel = channel
        self.fanout: Fanout[FeedItem] = Fanout(capacity)
        self.opened = asyncio.Event()  # the core sends all it commits from now on (or the feed ended)
        self.ended = False
        self.failure = ""  # why it ended, if not because the core is shutting down
        self.subscribers = 0  # joined: the feed closes with the last
        self._live = 0  # past the core's part (their backlog sent): the core counts these as its subscribers
        self._counted = asyncio.Event()  # `_live` changed
        self.task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """A subscriber fed from here on."""
        self._live += 1
        self._counted.set()
        try:
            yield
        finally:
            self._live -= 1
            self._counted.set()

    async def _requests(self) -> AsyncIterator[gateway_pb2.FeedRequest]:
        """The channel, then the count of live subscribers whenever it changes."""
        told = None
        while True:
            self._counted.clear()
            if self._live != told:
                told = self._live
                yield gateway_pb2.FeedRequest(channel=self.channel, subscribers=told)
            await self._counted.wait()

    async def run(self, stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
        try:
            async for events in stub.Feed(self._requests()):
                for event in events.events:
                    kind = event.WhichOneof("event")
                    if kind == "opened":
                        self.opened.set()
                    elif kind == "message":
                        self.fanout.publish(self.channel, (event.message.stream_cursor,
                                                           event.message.SerializeToString()))
                    else:
                        self.fanout.publish(self.channel, None)
            if not self.opened.is_set():
                self.failure = "the core closed it at once"
        except grpc.aio.AioRpcError as err:
            self.failure = f"{err.code().name}: {err.details()}"
        finally:
            self.ended = True
            self.fanout.close(self.channel)
            self.opened.set()


class Feeds:
    """A feed per channel with subscribers on this gateway, shared by them. It closes with its last subscriber;
    one that ended (the core went away, or it fell behind) is replaced for the next subscriber."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayServiceStub, capacity: int) -> None:
        self._stub = stub
        self._capacity = capacity
        self._feeds: dict[str, Feed] = {}

    @contextlib.asynccontextmanager
    async def joined(self, channel: str) -> AsyncIterator[tuple[Subscription[FeedItem], Feed]]:
        """A subscription to `channel`'s feed, once the feed is open: whatever the core commits from then on
        reaches it."""
        feed = self._feeds.get(channel)
        if feed is None or feed.ended:
            feed = self._feeds[channel] = Feed(channel, self._capacity)
            feed.task = asyncio.create_task(feed.run(self._stub))
        feed.subscribers += 1
        try:
            with feed.fanout.subscribe(channel) as sub:
                await feed.opened.wait()
                yield sub, feed
        finally:
            feed.subscribers -= 1
            if not feed.subscribers:
                if self._feeds.get(channel) is feed:
                    del self._feeds[channel]
                assert feed.task is not None
                feed.task.cancel()


def _proxies(core: grpc.aio.Channel, relay: CallRelay, feeds: Feeds, region: str) -> list[grpc.GenericRpcHandler]:
    """Handlers passing every client call on to the core, unparsed: the chat and cluster services and health.
    Unary calls of the chat and cluster services go through `relay`; Subscribe is started by the core and fed
    from `feeds`."""

    def unary(method: str) -> Callable[..., Any]:
        call = core.unary_unary(method)

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, metadata=passed_metadata(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await _pass_back(err, context, region)

        return handler

    async def responses(call: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A streaming call to the core's responses; the client's call ends as the core's did."""
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            await _pass_back(err, context, region)
        finally:  # the client went away: so does the call to the core
            call.cancel()

    def streaming(method: str) -> Callable[..., AsyncIterator[bytes]]:
        open_call = core.unary_stream(method)

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = open_call(request, metadata=passed_metadata(context), timeout=context.time_remaining())
            async for response in responses(call, context):
                yield response

        return handler

    def relayed(method: str) -> Callable[..., Any]:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                if len(request) > BATCH_BYTES:  # no batch carries it; the core holds smaller ones to its limit
                    limits.request_size(len(request))
            except MlchatError as err:
                await context.abort(grpc.StatusCode[err.grpc_status], str(err))
            return await relay.call(method, request, context)

        return handler

    passed_on = streaming(SUBSCRIBE_METHOD)
    until_live = core.unary_stream(UNTIL_LIVE_METHOD)
    may_read = core.unary_unary(MAY_READ_METHOD, request_serializer=gateway_pb2.MayReadRequest.SerializeToString)

    async def subscribe(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            channel = limits.channel(chat_pb2.SubscribeRequest.FromString(request).channel)
        except (DecodeError, MlchatError):  # the core says what is wrong with it
            async for response in passed_on(request, context):
                yield response
            return
        async with feeds.joined(channel) as (live, feed):
            if feed.ended:
                await _feed_ended(feed, context, region, channel)
                return
            call = until_live(request, metadata=passed_metadata(context), timeout=context.time_remaining())
            async for response in responses(call, context):
                yield response
            trailers = dict(await call.trailing_metadata() or ())
            live_after, user_id = trailers[LIVE_AFTER], trailers[SUBSCRIBER]
            with feed.live():  # counted by the core from here (before, the core counted its own part)
                while batch := await live.next_batch():
                    for item in batch:
                        if item is None:  # as the core does: check again, and end the stream if no more
                            try:
                                await may_read(gateway_pb2.MayReadRequest(channel=channel, user_id=user_id),
                                               timeout=10)
                            except grpc.aio.AioRpcError as err:
                                await _pass_back(err, context, region)
                        elif is_live(item[0], live_after):
                            yield item[1]
            if live.overflowed:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, cut_off(live.capacity))
            await _feed_ended(feed, context, region, channel)

    handlers = []
    for service in (*RELAYED_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"]):
        methods = {}
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            if path == SUBSCRIBE_METHOD:
                methods[m.name] = grpc.unary_stream_rpc_method_handler(subscribe)
            elif m.server_streaming:
                methods[m.name] = grpc.unary_stream_rpc_method_handler(streaming(path))
            elif service in RELAYED_SERVICES:
                methods[m.name] = grpc.unary_unary_rpc_method_handler(relayed(path))
            else:
                methods[m.name] = grpc.unary_unary_rpc_method_handler(unary(path))
        handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return handlers


async def _feed_ended(feed: Feed, context: grpc.aio.ServicerContext, region: str, channel: str) -> None:
    """End a subscriber's stream whose feed ended: OK if the core is shutting down (as its own subscribers
    end), else UNAVAILABLE."""
    if feed.failure:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"region {region} lost the live feed of channel {channel} "
                            f"({feed.failure}): subscribe again from your last stream_cursor")


def gateway_server(region: str, listen: str, core: grpc.aio.Channel, material: tls.TlsMaterial | None,
                   subscriber_buffer: int = limits.SUBSCRIBER_BUFFER) -> tuple[grpc.aio.Server, CallRelay]:
    """A gateway's server on `listen`, sharing the port (SO_REUSEPORT), passing calls on over `core`; and the
    relay of its unary calls, to start with the server."""
    stub = gateway_pb2_grpc.GatewayServiceStub(core)
    relay = CallRelay(stub, region)
    server = grpc.aio.server(options=limits.server_options(shared=True),
                             maximum_concurrent_rpcs=limits.MAX_CONCURRENT_RPCS)
    server.add_generic_rpc_handlers(_proxies(core, relay, Feeds(stub, subscriber_buffer), region))
    reflection.enable_server_reflection(["mlchat.v1.ChatService", "mlchat.v1.ClusterService",
                                         "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    tls.listen(server, listen, material)
    return server, relay


def core_channel(address: str) -> grpc.aio.Channel:
    """A channel to the core: batches both ways may be larger than gRPC's default 4 MiB (see `in_batches`)."""
    largest = limits.MAX_PEER_STATE_BYTES
    return grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", largest),
                                                       ("grpc.max_receive_message_length", largest)])


async def serve(region: str, listen: str, core_address: str, client_tls: tls.TlsFiles | None,
                grace_s: float, subscriber_buffer: int) -> None:
    try:
        material = tls.load(client_tls) if client_tls else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    terminated = on_termination()
    core = core_channel(core_address)
    server, relay = gateway_server(region, listen, core, material, subscriber_buffer)
    relay.start()
    await server.start()
    log.info("gateway serving on %s, passing calls to the core at %s", listen, core_address)
    print(READY_LINE, flush=True)

    await terminated.wait()
    log.info("gateway shutting down")
    await server.stop(grace_s)  # calls in flight still reach the core, which stops after its gateways
    await relay.stop()
    await core.close()
