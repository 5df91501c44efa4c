"""Asynchronous replication between regions: the stream a region serves, and the ones it opens.

Each region opens one `Replicate` stream to every peer and applies what arrives. On every
(re)connection it first sends its state (pycrdt state vectors of its shards, and its version
vector) and its cursor of the peer's outbox (where the peer's stream last got to, kept in Redis), so
that the peer answers with everything missing however long the link was down: from its outbox after
the cursor if the outbox still reaches back that far, else by comparing states. Then the peer streams
each later change of its state, with heartbeats when idle. Because a region streams what it applies
from others too, a change reaches a region through any path that works (A to C through B while A-C is
cut). A receiver that falls too far behind is cut off (its sender's buffer is bounded) and simply
reconnects. Heartbeats tell each peer how far this region holds its outbox, and a region trims from its
outbox what every member holds. Peers authenticate with a token signed by the cluster secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from mlchat.crdt import vector
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.replica import Delta, ReplicaState, carries_changes, combine
from mlchat.errors import ResourceExhausted
from mlchat.geo.failover import Term
from mlchat.geo.membership import PeerState, peer_state
from mlchat.geo.relay import RelayQueue
from mlchat.leader.consensus import Consensus
from mlchat.leader.fanout import Subscription
from mlchat.leader.limits import MAX_PEER_MESSAGE_BYTES
from mlchat.leader.region import FEED, Region
from mlchat.leader.servicer import PEER_PREFIX, Authenticator, streaming, unary
from mlchat.leader.tokens import TokenSigner
from mlchat.leader.wire import delta_from_pb, delta_pb
from mlchat.v1 import cluster_pb2, replication_pb2_grpc
from mlchat.v1 import replication_pb2 as rpb

log = logging.getLogger(__name__)
COMPRESS_ABOVE = 2048  # bytes: smaller deltas go out as they are
READ_AHEAD = 100  # messages of a peer's stream received and not yet applied, at most
READ_AHEAD_BYTES = 16 * 1024 * 1024  # and their bytes (a relayed catch-up can be one large message)


class ReplicationServicer(replication_pb2_grpc.ReplicationServiceServicer):
    def __init__(self, region: Region, auth: Authenticator, replicator: Replicator, consensus: Consensus) -> None:
        self.region = region
        self.auth = auth
        self.replicator = replicator
        self.consensus = consensus
        self.sent: Counter[str] = Counter()  # per peer: deltas with changes sent on its streams
        self.relays: Counter[tuple[str, str]] = Counter()  # per (peer, "sent" or "dropped"): see `RelayQueue`
        self.catch_ups: Counter[tuple[str, str]] = Counter()  # per (peer, "outbox" or "states")
        self.catch_up_seconds: Counter[tuple[str, str]] = Counter()  # the same: time from request to last part
        # Per peer, what each of its open streams has yet to send, and holds back (a reconnect, or a comparison
        # of states, may overlap the stream before it).
        self.queues: dict[str, list[tuple[Subscription[Delta], RelayQueue]]] = {}

    @unary
    async def Join(self, request, context):  # type: ignore[no-untyped-def]
        self.auth.principal(context, peer=True)
        await self.replicator.admit(request.region, request.address)
        advertised = {self.region.name: self.region.settings.peer_address}
        return rpb.JoinResponse(members={**self.region.members, **advertised})

    @unary
    async def Leave(self, request, context):  # type: ignore[no-untyped-def]
        self.auth.principal(context, peer=True)
        await self.replicator.dismiss(request.region)
        return rpb.LeaveResponse()

    @unary
    async def Prepare(self, request, context):  # type: ignore[no-untyped-def]
        self.auth.principal(context, peer=True)
        return await self.consensus.prepare(request)

    @unary
    async def Accept(self, request, context):  # type: ignore[no-untyped-def]
        self.auth.principal(context, peer=True)
        return await self.consensus.accept(request)

    def _message(self, delta: Delta) -> rpb.Delta:
        message = delta_pb(self.region.name, delta)
        if delta.cursor:
            message.cursor = self.region.position(delta.cursor)
        term = self.replicator.term()
        if term is not None:
            message.epoch, message.primary, message.voted_epoch = term.epoch, term.primary, self.replicator.voted()
        return message

    @functools.partial(streaming, limit_size=False)  # a peer's state may be large
    async def Replicate(self, request, context):  # type: ignore[no-untyped-def]
        self.auth.principal(context, peer=True)
        context.set_compression(grpc.Compression.Gzip)  # WAN links are paid by the byte
        peer = request.region
        settings = self.region.settings
        with self.region.feed.subscribe(FEED) as changes:  # first: nothing changed from now is missed
            relays = RelayQueue(peer, settings.relay_delay_ms, changes.capacity, *settings.pace_ms, self.relays)
            stream = (changes, relays)
            self.queues.setdefault(peer, []).append(stream)
            try:
                state = ReplicaState({s.shard: s.state_vector for s in request.shards}, dict(request.vector))
                started = time.monotonic()
                cursor = await self.region.resumable(request.resume_cursor)
                kind = "states" if cursor is None else "outbox"
                self.catch_ups[peer, kind] += 1
                async for part in (self.region.delta_for(state) if cursor is None
                                   else self.region.delta_since(cursor, peer, state)):
                    self.sent[peer] += carries_changes(part)
                    yield self._message(part)
                self.catch_up_seconds[peer, kind] += time.monotonic() - started
                while True:
                    wait_ms = relays.wait_ms(self.replicator.now_ms())
                    try:
                        async with asyncio.timeout(None if wait_ms is None else wait_ms / 1000):
                            batch = await changes.next_batch()  # heartbeats come at least every heartbeat_ms
                    except TimeoutError:  # what waits is due
                        batch = None
                    if batch == []:
                        if changes.overflowed:
                            raise ResourceExhausted(f"peer {peer} fell more than {changes.capacity} changes "
                                                    "behind: reconnect to catch up")
                        return
                    # A peer that lags gets fewer, larger messages.
                    parts = relays.told(combine(relays.next(batch or [], self.replicator.peer_vector(peer),
                                                            self.replicator.now_ms())))
                    for i, delta in enumerate(parts):
                        message = self._message(delta)
                        message.backlog = changes.pending + relays.held + len(parts) - i - 1
                        if message.ByteSize() < COMPRESS_ABOVE:  # not worth the CPU
                            context.disable_next_message_compression()
                        self.sent[peer] += carries_changes(delta)
                        yield message
            finally:
                self.queues[peer].remove(stream)
                if not self.queues[peer]:
                    del self.queues[peer]


@dataclass
class PeerLink:
    """What this region knows of its stream from one peer."""

    region: str
    address: str
    connected: bool = False
    last_heard: float = 0.0  # monotonic seconds
    lag_ms: int = 0  # commit there to applied here, for the latest change that carried messages
    backlog: int = 0  # changes the peer still had queued for this region, at its latest message
    applied: int = 0  # deltas with changes received and applied (new here or not)
    vector: dict[str, str] = field(default_factory=dict)  # what the peer's stream says this region holds
    holds: dict[str, str] = field(default_factory=dict)  # what the peer holds itself, as its heartbeats said
    term: Term | None = None  # single-leader mode: the primary the peer follows, as it last said
    voted: int = 0  # single-leader mode: the latest epoch the peer voted for, as it last said
    cursor: str = ""  # how far this region holds the peer's outbox ("EPOCH:STAMP"), as its stream told it
    acked: str = ""  # how far the peer holds this region's outbox (a stamp), as its heartbeats told it

    def state(self, now: float, timeout_s: float) -> PeerState:
        return peer_state(self.connected, now - self.last_heard, timeout_s)

    def told_cursor(self, told: str) -> None:
        """Keep the later cursor of the peer's outbox ("EPOCH:STAMP"). A cursor of another outbox means the peer's
        Redis lost or restored its data: it holds only what it tells from now on, not what it told before."""
        if self.cursor.partition(":")[0] == told.partition(":")[0]:
            self.cursor = max(self.cursor, told)
            return
        if self.cursor:
            self.vector = {}
        self.cursor = told


class Replicator:
    """Opens and keeps a stream to every peer, applying what arrives; sends heartbeats to the feed."""

    def __init__(self, region: Region, signer: TokenSigner, now_ms: Callable[[], int],
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.region = region
        self.signer = signer
        self.now_ms = now_ms
        self.credentials = credentials  # mutual TLS to peers; None: plaintext
        self.links: dict[str, PeerLink] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # One catch-up at a time: a stream says what this region holds only once the previous
        # stream's catch-up is applied, so that two peers do not both send the same backlog.
        self._catching_up = asyncio.Lock()
        self._heard = asyncio.Event()  # replaced by a fresh one whenever a peer's vector moves
        self._channels: dict[str, grpc.aio.Channel] = {}  # address -> channel, for calls to peers
        self._saved_cursors: dict[str, str] = {}  # the links' cursors as Redis holds them
        self._trimming: asyncio.Task[None] | None = None
        self.outbox_entries = 0  # in this region's outbox, at the latest trim
        # single-leader mode: the term this region follows and its latest vote, told to peers on every message
        self.term: Callable[[], Term | None] = lambda: None
        self.voted: Callable[[], int] = lambda: 0

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("replicator already started")
        settings = self.region.settings
        self._saved_cursors = await self.region.store.load_cursors()
        if settings.join and not self.region.members:  # a newcomer: any member tells it the rest
            for name, address in (await self._join(settings.join)).items():
                await self.region.add_member(name, address)
        for name in self.region.members:
            self._follow_region(name)
        self._tasks = [asyncio.create_task(self._heartbeats())]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._followers.values(), *([self._trimming] if self._trimming else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    def channel(self, region: str) -> grpc.aio.Channel:
        """For calls to a member (one channel per address, kept open)."""
        address = self._address(region)
        if address not in self._channels:
            self._channels[address] = self._open(address)
        return self._channels[address]

    def _open(self, address: str, **kwargs: Any) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, **kwargs)
        return grpc.aio.secure_channel(address, self.credentials, **kwargs)

    def stub(self, region: str) -> replication_pb2_grpc.ReplicationServiceStub:
        return replication_pb2_grpc.ReplicationServiceStub(self.channel(region))

    def reachable(self) -> list[str]:
        """The members whose stream is up now."""
        now, timeout_s = time.monotonic(), self.region.settings.peer_timeout_ms / 1000
        return [r for r, link in self.links.items() if link.state(now, timeout_s) is PeerState.UP]

    def peer_vector(self, region: str) -> dict[str, str]:
        """What a member holds, as it last told this region."""
        link = self.links.get(region)
        return vector.merge(link.vector, link.holds) if link is not None else {}

    def holders(self, origin: str, hlc: str) -> list[str]:
        """The members known to hold the write stamped `hlc` in region `origin`."""
        return [r for r, link in self.links.items() if link.vector.get(origin, "") >= hlc]

    async def held(self, origin: str, hlc: str, copies: int, timeout_s: float) -> bool:
        """Wait until `copies` members hold a write; False if they do not within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.holders(origin, hlc)) < copies:
                    await self._heard.wait()
        except TimeoutError:
            return False
        return True

    async def _join(self, address: str) -> dict[str, str]:
        settings = self.region.settings
        async with self._open(address) as channel:
            response = await replication_pb2_grpc.ReplicationServiceStub(channel).Join(
                rpb.JoinRequest(region=self.region.name, address=settings.peer_address),
                metadata=self.metadata(), timeout=30)
        log.info("joined through %s: members %s", address, ", ".join(response.members))
        return {r: a for r, a in response.members.items() if r != self.region.name}

    def metadata(self) -> tuple[tuple[str, str]]:
        token, _ = self.signer.issue(PEER_PREFIX + self.region.name, self.region.name, self.now_ms())
        return (("authorization", f"Bearer {token}"),)

    async def admit(self, region: str, address: str) -> None:
        """A region joins (or is heard of): follow it."""
        if await self.region.add_member(region, address):
            log.info("%s joined at %s", region, address)
            self._follow_region(region)

    async def dismiss(self, region: str) -> None:
        """A region leaves: stop following it."""
        if await self.region.remove_member(region):
            log.info("%s left", region)
            task = self._followers.pop(region, None)
            if task is not None:
                task.cancel()
            self.links.pop(region, None)

    def _follow_region(self, region: str) -> None:
        if region not in self._followers:
            self.links[region] = PeerLink(region, self._address(region), cursor=self._saved_cursors.get(region, ""))
            self._followers[region] = asyncio.create_task(self._follow(self.links[region]))

    def _address(self, region: str) -> str:
        """Where to reach a member: the routes file if it names it, else the address it gave."""
        routes_file = self.region.settings.routes_file
        if routes_file is not None:
            try:
                routes = json.loads(routes_file.read_text())
            except (OSError, ValueError):
                routes = {}
            if region in routes:
                return str(routes[region])
        return self.region.members[region]

    async def _membership(self, delta: Delta) -> None:
        """Learn of joins and departures from a peer's heartbeat (gossip)."""
        left, joined = self.region.membership.news(delta.members, delta.departed)
        for region in left:
            await self.dismiss(region)
        for region, address in joined.items():
            await self.admit(region, address)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.region.settings.heartbeat_ms / 1000)
            beat = await self.region.heartbeat()
            try:
                await self._save_cursors()
            except Exception:  # storage down: the next heartbeat tries again
                log.warning("storing the cursors of peers' outboxes failed", exc_info=True)
            # Peers trim their outboxes by these: only cursors stored here, which a restart resumes from.
            self.region.feed.publish(FEED, replace(beat, cursors=dict(self._saved_cursors)))
            if self._trimming is None or self._trimming.done():  # on a cluster it may take more than a heartbeat
                self._trimming = asyncio.create_task(self._trim_outbox())

    async def _save_cursors(self) -> None:
        """Store the links' cursors (late: a cursor behind only makes a peer resend)."""
        moved = {r: link.cursor for r, link in self.links.items() if link.cursor != self._saved_cursors.get(r, "")}
        await self.region.store.save_cursors(moved)
        self._saved_cursors.update(moved)

    async def _trim_outbox(self) -> None:
        """Trim from the outbox what every member holds. With no members, nothing would ever resume from it:
        a region that joins compares states."""
        acked = [link.acked for link in self.links.values()]
        held_by_all = min(acked, default=self.region.cursor()) if all(acked) else ""
        try:
            self.outbox_entries = await self.region.store.trim_outbox(held_by_all,
                                                                      self.region.settings.outbox_retention)
        except Exception:  # storage down: the next heartbeat tries again
            log.warning("trimming the outbox failed", exc_info=True)

    def _open_stream(self, address: str) -> grpc.aio.Channel:
        # WAN links are paid by the byte: deltas travel compressed.
        return self._open(address, compression=grpc.Compression.Gzip, options=[
            ("grpc.max_receive_message_length", MAX_PEER_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", self.region.settings.heartbeat_ms * 2),
            ("grpc.keepalive_timeout_ms", self.region.settings.peer_timeout_ms)])

    async def _caught_up(self, link: PeerLink, channel: grpc.aio.Channel, resume_cursor: str,
                         audit: bool = False) -> AsyncGenerator[rpb.Delta, None]:
        """Open a stream from the peer and apply its catch-up; return the stream's later messages. One catch-up
        at a time: a stream says what this region holds only once the previous stream's catch-up is applied.
        An audit tells no vector: the peer then sends every register, not only those past it."""
        async with self._catching_up:
            state = await self.region.state()
            stream = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(rpb.ReplicateRequest(
                region=self.region.name, vector={} if audit else state.vector,
                shards=[rpb.ShardState(shard=k, state_vector=v) for k, v in state.shards.items()],
                resume_cursor=resume_cursor), metadata=self.metadata())
            messages = _with_idle_timeout(stream, self.region.settings.peer_timeout_ms / 1000)
            while True:  # the catch-up: its last part carries the vector
                part = await messages.__anext__()
                await self._received(link, [part])
                if part.vector:
                    return messages

    async def _follow(self, link: PeerLink) -> None:
        backoff = 0.05
        audits = asyncio.create_task(self._audit(link)) if self.region.settings.compare_states_every_s else None
        try:
            while True:
                link.address = self._address(link.region)
                try:
                    async with self._open_stream(link.address) as channel:
                        live = await self._caught_up(link, channel, link.cursor)
                        # Where writes wait on other regions' copies, an acknowledgement must not wait
                        # behind the changes after it: each message alone.
                        async with contextlib.aclosing(in_groups(live) if self.region.settings.paced
                                                       else _singly(live)) as groups:
                            async for group in groups:
                                await self._received(link, group)
                                backoff = 0.05
                except (grpc.aio.AioRpcError, TimeoutError, StopAsyncIteration) as e:
                    detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else "silent too long or closed"
                    log.info("stream from %s ended: %s", link.region, detail)
                except Exception:
                    log.exception("applying changes from %s failed", link.region)
                link.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            if audits is not None:
                audits.cancel()

    async def _audit(self, link: PeerLink) -> None:
        """Anti-entropy: now and then, beside the live stream, compare states with the peer once (a catch-up
        with no cursor and no vector: every shard that differs, every register), so that whatever a stream or
        an outbox ever missed arrives all the same."""
        while True:
            await asyncio.sleep(self.region.settings.compare_states_every_s)
            try:
                async with self._open_stream(link.address) as channel:
                    rest = await self._caught_up(link, channel, "", audit=True)
                    await rest.aclose()  # the live stream carries the rest
            except Exception:  # the live stream's reconnects report the link's trouble
                log.info("comparing states with %s failed", link.region, exc_info=True)

    async def _received(self, link: PeerLink, messages: list[rpb.Delta]) -> None:
        """Apply consecutive messages of a peer's stream as one change (see `in_groups`); only the last may be a
        heartbeat."""
        last = messages[-1]
        link.connected, link.last_heard, link.backlog = True, time.monotonic(), last.backlog
        if last.epoch:
            link.term, link.voted = Term(last.epoch, last.primary), last.voted_epoch
        deltas = [delta_from_pb(m) for m in messages]
        combined = combine(deltas)  # each with the merge of its deltas' vectors
        for delta in combined:
            await self.region.apply(delta, link.region)
        if last.cursor:  # applied: this region holds the peer's outbox that far
            link.told_cursor(last.cursor)
        told = deltas[-1]
        epoch, _, acked = told.cursors.get(self.region.name, "").partition(":")
        if epoch == self.region.epoch:
            link.acked = max(link.acked, acked)
        await self._membership(told)
        if told.members:  # a heartbeat: the peer's own view
            await self.region.listed(link.region, told.members)
            link.holds = told.holds  # the latest: a peer whose Redis lost its data holds less than it said
        link.applied += sum(map(carries_changes, deltas))
        moved = functools.reduce(vector.merge, (d.vector for d in combined), {})
        if moved:
            link.vector = vector.merge(link.vector, moved)
            heard, self._heard = self._heard, asyncio.Event()
            heard.set()
        if any(d.shard_updates for d in combined) and moved.get(link.region):
            link.lag_ms = max(0, self.now_ms() - Hlc.decode(moved[link.region]).wall_ms)

    def peer_status(self) -> list[cluster_pb2.PeerStatus]:
        now = time.monotonic()
        timeout_s = self.region.settings.peer_timeout_ms / 1000
        return [cluster_pb2.PeerStatus(region=link.region, address=link.address,
                                       state=int(link.state(now, timeout_s)), replication_lag_ms=link.lag_ms,
                                       replication_lag_entries=link.backlog)
                for link in self.links.values()]


async def in_groups(messages: AsyncIterator[rpb.Delta], limit: int = READ_AHEAD,
                    limit_bytes: int = READ_AHEAD_BYTES) -> AsyncGenerator[list[rpb.Delta], None]:
    """A stream's messages, read ahead and handed on in groups: each group is what arrived while the one
    before was applied, so a receiver that lags applies fewer, larger changes. At most `limit` wait, and those
    waiting and being applied hold at most `limit_bytes` (or are one larger message alone), plus the next
    message received, which waits for room. A heartbeat ends
    its group: the membership it tells, and how far it says the receiver holds the sender's outbox, hold once
    everything before it is applied."""
    # A message with its size; None: the stream ended.
    waiting: asyncio.Queue[tuple[rpb.Delta, int] | Exception | None] = asyncio.Queue(limit)
    held = _Held(limit_bytes)  # until its group is applied

    async def read() -> None:
        try:
            async for message in messages:
                size = message.ByteSize()
                await held.add(size)
                await waiting.put((message, size))
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # in_groups is done with it
                raise
            await waiting.put(ConnectionError("the stream's call was cancelled"))  # its channel closed under it
        except Exception as e:  # the follower's to handle, after what came before it
            await waiting.put(e)
        else:
            await waiting.put(None)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await waiting.get()
            group: list[rpb.Delta] = []
            size = 0
            while isinstance(item, tuple):
                message, message_size = item
                group.append(message)
                size += message_size
                if message.members or message.cursor or waiting.empty():
                    break
                item = waiting.get_nowait()
            if group:
                yield group
                held.release(size)
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


class _Held:
    """Bytes of a stream's messages read ahead and not yet handed on."""

    def __init__(self, limit: int) -> None:
        self.limit, self.bytes = limit, 0
        self._released = asyncio.Event()

    async def add(self, size: int) -> None:
        """Count a message in, once it fits (a larger one, once nothing else is held)."""
        while self.bytes and self.bytes + size > self.limit:
            self._released.clear()
            await self._released.wait()
        self.bytes += size

    def release(self, size: int) -> None:
        self.bytes -= size
        self._released.set()


async def _singly(messages: AsyncIterator[rpb.Delta]) -> AsyncGenerator[list[rpb.Delta], None]:
    async for message in messages:
        yield [message]


async def _with_idle_timeout(stream: AsyncIterator[rpb.Delta], timeout_s: float) -> AsyncGenerator[rpb.Delta, None]:
    """The stream's messages; TimeoutError if none comes for `timeout_s` (a hung link)."""
    iterator = stream.__aiter__()
    while True:
        try:
            message = await asyncio.wait_for(iterator.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        yield message
