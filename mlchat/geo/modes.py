"""Replication modes: what a cluster promises about writes, and what each promise costs.

Every region of a cluster runs the same mode.

- `async`: a write is acknowledged once its own region holds it; deltas reach the others in the
  background. Fastest, always writable, and two regions may accept the same username at once (one
  claim later loses).
- `sync`: a write is acknowledged once it is durable in every region (`all`) or in a majority of them
  (`quorum`). When too few regions are reachable, writes are refused up front.
- `single-leader`: one primary region takes every write (the others forward to it) and acknowledges
  it once a majority holds it; the survivors elect a new primary, fenced by an epoch, when it dies.
- `strong-names`: like `async`, except that a username is claimed through consensus (Paxos) across a
  majority of regions, so no two users ever own one name.
"""

from __future__ import annotations

import enum


class Mode(enum.StrEnum):
    ASYNC = "async"
    SYNC = "sync"
    SINGLE_LEADER = "single-leader"
    STRONG_NAMES = "strong-names"


class SyncAcks(enum.StrEnum):
    ALL = "all"
    QUORUM = "quorum"


def majority(regions: int) -> int:
    return regions // 2 + 1


def describe(mode: Mode, acks: SyncAcks) -> str:
    """The mode as GetClusterStatus shows it, e.g. "sync=quorum"."""
    return f"{mode}={acks}" if mode is Mode.SYNC else str(mode)


def copies_needed(mode: Mode, acks: SyncAcks, regions: int) -> int:
    """How many other regions must hold a write before it is acknowledged, in a cluster of `regions`."""
    if mode is Mode.SYNC and acks is SyncAcks.ALL:
        return regions - 1
    if mode in (Mode.SYNC, Mode.SINGLE_LEADER):
        return majority(regions) - 1
    return 0


def names_by_consensus(mode: Mode) -> bool:
    """Whether a username claim is decided once for all regions (never provisional, never lost later)."""
    return mode in (Mode.STRONG_NAMES, Mode.SINGLE_LEADER)
