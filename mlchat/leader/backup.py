"""Backup and restore of a region's Redis, taken while the region serves.

Why reading key by key is consistent enough. A region's state only grows (message shards, claims,
channel records are unions; statuses and memberships are registers that only move to a later stamp),
and every change from a peer is applied idempotently. So a backup that reads different keys at
slightly different moments is still a state the region could have been in, provided that no key
claims more than the keys it describes hold. Three kinds of key, read in this order:

1. Summaries, read first and together: `meta:vector` (what the region holds of each origin),
   `meta:hlc` (the clock floor, which is also the region's own entry of that vector) and `shards`
   (each shard's pycrdt state vector). They are what the region tells peers it holds, and peers send
   only what lies past them; read before the data they may claim less than it holds (a peer then
   sends some changes again, which apply as no-ops), never more (a change no peer would ever send).
2. Data, the rest. The keys of one channel share a hash tag and are read in one MULTI, so a shard's
   snapshot and the updates after it (compaction rewrites both), and the page index, dedup hash and
   stream written with them by one script, come from one moment.
3. Indexes, read last: `u:*` users (created with their first claim in `n:*`) and the `users` and
   `channels` sets. Read after the data, each covers all of it: no claim without its user, no channel
   left out of the digest.

A restored region holds all of this; what it missed since (its own writes after the backup included,
if they reached a peer) arrives by replication when its leader starts and peers compare states. Its
clock restarts from the floor in the backup and the wall clock: the wall clock is past every stamp
the region made before the loss unless the clock of its machine is behind the old one's.

The file: a header line, then records (4-byte big-endian lengths: key, Redis DUMP payload), then an
empty key whose value is the record count, so a truncated file is refused rather than half restored.
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

from mlchat.errors import FailedPrecondition, InvalidArgument

HEADER = b"mlchat-backup 1\n"
SUMMARY_KEYS = (b"meta:vector", b"meta:hlc", b"shards")
INDEX_KEYS = (b"users", b"channels")
INDEX_PATTERN = b"u:*"
_LENGTH = struct.Struct(">I")
_BATCH = 500  # keys a round trip


class Phase(enum.IntEnum):
    SUMMARY = 0
    DATA = 1
    INDEX = 2


def phase(key: bytes) -> Phase:
    if key in SUMMARY_KEYS:
        return Phase.SUMMARY
    if key in INDEX_KEYS or key.startswith(INDEX_PATTERN[:-1]):
        return Phase.INDEX
    return Phase.DATA


def hash_tag(key: bytes) -> bytes | None:
    """The key's hash tag as Redis Cluster reads it (`{...}`, not empty), or None."""
    start = key.find(b"{")
    end = key.find(b"}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else None


def data_groups(keys: Iterable[bytes]) -> list[list[bytes]]:
    """Data keys in the groups they are read in: each hash tag's keys together (one MULTI); the
    region-wide keys, whose writes touch one key each apart from the indexes, in batches."""
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


def read_records(stream: io.BufferedIOBase) -> Iterator[tuple[bytes, bytes]]:
    """The (key, DUMP payload) records of a backup file; raises InvalidArgument if it is not a whole one."""
    if stream.read(len(HEADER)) != HEADER:
        raise InvalidArgument("not an mlchat backup (wrong header)")
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


def take(client: redis.Redis, out: Path) -> int:
    """Write the state of the region whose Redis is `client` to `out` (gzip); return the key count.
    The file appears only once complete."""
    partial = out.with_name(out.name + ".partial")
    count = 0
    try:
        with gzip.open(partial, "wb", compresslevel=6) as f:
            f.write(HEADER)
            for key, value in _dumps(client):
                f.write(encode_record(key, value))
                count += 1
            f.write(encode_record(b"", str(count).encode()))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return count


def _dumps(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    yield from _read_together(client, list(SUMMARY_KEYS))
    keys = [k for k in client.scan_iter(count=1000) if phase(k) is Phase.DATA]
    for group in data_groups(keys):
        yield from _read_together(client, group)
    # A fresh scan: a user created by a claim the data phase read was created before that read.
    users = list(client.scan_iter(match=INDEX_PATTERN, count=1000))
    for i in range(0, len(users), _BATCH):
        yield from _read_together(client, users[i:i + _BATCH])
    yield from _read_together(client, list(INDEX_KEYS))


def _read_together(client: redis.Redis, keys: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    with client.pipeline(transaction=True) as pipe:
        for key in keys:
            pipe.dump(key)
        values = pipe.execute()
    # A key gone since the scan (an emptied update list) has nothing to restore.
    yield from ((k, v) for k, v in zip(keys, values, strict=True) if v is not None)


def restore(client: redis.Redis, src: Path) -> int:
    """Load the backup `src` into the empty Redis `client`; return the key count. Refuses a Redis that
    holds any key: a region's state is restored whole or not at all."""
    held = client.dbsize()
    if held:
        raise BackupError(f"the target Redis holds {held} keys: restore only into an empty one (a fresh "
                          "server, or FLUSHALL it if you mean to replace what it holds), with no leader running on it")
    try:  # the whole file is checked before any key is loaded
        with gzip.open(src, "rb") as f:
            total = sum(1 for _ in read_records(f))
    except (OSError, EOFError) as e:
        raise InvalidArgument(f"{src} is not a readable backup: {e}") from None
    with gzip.open(src, "rb") as f:
        records = read_records(f)
        while batch := list(itertools.islice(records, _BATCH)):
            with client.pipeline(transaction=False) as pipe:
                for key, value in batch:
                    pipe.restore(key, 0, value)
                pipe.execute()
    return total
