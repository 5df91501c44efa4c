"""Grow-only message log on pycrdt.

A channel's history is split into shards, one per (channel, time bucket); each shard is a pycrdt
`Doc` whose root `Map "log"` maps an entry's `order_key` = (hlc, origin region, message id) to the
entry. Keys are written once and never change, so concurrent writers never conflict on a key, and
merging shards is a plain union: `apply` is idempotent, commutative and relays through third replicas
unchanged (pycrdt's update semantics).

The message id is derived from (user, channel, client_msg_id). A region accepts an id once; if a client
retry was accepted by two regions before either saw the other, the log holds two copies of the message
(possibly in two shards), and readers keep the copy with the smallest order key (`winner`), which every
region agrees on.

Each live Doc needs a client id of its own; two live docs sharing one diverge silently, so the caller
passes a fresh random one at every process start (this module owns no randomness).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from pycrdt import Doc, Map, MapEvent

from mlchat.crdt.hlc import ENCODED_LENGTH as HLC_LENGTH
from mlchat.crdt.hlc import Hlc, is_encoded_hlc

ROOT = "log"
EMPTY_UPDATE = b"\x00\x00"  # an update that changes nothing
ID_LENGTH = 16
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # made once: not per call


def message_id(user_id: str, channel: str, client_msg_id: str) -> str:
    """The deterministic id of a message: the same request always names the same message."""
    raw = "\x00".join((user_id, channel, client_msg_id)).encode()
    return hashlib.blake2b(raw, digest_size=ID_LENGTH // 2).hexdigest()


def shard_name(channel: str, hlc: str, bucket_ms: int) -> str:
    """The shard holding a message: its channel and the time bucket of its hlc."""
    return f"{channel}/{Hlc.decode(hlc).wall_ms // bucket_ms}"


def split_shard_name(name: str) -> tuple[str, int]:
    """(channel, bucket) of a shard name."""
    channel, bucket = name.rsplit("/", 1)
    return channel, int(bucket)


@dataclass(frozen=True, slots=True)
class LogEntry:
    id: str
    channel: str
    user_id: str
    body: str
    client_msg_id: str
    hlc: str
    region: str

    @property
    def order_key(self) -> str:
        """Sorts entries in read order; a fixed-width hlc first, then region, then id."""
        return order_key(self.hlc, self.region, self.id)

    @property
    def payload(self) -> str:
        """What the order key and the channel do not already say."""
        return _compact_json([self.user_id, self.body, self.client_msg_id])

    @classmethod
    def from_parts(cls, channel: str, key: str, payload: str) -> LogEntry:
        hlc, region, msg_id = split_order_key(key)
        user_id, body, client_msg_id = json.loads(payload)
        return cls(msg_id, channel, user_id, body, client_msg_id, hlc, region)


def winner(a: LogEntry | None, b: LogEntry) -> LogEntry:
    """Of two copies of one message, the one every region keeps."""
    return b if a is None or b.order_key < a.order_key else a


def order_key(hlc: str, region: str, msg_id: str) -> str:
    # NUL ends the region so that a region name sorts before any longer name it prefixes.
    return f"{hlc}{region}\x00{msg_id}"


def split_order_key(key: str) -> tuple[str, str, str]:
    """(hlc, region, message id) of an order key; ValueError if it is not one."""
    hlc, (region, sep, msg_id) = key[:HLC_LENGTH], key[HLC_LENGTH:].partition("\x00")
    if not (is_encoded_hlc(hlc) and region and sep and len(msg_id) == ID_LENGTH):
        raise ValueError(f"not an order key: {key[:80]!r}")
    return hlc, region, msg_id


class MessageShard:
    """One shard of a channel's log: local adds, remote updates, deltas and snapshots."""

    def __init__(self, channel: str, client_id: int, updates: Iterable[bytes] = ()) -> None:
        self.channel = channel
        self._doc: Doc = Doc(client_id=client_id)
        # Created once and never nested: concurrent creation of nested maps loses a side.
        self._log: Map = self._doc.get(ROOT, type=Map)
        for update in updates:
            self._doc.apply_update(update)

    def __len__(self) -> int:
        return len(self._log)

    def add(self, entries: Iterable[LogEntry]) -> bytes:
        """Add local entries in one transaction; return the update to persist and ship: the transaction's
        own, which costs the same whatever the shard's size (`get_update(before)` grows with it)."""
        updates: list[bytes] = []
        subscription = self._doc.observe(lambda event: updates.append(event.update))
        try:
            with self._doc.transaction(origin="local"):
                for entry in entries:
                    self._log[entry.order_key] = entry.payload
        finally:
            self._doc.unobserve(subscription)
        return updates[0] if updates else EMPTY_UPDATE  # one transaction: one update, if it changed anything

    def apply(self, update: bytes) -> list[LogEntry]:
        """Apply a remote update (or a delta, or a snapshot); return the entries it added."""
        added: list[LogEntry] = []

        def collect(event: MapEvent) -> None:
            for key, change in event.keys.items():
                if change["action"] == "add":
                    added.append(LogEntry.from_parts(self.channel, key, change["newValue"]))

        subscription = self._log.observe(collect)
        try:
            self._doc.apply_update(update)
        finally:
            self._log.unobserve(subscription)
        return added

    def state_vector(self) -> bytes:
        return self._doc.get_state()

    def delta_since(self, state_vector: bytes) -> bytes:
        """What a replica with `state_vector` is missing."""
        return self._doc.get_update(state_vector)

    def snapshot(self) -> bytes:
        return self._doc.get_update()

    def entries(self) -> list[LogEntry]:
        """All entries in read order."""
        return [LogEntry.from_parts(self.channel, key, self._log[key]) for key in sorted(self._log.keys())]
