"""A digest of a region's whole replicated state, for convergence checks.

Two replicas holding the same messages, status registers, claims, private channel records and
memberships have the same digest, however
their state was reached. Callers stream their state in any order; the digest sorts what it hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from mlchat.crdt.claims import Claim
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry


def state_digest(entries: Iterable[LogEntry], statuses: Iterable[StatusValue], claims: Iterable[Claim],
                 channels: Iterable[Claim], memberships: Iterable[MemberValue]) -> str:
    """`channels`: the records of private channels (a claim on the channel name by its creator)."""
    lines = [f"m\x1f{e.channel}\x1f{e.order_key}\x1f{e.payload}" for e in entries]
    lines += [f"s\x1f{s.user_id}\x1f{s.presence}\x1f{s.text}\x1f{s.hlc}\x1f{s.region}" for s in statuses]
    lines += [f"c\x1f{c.name}\x1f{c.user_id}\x1f{c.hlc}\x1f{c.region}" for c in claims]
    lines += [f"p\x1f{c.name}\x1f{c.user_id}\x1f{c.hlc}\x1f{c.region}" for c in channels]
    lines += [f"g\x1f{m.channel}\x1f{m.user_id}\x1f{int(m.member)}\x1f{m.hlc}\x1f{m.region}" for m in memberships]
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()
