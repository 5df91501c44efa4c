"""A region's durable state in Redis (any Redis >= 7 or Valkey).

Keys (every per-channel key carries the hash tag `{channel}`; on Redis Cluster the region-wide keys
that scripts touch, marked *, have one copy per slot and the meta keys one tag: see `keys.py`):
  c:{ch}:z     ZSET, score 0: member = order_key NUL payload (LogEntry.payload); read order
  c:{ch}:ids   HASH message id -> order_key: deduplicates retries, finds the original
  c:{ch}:s     STREAM of message ids in commit order here: what Subscribe resumes from (capped)
  y:{ch}:B:u   LIST of pycrdt updates of shard (ch, bucket B) since its snapshot
  y:{ch}:B:snap STRING pycrdt snapshot of that shard
  u:USER       HASH name, hlc, region: the user created by a claim
  n:NAME       HASH user id -> hlc NUL region: every claim on the name
  s:USER       HASH k (rank key), p, t, h, r: the user's status register
  pc:{ch}      HASH creator user id -> hlc NUL region: every record of the private channel ch
  cm:{ch}:USER HASH k (rank key), v (1 member, 0 not), h, r: the user's membership register of ch
  cmi:{ch}     SET of user ids with a membership register of ch
  shards*      HASH shard name -> pycrdt state vector: what a peer is told this region holds
  outbox*      ZSET, score 0: member = stamp NUL OutboxEntry (`wire.outbox_entry`): every change, for peers
  outbox:trimmed*  STRING the highest stamp trimmed from the outbox: cursors below it cannot resume
  meta:epoch   STRING names this outbox: a cursor of another epoch (the data was lost or restored) is void
  meta:cursors HASH region -> "EPOCH:STAMP": how far this region holds that peer's outbox
  channels*, users*  SETs, for counts; meta:hlc*  the largest hlc issued here (clock floor at start)
  meta:vector  HASH origin region -> hlc up to which all its writes are held here
  meta:members HASH region -> address of the other members; meta:departed  SET of regions that left;
  meta:listed-by  SET of members known to count this region as one of theirs
  meta:copies  (Redis Cluster only) SET of the tags that hold copies of the starred keys

A write is one Lua script, so the state change and everything derived from it (its outbox entry
included) commit together or not at all, and it is acknowledged only after Redis has it. One exception
on a cluster: a name's claims and the user a claim creates live in two slots, so a claim there is two
scripts, the user's second; it is idempotent and runs again with every retry of the claim and every
copy of it from a peer, so a crash between the two is healed by the next.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from mlchat.crdt.claims import Claim
from mlchat.crdt.hlc import ENCODED_LENGTH as HLC_LEN
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import ID_LENGTH, LogEntry, split_shard_name
from mlchat.leader.keys import (
    CHANNELS,
    COPIES,
    FLOOR,
    OUTBOX,
    SHARDS,
    TRIMMED,
    USERS,
    ClusterLayout,
    Layout,
    SingleLayout,
    slot_tags,
)
from mlchat.leader.scripts import script_connection

_LESS = """
local function less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
"""

# raise_floor: the clock floor only moves forward. ship: a change's outbox entry, under a stamp that the
# clock floor then covers (stamps after a restart are above every entry). A write whose stamp was given up
# on (`_RESOLVE`: the region found nothing under it) is fenced: a tombstone, the stamp with no payload.
_SHIP = _LESS + """
local function raise_floor(key, hlc)
  local floor = redis.call('GET', key)
  if (not floor) or less(floor, hlc) then redis.call('SET', key, hlc) end
end
local function ship(outbox, floor, stamp, payload)
  redis.call('ZADD', outbox, 0, stamp .. '\\0' .. payload)
  raise_floor(floor, stamp)
end
local function fence(outbox, stamp)
  if redis.call('ZSCORE', outbox, stamp .. '\\0') then
    return redis.error_reply('FENCED write ' .. stamp .. ' was given up on: it stores nothing')
  end
end
"""

# Shared by the scripts below. lww_set: a last-writer-wins register kept in a hash whose field 'k' is
# the rank key; sets the fields if `rank` is larger, and returns 1 if the register changed. keep_earliest:
# a claim-like record per user in a hash (user -> hlc NUL region), keeping each user's earliest; returns 1
# if the hash changed. The scripts that change a register or record ship the change (ARGV: stamp, payload);
# one that finds its change shipped already ran before (the client retried it, its reply lost), and
# answers as it did then, so that the change is published.
_REGISTERS = _SHIP + """
local function shipped_before(outbox, stamp, payload)
  return redis.call('ZSCORE', outbox, stamp .. '\\0' .. payload) ~= false
end
local function lww_set(reg, rank, fields)
  local cur = redis.call('HGET', reg, 'k')
  if cur and not less(cur, rank) then return 0 end
  redis.call('HSET', reg, 'k', rank, unpack(fields))
  return 1
end
local function keep_earliest(hash, user, value)
  local prior = redis.call('HGET', hash, user)
  if prior and not less(value, prior) then return 0 end
  redis.call('HSET', hash, user, value)
  return 1
end
local function add_user(user, users, id, hlc, region, name)
  if redis.call('EXISTS', user) == 1 then return end
  redis.call('HSET', user, 'name', name, 'hlc', hlc, 'region', region)
  redis.call('SADD', users, id)
