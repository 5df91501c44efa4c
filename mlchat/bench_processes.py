"""`python -m mlchat.bench_processes`: PostMessage throughput of one region served by 1, 2 and 4 processes.

Each run starts the region afresh (`mlchat leader --processes N`: the core and N-1 gateways on one
address) on one Valkey, and drives it from one load process: 64 concurrent posters over 16 connections
(the kernel spreads connections, not calls, over the processes). The baseline is the one-process region,
measured in the same run; the runs alternate (1, 2, 4, 1, 2, 4, ...) so that a noisy spell on the
shared machine does not fall on one setting. Also printed: the CPU time the region's processes spent
per post (all of them, and the core alone), and how busy the machine's cores were.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from mlchat.bench import pct, post_load
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.valkey import EmbeddedValkey

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return out


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


def run(processes: int, valkey_url: str, home: Path, seconds: float, concurrency: int, connections: int,
        tag: str) -> dict[str, float]:
    leader = LeaderProcess("us-east", home / tag, redis_url=valkey_url, peer_port=free_port(),
                           extra_args=("--user-rate", "0", "--processes", str(processes)))
    with leader:
        assert leader.proc is not None
        with ChatClient(leader.address) as client:
            token = client.claim("bench_user", "bench-claim-key-0001").token
        asyncio.run(post_load(leader.address, token, concurrency, 1.0, f"warm-{tag}", tag, connections))
        pids = [leader.proc.pid, *children(leader.proc.pid)]
        before = [cpu_s(p) for p in pids]
        busy, started = machine_busy_s(), time.perf_counter()
        rate, latencies = asyncio.run(post_load(leader.address, token, concurrency, seconds, tag, tag, connections))
        cores_busy = (machine_busy_s() - busy) / (time.perf_counter() - started)
        spent = [cpu_s(p) - b for p, b in zip(pids, before, strict=True)]
    posts = rate * seconds
    return {"rate": rate, "p50": pct(latencies, .5), "p99": pct(latencies, .99),
            "cpu_us": sum(spent) / posts * 1e6, "core_us": spent[0] / posts * 1e6, "cores_busy": cores_busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]

    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="mlchat-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey", port=free_port())
        valkey.start()
        try:
            for r in range(args.rounds):
                for n in counts:
                    result = run(n, valkey.url, Path(tmp), args.seconds, args.concurrency, args.connections,
                                 f"r{r}p{n}")
                    results[n].append(result)
                    print(f"round {r + 1} processes={n}: {result['rate']:.0f}/s, p50 {result['p50']:.2f} ms, "
                          f"p99 {result['p99']:.2f} ms, region CPU {result['cpu_us']:.0f} us/post "
                          f"(core {result['core_us']:.0f}), machine {result['cores_busy']:.2f} cores busy",
                          flush=True)
        finally:
            valkey.stop()

    def median(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[n])

    base = median(counts[0], "rate")
    print(f"\nPostMessage, c={args.concurrency} over {args.connections} connections, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds\n")
    print("| processes | posts/s | vs 1 process | p50 / p99 ms | region CPU per post (core) | cores busy |")
    print("|---|---|---|---|---|---|")
    for n in counts:
        print(f"| {n} | {median(n, 'rate'):.0f} | {median(n, 'rate') / base:.2f}x | {median(n, 'p50'):.2f} / "
              f"{median(n, 'p99'):.2f} | {median(n, 'cpu_us'):.0f} us ({median(n, 'core_us'):.0f} us) | "
              f"{median(n, 'cores_busy'):.2f} of {os.cpu_count()} |")


if __name__ == "__main__":
    main()
