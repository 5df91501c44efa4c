"""Backup and restore of a region's Redis, taken while the region serves.

Why reading key by key is consistent enough. A region's state only grows (message shards, claims,
channel records are unions; statuses and memberships are registers that only move to a later stamp),
and every change from a peer is applied idempotently. So a backup that reads different keys at
slightly different moments is still a state the region could have been in, provided that no key
claims more than the keys it describes hold. Three kinds of key, read in this order:

1. Summaries, read first (and together, on one Redis): `meta:vector` (what the region holds of each
   origin), `meta:hlc` (the clock floor, which is also the region's own entry of that vector) and
   `shards` (each shard's pycrdt state vector). They are what the region tells peers it holds, and peers send
   only what lies past them; read before the data they may claim less than it holds (a peer then
   sends some changes again, which apply as no-ops), never more (a change no peer would ever send).
2. Data, the rest. The keys of one channel share a hash tag and are read in one MULTI, so a shard's
   snapshot and the updates after it (compaction rewrites both), and the page index, dedup hash and
   stream written with them by one script, come from one moment.
3. Indexes, read last: `u:*` users (created with their first claim in `n:*`) and the `users` and
   `channels` sets. Read after the data, each covers all of it: no claim without its user, no channel
   left out of the digest.

On Redis Cluster (`keys.py`) the same order holds across primaries: SCAN visits every primary, a
channel's keys are in one slot and still read in one MULTI, and the region-wide keys are read in their
phase, every copy of each: the summaries' copies of the tags listed in `meta:copies` when the backup
starts (one primary after another, all before any data: each can only claim less than the data read
after it), the indexes' copies of the tags listed once the data is read (a tag is listed before its
first copy is written, so they cover every slot the data came from), with `meta:copies` itself. A
claim and the user it creates are two scripts there, the user second, and still read after the claim:
a claim without its user is one the region itself held so (a crash between the two), healed the same
way, by the next retry or copy of the claim.

The outbox (`outbox`, `outbox:trimmed`, `meta:epoch`) and the cursors of peers' outboxes
(`meta:cursors`) are left out: a restored region starts a new outbox, which voids every peer's cursor of
the old one, and compares states with each peer once, as it would with no cursor at all. Stamps it makes
after the restore may be below ones it made before the loss, so no cursor of the old outbox may be
trusted.

A restored region holds all of this; what it missed since (its own writes after the backup included,
if they reached a peer) arrives by replication when its leader starts and peers compare states. Its
clock restarts from the floor in the backup and the wall clock: the wall clock is past every stamp
the region made before the loss unless the clock of its machine is behind the old one's.

The file: a header line, which also says whether the keys are named for one Redis or for a cluster
(a backup is restored only into the same kind: the two name and split the region-wide keys
differently); then records (4-byte big-endian lengths: key, Redis DUMP payload); then an empty key
whose value is the record count, so a truncated file is refused rather than half restored.
"""

from __future__ import annotations

import enum
import gzip
import io
import itertools
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from mlchat.errors import FailedPrecondition, InvalidArgument
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
    single_name,
)
from mlchat.leader.server import CLUSTER_SCHEME, SENTINEL_SCHEME, SentinelUrl

HEADER = b"mlchat-backup 1\n"  # keys named for one Redis
CLUSTER_HEADER = b"mlchat-backup 1 cluster\n"  # keys named for a Redis Cluster
# The region-wide keys read first and last, by their names on one Redis (`keys.single_name`).
SUMMARY_KEYS = ("meta:vector", FLOOR, SHARDS)
INDEX_KEYS = (USERS, CHANNELS, COPIES)
INDEX_PATTERN = b"u:*"
LEFT_OUT = (OUTBOX, TRIMMED, "meta:epoch", "meta:cursors")  # a restored region starts a new outbox
_LENGTH = struct.Struct(">I")
_BATCH = 500  # keys a round trip


class Phase(enum.IntEnum):
    SUMMARY = 0
    DATA = 1
    INDEX = 2
    LEFT_OUT = 3