end
"""

# A batch of new local messages of one shard and the pycrdt update that adds them all.
# KEYS: ids, zset, stream, shard update list, channels, meta:hlc, shards, the channel's private records,
# outbox, then each message's poster's membership register. ARGV: stream cap, update, channel, outbox
# stamp, shard, shard state vector, outbox payload, then (id, order key, member) for each message.
# Returns {1, stream ids}; or, storing nothing, {0, {id, stored order key, ...}} if any of the ids is
# stored already (a retry), or {2, {id, ...}} for the messages whose poster may not post in the channel
# (it is private, and they are not members): checked here so that a post costs one round trip.
_POST = _SHIP + """
local fenced = fence(KEYS[9], ARGV[4])
if fenced then return fenced end
local dups = {}
for i = 8, #ARGV, 3 do
  local key = redis.call('HGET', KEYS[1], ARGV[i])
  if key then dups[#dups + 1] = ARGV[i]; dups[#dups + 1] = key end
end
if #dups > 0 then return {0, dups} end
if redis.call('EXISTS', KEYS[8]) == 1 then
  local refused = {}
  for i = 8, #ARGV, 3 do
    if redis.call('HGET', KEYS[10 + (i - 8) / 3], 'v') ~= '1' then refused[#refused + 1] = ARGV[i] end
  end
  if #refused > 0 then return {2, refused} end
end
local sids = {}
for i = 8, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], 0, ARGV[i + 2])
  sids[#sids + 1] = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'i', ARGV[i])
end
redis.call('RPUSH', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('HSET', KEYS[7], ARGV[5], ARGV[6])
ship(KEYS[9], KEYS[6], ARGV[4], ARGV[7])
return {1, sids}
"""

# Copies of messages that arrived from another region, with the pycrdt update that brought them.
# KEYS: ids, zset, stream, shard update list, channels, shards, outbox, meta:hlc. ARGV: stream cap, update,
# channel, shard, shard state vector, outbox stamp, outbox payload, then (id, order key, member) for each
# copy. A copy of a message not
# stored here is added; a copy of one stored here replaces it if its order key is smaller (readers
# everywhere keep the earliest copy). Returns {id, stream id} for each message new here.
_APPLY = _SHIP + """
local fenced = fence(KEYS[7], ARGV[6])
if fenced then return fenced end
redis.call('RPUSH', KEYS[4], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[3])
redis.call('HSET', KEYS[6], ARGV[4], ARGV[5])
ship(KEYS[7], KEYS[8], ARGV[6], ARGV[7])
local new = {}
for i = 8, #ARGV, 3 do
  local prior = redis.call('HGET', KEYS[1], ARGV[i])
  if not prior then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[2], 0, ARGV[i + 2])
    new[#new + 1] = ARGV[i]
    new[#new + 1] = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'i', ARGV[i])
  elseif less(ARGV[i + 1], prior) then
    redis.call('ZREMRANGEBYLEX', KEYS[2], '[' .. prior .. '\\0', '[' .. prior .. '\\1')
    redis.call('ZADD', KEYS[2], 0, ARGV[i + 2])
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return new
"""

# KEYS: the term hash. ARGV: term ("EPOCH PRIMARY"), the epoch last voted for. Both only move forward, so
# that two saves landing out of order never lower the stored vote.
_SAVE_TERM = """
local stored = redis.call('HGET', KEYS[1], 'term')
local epoch = stored and tonumber(string.match(stored, '^%d+')) or -1
if tonumber(string.match(ARGV[1], '^%d+')) >= epoch then redis.call('HSET', KEYS[1], 'term', ARGV[1]) end
if tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'voted') or '0') then
  redis.call('HSET', KEYS[1], 'voted', ARGV[2])
end
"""

# KEYS: meta:hlc. ARGV: hlc. The clock floor only moves forward.
_RAISE_FLOOR = _SHIP + """
raise_floor(KEYS[1], ARGV[1])
"""

# KEYS: an outbox copy. ARGV: 1 to fence, then stamps of writes whose outcome is in doubt. Returns the
# entries under them; with ARGV[1] 1, a stamp with none is fenced in the same step (see `fence`), so that
# its script, if it still waits to run, stores nothing.
_RESOLVE = """
local found = {}
for i = 2, #ARGV do
  local entries = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. ARGV[i] .. '\\0', '(' .. ARGV[i] .. '\\1')
  if #entries == 0 and ARGV[1] == '1' then redis.call('ZADD', KEYS[1], 0, ARGV[i] .. '\\0') end
  for _, entry in ipairs(entries) do
    if #entry > #ARGV[i] + 1 then found[#found + 1] = entry end
  end
end
return found
"""

# KEYS: outbox, outbox:trimmed. ARGV: a stamp every peer holds the outbox up to ('' if not all are known),
# the most entries to keep. Trims what all hold, then the oldest past the most, and raises the trimmed
# floor to the highest stamp trimmed. Returns the entries left.
_TRIM_OUTBOX = _SHIP + """
if ARGV[1] ~= '' then
  if redis.call('ZREMRANGEBYLEX', KEYS[1], '-', '(' .. ARGV[1] .. '\\1') > 0 then raise_floor(KEYS[2], ARGV[1]) end
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then
  local last = redis.call('ZRANGE', KEYS[1], over - 1, over - 1)[1]
  raise_floor(KEYS[2], string.sub(last, 1, string.find(last, '\\0', 1, true) - 1))
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
end
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: ids, zset. ARGV: message id. Returns the member of the copy readers see, or nil.
_FIND = """
local key = redis.call('HGET', KEYS[1], ARGV[1])
if not key then return false end
return redis.call('ZRANGEBYLEX', KEYS[2], '[' .. key .. '\\0', '[' .. key .. '\\1', 'LIMIT', 0, 1)[1]
"""

