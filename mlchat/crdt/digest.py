"""A digest of a region's whole replicated state, for convergence checks.

Two replicas holding the same messages, status registers and claims have the same digest, however
their state was reached. Callers stream their state in any order; the digest sorts what it hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from mlchat.crdt.claims import Claim
from mlchat.crdt.lww import StatusValue
from mlchat.crdt.msglog import LogEntry


def state_digest(entries: Iterable[LogEntry], statuses: Iterable[StatusValue], claims: Iterable[Claim]) -> str:
    lines = [f"m\x1f{e.channel}\x1f{e.order_key}\x1f{e.payload}" for e in entries]
    lines += [f"s\x1f{s.user_id}\x1f{s.presence}\x1f{s.text}\x1f{s.hlc}\x1f{s.region}" for s in statuses]
    lines += [f"c\x1f{c.name}\x1f{c.user_id}\x1f{c.hlc}\x1f{c.region}" for c in claims]
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()
