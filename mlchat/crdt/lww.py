"""Last-writer-wins register for user status.

A status value carries the hlc and region of the write that made it. Of two values the one with the
larger (hlc, region) wins, whatever order they arrive in; since an hlc absorbs every timestamp it sees,
a status set after seeing another always wins. The register is not a pycrdt `Y.Map`: Y.Map settles
concurrent sets by client id, not by time. The leader keeps the same comparison in a Redis script.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatusValue:
    user_id: str
    presence: int
    text: str
    hlc: str
    region: str

    @property
    def rank(self) -> tuple[str, str, int, str]:
        # (hlc, region) decides; presence and text only break ties between identical stamps, which
        # one region never issues twice, so that merge stays a total order for any input.
        return (self.hlc, self.region, self.presence, self.text)


def merge(current: StatusValue | None, incoming: StatusValue | None) -> StatusValue | None:
    """The winner of two register values (None is the empty register)."""
    if current is None:
        return incoming
    if incoming is None:
        return current
    return incoming if incoming.rank > current.rank else current