# KEYS: status hash, meta:hlc, outbox. ARGV: rank key, presence, text, hlc, region, outbox stamp and payload.
# Returns {1 if the register changed, the winner's fields}.
_SET_STATUS = _REGISTERS + """
local fenced = fence(KEYS[3], ARGV[6])
if fenced then return fenced end
local changed = 1
if not shipped_before(KEYS[3], ARGV[6], ARGV[7]) then
  changed = lww_set(KEYS[1], ARGV[1], {'p', ARGV[2], 't', ARGV[3], 'h', ARGV[4], 'r', ARGV[5]})
  raise_floor(KEYS[2], ARGV[4])
  if changed == 1 then ship(KEYS[3], KEYS[2], ARGV[6], ARGV[7]) end
end
return {changed, redis.call('HMGET', KEYS[1], 'p', 't', 'h', 'r')}
"""

# KEYS: membership register, meta:hlc, the channel's member index, outbox. ARGV: rank key, member (1/0),
# hlc, region, user id, outbox stamp and payload. Returns {1 if the register changed, the winner's fields}.
_SET_MEMBER = _REGISTERS + """
local fenced = fence(KEYS[4], ARGV[6])
if fenced then return fenced end
local changed = 1
if not shipped_before(KEYS[4], ARGV[6], ARGV[7]) then
  changed = lww_set(KEYS[1], ARGV[1], {'v', ARGV[2], 'h', ARGV[3], 'r', ARGV[4]})
  redis.call('SADD', KEYS[3], ARGV[5])
  raise_floor(KEYS[2], ARGV[3])
  if changed == 1 then ship(KEYS[4], KEYS[2], ARGV[6], ARGV[7]) end
end
return {changed, redis.call('HMGET', KEYS[1], 'v', 'h', 'r')}
"""

# A private channel created here: its record and the creator's membership, unless the channel is
# private already (0) or holds public messages here (-1). KEYS: channel records, meta:hlc, the
# channel's message ids, the creator's membership register, the channel's member index, outbox.
# ARGV: user id, hlc, region, rank key of the membership, outbox stamp and payload. Returns 1 if created.
_CREATE_CHANNEL = _REGISTERS + """
local fenced = fence(KEYS[6], ARGV[5])
if fenced then return fenced end
if shipped_before(KEYS[6], ARGV[5], ARGV[6]) then return 1 end
raise_floor(KEYS[2], ARGV[2])  -- whatever the outcome: the region settles the stamp as stored
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\\0' .. ARGV[3])
lww_set(KEYS[4], ARGV[4], {'v', '1', 'h', ARGV[2], 'r', ARGV[3]})
redis.call('SADD', KEYS[5], ARGV[1])
ship(KEYS[6], KEYS[2], ARGV[5], ARGV[6])
return 1
"""

# A private channel record from another region. KEYS: channel records, meta:hlc, outbox.
# ARGV: user id, hlc, region, outbox stamp and payload. Returns 0 if the records did not change, else how
# many users created it.
_ADD_CHANNEL = _REGISTERS + """
local fenced = fence(KEYS[3], ARGV[4])
if fenced then return fenced end
if shipped_before(KEYS[3], ARGV[4], ARGV[5]) then return redis.call('HLEN', KEYS[1]) end
raise_floor(KEYS[2], ARGV[2])
if keep_earliest(KEYS[1], ARGV[1], ARGV[2] .. '\\0' .. ARGV[3]) == 0 then return 0 end
ship(KEYS[3], KEYS[2], ARGV[4], ARGV[5])
return redis.call('HLEN', KEYS[1])
"""

# A claim from another region (or decided by consensus): kept (per user, the earliest) whatever else is on
# the name. KEYS: claims on the name, meta:hlc, outbox, then (one Redis) the user hash and the set of users,
# the user created if new. ARGV: user id, hlc, region, name, outbox stamp and payload.
# Returns 0 if the claims on the name did not change, else how many users claim it.
_ADD_CLAIM = _REGISTERS + """
local fenced = fence(KEYS[3], ARGV[5])
if fenced then return fenced end
if shipped_before(KEYS[3], ARGV[5], ARGV[6]) then return redis.call('HLEN', KEYS[1]) end
raise_floor(KEYS[2], ARGV[2])
if keep_earliest(KEYS[1], ARGV[1], ARGV[2] .. '\\0' .. ARGV[3]) == 0 then return 0 end
ship(KEYS[3], KEYS[2], ARGV[5], ARGV[6])
if #KEYS == 5 then add_user(KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) end
return redis.call('HLEN', KEYS[1])
"""

# KEYS: claims on the name, meta:hlc, outbox, then (one Redis) the user hash and the set of users.
# ARGV: user id, hlc, region, name, outbox stamp and payload.
# Returns 1 if claimed now, 0 if this user already claimed it, -1 if another user holds a claim.
_CLAIM = _REGISTERS + """
local fenced = fence(KEYS[3], ARGV[5])
if fenced then return fenced end
if shipped_before(KEYS[3], ARGV[5], ARGV[6]) then return 1 end
raise_floor(KEYS[2], ARGV[2])  -- whatever the outcome: the region settles the stamp as stored
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) > 0 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '\\0' .. ARGV[3])
ship(KEYS[3], KEYS[2], ARGV[5], ARGV[6])
if #KEYS == 5 then add_user(KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) end
return 1
"""

# Cluster only, after a claim: the user it names, created if new. KEYS: user hash, set of users, meta:hlc.
# ARGV: user id, hlc, region, name.
_ADD_USER = _REGISTERS + """
add_user(KEYS[1], KEYS[2], unpack(ARGV))
raise_floor(KEYS[3], ARGV[2])
"""


