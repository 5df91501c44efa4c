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

from mlchat.crdt.hlc import Hlc

ROOT = "log"
ID_LENGTH = 16


def message_id(user_id: str, channel: str, client_msg_id: str) -> str:
    """The deterministic id of a message: the same request always names the same message."""
    raw = "\x00".join((user_id, channel, client_msg_id)).encode()
    return hashlib.blake2b(raw, digest_size=ID_LENGTH // 2).hexdigest()


def shard_name(channel: str, hlc: str, bucket_ms: int) -> str:
    """The shard holding a message: its channel and the time bucket of its hlc."""
    return f"{channel}/{Hlc.decode(hlc).wall_ms // bucket_ms}"


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

    def encode(self) -> str:
        return json.dumps(
            [self.id, self.channel, self.user_id, self.body, self.client_msg_id, self.hlc, self.region],
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def decode(cls, text: str) -> LogEntry:
        return cls(*json.loads(text))


def winner(a: LogEntry | None, b: LogEntry) -> LogEntry:
    """Of two copies of one message, the one every region keeps."""
    return b if a is None or b.order_key < a.order_key else a


def order_key(hlc: str, region: str, msg_id: str) -> str:
    # NUL ends the region so that a region name sorts before any longer name it prefixes.
    return f"{hlc}{region}\x00{msg_id}"


class MessageShard:
    """One shard of a channel's log: local adds, remote updates, deltas and snapshots."""

    def __init__(self, client_id: int, updates: Iterable[bytes] = ()) -> None:
        self._doc: Doc = Doc(client_id=client_id)
        # Created once and never nested: concurrent creation of nested maps loses a side.
        self._log: Map = self._doc.get(ROOT, type=Map)
        for update in updates:
            self._doc.apply_update(update)

    def __len__(self) -> int:
        return len(self._log)

    def add(self, entry: LogEntry) -> bytes:
        """Add a local entry; return the update to persist and ship."""
        before = self._doc.get_state()
        with self._doc.transaction(origin="local"):
            self._log[entry.order_key] = entry.encode()
        return self._doc.get_update(before)

    def apply(self, update: bytes) -> list[LogEntry]:
        """Apply a remote update (or a delta, or a snapshot); return the entries it added."""
        added: list[LogEntry] = []

        def collect(event: MapEvent) -> None:
            for change in event.keys.values():
                if change["action"] == "add":
                    added.append(LogEntry.decode(change["newValue"]))

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
        return sorted((LogEntry.decode(raw) for raw in self._log.values()), key=lambda e: e.order_key)
