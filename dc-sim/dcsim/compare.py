"""`dcsim compare`: one mixed workload under every replication mode, with the same WAN and faults.

For each mode a fresh three-region cluster runs the same seeded workload: users at home in every
region post, read (at home or in another region, with or without their causal token), set and read
statuses (writing and reading from two threads each), and pairs of users in different regions race
for the same username. Midway, ap-northeast
is cut off from the others and the partition heals; later us-east (the first primary in
single-leader mode) is killed and restarted. Then traffic stops, the regions converge, and the
checker reads the whole client history against what every region holds.

Per mode it reports write latency per region, write availability on each side of the partition and
while a region is down (`AVAILABILITY`), the time every region took after the heal to hold every message
acknowledged before it, and the anomalies the checker counts. It prints the table, and writes a
Markdown report and PNG plots.
"""

from __future__ import annotations

import argparse
import math
import random
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dcsim import sessions
from dcsim.checker import WRITE_KINDS, Op, Report, availability, check, percentile, write_latencies, writes_within
from dcsim.sessions import REGIONS, Run, Session, now_ms
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.v1 import chat_pb2 as pb

CUT_OFF = "ap-northeast"  # the region the partition isolates
KILLED = "us-east"  # the region killed (the first primary in single-leader mode)
PRESENCES = (pb.PRESENCE_ONLINE, pb.PRESENCE_AWAY, pb.PRESENCE_BUSY)
AVAILABILITY = ("Writes ok: the share acknowledged of the writes sent and answered while the fault lasted. A write "
                "answered after it ended is left out: in sync and single-leader modes, one sent before the cut was "
                "noticed waits for the regions it needs (up to the write timeout), and may be acknowledged once "
                "they hold it, after the heal.")


@dataclass(frozen=True)
class Plan:
    phase_s: float = 8.0  # length of each phase: steady, partitioned, healed, region down, restarted
    users_per_region: int = 2
    channels: int = 3
    think_ms: float = 40.0  # pause between a user's calls
    race_every_s: float = 2.0  # how often two users in different regions race for a new name
    seed: int = 1


@dataclass
class Outcome:
    mode: str
    history: list[Op]
    phases: dict[str, tuple[float, float]]  # phase -> (start, end) in ms
    report: Report
    converge_after_heal_ms: float
    converged_at_end: bool
    notes: list[str] = field(default_factory=list)

    def latency(self, region: str, q: float) -> float:
        return percentile(write_latencies(self.history, region), q)

    def availability(self, phase: str, regions: Sequence[str]) -> str:
        """The share acknowledged of the writes sent and answered in a phase, on some regions, and how many
        writes that is."""
        start, end = self.phases[phase]
        share = availability(self.history, regions, start, end)
        return f"{_pct(share)} of {len(writes_within(self.history, regions, start, end))}"


