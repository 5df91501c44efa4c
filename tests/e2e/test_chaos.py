"""A short `dcsim chaos` run per mode: random partitions, killed leaders and killed Valkeys under
client load lose and duplicate nothing, the regions converge, and no read with a token is stale."""

from __future__ import annotations

import pytest

from dcsim import chaos, sessions

MODES = [m for m in sessions.MODES if m[0] in (sessions.Mode.ASYNC, sessions.Mode.SINGLE_LEADER)]


@pytest.mark.parametrize(("mode", "acks"), MODES, ids=[sessions.label(m, a) for m, a in MODES])
def test_random_faults_under_load_break_no_guarantee(mode, acks):
    result = chaos.run(mode, acks, duration_s=15, seed=7, fault_every_s=2, say=lambda _: None)
    assert len(result.faults) >= 4, result.faults
    assert result.acknowledged > 100
    assert not chaos.failed(result), chaos.summary(result)
