"""Last-writer-wins registers: a user's status, and a user's membership of a private channel.

A register value carries the hlc and region of the write that made it. Of two values the one with the
larger (hlc, region) wins, whatever order they arrive in; since an hlc absorbs every timestamp it sees,
a value written after seeing another always wins. The registers are not a pycrdt `Y.Map`: Y.Map settles
concurrent sets by client id, not by time. The leader keeps the same comparison in a Redis script.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar


class _Ranked(Protocol):
    @property
    def rank(self) -> tuple[str | int | bool, ...]: ...


R = TypeVar("R", bound=_Ranked)


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


@dataclass(frozen=True, slots=True)
class MemberValue:
    """Whether `user_id` is a member of the private `channel`: added (True) or removed (False)."""

    channel: str
    user_id: str
    member: bool
    hlc: str
    region: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.channel, self.user_id)

    @property
    def rank(self) -> tuple[str, str, bool]:
        return (self.hlc, self.region, self.member)


def merge(current: R | None, incoming: R | None) -> R | None:
    """The winner of two values of one register (None is the empty register)."""
    if current is None:
        return incoming
    if incoming is None:
        return current
    return incoming if incoming.rank > current.rank else current