class Workload:
    """The users and their calls, running in threads until stopped."""

    def __init__(self, cluster: Run, plan: Plan) -> None:
        self.cluster = cluster
        self.plan = plan
        self.channels = [f"room-{i}" for i in range(plan.channels)]
        self.users = [Session(cluster, f"{region[:2]}{i}", region, timeout_s=2) for region in REGIONS
                      for i in range(plan.users_per_region)]
        self.racers: list[Session] = []
        self.contested: dict[str, list[str]] = {}  # username -> user ids that claimed it
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def sign_in(self) -> None:
        for user in self.users:
            op, _ = user.claim(user.home, f"user_{user.name}", f"{user.name}-claim-key-0123456789")
            if not op.ok:
                raise RuntimeError(f"{user.name} could not sign in at {user.home} before the run started")

    def start(self) -> None:
        # Each user writes and reads from two threads, so that a read stuck behind a partition does not
        # keep the user from writing at home (the writes are what availability counts).
        self._threads = [threading.Thread(target=role, args=(u,), daemon=True)
                         for u in self.users for role in (self._writer, self._reader)]
        self._threads.append(threading.Thread(target=self._races, daemon=True))
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join()
        for s in [*self.users, *self.racers]:
            s.close()

    def _writer(self, me: Session) -> None:
        rng = random.Random(f"{self.plan.seed}-{me.name}-writes")
        sent = 0
        while not self.stop.wait(self.plan.think_ms / 1000):
            sent += 1
            if rng.random() < 0.75:
                channel, cmid = rng.choice(self.channels), f"{me.name}-{sent}"
                op, _ = me.post(me.home, channel, f"{me.name} says {sent}", cmid)
                if not op.ok:  # retried once, as a client would: it must not create a second message
                    me.post(me.home, channel, f"{me.name} says {sent}", cmid)
            else:
                me.set_status(me.home, rng.choice(PRESENCES), f"status {sent}")

    def _reader(self, me: Session) -> None:
        rng = random.Random(f"{self.plan.seed}-{me.name}-reads")
        others = [u for u in self.users if u is not me]
        while not self.stop.wait(self.plan.think_ms / 1000):
            region = rng.choice([me.home, *(r for r in REGIONS if r != me.home)]) if rng.random() < 0.5 else me.home
            if rng.random() < 0.7:
                me.read(region, rng.choice(self.channels), with_token=rng.random() < 0.5)
            else:
                me.get_status(region, rng.choice(others).user_id, with_token=rng.random() < 0.5)

    def _races(self) -> None:
        rng = random.Random(f"{self.plan.seed}-races")
        n = 0
        while not self.stop.wait(self.plan.race_every_s):
            n += 1
            name = f"contested_{n}"
            regions = rng.sample(REGIONS, 2)
            pair = [Session(self.cluster, f"racer{n}{r[:2]}", r) for r in regions]
            self.racers.extend(pair)
            barrier = threading.Barrier(2)

            threads = [threading.Thread(target=self._race, args=(s, name, barrier)) for s in pair]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.contested[name] = [s.user_id for s in pair if s.user_id]


    @staticmethod
    def _race(racer: Session, name: str, start: threading.Barrier) -> None:
        start.wait()
        racer.claim(racer.home, name, f"{racer.name}-racing-claim-key-01")


def acked_posts(history: Sequence[Op], before_ms: float) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for op in history:
        if op.kind == "post" and op.ok and op.end_ms <= before_ms:
            out.setdefault(op.channel, set()).add(op.message_id)
    return out


def holds_all(cluster: Run, wanted: dict[str, set[str]]) -> bool:
    for region in cluster.regions:
        reader = cluster.observer(region)
        for channel, ids in wanted.items():
            reader.causal = {}
            try:
                if not ids <= {m.id for m in sessions.read_all(reader, channel)}:
                    return False
            except Exception:
                return False
    return True