def phase(key: bytes) -> Phase:
    """When `key`, named for one Redis or for a cluster, is read."""
    name = single_name(key.decode(errors="surrogateescape"))
    if name in SUMMARY_KEYS:
        return Phase.SUMMARY
    if name in LEFT_OUT:
        return Phase.LEFT_OUT
    if name in INDEX_KEYS or key.startswith(INDEX_PATTERN[:-1]):
        return Phase.INDEX
    return Phase.DATA


def hash_tag(key: bytes) -> bytes | None:
    """The key's hash tag as Redis Cluster reads it (`{...}`, not empty), or None."""
    start = key.find(b"{")
    end = key.find(b"}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else None


def data_groups(keys: Iterable[bytes]) -> list[list[bytes]]:
    """Data keys in the groups they are read in: each hash tag's keys together (one MULTI); the
    untagged keys (claims, statuses), whose writes touch one key each apart from the indexes, in batches."""
    tagged: dict[bytes, list[bytes]] = {}
    loose: list[bytes] = []
    for key in sorted(k for k in keys if phase(k) is Phase.DATA):
        tag = hash_tag(key)
        if tag is None:
            loose.append(key)
        else:
            tagged.setdefault(tag, []).append(key)
    return [*tagged.values(), *(loose[i:i + _BATCH] for i in range(0, len(loose), _BATCH))]


class BackupError(FailedPrecondition):
    """A backup could not be taken or restored (the message says why and what to do)."""


def encode_record(key: bytes, value: bytes) -> bytes:
    return _LENGTH.pack(len(key)) + key + _LENGTH.pack(len(value)) + value


def header(layout: Layout) -> bytes:
    return CLUSTER_HEADER if layout.cluster else HEADER


def read_header(stream: io.BufferedIOBase) -> bool:
    """Read a backup file's header: True if its keys are named for a Redis Cluster, False for one Redis."""
    line = stream.readline(len(CLUSTER_HEADER))
    if line not in (HEADER, CLUSTER_HEADER):
        raise InvalidArgument("not an mlchat backup (wrong header)")
    return line == CLUSTER_HEADER


def read_records(stream: io.BufferedIOBase) -> Iterator[tuple[bytes, bytes]]:
    """The (key, DUMP payload) records that follow the header; raises InvalidArgument if the file is
    not a whole backup."""
    count = 0
    while True:
        key = _read_sized(stream)
        value = _read_sized(stream)
        if not key:
            if int(value) != count:
                raise InvalidArgument(f"backup holds {count} records but its trailer says {int(value)}")
            return
        count += 1
        yield key, value


def _read_sized(stream: io.BufferedIOBase) -> bytes:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise InvalidArgument("backup file is truncated (no trailer): take it again")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise InvalidArgument("backup file is truncated: take it again")
    return data


# I/O -------------------------------------------------------------------------------------------

Client = redis.Redis | RedisCluster


def connect(url: str) -> Client:
    """A client for a region's Redis URL: `redis+cluster://` names any one node of a Redis Cluster
    (the client finds the others and the slot map), `redis+sentinel://` the Sentinels that name the
    primary (the client asks them), any other URL one server."""
    try:
        if url.startswith(CLUSTER_SCHEME):
            return RedisCluster.from_url("redis://" + url.removeprefix(CLUSTER_SCHEME))
        if url.startswith(SENTINEL_SCHEME):
            where = SentinelUrl.parse(url)
            sentinels = Sentinel(where.sentinels, sentinel_kwargs={"password": where.sentinel_password,
                                                                   "socket_timeout": 1.0})
            return sentinels.master_for(where.service, password=where.password)
        return redis.Redis.from_url(url)
    except ValueError as e:  # the URL itself is not repeated: it holds a password
        raise BackupError(f"--redis is not a Redis URL mlchat reads ({e})") from None


def layout_of(client: Client) -> Layout:
    return ClusterLayout() if isinstance(client, RedisCluster) else SingleLayout()


def take(client: Client, out: Path) -> int:
    """Write the state of the region whose Redis (or Redis Cluster) is `client` to `out` (gzip);
    return the key count. The file appears only once complete."""
    partial = out.with_name(out.name + ".partial")
    layout = layout_of(client)
    count = 0
    try:
        with gzip.open(partial, "wb", compresslevel=6) as f:
            f.write(header(layout))
            for key, value in _dumps(client, layout):
                f.write(encode_record(key, value))
                count += 1
            f.write(encode_record(b"", str(count).encode()))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return count


def _dumps(client: Client, layout: Layout) -> Iterator[tuple[bytes, bytes]]:
    # One MULTI can read keys of several slots only on one Redis; on a cluster each summary or index
    # copy is read alone, which the order of the phases makes enough (module docstring).
    one_redis = not layout.cluster
    yield from _read(client, _region_wide(client, layout, SUMMARY_KEYS), together=one_redis)
    keys = [k for k in client.scan_iter(count=1000) if phase(k) is Phase.DATA]
    for group in data_groups(keys):
        yield from _read(client, group, together=one_redis or hash_tag(group[0]) is not None)
    # A fresh scan: a user created by a claim the data phase read was created before that read.
    users = list(client.scan_iter(match=INDEX_PATTERN, count=1000))
    for i in range(0, len(users), _BATCH):
        yield from _read(client, users[i:i + _BATCH], together=one_redis)
    yield from _read(client, _region_wide(client, layout, INDEX_KEYS), together=one_redis)


def _region_wide(client: Client, layout: Layout, names: Iterable[str]) -> list[bytes]:
    """Every key (every copy, on a cluster) of the region-wide keys `names`, as listed now."""
    tags = {t.decode() for t in client.smembers(COPIES)} if layout.cluster else set()
    return [key.encode() for name in names for key in layout.every(name, tags)]


def _read(client: Client, keys: list[bytes], together: bool) -> Iterator[tuple[bytes, bytes]]:
    """(key, DUMP payload) of each key, in one round trip (per primary, on a cluster); `together`:
    at one moment, in one MULTI (the keys must then be in one slot on a cluster)."""
    if not keys:
        return
    with client.pipeline(transaction=together) as pipe:
        for key in keys:
            pipe.dump(key)
        values = pipe.execute()
    # A key gone since the scan (an emptied update list) has nothing to restore.
    yield from ((k, v) for k, v in zip(keys, values, strict=True) if v is not None)


def restore(client: Client, src: Path) -> int:
    """Load the backup `src` into the empty Redis (or Redis Cluster) `client`; return the key count.
    Refuses a Redis that holds any key (a region's state is restored whole or not at all), and a
    backup whose keys are named for the other kind."""
    layout = layout_of(client)
    where = {"target_nodes": RedisCluster.PRIMARIES} if layout.cluster else {}
    held = client.dbsize(**where)
    if held:
        raise BackupError(f"the target Redis holds {held} keys: restore only into an empty one (a fresh "
                          "server, or FLUSHALL it if you mean to replace what it holds), with no leader running on it")
    try:  # the whole file is checked before any key is loaded
        with gzip.open(src, "rb") as f:
            from_cluster = read_header(f)
            total = sum(1 for _ in read_records(f))
    except (OSError, EOFError) as e:
        raise InvalidArgument(f"{src} is not a readable backup: {e}") from None
    if from_cluster != layout.cluster:
        kinds = ("one Redis", "a Redis Cluster") if layout.cluster else ("a Redis Cluster", "one Redis")
        raise BackupError(
            f"{src} was taken from a region on {kinds[0]} and the target is {kinds[1]}: the two keep the "
            "region-wide keys (clock floor, shard vectors, user and channel sets) differently, one key each on "
            "one Redis, a copy per slot on a cluster, so these keys would make a broken region there. Restore "
            f"into {kinds[0]}; to move a region onto {kinds[1]}, start its leader there on empty storage with "
            "--join: its peers send it everything")
    with gzip.open(src, "rb") as f:
        read_header(f)
        records = read_records(f)
        while batch := list(itertools.islice(records, _BATCH)):
            # Not one MULTI: on a cluster the pipeline sends each key to the primary of its slot.
            with client.pipeline(transaction=False) as pipe:
                for key, value in batch:
                    pipe.restore(key, 0, value)
                pipe.execute()
    return total
