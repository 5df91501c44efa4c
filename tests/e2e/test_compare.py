"""`dcsim compare` on a short run: in every mode the checker finds no safety violation and no stale
read made with a causal token, across a partition, its heal, and a region killed and restarted."""

from __future__ import annotations

import pytest

from dcsim import compare, sessions


@pytest.mark.parametrize(("mode", "acks"), sessions.MODES, ids=[sessions.label(m, a) for m, a in sessions.MODES])
def test_every_mode_keeps_its_guarantees_under_partition_and_crash(mode, acks):
    outcome = compare.run_mode(mode, acks, compare.Plan(phase_s=2.0, race_every_s=1.0), progress=False)
    report = outcome.report
    assert report.violations() == 0, report.examples
    assert report.converged, report.divergent_regions
    assert sum(op.ok and op.kind == "post" for op in outcome.history) > 50  # the workload really ran
    # With the causal token, no mode lets a client miss its own write or read older state.
    assert (report.ryw_violations_with_token, report.monotonic_violations_with_token,
            report.status_regressions_with_token) == (0, 0, 0), report.examples
    if mode in (sessions.Mode.STRONG_NAMES, sessions.Mode.SINGLE_LEADER):
        assert report.claims_lost == 0  # a claim answered is final
