"""Where a region's region-wide keys live: on one Redis, or spread over a Redis Cluster.

A Lua script runs on one node, so on Redis Cluster every key of one call must hash to one slot. The
per-channel keys share the hash tag `{channel}`, and a user's or a name's keys are one key each; but
the scripts also update region-wide keys next to them: the clock floor (`meta:hlc`), the shards'
state vectors (`shards`), the sets `channels` and `users`, and the outbox (`outbox`, with the highest
stamp trimmed from it, `outbox:trimmed`). On a cluster each of those has one copy per slot that a
script wrote to, named with a tag that hashes to that slot (`meta:hlc:{3f2}` beside `c:{general}:z`
when `{general}` is in the slot of `3f2`); every tag that holds copies is listed in `meta:copies`,
added there before its first copy is written, so that a reader that merges every listed copy misses
none (the largest floor; the union of the hashes, sets and outboxes, whose copies are disjoint: a
shard, channel, user or change is only ever written beside its own keys). The other region-wide keys
are written alone or read together under one tag (`meta:{meta}:members`, ...).

On one Redis (`SingleLayout`) every name is the one it always had: existing data keeps working.
"""

from __future__ import annotations

import functools

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

COPIES = "meta:copies"  # cluster only: SET of the tags that hold copies of the region-wide keys
FLOOR, SHARDS, CHANNELS, USERS = "meta:hlc", "shards", "channels", "users"
OUTBOX, TRIMMED = "outbox", "outbox:trimmed"
PER_SLOT = (FLOOR, SHARDS, CHANNELS, USERS, OUTBOX, TRIMMED)  # the region-wide keys with a copy per slot on a cluster
_META = "meta:{meta}:"  # a cluster's meta keys (`ClusterLayout.meta`)


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each cluster slot, the shortest hex string that hashes to it (all of them in ~0.2 s)."""
    tags: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing, i = REDIS_CLUSTER_HASH_SLOTS, 0
    while missing:
        tag = format(i, "x")
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        i += 1
    return tuple(tags)  # type: ignore[arg-type]


def tag_beside(key: str) -> str:
    """The tag of the copies that live in the slot of `key`."""
    return slot_tags()[key_slot(key.encode())]


def single_name(key: str) -> str:
    """The name on one Redis of `key`, a key of either layout: the copy `shards:{3f2}` is `shards`, the
    meta key `meta:{meta}:vector` is `meta:vector`; every other key has the same name in both."""
    if key.startswith(_META):
        return "meta:" + key.removeprefix(_META)
    name, brace, tag = key.rpartition(":{")
    return name if brace and name in PER_SLOT and tag.endswith("}") else key


class SingleLayout:
    """One Redis: one copy of each region-wide key, under its own name."""

    cluster = False

    def copy(self, name: str, beside: str) -> str:
        """The copy of region-wide key `name` that a script touching `beside` writes."""
        return name

    def tag(self, beside: str) -> str | None:
        """The tag to list in `COPIES` before writing copies beside `beside` (None: nothing to list)."""
        return None

    def copies(self, name: str, tags: set[str]) -> list[str]:
        """Every copy of region-wide key `name`, given the tags listed in `COPIES`."""
        return [name]

    def meta(self, name: str) -> str:
        return f"meta:{name}"

    def every(self, name: str, tags: set[str]) -> list[str]:
        """Every key that region-wide key `name` (its `single_name`) is kept in, given the tags in `COPIES`."""
        return [name]


class ClusterLayout:
    """Redis Cluster: a copy of each region-wide key per slot written to, and the meta keys under one tag."""

    cluster = True

    def copy(self, name: str, beside: str) -> str:
        return f"{name}:{{{tag_beside(beside)}}}"

    def tag(self, beside: str) -> str | None:
        return tag_beside(beside)

    def copies(self, name: str, tags: set[str]) -> list[str]:
        return [f"{name}:{{{tag}}}" for tag in sorted(tags)]

    def meta(self, name: str) -> str:
        return f"{_META}{name}"

    def every(self, name: str, tags: set[str]) -> list[str]:
        if name in PER_SLOT:
            return self.copies(name, tags)
        # COPIES is read and written alone, so it keeps its name.
        return [self.meta(name.removeprefix("meta:"))] if name.startswith("meta:") and name != COPIES else [name]


Layout = SingleLayout | ClusterLayout
