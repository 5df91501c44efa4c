"""How long a busy channel's batch waits for posts on their way: a few of their usual gaps, but not long."""

from __future__ import annotations

import pytest

from mlchat.leader.region import GATHER_GAPS, GATHER_QUIET_S, _Arrivals


def test_the_wait_follows_the_usual_gap_between_posts() -> None:
    arrivals = _Arrivals()
    for _ in range(100):
        arrivals.came(2, 100e-6)  # two posts every 100 µs: one every 50 µs
    assert arrivals.quiet_s() == pytest.approx(GATHER_GAPS * 50e-6, rel=1e-3)


def test_the_wait_is_short_however_far_apart_posts_come() -> None:
    arrivals = _Arrivals()
    assert arrivals.quiet_s() <= GATHER_QUIET_S
    for _ in range(100):
        arrivals.came(1, 0.5)
    assert arrivals.quiet_s() == GATHER_QUIET_S
