"""The deterministic simulations over many seeds: each seed is one whole faulty run of every region's cores,
replayed exactly by the `make sim SEED=<seed> STEPS=<steps>` command that a failure prints."""

import os

import pytest
from sim.run import run_seed

SEEDS = int(os.environ.get("MLCHAT_SIM_SEEDS", "500"))
STEPS = int(os.environ.get("MLCHAT_SIM_STEPS", "300"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_invariant_holds_through_a_faulty_run(seed):
    run = run_seed(seed, STEPS)
    assert run.acked, "the run acknowledged no message: it tested nothing"
