"""`python -m mlchat.bench_processes`: one region served by 1, 2 and 4 processes, against one process.

Each run starts the region afresh (`mlchat leader --processes N`: the core and N-1 gateways on one
address) on one Valkey, and drives it from one load process over many connections (the kernel spreads
connections, not calls, over the processes):

- posts: 64 concurrent posters over 16 connections, as fast as they are answered;
- reads: 64 concurrent readers of a channel's latest 50 messages (ListMessages) over 16 connections;
- deliveries: 200 subscribers of one channel over 20 connections while one poster posts 50 messages a
  second (10,000 deliveries a second asked for).

The baseline is the one-process region, measured in the same run; the runs alternate (1, 2, 4, 1, 2,
4, ...) so that a noisy spell on the shared machine does not fall on one setting. Also printed: the CPU
time the region's processes spent per post or delivery (all of them, and the core alone), and how busy
the machine's cores were (the load generator shares them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from mlchat.bench import BODY, pct, post_load
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, descendants, free_port
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc

TICKS = os.sysconf("SC_CLK_TCK")
Load = Callable[[str, str, str], Awaitable[tuple[int, float, list[float]]]]  # (address, token, tag) -> result


def cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


def posts(seconds: float, concurrency: int = 64, connections: int = 16) -> Load:
    async def load(address: str, token: str, tag: str) -> tuple[int, float, list[float]]:
        started = time.perf_counter()
        rate, latencies = await post_load(address, token, concurrency, seconds, tag, tag, connections)
        return len(latencies), time.perf_counter() - started, latencies
    return load


def reads(seconds: float, concurrency: int = 64, connections: int = 16, messages: int = 200) -> Load:
    """ListMessages (the latest 50 of a channel of `messages`) from `concurrency` readers over `connections`
    connections, for `seconds`."""

    async def load(address: str, token: str, tag: str) -> tuple[int, float, list[float]]:
        metadata = (("authorization", f"Bearer {token}"),)
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
        await asyncio.gather(*(stubs[0].PostMessage(pb.PostMessageRequest(channel=tag, body=BODY,
                                                                            client_msg_id=f"fill-{i}"),
                                                    metadata=metadata) for i in range(messages)))
        latencies: list[float] = []
        end = time.perf_counter() + seconds

        async def reader(r: int) -> None:
            stub = stubs[r % connections]
            while time.perf_counter() < end:
                t = time.perf_counter()
                page = await stub.ListMessages(pb.ListMessagesRequest(channel=tag, limit=50, newest_first=True),
                                               metadata=metadata)
                assert len(page.messages) == 50
                latencies.append((time.perf_counter() - t) * 1000)

        try:
            started = time.perf_counter()
            await asyncio.gather(*(reader(r) for r in range(concurrency)))
            return len(latencies), time.perf_counter() - started, latencies
        finally:
            for c in channels:
                await c.close()

    return load


def deliveries(seconds: float, subscribers: int = 200, connections: int = 20, rate: float = 50) -> Load:
    """`subscribers` Subscribe streams on one channel while one poster posts `rate` messages a second; the
    result counts the messages delivered, over the time from the first post to the last delivery."""

    async def load(address: str, token: str, tag: str) -> tuple[int, float, list[float]]:
        metadata = (("authorization", f"Bearer {token}"),)
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        sent: dict[str, float] = {}
        latencies: list[float] = []
        live = [asyncio.Event() for _ in range(subscribers)]
        expected = int(rate * seconds) * subscribers
        done = asyncio.Event()

        async def read(i: int) -> None:
            stub = chat_pb2_grpc.ChatServiceStub(channels[i % connections])
            async for event in stub.Subscribe(pb.SubscribeRequest(channel=tag), metadata=metadata):
                msg_id = event.message.client_msg_id
                if msg_id.startswith("ready"):
                    live[i].set()
                elif msg_id in sent:
                    latencies.append((time.perf_counter() - sent[msg_id]) * 1000)
                    if len(latencies) == expected:
                        done.set()

        poster = chat_pb2_grpc.ChatServiceStub(channels[0])

        async def post(msg_id: str) -> None:
            await poster.PostMessage(pb.PostMessageRequest(channel=tag, body=BODY, client_msg_id=msg_id),
                                     metadata=metadata)

        readers = [asyncio.create_task(read(i)) for i in range(subscribers)]
        try:
            for attempt in range(100):  # until every stream is live
                await post(f"ready-{attempt}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in live)), 0.2)
                    break
            started = time.perf_counter()
            for i in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
                sent[f"d{i}"] = time.perf_counter()
                await post(f"d{i}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 30)
            return len(latencies), time.perf_counter() - started, latencies
        finally:
            for task in readers:
                task.cancel()
            for c in channels:
                await c.close()

    return load


def run(processes: int, valkey_url: str, home: Path, tag: str, load: Load) -> dict[str, float]:
    """Start the region on `processes` processes; run `load` once to warm it up, then once measured."""
    leader = LeaderProcess("us-east", home / tag, redis_url=valkey_url, peer_port=free_port(),
                           extra_args=("--user-rate", "0", "--processes", str(processes)))
    with leader:
        assert leader.proc is not None
        with ChatClient(leader.address) as client:
            token = client.claim("bench_user", "bench-claim-key-0001").token
        asyncio.run(load(leader.address, token, f"warm-{tag}"))
        pids = [leader.proc.pid, *descendants(leader.proc.pid)]
        before = [cpu_s(p) for p in pids]
        busy = machine_busy_s()
        count, elapsed, latencies = asyncio.run(load(leader.address, token, tag))
        cores_busy = (machine_busy_s() - busy) / elapsed
        spent = [cpu_s(p) - b for p, b in zip(pids, before, strict=True)]
    return {"rate": count / elapsed, "p50": pct(latencies, .5), "p99": pct(latencies, .99),
            "cpu_us": sum(spent) / count * 1e6, "core_us": spent[0] / count * 1e6, "cores_busy": cores_busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--measures", default="posts,reads,deliveries", help="comma-separated")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    loads = {"posts": posts, "reads": reads, "deliveries": deliveries}
    measures = {m: loads[m](args.seconds) for m in args.measures.split(",")}

    results: dict[tuple[str, int], list[dict[str, float]]] = {(m, n): [] for m in measures for n in counts}
    with tempfile.TemporaryDirectory(prefix="mlchat-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey", port=free_port())
        valkey.start()
        try:
            for r in range(args.rounds):
                for measure, load in measures.items():
                    for n in counts:
                        result = run(n, valkey.url, Path(tmp), f"r{r}{measure}{n}", load)
                        results[measure, n].append(result)
                        print(f"round {r + 1} {measure} processes={n}: {result['rate']:.0f}/s, p50 "
                              f"{result['p50']:.2f} ms, p99 {result['p99']:.2f} ms, region CPU "
                              f"{result['cpu_us']:.0f} us each (core {result['core_us']:.0f}), machine "
                              f"{result['cores_busy']:.2f} cores busy", flush=True)
        finally:
            valkey.stop()

    print(f"\n{os.cpu_count()} cores, median of {args.rounds} rounds\n")
    print("| measure | processes | per second | vs 1 process | p50 / p99 ms | region CPU each (core) | cores busy |")
    print("|---|---|---|---|---|---|---|")
    for measure in measures:
        def median(n: int, key: str) -> float:
            return statistics.median(r[key] for r in results[measure, n])  # noqa: B023 - used at once

        base = median(counts[0], "rate")
        for n in counts:
            print(f"| {measure} | {n} | {median(n, 'rate'):.0f} | {median(n, 'rate') / base:.2f}x | "
                  f"{median(n, 'p50'):.2f} / {median(n, 'p99'):.2f} | {median(n, 'cpu_us'):.0f} us "
                  f"({median(n, 'core_us'):.0f} us) | {median(n, 'cores_busy'):.2f} of {os.cpu_count()} |")


if __name__ == "__main__":
    main()
