"""Username claims.

Every claim is (name, user, hlc, region) and claims are never removed: the state is a grow-only set,
merged by union. The owner of a name is the user of the claim with the smallest (hlc, region, user), which
every region computes the same way once it holds the same claims. A claim is provisional until every
region's clock watermark has passed its hlc: from then on no earlier claim can still arrive, and the
claim is confirmed or lost for good.

The record of a private channel is a claim too: on the channel's name, by its creator. Two regions that
create the same channel at once end with one creator everywhere, the owner of the claims on the name.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class ClaimState(enum.IntEnum):
    # Values match mlchat.v1.ClaimState.
    PROVISIONAL = 1
    CONFIRMED = 2
    LOST = 3


@dataclass(frozen=True, order=True, slots=True)
class Claim:
    # Field order is the ownership order.
    hlc: str
    region: str
    user_id: str
    name: str


def owner(claims: Iterable[Claim]) -> Claim | None:
    """The winning claim among claims on one name, or None if there are none."""
    return min(claims, default=None)


def claim_state(claim: Claim, rivals: Iterable[Claim], watermark: str) -> ClaimState:
    """The state of `claim` given every claim on its name known here (it included).

    `watermark` is the smallest hlc up to which every region's claims are known here.
    """
    # The same user may hold several claims on a name (a retry accepted by two regions).
    if owner([claim, *rivals]).user_id != claim.user_id:  # type: ignore[union-attr]
        return ClaimState.LOST
    return ClaimState.CONFIRMED if watermark >= claim.hlc else ClaimState.PROVISIONAL
