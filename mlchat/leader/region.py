"""What one region does with a client's request, between the gRPC servicer and Redis.

It stamps writes with the region's hybrid logical clock, keeps the hot pycrdt shards of the message
log, makes retries idempotent, answers reads in the documented order, fans committed messages out to
subscribers, and tracks the version vector that causal tokens are checked against. It raises
`MlchatError`s; the servicer turns them into gRPC statuses. Time and the pycrdt client id come in
from outside.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mlchat.crdt import vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state, owner
from mlchat.crdt.digest import state_digest
from mlchat.crdt.hlc import ZERO, Hlc
from mlchat.crdt.lww import StatusValue
from mlchat.crdt.msglog import LogEntry, MessageShard, message_id, shard_name, split_order_key, split_shard_name
from mlchat.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted, Unavailable
from mlchat.leader.fanout import Fanout
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import Page, Store, parse_stream_id, stream_id_key

log = logging.getLogger(__name__)
CAUSAL_WAIT_MAX_S = 30.0
RECENT_IDS = 10_000


@dataclass(frozen=True, slots=True)
class Committed:
    """A message as subscribers receive it."""

    entry: LogEntry
    stream_id: str
    causal_token: bytes


@dataclass(frozen=True, slots=True)
class _Pending:
    msg_id: str
    user_id: str
    body: str
    client_msg_id: str


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
        self.clock = ZERO
        self.vector: dict[str, str] = {}
        self._vector_changed = asyncio.Event()  # replaced by a fresh one at every change
        self._shards: OrderedDict[str, MessageShard] = OrderedDict()
        self._pending_updates: dict[str, int] = {}  # per hot shard: updates stored since its snapshot
        # Posts waiting for their channel's writer, the writers, and every post not yet answered.
        self._queue: dict[str, list[_Pending]] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        self._inflight: dict[str, list[asyncio.Future[tuple[LogEntry, bool]]]] = {}
        # Ids of messages committed lately, so that a retry is answered without a shard reload.
        self._recent: OrderedDict[str, str] = OrderedDict()
        self.fanout: Fanout[Committed] = Fanout(settings.subscriber_buffer)

    async def start(self) -> None:
        floor = await self.store.clock_floor()
        if floor:
            self.clock = Hlc.decode(floor)
            self.vector[self.name] = floor

    # Clock and causality ------------------------------------------------------------------------

    def _stamp(self) -> str:
        self.clock = self.clock.tick(self._now_ms())
        return self.clock.encode()

    def _committed(self, hlc: str) -> None:
        if hlc > self.vector.get(self.name, ""):
            self.vector[self.name] = hlc
        changed, self._vector_changed = self._vector_changed, asyncio.Event()
        changed.set()

    def causal_token(self) -> bytes:
        return vector.encode_token(self.vector)

    async def wait_for(self, token: bytes, timeout_s: float | None) -> None:
        """Return once this region has seen everything `token` has; raise if it does not in time."""
        try:
            want = vector.decode_token(token)
        except ValueError as e:
            raise InvalidArgument(f"{e}: pass back a causal_token exactly as a response returned it") from None
        if vector.covers(self.vector, want):
            return
        timeout = min(timeout_s if timeout_s is not None else CAUSAL_WAIT_MAX_S, CAUSAL_WAIT_MAX_S)
        try:
            async with asyncio.timeout(timeout):
                while not vector.covers(self.vector, want):
                    await self._vector_changed.wait()
        except TimeoutError:
            gaps = ", ".join(f"{r} up to {h}" for r, h in vector.missing(self.vector, want).items())
            raise Unavailable(f"region {self.name} has not yet caught up with your causal token "
                              f"(missing {gaps}); retry, or read from another region") from None

    # Messages -----------------------------------------------------------------------------------

    async def post(self, user_id: str, channel: str, body: str, client_msg_id: str) -> tuple[LogEntry, bool]:
        """Commit a message; return it and whether the call was a retry of an earlier one."""
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
            while batch := self._queue.pop(channel, None):
                try:
                    await self._commit_batch(channel, batch)
                except Exception as e:
                    for p in batch:
                        self._settle(p.msg_id, e)
        finally:
            del self._writers[channel]

    async def _commit_batch(self, channel: str, batch: list[_Pending]) -> None:
        fresh = []
        for p in batch:
            if p.msg_id in self._recent:  # a retry of a message committed lately
                self._settle(p.msg_id, (await self.store.message_at(channel, self._recent[p.msg_id]), False))
            else:
                fresh.append(p)
        entries = [LogEntry(p.msg_id, channel, p.user_id, p.body, p.client_msg_id, self._stamp(), self.name)
                   for p in fresh]
        for name, group in itertools.groupby(entries, lambda e: shard_name(channel, e.hlc, self.settings.bucket_ms)):
            await self._commit_shard(name, list(group))

    async def _commit_shard(self, name: str, entries: list[LogEntry]) -> None:
        shard = await self._shard(name)
        update = shard.add(entries)
        try:
            outcome = await self.store.post(name, entries, update, self.settings.stream_retention)
        except BaseException:
            self._shards.pop(name, None)  # memory must never hold what Redis does not
            raise
        if outcome.duplicates:
            # Retries of messages stored before (by an earlier process, or another process of this
            # region). Nothing was stored: drop the shard, which holds what Redis does not, answer
            # the retries, and queue the other posts again.
            self._shards.pop(name, None)
            for e in entries:
                if e.id in outcome.duplicates:
                    self._settle(e.id, (await self.store.message_at(e.channel, outcome.duplicates[e.id]), False))
                else:
                    self._queue.setdefault(e.channel, []).append(_Pending(e.id, e.user_id, e.body, e.client_msg_id))
            return
        self._pending_updates[name] = self._pending_updates.get(name, 0) + 1
        if self._pending_updates[name] >= self.settings.compact_after:
            await self.store.compact_shard(name, shard.snapshot(), self._pending_updates[name])
            self._pending_updates[name] = 0
        self._committed(entries[-1].hlc)
        token = self.causal_token()
        for entry, stream_id in zip(entries, outcome.stream_ids, strict=True):
            self._recent[entry.id] = entry.order_key
            self._settle(entry.id, (entry, True))
            self.fanout.publish(entry.channel, Committed(entry, stream_id, token))
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    async def _shard(self, name: str) -> MessageShard:
        shard = self._shards.get(name)
        if shard is None:
            snapshot, updates = await self.store.shard_updates(name)
            shard = MessageShard(split_shard_name(name)[0], self._client_id, ([snapshot] if snapshot else []) + updates)
            self._shards[name] = shard
            self._pending_updates[name] = len(updates)
            while len(self._shards) > self.settings.hot_shards:
                evicted, _ = self._shards.popitem(last=False)
                self._pending_updates.pop(evicted, None)
        self._shards.move_to_end(name)
        return shard

    async def page(self, channel: str, cursor: str, limit: int, newest_first: bool) -> Page:
        return await self.store.page(channel, decode_cursor(cursor) if cursor else "", limit, newest_first)

    async def subscribe(self, channel: str, resume_cursor: str) -> AsyncIterator[Committed]:
        """Committed messages of `channel`: those after `resume_cursor`, then live ones."""
        with self.fanout.subscribe(channel) as sub:  # first, so nothing committed from now is missed
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
                        yield Committed(entry, sid, self.causal_token())
                    last = backlog[-1][0]
            else:
                last = await self.store.last_stream_id(channel)
            while True:
                batch = await sub.next_batch()
                if not batch:
                    if sub.overflowed:
                        raise ResourceExhausted(
                            f"subscriber fell more than {sub.capacity} messages behind and was cut off: "
                            "resume from your last stream_cursor")
                    return
                for item in batch:
                    if stream_id_key(item.stream_id) > stream_id_key(last):
                        last = item.stream_id
                        yield item

    # Status -------------------------------------------------------------------------------------

    async def set_status(self, user_id: str, presence: int, text: str) -> StatusValue:
        hlc = self._stamp()
        winner = await self.store.set_status(StatusValue(user_id, presence, text, hlc, self.name))
        self._committed(hlc)
        return winner

    async def status(self, user_id: str) -> StatusValue | None:
        if await self.store.user_name(user_id) is None:
            raise NotFound(f"no user {user_id!r} in region {self.name}")
        return await self.store.status(user_id)

    # Users and claims ---------------------------------------------------------------------------

    def _watermark(self) -> str:
        """The hlc up to which this region knows every region's claims (only itself so far)."""
        return self.vector.get(self.name, ZERO.encode())

    async def claim(self, username: str, claim_key: str) -> UserView:
        user_id = user_id_for(username, claim_key)
        hlc = self._stamp()
        outcome = await self.store.claim(Claim(hlc, self.name, user_id, username))
        if outcome < 0:
            raise AlreadyExists(f"username {username!r} is taken: choose another one")
        self._committed(hlc)
        return await self.user(user_id)

    async def user(self, user_id: str) -> UserView:
        name = await self.store.user_name(user_id)
        if name is None:
            raise NotFound(f"no user {user_id!r} in region {self.name}")
        claims = await self.store.claims_on(name)
        mine = min(c for c in claims if c.user_id == user_id)
        return UserView(user_id, name, mine, claim_state(mine, claims, self._watermark()))

    async def user_by_name(self, username: str) -> UserView:
        top = owner(await self.store.claims_on(username))
        if top is None:
            raise NotFound(f"no user has claimed the username {username!r}")
        return await self.user(top.user_id)

    # Region-wide --------------------------------------------------------------------------------

    async def digest(self) -> str:
        entries: list[LogEntry] = []
        statuses: list[StatusValue] = []
        claims: list[Claim] = []
        async for item in self.store.all_state():
            if isinstance(item, LogEntry):
                entries.append(item)
            elif isinstance(item, StatusValue):
                statuses.append(item)
            else:
                claims.append(item)
        return state_digest(entries, statuses, claims)


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
