"""What a region's core process runs for its gateways (`mlchat.leader.gateway`): the processes themselves, and
the service they pass their calls to.

The core serves its gateways on a Unix socket in a directory only its user may enter; there it serves
the same chat and cluster services as on the region's address, and `GatewayService`. A unary call that
comes in a batch is served exactly as the same call to the core would be: the same servicer method,
given a `PassedContext` in place of the gRPC call's context, checks the token, the user's rate, the
input and the mode's demands, and its outcome (response, or status, details and trailers) goes back
to the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from mlchat.errors import ResourceExhausted
from mlchat.leader import limits
from mlchat.leader.gateway import READY_LINE, in_batches
from mlchat.leader.region import AccessChanged
from mlchat.leader.servicer import ChatServicer, streaming, subscribe_response, unary
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.valkey import dying_with_parent
from mlchat.v1 import chat_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
# A unary method by its full name: its request message, and the handler to serve it with.
Handler = Callable[[Any, Any], Awaitable[Message]]
UnaryMethods = Mapping[str, tuple[type[Message], Handler]]


def unary_methods(*services: tuple[ServiceDescriptor, Any]) -> dict[str, tuple[type[Message], Handler]]:
    """The unary methods of these services, each with the object holding its handlers (as registered)."""
    return {f"/{descriptor.full_name}/{m.name}": (GetMessageClass(m.input_type), getattr(handlers, m.name))
            for descriptor, handlers in services for m in descriptor.methods
            if not (m.client_streaming or m.server_streaming)}


class _Aborted(Exception):
    pass


class PassedContext:
    """What a servicer reads and sets of a call's context, for a call a gateway passed on."""

    def __init__(self, call: gateway_pb2.PassedCall) -> None:
        self._metadata = tuple((m.key, m.value) for m in call.metadata)
        self._deadline = time.monotonic() + call.time_remaining_s if call.HasField("time_remaining_s") else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        self.fail(code, details)
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise _Aborted()

    def outcome(self, call_id: int, response: Message | None) -> gateway_pb2.CallOutcome:
        trailing = [gateway_pb2.CallMetadata(key=k, value=v) for k, v in self._trailing]
        if response is not None:
            return gateway_pb2.CallOutcome(id=call_id, response=response.SerializeToString(),
                                           trailing_metadata=trailing)
        code = self._code or grpc.StatusCode.UNKNOWN
        return gateway_pb2.CallOutcome(id=call_id, code=code.value[0], details=self._details,
                                       trailing_metadata=trailing)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Serves the unary calls gateways send in batches, each with its handler among `methods` (the measured
    servicers' own), and sends back their outcomes in batches, each as soon as it is known; starts their
    subscriptions (`chat`'s SubscribeUntilLive) and feeds them each channel's live messages."""

    def __init__(self, methods: UnaryMethods, chat: ChatServicer) -> None:
        self._methods = methods
        self._chat = chat
        self.region = chat.region
        self._serving: set[asyncio.Task[None]] = set()  # held here: a gateway that goes away cancels none
        self.batches = 0
        self.calls = 0

    async def _outcome(self, call: gateway_pb2.PassedCall) -> gateway_pb2.CallOutcome:
        context = PassedContext(call)
        if call.method not in self._methods:
            context.fail(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {call.method}")
            return context.outcome(call.id, None)
        request_type, handler = self._methods[call.method]
        try:
            request = request_type.FromString(call.request)
        except DecodeError:
            context.fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")  # as gRPC answers it
            return context.outcome(call.id, None)
        try:
            return context.outcome(call.id, await handler(request, context))
        except _Aborted:
            return context.outcome(call.id, None)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # the gateway's caller went away: nobody to answer
                raise
            context.fail(grpc.StatusCode.CANCELLED, "the call was cancelled")  # from within: say so, as gRPC would
            return context.outcome(call.id, None)
        except Exception as e:  # as gRPC answers a handler's unexpected failure
            log.exception("%s passed on by a gateway failed", call.method)
            context.fail(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e)}: {e}")
            return context.outcome(call.id, None)

    async def Calls(self, request_iterator: AsyncIterator[gateway_pb2.CallBatch], context: Any
                    ) -> AsyncIterator[gateway_pb2.CallOutcomes]:
        outcomes: list[gateway_pb2.CallOutcome] = []
        ready = asyncio.Event()
        mine: dict[int, asyncio.Task[None]] = {}  # by call id

        async def serve(call: gateway_pb2.PassedCall) -> None:
            outcomes.append(await self._outcome(call))

        def served(call_id: int, task: asyncio.Task[None]) -> None:
            self._serving.discard(task)
            mine.pop(call_id, None)
            ready.set()

        async def take() -> None:
            async for batch in request_iterator:
                self.batches += 1
                self.calls += len(batch.calls)
                for call in batch.calls:
                    task = asyncio.create_task(serve(call))
                    self._serving.add(task)
                    mine[call.id] = task
                    task.add_done_callback(functools.partial(served, call.id))
                for call_id in batch.cancelled:
                    if call_id in mine:
                        mine[call_id].cancel()

        taking = asyncio.create_task(take())
        taking.add_done_callback(lambda _: ready.set())
        try:
            while outcomes or mine or not taking.done():
                await ready.wait()
                ready.clear()
                if outcomes:
                    done, outcomes[:] = list(outcomes), []
                    for batch in in_batches(done):
                        yield gateway_pb2.CallOutcomes(outcomes=batch)
        finally:
            taking.cancel()

    async def SubscribeUntilLive(self, request: chat_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[chat_pb2.SubscribeResponse]:
        async for response in self._chat.SubscribeUntilLive(request, context):
            yield response

    async def _feed(self, requests: AsyncIterator[gateway_pb2.FeedRequest], context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[gateway_pb2.FeedEvents]:
        first = await anext(requests, None)
        if first is None:
            return
        channel = limits.channel(first.channel)
        me = object()  # this feed, in the region's count of the subscribers gateways feed

        async def count() -> None:
            async for request in requests:
                self.region.fed[me] = request.subscribers

        with self.region.fanout.subscribe(channel) as sub:
            self.region.fed[me] = first.subscribers
            counting = asyncio.create_task(count())
            try:
                yield gateway_pb2.FeedEvents(events=[gateway_pb2.FeedEvent(opened=True)])
                while items := await sub.next_batch():
                    events = [gateway_pb2.FeedEvent(access_changed=True) if isinstance(item, AccessChanged)
                              else gateway_pb2.FeedEvent(message=subscribe_response(item)) for item in items]
                    for batch in in_batches(events):
                        yield gateway_pb2.FeedEvents(events=batch)
                if sub.overflowed:
                    raise ResourceExhausted(f"a gateway's feed of channel {channel} fell more than {sub.capacity} "
                                            "messages behind and was cut off")
            finally:
                counting.cancel()
                del self.region.fed[me]

    Feed = streaming(_feed, limit_size=False)  # each request is a few bytes, read by gRPC's own limit

    @unary
    async def MayRead(self, request, context):
        await self.region.check_access(limits.channel(request.channel), request.user_id)
        return gateway_pb2.MayReadResponse()


class Gateways:
    """The region's gateway processes: started once the core serves them, started again when one dies,
    stopped before the core stops serving them. The core's socket for them is in `socket_dir`, which only
    the core's user may enter."""

    RETRY_S = 5.0  # after a gateway failed to start: it may fail the same way again

    def __init__(self, settings: LeaderSettings, count: int, socket_dir: Path) -> None:
        self.settings = settings
        self.count = count
        self.socket = socket_dir / "core.sock"
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # by slot, from the moment each is started
        self.restarts = 0
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def core_address(self) -> str:
        return f"unix:{self.socket}"

    def _command(self) -> list[str]:
        s = self.settings
        args = [sys.executable, "-m", "mlchat", "--log-level", logging.getLevelName(logging.getLogger().level),
                "gateway", "--region", s.region, "--listen", s.listen, "--core", self.core_address,
                "--grace", str(s.grace_s), "--subscriber-buffer", str(s.subscriber_buffer)]
        if s.tls is not None:
            args += ["--tls-cert", str(s.tls.cert), "--tls-key", str(s.tls.key)]
        return args

    async def _spawn(self, slot: int, timeout_s: float = 30.0) -> None:
        # From the main thread (the event loop's): the parent-death signal follows the thread that forks.
        proc = self._procs[slot] = subprocess.Popen(dying_with_parent(self._command()),  # noqa: ASYNC220
                                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout_s)
        except TimeoutError:
            line = b""
        except asyncio.CancelledError:  # stopping: the process is terminated by `stop`
            proc.stdout.close()
            raise
        if line.decode().strip() != READY_LINE:
            proc.kill()  # which also ends the read, if it timed out
            proc.wait()
            proc.stdout.close()
            raise SystemExit(f"a gateway process did not start serving on {self.settings.listen} within "
                             f"{timeout_s:.0f} s (exit status {proc.returncode}); its log is above")
        proc.stdout.close()  # the gateway writes nothing more there

    async def start(self) -> None:
        for slot in range(self.count):
            await self._spawn(slot)
        self._supervisor = asyncio.create_task(self._supervise())

    def running(self) -> int:
        return sum(p.poll() is None for p in self._procs.values())

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for slot, proc in list(self._procs.items()):
                if proc.poll() is not None:
                    log.warning("gateway process %d exited with status %s: starting another", proc.pid,
                                proc.returncode)
                    try:
                        await self._spawn(slot)
                        self.restarts += 1
                    except SystemExit as e:
                        log.error("%s; trying again in %.0f s", e, self.RETRY_S)
                        await asyncio.sleep(self.RETRY_S)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM every gateway (one being started too) and wait for it: each gives the calls it has in flight
        the grace time."""
        if self._supervisor is not None:
            self._supervisor.cancel()
        for proc in self._procs.values():
            proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs.values():
            try:
                await asyncio.to_thread(proc.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
