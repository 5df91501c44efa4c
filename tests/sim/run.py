"""Run the deterministic simulations (`world`: replication, membership and names; `failover_world`: single-leader
elections) from seeds. `make sim SEED=<seed> STEPS=<steps>` replays one seed exactly and prints its events; without
SEED, `make sim` runs SEEDS seeds from a random start and prints the replay command of each that fails."""

import argparse
import random
import sys
import time

from sim import failover_world, world


def run_seed(seed: int, steps: int) -> world.World:
    """Both simulations from one seed; InvariantBroken, with the command that replays it, if either breaks."""
    run = world.run_seed(seed, steps)
    try:
        failover_world.run_seed(seed, steps)
    except AssertionError as e:
        raise world.InvariantBroken(f"single-leader failover: {e}\nreplay: make sim SEED={seed} STEPS={steps}") from e
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, help="replay this seed only")
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds to run without --seed")
    parser.add_argument("--steps", type=int, default=300, help="simulated steps of faults and load")
    args = parser.parse_args()
    first = args.seed if args.seed is not None else random.randrange(10**9)
    seeds = [args.seed] if args.seed is not None else range(first, first + args.seeds)
    failed = []
    started = time.monotonic()
    for seed in seeds:
        try:
            run = run_seed(seed, args.steps)
        except world.InvariantBroken as e:
            failed.append(seed)
            print(f"seed {seed} FAILED: {e}\n", flush=True)
            continue
        if args.seed is not None:
            print("\n".join(run.events))
    print(f"{len(seeds)} seeds from {first}, {args.steps} steps each, in {time.monotonic() - started:.1f}s: "
          f"{len(failed)} failed" + "".join(f"\n  make sim SEED={s} STEPS={args.steps}" for s in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