def run_mode(mode: Mode, acks: SyncAcks, plan: Plan, progress: bool = True) -> Outcome:
    name = sessions.label(mode, acks)

    def say(text: str) -> None:
        if progress:
            print(f"  [{name}] {text}", flush=True)

    with sessions.run(mode, acks) as cluster:
        for region in REGIONS:
            cluster.observer(region)  # signed in while every region is up
        work = Workload(cluster, plan)
        work.sign_in()
        phases: dict[str, tuple[float, float]] = {}
        work.start()
        converge_ms = math.nan

        def phase(title: str, begin: float, during: Callable[[], None] = lambda: None) -> None:
            """Run a phase that started at `begin` (ms): `during` first, then traffic until its end."""
            during()
            time.sleep(max(0.0, (begin + plan.phase_s * 1000 - now_ms()) / 1000))
            phases[title] = (begin, now_ms())
            ops = [op for op in cluster.history if begin <= op.start_ms < phases[title][1]]
            say(f"{title}: {len(ops)} calls, {sum(op.ok for op in ops)} acknowledged")

        def converge() -> None:
            nonlocal converge_ms
            wanted = acked_posts(cluster.history, healed_at)
            if sessions.wait(lambda: holds_all(cluster, wanted), plan.phase_s * 3):
                converge_ms = now_ms() - healed_at

        try:
            phase("steady", now_ms())
            cluster.isolate(CUT_OFF)
            phase("partitioned", now_ms())
            cluster.control("heal")
            healed_at = now_ms()
            phase("healed", healed_at, converge)
            cluster.control("kill", region=KILLED)
            phase("region down", now_ms())
            cluster.control("restart", region=KILLED)
            phase("restarted", now_ms())
        finally:
            work.join()
        say("traffic stopped; waiting for the regions to converge")
        converged = sessions.wait(cluster.converged, 60)
        final = cluster.final_state(work.channels, {**work.contested,
                                                    **{f"user_{u.name}": [u.user_id] for u in work.users}})
        report = check(cluster.history, final)
        say(f"checked {len(cluster.history)} calls: {report.violations()} safety violations")
        return Outcome(name, list(cluster.history), phases, report, converge_ms, converged)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def table_rows(outcomes: Sequence[Outcome]) -> list[tuple[str, list[str]]]:
    """The comparison, one row per measure, one column per mode."""
    majority_side = [r for r in REGIONS if r != CUT_OFF]
    survivors = [r for r in REGIONS if r != KILLED]
    rows: list[tuple[str, list[str]]] = []
    for region in REGIONS:
        rows.append((f"write p50 / p99 ms, {region}",
                     [f"{_ms(o.latency(region, 0.5))} / {_ms(o.latency(region, 0.99))}" for o in outcomes]))
    rows += [
        (f"writes ok while partitioned, {CUT_OFF} (cut off)", [o.availability("partitioned", [CUT_OFF])
                                                               for o in outcomes]),
        ("writes ok while partitioned, other side", [o.availability("partitioned", majority_side) for o in outcomes]),
        (f"writes ok while {KILLED} is down, survivors", [o.availability("region down", survivors)
                                                          for o in outcomes]),
        ("all regions hold every ack'd message, after heal (ms)", [_ms(o.converge_after_heal_ms) for o in outcomes]),
        ("converged at the end (same digest)", ["yes" if o.report.converged else "NO" for o in outcomes]),
        ("lost acknowledged messages", [str(o.report.lost_writes) for o in outcomes]),
        ("duplicated messages", [str(o.report.duplicates) for o in outcomes]),
        ("usernames with two owners", [str(o.report.duplicate_usernames) for o in outcomes]),
        ("claims acknowledged, then lost", [str(o.report.claims_lost) for o in outcomes]),
        ("claims refused (name taken)", [str(o.report.claims_refused) for o in outcomes]),
        ("read-your-writes violations, with / without token",
         [f"{o.report.ryw_violations_with_token} / {o.report.ryw_violations_without_token}" for o in outcomes]),
        ("monotonic-read violations, with / without token",
         [f"{o.report.monotonic_violations_with_token} / {o.report.monotonic_violations_without_token}"
          for o in outcomes]),
        ("status back in time, with / without token",
         [f"{o.report.status_regressions_with_token} / {o.report.status_regressions_without_token}"
          for o in outcomes]),
        ("calls made (writes)", [f"{len(o.history)} ({sum(op.kind in WRITE_KINDS for op in o.history)})"
                                 for o in outcomes]),
    ]
    return rows


def render_table(outcomes: Sequence[Outcome], markdown: bool = False) -> str:
    rows = table_rows(outcomes)
    header = ["", *(o.mode for o in outcomes)]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([title, *cells]) + " |" for title, cells in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *([t, *c] for t, c in rows)]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*line) for line in [header, *([t, *c] for t, c in rows)])


