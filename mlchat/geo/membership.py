"""Cluster membership and failure detection, as one region sees them.

A region knows its members (the other regions: name -> address) and the regions that left for good.
It learns of members three ways: its configuration, the answer to its Join, and gossip (every
heartbeat carries the sender's members and departures). Departure wins over membership and is never
undone, so every region ends with the same view whatever order the gossip arrives in: a region that
left is never taken back by a peer that has not heard yet.

A region also tracks which members count it among theirs (configured peers do from the start). A
member that does not yet may confirm a username claim against a watermark that leaves this region
out, and this region's clock, which that member has never seen, may still be behind that claim: a
claim taken here could then win over one already confirmed. So a region takes claims only once every
member it knows has listed it, in a heartbeat that also moved its clock past that member's.

A peer's stream is up while it is connected and has spoken within the timeout, suspect up to twice
that, then down. No I/O here: the caller stores what changes and starts or stops following peers.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping


class PeerState(enum.IntEnum):
    # Values match mlchat.v1.PeerState.
    UP = 1
    SUSPECT = 2
    DOWN = 3


def peer_state(connected: bool, silent_s: float, timeout_s: float) -> PeerState:
    if connected and silent_s <= timeout_s:
        return PeerState.UP
    return PeerState.SUSPECT if silent_s <= 2 * timeout_s else PeerState.DOWN


class Membership:
    def __init__(self, me: str, members: Mapping[str, str], departed: Iterable[str] = (),
                 listed_by: Iterable[str] = ()) -> None:
        self.me = me
        self.departed = set(departed) - {me}
        self.members = {r: a for r, a in members.items() if r != me and r not in self.departed}
        self.listed_by = set(listed_by)  # the regions known to count this one as a member

    def admit(self, region: str, address: str) -> bool:
        """Take a region in; False if it is this one, known already, or has left."""
        if region == self.me or region in self.members or region in self.departed:
            return False
        self.members[region] = address
        return True

    def dismiss(self, region: str) -> bool:
        """A region leaves for good; False if it had left already."""
        if region in self.departed or region == self.me:
            return False
        self.departed.add(region)
        self.members.pop(region, None)
        return True

    def news(self, members: Mapping[str, str], departed: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """What a peer's view tells this region: the regions that left, then those that joined."""
        departed = set(departed)
        left = sorted(r for r in departed if r != self.me and r not in self.departed)
        joined = {r: a for r, a in members.items()
                  if r != self.me and r not in self.members and r not in self.departed and r not in departed}
        return left, joined

    def listed(self, peer: str, members: Mapping[str, str]) -> bool:
        """A peer's heartbeat told its members: True if it newly shows the peer counts this region in."""
        if self.me in members and peer not in self.listed_by:
            self.listed_by.add(peer)
            return True
        return False

    def unacknowledged(self) -> list[str]:
        """The members not yet known to count this region as one of theirs: until none is left, it takes no
        username claims."""
        return sorted(set(self.members) - self.listed_by)
