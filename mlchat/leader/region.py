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
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mlchat.crdt import vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state, owner
from mlchat.crdt.digest import state_digest
from mlchat.crdt.hlc import ENCODED_LENGTH, ZERO, Hlc, is_encoded_hlc
from mlchat.crdt.lww import StatusValue
from mlchat.crdt.msglog import ID_LENGTH, LogEntry, MessageShard, message_id, shard_name
from mlchat.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted, Unavailable
from mlchat.leader.fanout import Fanout
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.store import Page, Store, parse_stream_id, stream_id_key

log = logging.getLogger(__name__)
CAUSAL_WAIT_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Committed:
    """A message as subscribers receive it."""

    entry: LogEntry
    stream_id: str
    causal_token: bytes


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
        self._vector_changed = asyncio.Condition()
        self._shards: OrderedDict[str, MessageShard] = OrderedDict()
        self._shard_locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, asyncio.Future[LogEntry]] = {}
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

    async def _committed(self, hlc: str) -> None:
        if hlc > self.vector.get(self.name, ""):
            self.vector[self.name] = hlc
        async with self._vector_changed:
            self._vector_changed.notify_all()

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
            async with self._vector_changed:
                await asyncio.wait_for(self._vector_changed.wait_for(lambda: vector.covers(self.vector, want)),
                                       timeout)
        except TimeoutError:
            gaps = ", ".join(f"{r} up to {h}" for r, h in vector.missing(self.vector, want).items())
            raise Unavailable(f"region {self.name} has not yet caught up with your causal token "
                              f"(missing {gaps}); retry, or read from another region") from None

    # Messages -----------------------------------------------------------------------------------

    async def post(self, user_id: str, channel: str, body: str, client_msg_id: str) -> tuple[LogEntry, bool]:
        """Commit a message; return it and whether the call was a retry of an earlier one."""
        msg_id = message_id(user_id, channel, client_msg_id)
        if msg_id in self._inflight:  # the same request is being committed right now
            return self._same(await asyncio.shield(self._inflight[msg_id]), body), True
        existing = await self.store.find(channel, msg_id)
        if existing is not None:
            return self._same(existing, body), True
        future: asyncio.Future[LogEntry] = asyncio.get_running_loop().create_future()
        self._inflight[msg_id] = future
        try:
            entry, stored = await self._commit(msg_id, user_id, channel, body, client_msg_id)
            future.set_result(entry)
            return self._same(entry, body), not stored
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._inflight[msg_id]

    @staticmethod
    def _same(entry: LogEntry, body: str) -> LogEntry:
        if entry.body != body:
            raise AlreadyExists(f"client_msg_id {entry.client_msg_id!r} was already used for a different "
                                "message in this channel: use a new client_msg_id for a new message")
        return entry

    async def _commit(self, msg_id: str, user_id: str, channel: str, body: str,
                      client_msg_id: str) -> tuple[LogEntry, bool]:
        hlc = self._stamp()
        entry = LogEntry(msg_id, channel, user_id, body, client_msg_id, hlc, self.name)
        name = shard_name(channel, hlc, self.settings.bucket_ms)
        # One commit at a time per shard: each pycrdt update builds on the previous one, so an update
        # that fails to persist must not have successors.
        async with self._shard_locks.setdefault(name, asyncio.Lock()):
            shard = await self._shard(name)
            update = shard.add(entry)
            try:
                result = await self.store.post(entry, name, update, self.settings.stream_retention)
            except BaseException:
                self._shards.pop(name, None)  # memory must never hold what Redis does not
                raise
            if not result.stored:  # another leader process of this region committed it first
                self._shards.pop(name, None)
                return result.entry, False
            await self._maybe_compact(name, shard)
        await self._committed(hlc)
        self.fanout.publish(channel, Committed(entry, result.stream_id, self.causal_token()))
        return entry, True

    async def _shard(self, name: str) -> MessageShard:
        shard = self._shards.get(name)
        if shard is None:
            shard = MessageShard(self._client_id, await self.store.shard_updates(name))
            self._shards[name] = shard
            while len(self._shards) > self.settings.hot_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(name)
        return shard

    async def _maybe_compact(self, name: str, shard: MessageShard) -> None:
        pending = await self.store.shard_length(name)
        if pending >= self.settings.compact_after:
            await self.store.compact_shard(name, shard.snapshot(), pending)

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
        await self._committed(hlc)
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
        await self._committed(hlc)
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
        entries, statuses, claims = [], [], []
        async for item in self.store.all_state():
            {LogEntry: entries, StatusValue: statuses, Claim: claims}[type(item)].append(item)
        return state_digest(entries, statuses, claims)


def encode_cursor(order_key: str) -> str:
    return base64.urlsafe_b64encode(order_key.encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> str:
    """The order key inside a ListMessages cursor; InvalidArgument if it is not one."""
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        region, msg_id = key[ENCODED_LENGTH:].split("\x00")
        valid = is_encoded_hlc(key[:ENCODED_LENGTH]) and bool(region) and len(msg_id) == ID_LENGTH
    except (binascii.Error, UnicodeDecodeError, ValueError):
        valid = False
    if not valid:
        raise InvalidArgument(f"cursor {cursor[:60]!r} is malformed: pass back a cursor exactly as returned")
    return key
