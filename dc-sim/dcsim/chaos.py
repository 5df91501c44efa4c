"""`dcsim chaos`: random faults under client load, then a checker over what every client saw.

A fresh three-region cluster in the chosen mode runs `dcsim compare`'s workload (users posting,
retrying failed posts with the same client_msg_id, reading with and without their causal token,
racing for usernames) while a seeded fault injector, every few seconds, does one of: cut two regions
apart, cut one direction only, isolate a region, heal everything, SIGKILL a leader (restarted a
few seconds later), or SIGKILL a region's Valkey (its leader starts it again). At the end every fault
is healed, traffic stops, the regions converge, and the checker reports lost acknowledged messages and
duplicates (0 in every mode, or the run fails), divergence, and the mode's expected anomalies.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from dcsim import compare, sessions
from dcsim.checker import Report, check
from dcsim.sessions import REGIONS, Run
from mlchat.geo.modes import Mode, SyncAcks


@dataclass(frozen=True)
class ChaosRun:
    mode: str
    faults: list[str]
    calls: int
    acknowledged: int
    converged: bool
    report: Report


def _fault(cluster: Run, rng: random.Random, down: dict[str, float], now: float) -> str:
    """Inject one random fault; returns what it did."""
    a, b = rng.sample(REGIONS, 2)
    choice = rng.choice(["partition", "one-way", "isolate", "heal", "kill", "kill-storage"])
    if choice == "partition":
        cluster.control("partition", a=a, b=b)
        return f"cut {a} <-> {b}"
    if choice == "one-way":
        cluster.control("partition", a=a, b=b, one_way=True)
        return f"cut {a} -> {b} (one way)"
    if choice == "isolate":
        cluster.isolate(a)
        return f"isolate {a}"
    if choice == "heal":
        cluster.control("heal")
        return "heal every link"
    if a in down:
        return f"{a} is already down"
    if choice == "kill":
        cluster.control("kill", region=a)
        down[a] = now + rng.uniform(1, 4)
        return f"SIGKILL {a}'s leader"
    return str(cluster.control("kill-storage", region=a))


def run(mode: Mode, acks: SyncAcks, duration_s: float, seed: int, fault_every_s: float = 3.0,
        say: Callable[[str], None] = print) -> ChaosRun:
    label = sessions.label(mode, acks)
    rng = random.Random(seed)
    with sessions.run(mode, acks) as cluster:
        for region in REGIONS:
            cluster.observer(region)  # signed in while every region is up
        work = compare.Workload(cluster, compare.Plan(seed=seed))
        work.sign_in()
        work.start()
        faults: list[str] = []
        down: dict[str, float] = {}  # region -> when its leader comes back
        start = time.monotonic()
        next_fault = start + rng.uniform(0.5, 1.5) * fault_every_s
        try:
            while (now := time.monotonic()) < start + duration_s:
                for region, back in list(down.items()):
                    if now >= back:
                        cluster.control("restart", region=region)
                        del down[region]
                        faults.append(f"{now - start:5.1f}s restart {region}")
                        say(f"  [{label}] {faults[-1]}")
                if now >= next_fault:
                    faults.append(f"{now - start:5.1f}s {_fault(cluster, rng, down, now)}")
                    say(f"  [{label}] {faults[-1]}")
                    next_fault = now + rng.uniform(0.5, 1.5) * fault_every_s
                time.sleep(0.05)
        finally:
            cluster.control("heal")
            for region in down:
                cluster.control("restart", region=region)
            work.join()
        say(f"  [{label}] faults over, traffic stopped; waiting for the regions to converge")
        converged = sessions.wait(cluster.converged, 60)
        final = cluster.final_state(work.channels, {**work.contested,
                                                    **{f"user_{u.name}": [u.user_id] for u in work.users}})
        history = cluster.history
        return ChaosRun(label, faults, len(history), sum(op.ok for op in history), converged,
                        check(history, final))


def summary(result: ChaosRun) -> str:
    r = result.report
    lines = [
        f"{result.mode}: {len(result.faults)} faults, {result.calls} calls ({result.acknowledged} acknowledged)",
        f"  lost acknowledged messages {r.lost_writes}, duplicated {r.duplicates}, "
        f"names with two owners {r.duplicate_usernames}, converged {'yes' if r.converged else 'NO'}",
        f"  expected anomalies: claims lost {r.claims_lost}, claims refused {r.claims_refused}; "
        f"without token: read-your-writes {r.ryw_violations_without_token}, "
        f"monotonic {r.monotonic_violations_without_token}, status back in time {r.status_regressions_without_token}",
        f"  with token (must be 0): read-your-writes {r.ryw_violations_with_token}, "
        f"monotonic {r.monotonic_violations_with_token}, status back in time {r.status_regressions_with_token}",
        *(f"  - {e}" for e in r.examples),
    ]
    return "\n".join(lines)


def failed(result: ChaosRun) -> bool:
    r = result.report
    with_token = r.ryw_violations_with_token + r.monotonic_violations_with_token + r.status_regressions_with_token
    return r.violations() > 0 or not r.converged or with_token > 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dcsim chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="all", help="comma-separated modes (default: every mode)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults per mode")
    parser.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    by_label = {sessions.label(m, a): (m, a) for m, a in sessions.MODES}
    wanted = list(by_label) if args.modes == "all" else args.modes.split(",")
    unknown = [m for m in wanted if m not in by_label]
    if unknown:
        raise SystemExit(f"dcsim chaos: unknown mode {unknown[0]!r}; choose from {', '.join(by_label)}")
    results = []
    for label in wanted:
        print(f"== chaos, mode {label}, {args.duration:g}s, seed {args.seed}", flush=True)
        results.append(run(*by_label[label], args.duration, args.seed, args.fault_every))
    print()
    for result in results:
        print(summary(result))
    if any(failed(r) for r in results):
        raise SystemExit("dcsim chaos: a guarantee was broken (see above); the same --seed replays the same "
                         "fault schedule")


if __name__ == "__main__":
    main()