def plot(outcomes: Sequence[Outcome], out_dir: Path) -> list[Path]:
    """PNG plots: write latency by mode and region, and every write over time in each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(REGIONS)
    for i, region in enumerate(REGIONS):
        xs = [m + i * width for m in range(len(outcomes))]
        ax.bar(xs, [o.latency(region, 0.5) for o in outcomes], width, label=f"{region} p50")
        ax.scatter(xs, [o.latency(region, 0.99) for o in outcomes], marker="_", s=300, color="black",
                   label="p99" if i == 0 else None)
    ax.set_xticks([m + width for m in range(len(outcomes))], [o.mode for o in outcomes])
    ax.set_ylabel("write latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Write latency by replication mode and region (same WAN, same workload)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "write-latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(outcomes), 1, figsize=(9, 2.1 * len(outcomes)), sharex=True, squeeze=False)
    for ax, o in zip(axes[:, 0], outcomes, strict=True):
        t0 = o.phases["steady"][0]
        for title, (start, end) in o.phases.items():
            if title in ("partitioned", "region down"):
                ax.axvspan((start - t0) / 1000, (end - t0) / 1000, color="0.9")
                ax.text((start - t0) / 1000, 1, title, fontsize=7, va="bottom")
        for region, color in zip(REGIONS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            ok = [op for op in o.history if op.kind in WRITE_KINDS and op.region == region and op.ok]
            failed = [op for op in o.history if op.kind in WRITE_KINDS and op.region == region and not op.ok]
            ax.scatter([(op.start_ms - t0) / 1000 for op in ok], [op.end_ms - op.start_ms for op in ok], s=3,
                       color=color, label=region)
            ax.scatter([(op.start_ms - t0) / 1000 for op in failed], [op.end_ms - op.start_ms for op in failed],
                       s=12, marker="x", color=color)
        ax.set_yscale("log")
        ax.set_ylabel(f"{o.mode}\nms", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right", markerscale=3)
    axes[0, 0].set_title("Every write over time (dots acknowledged, crosses failed)")
    axes[-1, 0].set_xlabel("seconds since start, when the write was sent")
    fig.tight_layout()
    paths.append(out_dir / "writes-over-time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(outcomes: Sequence[Outcome], plan: Plan, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = plot(outcomes, out_dir)
    lines = [
        "# mlchat: replication modes compared", "",
        f"Three regions ({', '.join(REGIONS)}) on the default WAN matrix; "
        f"{plan.users_per_region} users at home in each region, a call every {plan.think_ms:.0f} ms each, "
        f"two users racing for a new username every {plan.race_every_s:g} s; phases of {plan.phase_s:g} s: "
        f"steady, {CUT_OFF} cut off, healed, {KILLED} killed, restarted. Seed {plan.seed}.", "",
        render_table(outcomes, markdown=True), "",
        AVAILABILITY, "",
        "Safety violations (lost, duplicated, two owners of a name) must be 0 in every mode. Claims acknowledged "
        "and then lost are async's documented anomaly; read-your-writes and monotonic-read violations without "
        "the causal token are what a client sees when it moves region without it.", "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    for o in outcomes:
        if o.report.examples:
            lines += ["", f"## {o.mode}: examples", *[f"- {e}" for e in o.report.examples]]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def compare(plan: Plan, modes: Sequence[tuple[Mode, SyncAcks]], out_dir: Path) -> list[Outcome]:
    outcomes = []
    for i, (mode, acks) in enumerate(modes, 1):
        print(f"[{i}/{len(modes)}] {sessions.label(mode, acks)}: starting three regions", flush=True)
        outcomes.append(run_mode(mode, acks, plan))
    report = write_report(outcomes, plan, out_dir)
    print()
    print(render_table(outcomes))
    print(textwrap.fill(AVAILABILITY, 110))
    print(f"\nreport: {report} (plots beside it)")
    return outcomes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dcsim compare", description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=Plan.phase_s)
    parser.add_argument("--users-per-region", type=int, default=Plan.users_per_region)
    parser.add_argument("--seed", type=int, default=Plan.seed)
    parser.add_argument("--modes", default=",".join(sessions.label(m, a) for m, a in sessions.MODES),
                        help="comma-separated, e.g. async,sync=all,strong-names")
    parser.add_argument("--out", type=Path, default=Path("compare-report"))
    args = parser.parse_args(argv)
    by_label = {sessions.label(m, a): (m, a) for m, a in sessions.MODES}
    unknown = [m for m in args.modes.split(",") if m not in by_label]
    if unknown:
        raise SystemExit(f"dcsim compare: unknown mode {unknown[0]!r}; choose from {', '.join(by_label)}")
    plan = Plan(phase_s=args.phase_seconds, users_per_region=args.users_per_region, seed=args.seed)
    compare(plan, [by_label[m] for m in args.modes.split(",")], args.out)


if __name__ == "__main__":
    main()
