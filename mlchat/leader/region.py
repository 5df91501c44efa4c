"""What one region does with a client's request, between the gRPC servicer and Redis.

It stamps writes with the region's hybrid logical clock, keeps the hot pycrdt shards of the message
log, makes retries idempotent, answers reads in the documented order, fans committed messages out to
subscribers, and tracks the version vector that causal tokens are checked against. It raises
`MlchatError`s; the servicer turns them into gRPC statuses. Time and the pycrdt client id come in
from outside.

Replication: every change to the region's state (its own writes, and what it applies from peers that
was new here) is stored with an entry in the region's outbox, in the same step, and published on `feed`
as a `Delta`, which the replication service streams to peers. A peer that (re)connects is answered from
the outbox after its cursor (`delta_since`) or, if the outbox no longer reaches back that far, with
everything it lacks (`delta_for`); `apply` merges a peer's delta. The region's own entry in its version
vector is a watermark: every write stamped at or below it is committed (stamps still being committed
hold it back), so a peer that holds the vector holds those writes. The outbox cursor is one too: every
entry stamped at or below it has been published (`cursor`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from mlchat.crdt import vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state, owner
from mlchat.crdt.digest import state_digest
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name, split_order_key, split_shard_name
from mlchat.crdt.regionclock import RegionClock
from mlchat.crdt.replica import Delta, Relayed, ReplicaState, carries_changes, combine, origins, wanted
from mlchat.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from mlchat.geo.membership import Membership
from mlchat.geo.modes import names_by_consensus
from mlchat.leader.fanout import Fanout
from mlchat.leader.limits import MAX_CHANNEL_MEMBERS
from mlchat.leader.locks import KeyedLocks
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import Page, Shipped, Store, parse_stream_id, past, split_entry, stream_id_key
from mlchat.leader.wire import from_outbox, outbox_entry

log = logging.getLogger(__name__)
CAUSAL_WAIT_MAX_S = 30.0
FEED = "*"  # the one topic of the replication feed
OUTBOX_PAGE = 500  # outbox entries sent at a time (merged) to a peer that resumes
NAMED_ABOVE = 16 * 1024  # bytes: a larger shard update applied from a peer is kept in the outbox by name
RECENT_IDS = 10_000
REFUSING_CHANNELS = 1_000
# A batch waits at most GATHER_TURNS turns of the event loop for posts on their way; when its channel is busy
# and its last wait caught some, until none has come for GATHER_GAPS times the usual gap between them, at most
# GATHER_QUIET_S, and at most GATHER_MAX_S in all (`Region._gathered`, `_Arrivals`).
GATHER_TURNS = 20
GATHER_GAPS, GATHER_QUIET_S, GATHER_MAX_S = 3, 400e-6, 2e-3
COMPACT_RATIO = 2  # a shard's updates since its snapshot are replaced by a new one once they weigh half of it
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Committed:
    """A message as subscribers receive it."""

    entry: LogEntry
    stream_id: str
    causal_token: bytes


@dataclass(frozen=True, slots=True)
class AccessChanged:
    """Published to a channel's subscribers when who may read it has changed (the channel became
    private, or a member was removed): each subscriber checks that it still may."""


ACCESS_CHANGED = AccessChanged()


@dataclass(frozen=True, slots=True)
class LiveAfter:
    """The end of a subscription asked to stop where its live part would begin: messages past `stream_id`
    are its live ones (a gateway sends them from its own feed of the channel)."""

    stream_id: str


@dataclass(frozen=True, slots=True)
class _Pending:
    msg_id: str
    user_id: str
    body: str
    client_msg_id: str


class _Arrivals:
    """The pace at which posts reach a busy channel's queue while its writer gathers a batch: a moving mean of
    the gap between them."""

    def __init__(self) -> None:
        self.gap_s = GATHER_QUIET_S / GATHER_GAPS  # until measured
        self.caught = True  # whether the last gathering caught any post that came during it

    def quiet_s(self) -> float:
        """How long without a post ends the gathering: a few usual gaps, but not long."""
        return min(GATHER_QUIET_S, GATHER_GAPS * self.gap_s)

    def came(self, count: int, waited_s: float) -> None:
        """`count` posts came after `waited_s` without any (each such wait weighs 1/8 in the mean)."""
        self.gap_s += (waited_s / count - self.gap_s) / 8


@dataclass(slots=True)
class _SinceSnapshot:
    """What a hot shard holds in Redis: its snapshot's bytes, and the updates stored since (how many, their bytes)."""

    updates: int = 0
    update_bytes: int = 0
    snapshot_bytes: int = 0

    @property
    def stored_bytes(self) -> int:
        return self.snapshot_bytes + self.update_bytes

    def due(self, min_updates: int) -> bool:
        """Whether to snapshot the shard now: once at least `min_updates` piled up, and they weigh at least
        1/COMPACT_RATIO of the snapshot. A snapshot costs the whole shard's size, so a large shard is
        snapshotted less often: each byte stored is snapshotted a bounded number of times, however large
        the shard grows, and Redis holds at most 1 + 1/COMPACT_RATIO times the shard (plus `min_updates`)."""
        return self.updates >= min_updates and self.update_bytes * COMPACT_RATIO >= self.snapshot_bytes


@dataclass(frozen=True, slots=True)
class UserView:
    user_id: str
    username: str
    claim: Claim
    state: ClaimState


def user_id_for(username: str, claim_key: str) -> str:
    """The same username and claim key always name the same user, in every region."""
    return "u" + hashlib.blake2b(f"{username}\x00{claim_key}".encode(), digest_size=8).hexdigest()