def _zset(channel: str) -> str:
    return f"c:{{{channel}}}:z"


def _ids(channel: str) -> str:
    return f"c:{{{channel}}}:ids"


def _stream(channel: str) -> str:
    return f"c:{{{channel}}}:s"


def _shard_keys(shard: str) -> tuple[str, str]:
    channel, bucket = split_shard_name(shard)
    return f"y:{{{channel}}}:{bucket}:u", f"y:{{{channel}}}:{bucket}:snap"


def rank_key(v: StatusValue | MemberValue) -> str:
    """A register value's `rank` as one string that sorts the same way byte by byte (fields have no NUL;
    presence is one digit, member a bool)."""
    return "\x00".join(str(part) for part in v.rank)


def _records(channel: str) -> str:
    return f"pc:{{{channel}}}"


def _member_key(channel: str, user_id: str) -> str:
    return f"cm:{{{channel}}}:{user_id}"


def _read_access(pipe: Any, channel: str, user_id: str) -> None:
    """Queue the reads of whether `channel` is private and `user_id` a member of it (`Store.access`)."""
    pipe.exists(_records(channel))
    pipe.hget(_member_key(channel, user_id), "v")


def _member_index(channel: str) -> str:
    return f"cmi:{{{channel}}}"


def _member_value(channel: str, user_id: str, fields: list[bytes | None]) -> MemberValue | None:
    v, h, r = fields
    return None if h is None else MemberValue(channel, user_id, v == b"1", h.decode(), r.decode())


def _member(entry: LogEntry) -> str:
    return f"{entry.order_key}\x00{entry.payload}"


def _entry(channel: str, member: str) -> LogEntry:
    # The order key holds one NUL (after the region) and has a fixed-width tail: the id.
    region_end = member.index("\x00", HLC_LEN)
    key_end = region_end + 1 + ID_LENGTH
    return LogEntry.from_parts(channel, member[:key_end], member[key_end + 1:])


def _after(order_key: str) -> str:
    """The smallest string above every member that starts with `order_key`."""
    return order_key[:-1] + chr(ord(order_key[-1]) + 1)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Shipped:
    """A change's entry in the outbox: the stamp it goes under, and the change as `wire.outbox_entry` encodes it."""

    stamp: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class PostOutcome:
    stream_ids: list[str] = field(default_factory=list)  # of the stored messages, in order
    duplicates: dict[str, str] = field(default_factory=dict)  # id -> order key stored earlier
    refused: set[str] = field(default_factory=set)  # ids whose poster is not a member of the private channel


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[LogEntry]
    stream_id: str  # the last stream entry when the page was read: Subscribe from here
    access: tuple[bool, bool]  # (whether the channel is private, whether the reader is a member), read with it


class Store:
    """A region's state in one Redis or in a Redis Cluster (a `RedisCluster` client): same keys and
    scripts, only where the region-wide keys live differs (`keys.py`)."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self.redis: Any = client
        self.layout: Layout = ClusterLayout() if isinstance(client, RedisCluster) else SingleLayout()
        if self.layout.cluster:
            slot_tags()  # ~0.2 s once, at start rather than in the first write
        self._listed: set[str] = set()  # tags known to be in COPIES already
        # Writes are script calls: on one server, over a pipelined connection of their own (`scripts.py`).
        self._scripts = script_connection(client)
        script = self._scripts.script if self._scripts else client.register_script
        self._add_user = script(_ADD_USER)
        self._post = script(_POST)
        self._set_status = script(_SET_STATUS)
        self._claim = script(_CLAIM)
        self._apply = script(_APPLY)
        self._find = script(_FIND)
        self._raise_floor = script(_RAISE_FLOOR)
        self._save_term = script(_SAVE_TERM)
        self._add_claim = script(_ADD_CLAIM)
        self._set_member = script(_SET_MEMBER)
        self._create_channel = script(_CREATE_CHANNEL)
        self._add_channel = script(_ADD_CHANNEL)
        self._trim_outbox = script(_TRIM_OUTBOX)
        self._resolve = script(_RESOLVE)

    async def close(self) -> None:
        if self._scripts:
            await self._scripts.close()
        await self.redis.aclose()

    async def _beside(self, key: str) -> tuple[str, str, str, str, str]:
        """The copies of (meta:hlc, shards, channels, users, outbox) in the slot of `key`, listed in COPIES
        first so that readers find them."""
        tag = self.layout.tag(key)
        if tag is not None and tag not in self._listed:
            await self.redis.sadd(COPIES, tag)
            self._listed.add(tag)
        return tuple(self.layout.copy(name, key) for name in (FLOOR, SHARDS, CHANNELS, USERS, OUTBOX))  # type: ignore[return-value]

    async def _copies(self, name: str) -> list[str]:
        """Every copy of a region-wide key, to read and merge."""
        tags = ({t.decode() for t in await self.redis.smembers(COPIES)} if self.layout.cluster else set())
        return self.layout.copies(name, tags)

    # Messages -----------------------------------------------------------------------------------

    async def post(self, shard: str, entries: list[LogEntry], update: bytes, state_vector: bytes,
                   stream_cap: int, shipped: Shipped) -> PostOutcome:
        """Store new messages of one shard with the pycrdt update that adds them, and their outbox entry
        (under a stamp at least theirs), unless any of them is stored already, or the channel is private and
        a poster not a member: then store nothing and say which."""
        updates_key, _ = _shard_keys(shard)
        ch = entries[0].channel
        args: list[str | bytes | int] = [stream_cap, update, ch, shipped.stamp, shard, state_vector, shipped.payload]
        for e in entries:
            args += [e.id, e.order_key, _member(e)]
        floor, shards, channels, _, outbox = await self._beside(_ids(ch))
        stored, values = await self._post(
            keys=[_ids(ch), _zset(ch), _stream(ch), updates_key, channels, floor, shards, _records(ch), outbox,
                  *(_member_key(ch, e.user_id) for e in entries)], args=args)
        decoded = [v.decode() for v in values]
        if stored == 1:
            return PostOutcome(stream_ids=decoded)
        if stored == 2:
            return PostOutcome(refused=set(decoded))
        return PostOutcome(duplicates=dict(zip(decoded[::2], decoded[1::2], strict=True)))

    async def apply(self, shard: str, entries: list[LogEntry], update: bytes, state_vector: bytes,
                    stream_cap: int, shipped: Shipped) -> dict[str, str]:
        """Store copies of messages from another region with the update that brought them, and its outbox
        entry; return {message id: stream id} of the messages that are new here."""
        updates_key, _ = _shard_keys(shard)
        ch = split_shard_name(shard)[0]
        args: list[str | bytes | int] = [stream_cap, update, ch, shard, state_vector, shipped.stamp, shipped.payload]
        for e in entries:
            args += [e.id, e.order_key, _member(e)]
        floor, shards, channels, _, outbox = await self._beside(_ids(ch))
        values = [v.decode() for v in await self._apply(
            keys=[_ids(ch), _zset(ch), _stream(ch), updates_key, channels, shards, outbox, floor], args=args)]
        return dict(zip(values[::2], values[1::2], strict=True))

    async def find(self, channel: str, msg_id: str) -> LogEntry | None:
        """The copy of a message that readers see, or None if the message is not stored here."""
        member = await self._find(keys=[_ids(channel), _zset(channel)], args=[msg_id])
        return None if member is None else _entry(channel, member.decode())

    async def page(self, channel: str, cursor: str, limit: int, newest_first: bool, reader: str) -> Page:
        """Up to `limit` messages after `cursor` (before it, newest first), read atomically with the
        stream position so that Subscribe can continue exactly where the page ends, and with whether
        `reader` may read the channel (one round trip)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            _read_access(pipe, channel, reader)
            if newest_first:
                pipe.zrevrangebylex(_zset(channel), f"({cursor}" if cursor else "+", "-", 0, limit)
            else:
                pipe.zrangebylex(_zset(channel), f"[{_after(cursor)}" if cursor else "-", "+", 0, limit)
            pipe.xrevrange(_stream(channel), "+", "-", 1)
            private, member, members, last = await pipe.execute()
        return Page([_entry(channel, m.decode()) for m in members], last[0][0].decode() if last else "0-0",
                    (bool(private), member == b"1"))

    async def stream_after(self, channel: str, stream_id: str, count: int) -> list[tuple[str, LogEntry]]:
        """Messages committed after `stream_id`, oldest first, with their stream ids."""
        rows = await self.redis.xrange(_stream(channel), f"({stream_id}", "+", count)
        if not rows:
            return []
        keys = await self.redis.hmget(_ids(channel), [fields[b"i"] for _, fields in rows])
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:  # the copy readers see now (an earlier copy may have replaced the first)
                pipe.zrangebylex(_zset(channel), b"[" + key + b"\x00", b"[" + key + b"\x01", 0, 1)
            members = await pipe.execute()
        return [(sid.decode(), _entry(channel, m[0].decode())) for (sid, _), m in zip(rows, members, strict=True)]

    async def stream_ids(self, channel: str, msg_ids: Collection[str], within: int = 1000) -> dict[str, str]:
        """The stream ids of these messages, found among the channel's last `within` stream entries."""
        wanted = set(msg_ids)
        rows = await self.redis.xrevrange(_stream(channel), "+", "-", within)
        return {msg_id: sid.decode() for sid, fields in rows if (msg_id := fields[b"i"].decode()) in wanted}

    async def stream_trimmed_past(self, channel: str, stream_id: str) -> bool:
        """True when entries after `stream_id` were already trimmed from the stream."""
        try:
            info = await self.redis.xinfo_stream(_stream(channel))
        except aioredis.ResponseError:  # no such stream: nothing was ever trimmed
            return False
        deleted = info.get("max-deleted-entry-id", b"0-0")
        deleted = deleted.decode() if isinstance(deleted, bytes) else str(deleted)
        return stream_id_key(deleted) > stream_id_key(stream_id)

    async def last_stream_id(self, channel: str) -> str:
        last = await self.redis.xrevrange(_stream(channel), "+", "-", 1)
        return last[0][0].decode() if last else "0-0"

    # pycrdt shards ------------------------------------------------------------------------------

    async def shard_updates(self, shard: str) -> tuple[bytes | None, list[bytes]]:
        """The shard's snapshot (None if it has none yet) and the updates since it."""
        updates_key, snap_key = _shard_keys(shard)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(snap_key)
            pipe.lrange(updates_key, 0, -1)
            snap, updates = await pipe.execute()
        return snap, updates

    async def compact_shard(self, shard: str, snapshot: bytes, covered: int) -> None:
        """Replace the first `covered` updates of the shard by `snapshot`, which includes them."""
        updates_key, snap_key = _shard_keys(shard)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(snap_key, snapshot)
            pipe.ltrim(updates_key, covered, -1)
            await pipe.execute()

    # Status -------------------------------------------------------------------------------------

    async def set_status(self, value: StatusValue, shipped: Shipped) -> tuple[StatusValue, bool]:
        """Merge `value` into the user's register, shipping it if it wins; return the winner and whether the
        register changed."""
        key = f"s:{value.user_id}"
        floor, *_, outbox = await self._beside(key)
        changed, (p, t, h, r) = await self._set_status(
            keys=[key, floor, outbox],
            args=[rank_key(value), value.presence, value.text, value.hlc, value.region, shipped.stamp,
                  shipped.payload])
        return StatusValue(value.user_id, int(p), t.decode(), h.decode(), r.decode()), bool(changed)

    async def status(self, user_id: str) -> StatusValue | None:
        p, t, h, r = await self.redis.hmget(f"s:{user_id}", "p", "t", "h", "r")
        return None if h is None else StatusValue(user_id, int(p), t.decode(), h.decode(), r.decode())

    # Users and claims ---------------------------------------------------------------------------

    async def claim(self, claim: Claim, shipped: Shipped) -> int:
        """Record a claim made here; 1: claimed, 0: this user claimed the name before, -1: another user did."""
        outcome = int(await self._claim(keys=await self._claim_keys(claim),
                                        args=[*_claim_args(claim), shipped.stamp, shipped.payload]))
        if outcome >= 0:
            await self._user_of(claim)
        return outcome

    async def add_claim(self, claim: Claim, shipped: Shipped) -> int:
        """Record a claim from another region (or decided by consensus); 0 if the claims on its name did not
        change, else how many users claim the name (more than one: a conflict)."""
        outcome = int(await self._add_claim(keys=await self._claim_keys(claim),
                                            args=[*_claim_args(claim), shipped.stamp, shipped.payload]))
        await self._user_of(claim)
        return outcome

    async def _claim_keys(self, claim: Claim) -> list[str]:
        key, user = f"n:{claim.name}", f"u:{claim.user_id}"
        floor, *_, outbox = await self._beside(key)
        # On one Redis the claim script creates the user too; on a cluster the user is in another slot.
        return [key, floor, outbox] + ([] if self.layout.cluster else [user, self.layout.copy(USERS, user)])

    async def _user_of(self, claim: Claim) -> None:
        """Cluster only: the user a claim names, created if new (idempotent: heals a crash after the claim)."""
        if self.layout.cluster:
            user = f"u:{claim.user_id}"
            floor, _, _, users, _ = await self._beside(user)
            await self._add_user(keys=[user, users, floor], args=_claim_args(claim))

    async def claims_on(self, name: str) -> list[Claim]:
        return _claims(name, await self.redis.hgetall(f"n:{name}"))

    async def user_name(self, user_id: str) -> str | None:
        name = await self.redis.hget(f"u:{user_id}", "name")
        return None if name is None else name.decode()

    # Private channels ---------------------------------------------------------------------------

    async def create_channel(self, record: Claim, shipped: Shipped) -> int:
        """Record a private channel created here, its creator a member (stamped with the record's hlc);
        1: created, 0: the channel is private already, -1: it holds public messages here."""
        ch, user = record.name, record.user_id
        member = MemberValue(ch, user, True, record.hlc, record.region)
        floor, *_, outbox = await self._beside(_records(ch))
        outcome = await self._create_channel(
            keys=[_records(ch), floor, _ids(ch), _member_key(ch, user), _member_index(ch), outbox],
            args=[user, record.hlc, record.region, rank_key(member), shipped.stamp, shipped.payload])
        return int(outcome)

    async def add_channel(self, record: Claim, shipped: Shipped) -> int:
        """Record a private channel from another region; 0 if the channel's records did not change,
        else how many users created it (more than one: a conflict)."""
        floor, *_, outbox = await self._beside(_records(record.name))
        return int(await self._add_channel(keys=[_records(record.name), floor, outbox],
                                           args=[record.user_id, record.hlc, record.region, shipped.stamp,
                                                 shipped.payload]))

    async def channel_records(self, channel: str) -> list[Claim]:
        return _claims(channel, await self.redis.hgetall(_records(channel)))

    async def set_member(self, value: MemberValue, shipped: Shipped) -> tuple[MemberValue, bool]:
        """Merge `value` into the membership register, shipping it if it wins; return the winner and whether
        it changed."""
        ch, user = value.channel, value.user_id
        floor, *_, outbox = await self._beside(_member_index(ch))
        changed, fields = await self._set_member(
            keys=[_member_key(ch, user), floor, _member_index(ch), outbox],
            args=[rank_key(value), int(value.member), value.hlc, value.region, user, shipped.stamp,
                  shipped.payload])
        return _member_value(ch, user, fields), bool(changed)  # type: ignore[return-value]

    async def member(self, channel: str, user_id: str) -> MemberValue | None:
        return _member_value(channel, user_id, await self.redis.hmget(_member_key(channel, user_id), "v", "h", "r"))

    async def access(self, channel: str, user_id: str) -> tuple[bool, bool]:
        """(whether the channel is private, whether the user is a member), read together."""
        async with self.redis.pipeline(transaction=True) as pipe:
            _read_access(pipe, channel, user_id)
            private, member = await pipe.execute()
        return bool(private), member == b"1"

    async def members(self, channel: str) -> list[MemberValue]:
        """Every membership register of the channel, removed users' included."""
        users = sorted(u.decode() for u in await self.redis.smembers(_member_index(channel)))
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.hmget(_member_key(channel, user), "v", "h", "r")
            rows = await pipe.execute()
        return [v for u, row in zip(users, rows, strict=True) if (v := _member_value(channel, u, row)) is not None]

    async def channels(self) -> AsyncIterator[Claim]:
        """Every private channel record."""
        async for channel, raw in self._scan_read("pc:*", "hgetall"):
            for record in _claims(channel.strip("{}"), raw):
                yield record

    async def memberships(self) -> AsyncIterator[MemberValue]:
        async for suffix, row in self._scan_read("cm:*", "hmget", "v", "h", "r"):
            channel, _, user = suffix.partition("}:")
            if (value := _member_value(channel.lstrip("{"), user, row)) is not None:
                yield value

    # Consensus --------------------------------------------------------------------------------

    async def acceptor_step(self, key: str, step: Callable[[str | None], tuple[str, T]]) -> T:
        """Run `step` on the stored Paxos acceptor state of `key` and store the state it returns, as one
        atomic change (optimistic: run again if the state changed meanwhile). Returns `step`'s answer."""
        name = f"px:{key}"
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(name)
                    raw = await pipe.get(name)
                    state, answer = step(None if raw is None else raw.decode())
                    pipe.multi()
                    pipe.set(name, state)
                    await pipe.execute()
                    break
                except redis.exceptions.WatchError:
                    continue
        # A promise must outlive a crash of the host too: wait until the AOF is on disk (Redis >= 7.2),
        # on the node that holds the key.
        where = {"target_nodes": self.redis.get_node_from_key(name)} if self.layout.cluster else {}
        try:
            await self.redis.execute_command("WAITAOF", 1, 0, 1000, **where)
        except redis.exceptions.ResponseError:
            pass  # an older server (or AOF off): as durable as its other writes
        return answer

    async def term(self) -> tuple[str, int]:
        """single-leader mode: the term this region follows, encoded ("" before the first change), and
        the latest epoch it voted for."""
        term, voted = await self.redis.hmget(self.layout.meta("term"), ["term", "voted"])
        return (term.decode() if term else ""), int(voted or 0)

    async def save_term(self, term: str, voted: int) -> None:
        """Store the term followed ("EPOCH PRIMARY") and the epoch voted for, each unless a later one is stored."""
        await self._save_term(keys=[self.layout.meta("term")], args=[term, voted])

    # Region-wide --------------------------------------------------------------------------------

    async def shard_states(self) -> dict[str, bytes]:
        """Every shard held here, with its pycrdt state vector."""
        states: dict[str, bytes] = {}
        for row in await self._read_all("hgetall", await self._copies(SHARDS)):
            states.update((k.decode(), v) for k, v in row.items())
        return states

    async def load_members(self) -> tuple[dict[str, str], set[str], set[str]]:
        """(region -> address of the members, regions that left, regions known to count this one in)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.layout.meta("members"))
            pipe.smembers(self.layout.meta("departed"))
            pipe.smembers(self.layout.meta("listed-by"))
            members, departed, listed_by = await pipe.execute()
        return ({k.decode(): v.decode() for k, v in members.items()}, {d.decode() for d in departed},
                {r.decode() for r in listed_by})

    async def save_listed_by(self, region: str) -> None:
        await self.redis.sadd(self.layout.meta("listed-by"), region)

    async def save_member(self, region: str, address: str) -> None:
        await self.redis.hset(self.layout.meta("members"), region, address)

    async def save_departure(self, region: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.layout.meta("members"), region)
            pipe.sadd(self.layout.meta("departed"), region)
            await pipe.execute()

    # Outbox ------------------------------------------------------------------------------------

    async def outbox_epoch(self) -> str:
        """The name of this outbox, made at its first use: a Redis that lost its data, or got it from a
        backup, starts a new one (`backup` leaves it out), and peers' cursors of the old one are void."""
        key = self.layout.meta("epoch")
        await self.redis.set(key, secrets.token_hex(8), nx=True)
        return (await self.redis.get(key)).decode()

    async def outbox_since(self, after: bytes, chunk: int = 500) -> AsyncIterator[bytes]:
        """Every outbox entry above `after` (an entry, or `past(stamp)`), oldest first; `split_entry` reads them
        (a fence's payload is empty). On a cluster the copies are merged, each read a chunk at a time as the
        merge reaches its end, so that a page costs about one chunk however many copies there are."""
        copies = await self._copies(OUTBOX)
        first = max(1, chunk // len(copies))  # then `chunk` from each copy the merge reaches the end of
        chunks = await self._read_all("zrangebylex", copies, b"(" + after, b"+", 0, first)
        asked = [first] * len(copies)
        heads = [(row[0], i, 0) for i, row in enumerate(chunks) if row]
        heapq.heapify(heads)
        while heads:
            entry, i, at = heapq.heappop(heads)
            yield entry
            at += 1
            if at == len(chunks[i]) == asked[i]:  # that copy may hold more
                asked[i] = chunk
                chunks[i], at = await self.redis.zrangebylex(copies[i], b"(" + entry, b"+", 0, chunk), 0
            if at < len(chunks[i]):
                heapq.heappush(heads, (chunks[i][at], i, at))

    async def resolve(self, stamps: list[str]) -> list[tuple[str, bytes]]:
        """The outbox entries stamped with any of `stamps` (writes whose outcome is in doubt), as (stamp,
        payload); a stamp with none is fenced first, in every copy, so that its write never stores anything."""
        copies = await self._copies(OUTBOX)  # a write's entries are all in one copy, the one beside its keys
        found: list[tuple[str, bytes]] = []
        if len(copies) > 1:  # find first, so that copies without a write's entries are not fenced for it
            for copy in copies:
                found += [split_entry(m) for m in await self._resolve(keys=[copy], args=[0, *stamps])]
        missing = sorted(set(stamps) - {stamp for stamp, _ in found})
        for copy in copies if missing else ():
            found += [split_entry(m) for m in await self._resolve(keys=[copy], args=[1, *missing])]
        return sorted(found)

    async def outbox_trimmed(self) -> str:
        """The highest stamp trimmed from the outbox ("" if none): a cursor below it cannot resume."""
        return max((v.decode() for v in await self._read_all("get", await self._copies(TRIMMED)) if v), default="")

    async def trim_outbox(self, held_by_all: str, keep: int) -> int:
        """Trim the outbox entries stamped at or below `held_by_all` ("": none), then the oldest past `keep`
        (in each copy on a cluster, those with entries, a few at a time); return the entries left."""
        copies = await self._copies(OUTBOX)
        held = [copy for copy, size in zip(copies, await self._read_all("zcard", copies), strict=True) if size]
        left = 0
        for start in range(0, len(held), 32):
            left += sum(await asyncio.gather(*(
                self._trim_outbox(keys=[copy, self.layout.copy(TRIMMED, copy)], args=[held_by_all, keep])
                for copy in held[start:start + 32])))
        return left

    async def load_cursors(self) -> dict[str, str]:
        """region -> how far this region holds that peer's outbox ("EPOCH:STAMP")."""
        return {k.decode(): v.decode() for k, v in (await self.redis.hgetall(self.layout.meta("cursors"))).items()}

    async def save_cursors(self, cursors: dict[str, str]) -> None:
        if cursors:
            await self.redis.hset(self.layout.meta("cursors"), mapping=cursors)

    async def load_vector(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in (await self.redis.hgetall(self.layout.meta("vector"))).items()}

    async def save_vector(self, vector: dict[str, str]) -> None:
        if vector:
            await self.redis.hset(self.layout.meta("vector"), mapping=vector)

    async def _read_all(self, read: str, keys: list[Any], *fields: Any) -> list[Any]:
        """`read` of each key, in one pipeline (on a cluster, one round trip per node)."""
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                getattr(pipe, read)(key, *fields)
            return list(await pipe.execute())

    async def _scan_read(self, pattern: str, read: str, *fields: str) -> AsyncIterator[tuple[str, Any]]:
        """(key suffix, value) for every key matching `pattern` (on every node of a cluster), read
        with `read` a page at a time: one round trip per page, not per key."""
        page: list[bytes] = []
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            page.append(key)
            if len(page) < 1000:
                continue
            for k, value in zip(page, await self._read_all(read, page, *fields), strict=True):
                yield k.decode()[len(pattern) - 1:], value
            page = []
        for k, value in zip(page, await self._read_all(read, page, *fields), strict=True):
            yield k.decode()[len(pattern) - 1:], value

    async def statuses(self) -> AsyncIterator[StatusValue]:
        async for user_id, (p, t, h, r) in self._scan_read("s:*", "hmget", "p", "t", "h", "r"):
            if h is not None:
                yield StatusValue(user_id, int(p), t.decode(), h.decode(), r.decode())

    async def claims(self) -> AsyncIterator[Claim]:
        async for name, raw in self._scan_read("n:*", "hgetall"):
            for claim in _claims(name, raw):
                yield claim

    async def raise_clock_floor(self, hlc: str) -> None:
        floor, *_ = await self._beside(COPIES)
        await self._raise_floor(keys=[floor], args=[hlc])

    async def clock_floor(self) -> str:
        """The largest hlc issued here (the largest of its copies on a cluster)."""
        values = await self._read_all("get", await self._copies(FLOOR))
        return max((v.decode() for v in values if v), default="")

    async def _channel_names(self) -> list[str]:
        return sorted({c.decode() for row in await self._read_all("smembers", await self._copies(CHANNELS))
                       for c in row})

    async def counts(self) -> tuple[int, int, int]:
        """(users, channels, messages)."""
        channels = await self._channel_names()
        users = sum(await self._read_all("scard", await self._copies(USERS)))
        sizes = await self._read_all("zcard", [_zset(ch) for ch in channels])
        return int(users), len(channels), sum(sizes)

    async def messages(self) -> AsyncIterator[LogEntry]:
        """Every message (the copy readers see), for the state digest."""
        for ch in await self._channel_names():
            for member in await self.redis.zrange(_zset(ch), 0, -1):
                yield _entry(ch, member.decode())


def parse_stream_id(text: str) -> str:
    """Validate a stream id (`ms-seq`); raise ValueError if it is not one."""
    ms, sep, seq = text.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit() and len(ms) <= 20 and len(seq) <= 20):
        raise ValueError(f"not a stream position: {text[:40]!r}")
    return f"{int(ms)}-{int(seq)}"


def past(stamp: str) -> bytes:
    """Below every outbox entry stamped after `stamp`, above every other one."""
    return stamp.encode() + b"\x01"


def split_entry(member: bytes) -> tuple[str, bytes]:
    """An outbox entry as (stamp, payload)."""
    stamp, _, payload = member.partition(b"\x00")
    return stamp.decode(), payload


def _claim_args(claim: Claim) -> list[str]:
    return [claim.user_id, claim.hlc, claim.region, claim.name]


def _claims(name: str, raw: dict[bytes, bytes]) -> list[Claim]:
    claims = []
    for user_id, value in raw.items():
        hlc, region = value.decode().split("\x00")
        claims.append(Claim(hlc, region, user_id.decode(), name))
    return claims


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """A stream id as a tuple that sorts in stream order."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