class Region:
    def __init__(self, settings: LeaderSettings, store: Store, client_id: int,
                 now_ms: Callable[[], int]) -> None:
        self.settings = settings
        self.name = settings.region
        self.store = store
        self._client_id = client_id
        self._now_ms = now_ms
        self.clocks = RegionClock(self.name)
        self._saved_remote: dict[str, str] = {}
        self._vector_changed = asyncio.Event()  # replaced by a fresh one at every change
        self.membership = Membership(self.name, settings.peers)
        self.feed: Fanout[Delta] = Fanout(settings.feed_buffer)
        self._shards: OrderedDict[str, MessageShard] = OrderedDict()
        self._since_snapshot: dict[str, _SinceSnapshot] = {}  # per hot shard
        self._compacting: dict[str, asyncio.Task[None]] = {}  # per shard: its snapshot being stored
        # Posts waiting for their channel's writer, the writers, and every post not yet answered.
        self._queue: dict[str, list[_Pending]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self.commits = 0  # batches of posts committed (or tried)
        self._inflight: dict[str, list[asyncio.Future[tuple[LogEntry, bool]]]] = {}
        # Ids of messages committed lately, so that a retry is answered without a shard reload.
        self._recent: OrderedDict[str, None] = OrderedDict()
        # Private channels where posts were refused lately: there, posts are checked before they are
        # queued, so that non-members cannot make the hot shard be dropped and reloaded at every post.
        self._refusing: OrderedDict[str, None] = OrderedDict()
        self._shard_locks = KeyedLocks()
        # Held from storing a channel's new messages (which appends them to its stream) until they are published:
        # subscribers get each channel's messages in stream order, so one that resumes from the last cursor it
        # received misses nothing. Commits to one channel in different shards (a peer's message of the hour
        # before, a post of this one) would otherwise publish in the order their replies came back. Taken after
        # the shard's lock, once the shard is loaded and changed in memory: a cold shard being loaded (a peer's
        # catch-up of an old hour) does not hold up posts to the channel's other shards.
        self._stream_order = KeyedLocks()
        # Per apply in flight (or failed, in doubt), by the stamp of its outbox entries: the vector told when
        # it started.
        self._applying: dict[str, dict[str, str]] = {}
        # Stamps of changes whose storing failed: they may be in the outbox all the same (Redis ran the script
        # and the reply was lost), and hold the cursor back until the outbox is read (`_resolve_doubts`).
        self._in_doubt: set[str] = set()
        # Per shard an apply in doubt changed, by (stamp, shard): the messages it would have added, published if
        # the outbox shows the shard's script ran.
        self._unpublished: dict[tuple[str, str], list[LogEntry]] = {}
        self.epoch = ""  # names the outbox (`Store.outbox_epoch`)
        self.fanout: Fanout[Committed | AccessChanged] = Fanout(settings.subscriber_buffer)
        # Per feed of a channel to a gateway (which is one subscription of `fanout`): the subscribers it feeds.
        self.fed: dict[object, int] = {}
        self.conflicts: Counter[str] = Counter()  # by kind: values from peers that met a different one here

    async def start(self) -> None:
        self.clocks = RegionClock(self.name, await self.store.clock_floor(), await self.store.load_vector())
        self.epoch = await self.store.outbox_epoch()
        self._saved_remote = dict(self.clocks.remote)
        stored, departed, listed_by = await self.store.load_members()
        for region, address in self.settings.peers.items():
            if region not in stored:
                await self.store.save_member(region, address)
        # Configured peers are configured with this region too.
        self.membership = Membership(self.name, {**stored, **self.settings.peers}, departed,
                                     listed_by | set(self.settings.peers))

    @property
    def members(self) -> dict[str, str]:
        """The other regions: name -> address."""
        return self.membership.members

    @property
    def departed(self) -> set[str]:
        return self.membership.departed

    @property
    def regions(self) -> frozenset[str]:
        """This region and its members: every clock a claim waits for."""
        return frozenset({self.name, *self.members})

    async def add_member(self, region: str, address: str) -> bool:
        """Take a region in; False if it is known already, has left, or is this one."""
        if not self.membership.admit(region, address):
            return False
        await self.store.save_member(region, address)
        self._vector_moved()
        return True

    async def listed(self, peer: str, members: dict[str, str]) -> None:
        """A peer's heartbeat (applied: this clock is past the peer's) told its members. Once it lists this
        region, the floor is stored past the peer's clock before that is recorded: a restart must not stamp
        a claim below what the peer may have confirmed before it knew of this region."""
        if self.membership.listed(peer, members):
            floor = self.clocks.clock.encode()
            await self.store.raise_clock_floor(floor)
            self.clocks.floor_saved(floor)
            await self.store.save_listed_by(peer)

    async def remove_member(self, region: str) -> bool:
        """A region leaves for good; False if it had left already."""
        if not self.membership.dismiss(region):
            return False
        await self.store.save_departure(region)
        self._vector_moved()
        return True

    # Clock and causality ------------------------------------------------------------------------

    def _stamp(self) -> str:
        return self.clocks.stamp(self._now_ms())

    def _settle_stamps(self, stamps: list[str], stored: bool = True) -> None:
        self.clocks.settle([s for s in stamps if s not in self._in_doubt], stored)
        self._vector_moved()

    def _own(self, stamp: str, change: Delta) -> Shipped:
        """The outbox entry of an own write."""
        return Shipped(stamp, outbox_entry(change, "", {self.name: stamp}))

    def _publish(self, change: Delta) -> None:
        """Put a stored change on the feed, with the vector and cursor it lets peers count on."""
        self.feed.publish(FEED, replace(change, vector=self.told_vector(), cursor=self.cursor()))

    def cursor(self) -> str:
        """The outbox cursor: every entry stamped at or below it is published on the feed (a write given up on
        is fenced, and stores none). Own writes are published as they settle, so the vector's own entry bounds them;
        entries of applies in flight and of failures not yet resolved hold it back."""
        own = self.clocks.own
        held = [*self._applying, *self._in_doubt]
        return min(own, Hlc.decode(min(held)).previous().encode()) if held else own

    async def _resolve_doubts(self) -> None:
        """Publish whatever the outbox holds under the stamps in doubt (it was stored after all), and settle them."""
        doubts = sorted(self._in_doubt)
        found = await self.store.resolve(doubts)
        for stamp, payload in found:
            change = from_outbox(stamp, payload)
            updates = dict(change.shard_updates)
            for name in [n for n, update in updates.items() if not update]:  # kept by name only: send it whole
                updates.update((await self._shard_delta(name, ReplicaState({}, {}))).shard_updates)
            change = replace(change, shard_updates=updates)
            relayed = change.relayed
            if relayed and relayed.source:  # a failed apply's: held where it started, as it would have been
                self._publish(replace(change, relayed=replace(relayed, before=self._applying.get(stamp, {}))))
                for name in change.shard_updates:  # the shards whose script ran: their messages are new here
                    await self._deliver_stored(self._unpublished.pop((stamp, name), []))
            else:
                self._publish(replace(change, relayed=None))
                await self._deliver_stored([  # a post's: its messages, read from its update
                    e for name, update in change.shard_updates.items()
                    for e in MessageShard(split_shard_name(name)[0], self._client_id).apply(update)])
        for stamp in doubts:
            self._applying.pop(stamp, None)
        # Shards whose script did not run: a resend may have stored (and published) their messages since.
        resolved = set(doubts)
        for key in [k for k in self._unpublished if k[0] in resolved]:
            del self._unpublished[key]
        self._in_doubt.difference_update(doubts)
        if found:
            self.clocks.floor_saved(max(stamp for stamp, _ in found))  # their scripts raised the clock floor
        self._settle_stamps(doubts, stored=False)  # no response carried them: tokens need not cover them

    async def _stored(self, stamp: str, storing: Awaitable[T]) -> T:
        """Await the storing of a write stamped `stamp`; the stamp is settled, or in doubt if storing failed."""
        stored = False
        try:
            result = await self._doubted_on_failure([stamp], storing)
            stored = True
            return result
        finally:
            self._settle_stamps([stamp], stored)

    async def _doubted_on_failure(self, stamps: list[str], storing: Awaitable[T]) -> T:
        """Await the storing of changes stamped `stamps`. If it fails, Redis may have stored them all the
        same: they stay unsettled until the outbox says (`_resolve_doubts`)."""
        try:
            return await storing
        except BaseException:
            self._in_doubt.update(stamps)
            raise

    def _vector_moved(self) -> None:
        changed, self._vector_changed = self._vector_changed, asyncio.Event()
        changed.set()

    @property
    def vector(self) -> dict[str, str]:
        """For each origin region, the hlc up to which all its writes are held here."""
        return self.clocks.vector

    async def heartbeat(self) -> Delta:
        """Move the clock on when idle (so that peers' watermarks of this region move too), store it
        as the clock floor and what is held of others, and return the empty delta that tells peers
        this region's vector. If storage fails, the vector told stays at the last floor stored."""
        floor = self.clocks.floor_target(self._now_ms())
        remote = dict(self.clocks.remote)  # taken with the floor, which is past all of it
        try:
            if self._in_doubt:
                await self._resolve_doubts()
            await self.store.raise_clock_floor(floor)
            self.clocks.floor_saved(floor)
            if remote != self._saved_remote:  # saved late: peers only resend what is here
                await self.store.save_vector(remote)
                self._saved_remote = remote
        except Exception:  # storage down: the next heartbeat tries again
            log.warning("storing the clock floor failed", exc_info=True)
        self._vector_moved()
        advertised = {self.name: self.settings.peer_address}
        told = self.told_vector()
        return Delta(vector=told, members={**self.members, **advertised},
                     departed=tuple(sorted(self.departed)), cursor=self.cursor(), holds=told)

    def causal_token(self, *seen: tuple[str, str]) -> bytes:
        """The token of what a response reflects: this region's vector, and the (origin, hlc) of any
        write the response carries (a client must be able to read its own write anywhere)."""
        return vector.encode_token(self.clocks.token(*seen))

    async def wait_for(self, token: bytes, timeout_s: float | None) -> None:
        """Return once this region has seen everything `token` has; raise if it does not in time."""
        try:
            want = vector.decode_token(token)
        except ValueError as e:
            raise InvalidArgument(f"{e}: pass back a causal_token exactly as a response returned it") from None
        if vector.covers(self.told_vector(), want):
            return
        timeout = min(timeout_s if timeout_s is not None else CAUSAL_WAIT_MAX_S, CAUSAL_WAIT_MAX_S)
        try:
            async with asyncio.timeout(timeout):
                while not vector.covers(self.told_vector(), want):
                    await self._vector_changed.wait()
        except TimeoutError:
            gaps = ", ".join(f"{r} up to {h}" for r, h in vector.missing(self.told_vector(), want).items())
            raise Unavailable(f"region {self.name} has not yet caught up with your causal token "
                              f"(missing {gaps}); retry, or read from another region") from None

    # Messages -----------------------------------------------------------------------------------

    async def post(self, user_id: str, channel: str, body: str, client_msg_id: str) -> tuple[LogEntry, bool]:
        """Commit a message; return it and whether the call was a retry of an earlier one. Whether the
        user may post in the channel is checked as it is stored (`_commit_shard`): one round trip."""
        if channel in self._refusing:
            await self.check_access(channel, user_id)
        msg_id = message_id(user_id, channel, client_msg_id)
        # Each caller waits on a future of its own: one that gives up cancels nothing others wait on.
        future: asyncio.Future[tuple[LogEntry, bool]] = asyncio.get_running_loop().create_future()
        retry = msg_id in self._inflight  # the same request is being committed right now
        if retry:
            self._inflight[msg_id].append(future)
        else:
            self._inflight[msg_id] = [future]
            self._queue.setdefault(channel, []).append(_Pending(msg_id, user_id, body, client_msg_id))
            if channel not in self._writers:
                self._writers[channel] = asyncio.create_task(self._write(channel))
        entry, stored = await future
        return self._same(entry, body), retry or not stored

    @staticmethod
    def _same(entry: LogEntry, body: str) -> LogEntry:
        if entry.body != body:
            raise AlreadyExists(f"client_msg_id {entry.client_msg_id!r} was already used for a different "
                                "message in this channel: use a new client_msg_id for a new message")
        return entry

    def _settle(self, msg_id: str, result: tuple[LogEntry, bool] | BaseException) -> None:
        # Absent: already answered (a batch that failed after re-queueing the post).
        for future in self._inflight.pop(msg_id, ()):
            if future.done():  # its caller gave up
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _write(self, channel: str) -> None:
        """Commit a channel's queued posts, in batches: one Redis round trip serves many posts."""
        try:
            arrivals, busy = _Arrivals(), False
            while batch := await self._gathered(channel, arrivals if busy else None):
                try:
                    await self._commit_batch(channel, batch)
                except Exception as e:
                    for p in batch:
                        self._settle(p.msg_id, e)
                busy = channel in self._queue  # posts came while it was committed: more are likely on their way
        finally:
            del self._writers[channel]

    async def _gathered(self, channel: str, arrivals: _Arrivals | None) -> list[_Pending] | None:
        """The channel's queued posts, once calls on their way to the queue have joined them. Under load,
        calls that arrived with the queued posts are still being read and checked: a commit that waits for
        them serves them too, where each would otherwise pay a Redis round trip of its own. So the batch is
        taken once the event loop has nothing else ready to run; and when the channel is busy, once posts
        stop coming at the pace they came (`_Arrivals`). Meanwhile the loop keeps turning, so that each call
        is read as soon as gRPC hands it over (sleeping instead left calls waiting, and the loop idle). After
        a wait that caught no post, the next batch is taken as a first one is, until one catches some again:
        turning the loop for posts that do not come only burns CPU. A lone post waits for nothing: nothing
        else is ready."""
        queued = len(self._queue.get(channel, ()))
        if arrivals is not None and arrivals.caught:
            now = start = last = time.perf_counter()
            while now - last < arrivals.quiet_s() and now - start < GATHER_MAX_S:
                await asyncio.sleep(0)
                now = time.perf_counter()
                if (count := len(self._queue.get(channel, ()))) > queued:
                    arrivals.came(count - queued, now - last)
                    queued, last = count, now
            arrivals.caught = last > start
        else:
            loop = asyncio.get_running_loop()
            for _ in range(GATHER_TURNS):
                if not getattr(loop, "_ready", None):  # the loop's callbacks ready to run (CPython's event loop)
                    break
                await asyncio.sleep(0)
            if arrivals is not None:
                arrivals.caught = len(self._queue.get(channel, ())) > queued
        self.commits += channel in self._queue
        return self._queue.pop(channel, None)

    async def _commit_batch(self, channel: str, batch: list[_Pending]) -> None:
        fresh = []
        for p in batch:
            if p.msg_id in self._recent:  # a retry of a message committed lately
                self._settle(p.msg_id, (await self._stored_message(channel, p.msg_id), False))
            else:
                fresh.append(p)
        entries = [LogEntry(p.msg_id, channel, p.user_id, p.body, p.client_msg_id, self._stamp(), self.name)
                   for p in fresh]
        try:
            for name, group in itertools.groupby(entries,
                                                 lambda e: shard_name(channel, e.hlc, self.settings.bucket_ms)):
                await self._commit_shard(name, list(group))
        finally:  # those committed are settled already
            self._settle_stamps([e.hlc for e in entries], stored=False)

    async def _commit_shard(self, name: str, entries: list[LogEntry]) -> None:
        async with self._locked_shard(name) as shard, self._stream_order.held(entries[0].channel):
            update = shard.add(entries)
            async with self._dropped_on_failure(name):
                outcome = await self._doubted_on_failure([e.hlc for e in entries], self.store.post(
                    name, entries, update, shard.state_vector(), self.settings.stream_retention,
                    self._own(entries[-1].hlc, Delta(shard_updates={name: update}))))
            # Every id stored under the key just built: the script ran before (a retried call whose
            # reply was lost), so this is a success.
            ours = outcome.duplicates and all(outcome.duplicates.get(e.id) == e.order_key for e in entries)
            if (outcome.duplicates and not ours) or outcome.refused:
                # Retries of messages stored before (by an earlier process, or another process of this
                # region), or posts to a private channel by non-members. Nothing was stored: drop the
                # shard, which holds what Redis does not, answer those, and queue the other posts again.
                self._dropped(name)
                if outcome.refused:
                    self._refusing[entries[0].channel] = None
                    while len(self._refusing) > REFUSING_CHANNELS:
                        self._refusing.popitem(last=False)
                for e in entries:
                    if e.id in outcome.refused:
                        self._settle(e.id, PermissionDenied(not_a_member(e.channel, e.user_id)))
                    elif e.id in outcome.duplicates:
                        self._settle(e.id, (await self._stored_message(e.channel, e.id), False))
                    else:
                        self._queue.setdefault(e.channel, []).append(
                            _Pending(e.id, e.user_id, e.body, e.client_msg_id))
                return
            self._stored_update(name, shard, update)
            self._settle_stamps([e.hlc for e in entries])  # so that the published vector covers them
            self._publish(Delta(shard_updates={name: update}))
            for entry in entries:
                self._recent[entry.id] = None
                self._settle(entry.id, (entry, True))
            while len(self._recent) > RECENT_IDS:
                self._recent.popitem(last=False)
            if outcome.stream_ids:
                self._deliver(entries, dict(zip((e.id for e in entries), outcome.stream_ids, strict=True)))
            else:  # the script had run before, its reply lost: the messages are in the channel's stream already
                await self._deliver_stored(entries)

    def _deliver(self, entries: list[LogEntry], stream_ids: dict[str, str]) -> None:
        """Send stored messages to local subscribers, by their ids in their channel's stream."""
        if not self.fanout.has_subscribers(entries[0].channel):  # all of one channel: no message to build
            return
        for entry in entries:
            if entry.id in stream_ids:
                self.fanout.publish(entry.channel, Committed(entry, stream_ids[entry.id],
                                                             self.causal_token((entry.region, entry.hlc))))

    async def _deliver_stored(self, entries: list[LogEntry]) -> None:
        """Send local subscribers messages a script stored without the leader hearing of it (its reply was
        lost), their stream ids read back from the channel's stream. Should that fail too, a subscriber finds
        them when it resumes from its cursor."""
        for channel, group in itertools.groupby(sorted(entries, key=lambda e: e.channel), lambda e: e.channel):
            in_channel = list(group)
            try:
                self._deliver(in_channel, await self.store.stream_ids(channel, [e.id for e in in_channel]))
            except Exception:
                log.warning("reading the stream ids of messages stored in %s failed", channel, exc_info=True)

    async def _stored_message(self, channel: str, msg_id: str) -> LogEntry:
        """The copy of a stored message that readers see now."""
        entry = await self.store.find(channel, msg_id)
        if entry is None:
            raise Unavailable(f"message {msg_id} is being stored; retry")
        return entry

    def _stored_update(self, name: str, shard: MessageShard, update: bytes) -> None:
        """Count an update stored for a shard; when enough have piled up (`_SinceSnapshot.due`), snapshot the
        shard and store the snapshot in their place. Called with the shard's lock held, so the snapshot holds
        exactly the updates Redis holds; it is stored after the lock is let go: a large shard's snapshot
        (megabytes) takes Redis a while, and posts to the shard need not wait for it (it replaces only the
        updates it covers)."""
        since = self._since_snapshot.setdefault(name, _SinceSnapshot())
        since.updates += 1
        since.update_bytes += len(update)
        if since.due(self.settings.compact_after) and name not in self._compacting:
            self._compacting[name] = asyncio.create_task(
                self._compact(name, shard.snapshot(), since.updates, since.update_bytes))

    async def _compact(self, name: str, snapshot: bytes, updates: int, update_bytes: int) -> None:
        """Store `snapshot` in place of the shard's first `updates` updates (`update_bytes` of them)."""
        try:
            await self.store.compact_shard(name, snapshot, updates)
            if since := self._since_snapshot.get(name):  # (reloaded since: it may count fewer; it compacts later)
                since.updates = max(0, since.updates - updates)
                since.update_bytes = max(0, since.update_bytes - update_bytes)
                since.snapshot_bytes = len(snapshot)
        except Exception:  # the updates stay in their list; compaction is tried again at the next update
            log.warning("compacting shard %s failed", name, exc_info=True)
        finally:
            del self._compacting[name]

    @contextlib.asynccontextmanager
    async def _dropped_on_failure(self, name: str) -> AsyncIterator[None]:
        """Storing a change made to a hot shard: if it fails, drop the shard from memory, which must
        never hold what Redis does not (it is loaded again from Redis when next needed)."""
        try:
            yield
        except BaseException:
            self._dropped(name)
            raise

    def _dropped(self, name: str) -> None:
        """Forget a hot shard: it is loaded again from Redis when next needed."""
        self._shards.pop(name, None)
        self._since_snapshot.pop(name, None)

    @contextlib.asynccontextmanager
    async def _locked_shard(self, name: str) -> AsyncIterator[MessageShard]:
        """A shard, held while the caller changes or reads it: one holder at a time, so what anyone
        reads of a shard in memory (to store, ship or snapshot it) is what Redis holds."""
        async with self._shard_locks.held(name):
            yield await self._shard(name)

    async def _shard(self, name: str) -> MessageShard:
        shard = self._shards.get(name)
        if shard is None:
            snapshot, updates = await self.store.shard_updates(name)
            shard = MessageShard(split_shard_name(name)[0], self._client_id, ([snapshot] if snapshot else []) + updates)
            self._shards[name] = shard
            self._since_snapshot[name] = _SinceSnapshot(len(updates), sum(map(len, updates)), len(snapshot or b""))
            while len(self._shards) > self.settings.hot_shards:
                evicted, _ = self._shards.popitem(last=False)
                self._since_snapshot.pop(evicted, None)
        self._shards.move_to_end(name)
        return shard

    async def page(self, user_id: str, channel: str, cursor: str, limit: int, newest_first: bool) -> Page:
        after = decode_cursor(cursor) if cursor else ""
        page = await self.store.page(channel, after, limit, newest_first, user_id)
        _refuse_unless_readable(channel, user_id, *page.access)
        return page

    async def subscribe(self, user_id: str, channel: str, resume_cursor: str, live: bool = True
                        ) -> AsyncIterator[Committed | LiveAfter]:
        """Committed messages of `channel`: those after `resume_cursor`, then live ones. The stream
        ends with PermissionDenied once the user may no longer read the channel. Without `live`, it ends
        where the live ones would begin, with `LiveAfter`."""
        with self.fanout.subscribe(channel) as sub:  # first, so nothing committed from now is missed
            await self.check_access(channel, user_id)  # after: a removal from now on reaches `sub`
            if resume_cursor:
                try:
                    last = parse_stream_id(resume_cursor)
                except ValueError as e:
                    raise InvalidArgument(f"resume_cursor is malformed ({e}): pass back a stream_cursor "
                                          "or subscribe_cursor exactly as returned") from None
                if await self.store.stream_trimmed_past(channel, last):
                    raise OutOfRange(f"resume_cursor {resume_cursor} is older than the last "
                                     f"{self.settings.stream_retention} messages this region keeps for "
                                     "resuming: reload with ListMessages and subscribe from its subscribe_cursor")
                while True:
                    backlog = await self.store.stream_after(channel, last, 500)
                    if not backlog:
                        break
                    for sid, entry in backlog:
                        yield Committed(entry, sid, self.causal_token((entry.region, entry.hlc)))
                    last = backlog[-1][0]
            else:
                last = await self.store.last_stream_id(channel)
            if not live:
                yield LiveAfter(last)
                return
            while True:
                batch = await sub.next_batch()
                if not batch:
                    if sub.overflowed:
                        raise ResourceExhausted(cut_off(sub.capacity))
                    return
                for item in batch:
                    if isinstance(item, AccessChanged):
                        await self.check_access(channel, user_id)
                    elif is_live(item.stream_id, last):
                        yield item

    # Private channels -------------------------------------------------------------------------

    def subscriber_count(self) -> int:
        """Open Subscribe streams of the region: on this process, and on its gateways."""
        return self.fanout.subscriber_count() - len(self.fed) + sum(self.fed.values())

    async def check_access(self, channel: str, user_id: str) -> None:
        """Raise PermissionDenied unless `user_id` may read and post in `channel` (public, or a member)."""
        _refuse_unless_readable(channel, user_id, *await self.store.access(channel, user_id))

    async def create_channel(self, user_id: str, channel: str) -> Claim:
        """Create the private channel `channel`, with `user_id` its creator and first member; return its
        record (the existing one if this user created it before: a retry)."""
        record = Claim(self._stamp(), self.name, user_id, channel)
        change = Delta(channels=(record,), memberships=(MemberValue(channel, user_id, True, record.hlc, self.name),))
        outcome = await self._stored(record.hlc, self.store.create_channel(record, self._own(record.hlc, change)))
        if outcome < 0:
            raise FailedPrecondition(f"channel {channel!r} already has public messages in region {self.name}: "
                                     "choose a new name for a private channel")
        if outcome > 0:
            self._publish(change)
            self.fanout.publish(channel, ACCESS_CHANGED)  # subscribers of the public channel of that name
            return record
        top = await self._private(channel)
        if top.user_id != user_id:
            raise AlreadyExists(f"channel {channel!r} is already a private channel, created by {top.user_id}: "
                                "choose another name, or ask a member to add you")
        return top

    async def _private(self, channel: str) -> Claim:
        """The record of a private channel (its creator); NotFound if the channel is not private here."""
        top = owner(await self.store.channel_records(channel))
        if top is None:
            raise NotFound(f"channel {channel!r} is not a private channel in region {self.name} (public "
                           "channels have no members); create it with CreatePrivateChannel")
        return top

    async def set_member(self, actor: str, channel: str, user_id: str, member: bool) -> MemberValue:
        """`actor` adds `user_id` to the private `channel` (or removes them); return the membership.
        Nothing is stored if it already was so."""
        creator = (await self._private(channel)).user_id
        refusal = membership_refusal(actor, creator, await self._is_member(channel, actor), user_id, member)
        if refusal:
            raise PermissionDenied(f"{refusal} (channel {channel!r})")
        if await self.store.user_name(user_id) is None:
            raise NotFound(f"no user {user_id!r} in region {self.name}")
        current = await self.store.member(channel, user_id)
        if (current is not None and current.member) == member:
            return current or MemberValue(channel, user_id, False, "", "")  # never a member
        if member and len([m for m in await self.store.members(channel) if m.member]) >= MAX_CHANNEL_MEMBERS:
            raise FailedPrecondition(f"channel {channel!r} has {MAX_CHANNEL_MEMBERS} members, the most a private "
                                     "channel may have: remove one first")
        value = MemberValue(channel, user_id, member, self._stamp(), self.name)
        winner, changed = await self._stored(value.hlc, self.store.set_member(
            value, self._own(value.hlc, Delta(memberships=(value,)))))
        if changed:
            self._publish(Delta(memberships=(winner,)))
            if not winner.member:
                self.fanout.publish(channel, ACCESS_CHANGED)
        return winner

    async def _is_member(self, channel: str, user_id: str) -> bool:
        value = await self.store.member(channel, user_id)
        return value is not None and value.member

    async def channel_members(self, actor: str, channel: str) -> tuple[Claim, list[MemberValue]]:
        """A private channel's record and current members, for a member or the creator."""
        record = await self._private(channel)
        if actor != record.user_id and not await self._is_member(channel, actor):
            raise PermissionDenied(f"channel {channel!r} is private and user {actor} is not a member: only its "
                                   "members and its creator see who is in it")
        return record, [m for m in await self.store.members(channel) if m.member]

    # Status -------------------------------------------------------------------------------------

    async def set_status(self, user_id: str, presence: int, text: str) -> StatusValue:
        value = StatusValue(user_id, presence, text, self._stamp(), self.name)
        winner, changed = await self._stored(value.hlc, self.store.set_status(
            value, self._own(value.hlc, Delta(statuses=(value,)))))
        if changed:
            self._publish(Delta(statuses=(winner,)))
        return winner

    async def status(self, user_id: str) -> StatusValue | None:
        if await self.store.user_name(user_id) is None:
            raise NotFound(f"no user {user_id!r} in region {self.name}")
        return await self.store.status(user_id)

    # Users and claims ---------------------------------------------------------------------------

    def _watermark(self) -> str:
        """The hlc up to which this region knows every region's claims."""
        return self.clocks.watermark(self.regions)

    async def claim(self, username: str, claim_key: str,
                    decide: Callable[[str, str], Awaitable[str]] | None = None) -> UserView:
        """Claim `username` for the user that `claim_key` names. Without `decide`, a claim is taken
        here and now and may lose to a concurrent one from another region later. With it, the owner
        is decided once for all regions: `decide(username, user_id)` returns the user it chose."""
        user_id = user_id_for(username, claim_key)
        if decide is None:
            if waiting := self.membership.unacknowledged():
                raise Unavailable(f"region {self.name} takes username claims once {', '.join(waiting)} (new to "
                                  "the cluster, or to this region) counts it as a member, which its next heartbeat "
                                  "tells; retry shortly, or claim in another region")
            claim = Claim(self._stamp(), self.name, user_id, username)
            shipped = self._own(claim.hlc, Delta(claims=(claim,)))
            outcome = await self._stored(claim.hlc, self.store.claim(claim, shipped))
            if outcome > 0:
                self._publish(Delta(claims=(claim,)))
        else:
            # Only decided claims are ever stored, so a name held here is decided already.
            known = owner(await self.store.claims_on(username))
            holder = known.user_id if known is not None else await decide(username, user_id)
            if known is None:
                await self._record_claim(username, holder)
            outcome = 0 if holder == user_id else -1
        if outcome < 0:
            raise AlreadyExists(f"username {username!r} is taken: choose another one")
        return await self.user(user_id)

    async def _record_claim(self, username: str, user_id: str) -> None:
        """Store a decided claim here; it replicates like any other (a name decided once may be
        recorded by several regions, each stamping its own record of the same user)."""
        claim = Claim(self._stamp(), self.name, user_id, username)
        shipped = self._own(claim.hlc, Delta(claims=(claim,)))
        changed = await self._stored(claim.hlc, self.store.add_claim(claim, shipped))
        if changed:
            self._publish(Delta(claims=(claim,)))

    async def user(self, user_id: str) -> UserView:
        name = await self.store.user_name(user_id)
        if name is None:
            raise NotFound(f"no user {user_id!r} in region {self.name}")
        claims = await self.store.claims_on(name)
        mine = min(c for c in claims if c.user_id == user_id)
        if names_by_consensus(self.settings.mode):  # stored claims are decided: none is provisional
            state = ClaimState.CONFIRMED if owner(claims).user_id == user_id else ClaimState.LOST  # type: ignore[union-attr]
        else:
            state = claim_state(mine, claims, self._watermark())
        return UserView(user_id, name, mine, state)

    async def user_by_name(self, username: str) -> UserView:
        top = owner(await self.store.claims_on(username))
        if top is None:
            raise NotFound(f"no user has claimed the username {username!r}")
        return await self.user(top.user_id)

    # Replication --------------------------------------------------------------------------------

    async def delta_for(self, peer: ReplicaState) -> AsyncIterator[Delta]:
        """Everything this region holds that a peer in state `peer` lacks, in parts: one shard each,
        then statuses, claims, private channels and memberships, with the vector and outbox cursor that
        the whole covers (on the last part only)."""
        current, upto = self.told_vector(), self.cursor()  # first: what follows covers at least these
        for name, state_vector in (await self.store.shard_states()).items():
            if peer.shards.get(name) != state_vector:
                yield await self._shard_delta(name, peer)
        statuses = tuple([v async for v in self.store.statuses() if wanted(v.hlc, v.region, peer.vector)])
        claims = tuple([c async for c in self.store.claims() if wanted(c.hlc, c.region, peer.vector)])
        channels = tuple([c async for c in self.store.channels() if wanted(c.hlc, c.region, peer.vector)])
        memberships = tuple([m async for m in self.store.memberships() if wanted(m.hlc, m.region, peer.vector)])
        yield Delta(statuses=statuses, claims=claims, channels=channels, memberships=memberships, vector=current,
                    cursor=upto)

    def position(self, cursor: str) -> str:
        """A cursor of this region's outbox as peers hold it: it names the outbox too."""
        return f"{self.epoch}:{cursor}"

    async def resumable(self, position: str) -> str | None:
        """The cursor in a peer's `position` if the outbox holds everything after it, else None."""
        epoch, _, cursor = position.partition(":")
        if epoch != self.epoch or not cursor or cursor > self.cursor():  # another outbox, or none
            return None
        return cursor if cursor >= await self.store.outbox_trimmed() else None

    async def _shard_delta(self, name: str, peer: ReplicaState) -> Delta:
        """What a peer in state `peer` lacks of one shard."""
        async with self._locked_shard(name) as shard:
            try:
                update = shard.delta_since(peer.shards[name]) if name in peer.shards else shard.snapshot()
            except ValueError:
                raise InvalidArgument(f"the state vector given for shard {name!r} cannot be decoded: send "
                                      "the pycrdt state vector of the shard as it is") from None
        return Delta(shard_updates={name: update})

    async def delta_since(self, cursor: str, peer: str, state: ReplicaState) -> AsyncIterator[Delta]:
        """What the peer `peer`, in state `state`, that holds the outbox up to `cursor` lacks, from the outbox,
        in parts: every later entry that the peer did not send here and its vector does not cover (a shard
        kept by name only, what the peer lacks of it); the last part carries the vector and cursor that the
        whole covers. OutOfRange if the outbox was trimmed past `cursor` meanwhile."""
        current, upto = self.told_vector(), self.cursor()  # first: what follows covers at least these
        named: set[str] = set()
        lacking: list[Delta] = []
        async for entry in self.store.outbox_since(past(cursor)):
            stamp, payload = split_entry(entry)
            if not payload:  # a fence: a write given up on
                continue
            change = from_outbox(stamp, payload)
            relayed = change.relayed
            if relayed.source == peer or (relayed.origins and vector.covers(state.vector, relayed.origins)):  # type: ignore[union-attr]
                continue
            named |= {n for n, update in change.shard_updates.items() if not update}
            lacking.append(replace(change, shard_updates={n: u for n, u in change.shard_updates.items() if u}))
            if len(lacking) == OUTBOX_PAGE:
                for part in combine([c for c in lacking if carries_changes(c)]):
                    yield part
                lacking = []
        for part in combine([c for c in lacking if carries_changes(c)]):
            yield part
        for name in sorted(named):
            yield await self._shard_delta(name, state)
        if cursor < await self.store.outbox_trimmed():
            raise OutOfRange(f"the outbox of region {self.name} was trimmed past cursor {cursor} while it was "
                             "read: reconnect to compare states")
        yield Delta(vector=current, cursor=upto)

    async def state(self) -> ReplicaState:
        return ReplicaState(await self.store.shard_states(), self.told_vector())

    async def apply(self, delta: Delta, source: str) -> None:
        """Merge a delta from the peer `source`; store whatever was new here with its outbox entry, and publish
        it on the feed, for other peers."""
        before = self.told_vector()
        stamp = self.clocks.tick(self._now_ms())
        self._applying[stamp] = before
        try:
            await self._apply(delta, source, stamp, before)
        finally:
            if stamp in self._applying:  # it failed: it stays in flight until the outbox says what it stored
                self._in_doubt.add(stamp)

    def told_vector(self) -> dict[str, str]:
        """What peers and readers may count on: `vector`, with each other region's entry held where every apply
        in flight started. Deltas from peers are applied concurrently, and each publishes what it stored only
        when it ends: until then no vector told may cover it, or a third region would count it as held before
        it is relayed to it (`mlchat.geo.relay`), and a reader with a causal token could miss it here."""
        told = self.vector
        for before in self._applying.values():
            told = {r: h if r == self.name else min(h, before.get(r, "")) for r, h in told.items()}
        return {r: h for r, h in told.items() if h}

    async def _apply(self, delta: Delta, source: str, stamp: str, before: dict[str, str]) -> None:
        def shipped(change: Delta, stamped: Sequence[LogEntry | StatusValue | Claim | MemberValue]) -> Shipped:
            """The outbox entry of what was new here: relayed from `source` (see `Relayed` for its origins). A
            large shard update (a catch-up's) is kept by the shard's name only: a peer resuming gets what it
            lacks of the shard then."""
            if any(len(update) > NAMED_ABOVE for update in change.shard_updates.values()):
                change = Delta(shard_updates=dict.fromkeys(change.shard_updates, b""))
            return Shipped(stamp, outbox_entry(change, source, origins(stamped) if stamped else None))

        new_updates = {}
        integrated: list[LogEntry] = []
        known = True  # whether the origins of everything new are known (see `Relayed`)
        for name, update in delta.shard_updates.items():
            change = Delta(shard_updates={name: update})
            entries = await self._apply_shard(name, update, functools.partial(shipped, change))
            if entries is not None:
                new_updates[name] = update
                integrated += entries
                known = known and bool(entries)
        # Conflicts, counted by kind: a register value that lost to one another region wrote (a write
        # made after seeing another always wins, so the loser was concurrent with it, or came late by a
        # slower path), or a claim or channel record on a name another user holds too.
        statuses = []
        for value in delta.statuses:
            winner, changed = await self.store.set_status(value, shipped(Delta(statuses=(value,)), [value]))
            self.conflicts["status"] += winner.region != value.region
            if changed:
                statuses.append(value)
        claims = []
        for claim in delta.claims:
            claimants = await self.store.add_claim(claim, shipped(Delta(claims=(claim,)), [claim]))
            self.conflicts["claim"] += claimants > 1
            if claimants:
                claims.append(claim)
        channels = []
        for record in delta.channels:
            creators = await self.store.add_channel(record, shipped(Delta(channels=(record,)), [record]))
            self.conflicts["channel"] += creators > 1
            if creators:
                channels.append(record)
                self.fanout.publish(record.name, ACCESS_CHANGED)
        memberships = []
        for member in delta.memberships:
            held, changed = await self.store.set_member(member, shipped(Delta(memberships=(member,)), [member]))
            self.conflicts["membership"] += held.region != member.region
            if changed:
                memberships.append(member)
                if not member.member:
                    self.fanout.publish(member.channel, ACCESS_CHANGED)
        self.clocks.absorb(delta.vector, self._now_ms())
        self.clocks.witness([x.hlc for x in (*integrated, *statuses, *claims, *channels, *memberships)], self._now_ms())
        del self._applying[stamp]  # published just below, with what it stored
        self._vector_moved()
        stamped = origins([*integrated, *statuses, *claims, *channels, *memberships]) if known else None
        new = Delta(shard_updates=new_updates, statuses=tuple(statuses), claims=tuple(claims),
                    channels=tuple(channels), memberships=tuple(memberships),
                    relayed=Relayed(source, stamped, before, stamp))
        if carries_changes(new):
            self.clocks.floor_saved(stamp)  # its outbox entries raised the clock floor to it
            self._publish(new)

    async def _apply_shard(self, name: str, update: bytes,
                           shipped: Callable[[list[LogEntry]], Shipped]) -> list[LogEntry] | None:
        """Apply a pycrdt update to a shard; if anything in it was new here, store it (for other peers to
        be sent as it came) and return the entries it added. The update is stored as it came: pycrdt holds
        back items whose predecessors have not arrived yet, and the stored update keeps them until they do."""
        async with self._locked_shard(name) as shard:
            before = shard.state_vector()
            added = shard.apply(update)
            if not added and shard.state_vector() == before:
                return None
            async with self._stream_order.held(split_shard_name(name)[0]):
                shipping = shipped(added)
                try:
                    async with self._dropped_on_failure(name):
                        new = await self.store.apply(name, added, update, shard.state_vector(),
                                                     self.settings.stream_retention, shipping)
                except BaseException:  # in doubt: Redis may have stored them all the same (`_resolve_doubts`)
                    self._unpublished[(shipping.stamp, name)] = added
                    raise
                if added:
                    self._deliver(added, new)
            self._stored_update(name, shard, update)
        return added

    # Region-wide --------------------------------------------------------------------------------

    def hot_shard_sizes(self) -> list[int]:
        """For each shard held in memory, an estimate of its memory: the bytes Redis holds of it (its snapshot
        and the updates since), counted as they are stored. Encoding the shards instead would cost a scrape
        the whole of each (tens of milliseconds for a busy hour), while posts wait."""
        return [self._since_snapshot.get(name, _SinceSnapshot()).stored_bytes for name in self._shards]

    async def digest(self) -> str:
        store = self.store
        return state_digest([e async for e in store.messages()], [s async for s in store.statuses()],
                            [c async for c in store.claims()], [c async for c in store.channels()],
                            [m async for m in store.memberships()])


def is_live(stream_id: str, live_after: str) -> bool:
    """Whether a message published to a channel's subscribers is new to one whose backlog (or start) ended at
    `live_after`. Each is published once, and in stream order but for one case (a change in doubt is published
    when its doubt is resolved, after later ones), so it is not compared with the last one sent."""
    return stream_id_key(stream_id) > stream_id_key(live_after)


def cut_off(capacity: int) -> str:
    return f"subscriber fell more than {capacity} messages behind and was cut off: resume from your last stream_cursor"


def _refuse_unless_readable(channel: str, user_id: str, private: bool, member: bool) -> None:
    if private and not member:
        raise PermissionDenied(not_a_member(channel, user_id))


def not_a_member(channel: str, user_id: str) -> str:
    return (f"channel {channel!r} is private and user {user_id} is not a member: a member has to add you "
            "(AddChannelMember)")


def membership_refusal(actor: str, creator: str, actor_is_member: bool, user_id: str, add: bool) -> str:
    """Why `actor` may not add `user_id` to a private channel (or remove them); "" if they may.
    Members and the creator add anyone; a member removes themselves, the creator anyone."""
    if actor == creator:
        return ""
    if add:
        return "" if actor_is_member else "only members of a private channel and its creator may add members"
    return "" if actor == user_id else "only the creator of a private channel may remove other members"


def encode_cursor(order_key: str) -> str:
    return base64.urlsafe_b64encode(order_key.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The order key inside a ListMessages cursor; InvalidArgument if it is not one."""
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        split_order_key(key)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(f"cursor {cursor[:60]!r} is malformed: pass back a cursor exactly as returned") from None
    return key
