"""`make bench`: the leader's figures, each against a baseline measured in the same run.

- PostMessage throughput and p50/p99 latency at concurrency 1, 16 and 64, against a bare gRPC echo
  servicer (the same request and response messages, no storage) in a process of its own: rounds of the
  two alternate, and the ratio is of their median rates (each round's ratio is printed too).
- Subscribe delivery: from sending a post to a subscriber receiving it, against the post's own
  acknowledgement.
- ListMessages page latency on a channel with 100k messages, against the echo round trip.
- Redis memory per stored message, leader RSS per 100k hot messages, and the time from a leader
  restart to serving with 100k messages stored, against a restart with nothing stored.

The machines are shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import redis

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port, wait_serving
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc

BODY = "x" * 100
LEVELS = (1, 16, 64)


class EchoServicer(chat_pb2_grpc.ChatServiceServicer):
    """PostMessage answered from the request alone: the cost of gRPC and protobuf, nothing else."""

    async def PostMessage(self, request, context):
        return pb.PostMessageResponse(message=pb.Message(channel=request.channel, body=request.body,
                                                         client_msg_id=request.client_msg_id))

    async def ListMessages(self, request, context):
        return pb.ListMessagesResponse()


async def run_echo_server(port: int) -> None:
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def post_load(address: str, token: str, concurrency: int, seconds: float, tag: str,
                    channel: str = "bench", connections: int = 1) -> tuple[float, list[float]]:
    """Posts from `concurrency` workers, spread over `connections` connections, for `seconds`; return
    (messages/s, latencies in ms)."""
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    # A subchannel pool of its own per channel: otherwise channels to one address share one connection.
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        stub = stubs[w % connections]
        i = 0
        while time.perf_counter() < end:
            t = time.perf_counter()
            await stub.PostMessage(pb.PostMessageRequest(channel=channel, body=BODY,
                                                         client_msg_id=f"{tag}-{w}-{i}"), metadata=metadata)
            latencies.append((time.perf_counter() - t) * 1000)
            i += 1

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        for c in channels:
            await c.close()
    return len(latencies) / elapsed, latencies


async def post_count(address: str, token: str, total: int, channel: str, concurrency: int = 64) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel_:
        stub = chat_pb2_grpc.ChatServiceStub(channel_)
        counter = iter(range(total))

        async def worker() -> None:
            for i in counter:
                await stub.PostMessage(pb.PostMessageRequest(channel=channel, body=BODY, client_msg_id=f"fill-{i}"),
                                       metadata=metadata)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def delivery_latencies(address: str, token: str, count: int) -> tuple[list[float], list[float]]:
    """Post `count` messages one by one while subscribed; return (ms from send to delivery to the
    subscriber, ms from send to the post's acknowledgement)."""
    metadata = (("authorization", f"Bearer {token}"),)
    sent: dict[str, float] = {}
    delivered: list[float] = []
    acked: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel_:
        stub = chat_pb2_grpc.ChatServiceStub(channel_)
        stream = stub.Subscribe(pb.SubscribeRequest(channel="delivery"), metadata=metadata)
        ready = asyncio.Event()

        async def read() -> None:
            async for event in stream:
                delivered.append((time.perf_counter() - sent[event.message.client_msg_id]) * 1000)
                if len(delivered) == count:
                    ready.set()

        reader = asyncio.create_task(read())
        await stub.PostMessage(pb.PostMessageRequest(channel="warmup", body=BODY, client_msg_id="w"),
                               metadata=metadata)
        for i in range(count):
            sent[f"d{i}"] = time.perf_counter()
            await stub.PostMessage(pb.PostMessageRequest(channel="delivery", body=BODY, client_msg_id=f"d{i}"),
                                   metadata=metadata)
            acked.append((time.perf_counter() - sent[f"d{i}"]) * 1000)
        await asyncio.wait_for(ready.wait(), 30)
        stream.cancel()
        reader.cancel()
    return delivered, acked


def page_latencies(client: ChatClient, channel: str, cursors: list[str], newest_first: bool) -> list[float]:
    out = []
    for cursor in cursors:
        t = time.perf_counter()
        page = client.list(channel, cursor=cursor, limit=50, newest_first=newest_first)
        out.append((time.perf_counter() - t) * 1000)
        assert len(page.messages) == 50
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per concurrency level")
    parser.add_argument("--messages", type=int, default=100_000, help="size of the big channel")
    parser.add_argument("--rounds", type=int, default=5, help="PostMessage: alternating rounds per level")
    args = parser.parse_args()

    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="mlchat-bench-") as tmp:
        valkey = EmbeddedValkey(Path(tmp) / "valkey", port=free_port())
        valkey.start()
        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, "-m", "mlchat.bench", "--echo-server", str(echo_port)])
        leader = LeaderProcess("us-east", Path(tmp) / "leader", redis_url=valkey.url,
                               extra_args=("--user-rate", "0"))  # one user drives the whole load
        try:
            wait_serving(f"127.0.0.1:{echo_port}", 30)
            leader.start()
            with ChatClient(leader.address) as client:
                token = client.claim("bench_user", "bench-claim-key-0001").token
                echo_address = f"127.0.0.1:{echo_port}"
                print(f"PostMessage vs echo (same payload, same run; {args.rounds} alternating rounds of "
                      f"{args.seconds:g} s, median rates)", flush=True)
                for level in LEVELS:
                    e_rates, l_rates, e_lat, l_lat = [], [], [], []
                    for r in range(args.rounds):  # alternating: the machine's drift falls on both alike
                        e_rate, lat = asyncio.run(post_load(echo_address, token, level, args.seconds, f"e{level}-{r}"))
                        e_rates.append(e_rate)
                        e_lat += lat
                        l_rate, lat = asyncio.run(post_load(leader.address, token, level, args.seconds,
                                                            f"l{level}-{r}"))
                        l_rates.append(l_rate)
                        l_lat += lat
                    l_rate, e_rate = statistics.median(l_rates), statistics.median(e_rates)
                    rounds = ", ".join(f"{lr / er:.2f}x" for lr, er in zip(l_rates, e_rates, strict=True))
                    line = (f"c={level:<3} leader {l_rate:7.0f}/s p50 {pct(l_lat, .5):6.2f} ms p99 "
                            f"{pct(l_lat, .99):6.2f} ms | echo {e_rate:7.0f}/s p50 {pct(e_lat, .5):6.2f} ms "
                            f"p99 {pct(e_lat, .99):6.2f} ms | throughput ratio {l_rate / e_rate:.2f}x "
                            f"(rounds: {rounds})")
                    print(line, flush=True)
                    rows.append((f"PostMessage c={level}",
                                 f"{l_rate:.0f}/s, p50 {pct(l_lat, .5):.2f} ms, p99 {pct(l_lat, .99):.2f} ms",
                                 f"echo {e_rate:.0f}/s, p50 {pct(e_lat, .5):.2f} ms, p99 {pct(e_lat, .99):.2f} ms",
                                 f"{l_rate / e_rate:.2f}x throughput (rounds: {rounds})"
                                 + (" (target >= 0.6x)" if level == 16 else "")))

                delivered, acked = asyncio.run(delivery_latencies(leader.address, token, 500))
                print(f"\nSubscribe delivery, send to subscriber: p50 {pct(delivered, .5):.2f} ms p99 "
                      f"{pct(delivered, .99):.2f} ms (post acknowledged: p50 {pct(acked, .5):.2f} ms)", flush=True)
                rows.append(("Subscribe delivery (post sent to subscriber received)",
                             f"p50 {pct(delivered, .5):.2f} ms, p99 {pct(delivered, .99):.2f} ms",
                             f"post acknowledged p50 {pct(acked, .5):.2f} ms",
                             f"{pct(delivered, .5) / pct(acked, .5):.2f}x"))

                print(f"\nfilling a channel with {args.messages} messages", flush=True)
                r = redis.Redis.from_url(valkey.url)
                mem_before = int(r.info("memory")["used_memory"])
                rss_before = rss_kib(leader.proc.pid)
                t = time.perf_counter()
                asyncio.run(post_count(leader.address, token, args.messages, "big"))
                fill_s = time.perf_counter() - t
                mem_per_msg = (int(r.info("memory")["used_memory"]) - mem_before) / args.messages
                rss_per_100k = (rss_kib(leader.proc.pid) - rss_before) * 100_000 / args.messages / 1024
                r.close()
                print(f"filled in {fill_s:.1f}s ({args.messages / fill_s:.0f}/s); Redis {mem_per_msg:.0f} B/message; "
                      f"leader RSS +{rss_per_100k:.1f} MiB per 100k hot messages", flush=True)
                rows.append(("Redis memory per message", f"{mem_per_msg:.0f} B", f"{len(BODY)} B body",
                             f"{mem_per_msg / len(BODY):.1f}x the body (target <= 600 B)"))
                rows.append(("Leader RSS per 100k hot messages", f"{rss_per_100k:.1f} MiB", "", ""))

                cursors = [m.cursor for m in client.list("big", limit=500).messages[::2]][:200]
                forward = page_latencies(client, "big", cursors, newest_first=False)
                latest = page_latencies(client, "big", [""] * 200, newest_first=True)
                _, echo_lat = asyncio.run(post_load(echo_address, token, 1, 1.0, "e-page"))
                echo_p50 = pct(echo_lat, .5)
                for label, lat in (("ListMessages page of 50, forward from a cursor", forward),
                                   ("ListMessages latest 50 (newest first)", latest)):
                    print(f"{label}: p50 {pct(lat, .5):.2f} ms p99 {pct(lat, .99):.2f} ms "
                          f"(echo p50 {echo_p50:.2f} ms)", flush=True)
                    rows.append((f"{label}, {args.messages} in channel",
                                 f"p50 {pct(lat, .5):.2f} ms, p99 {pct(lat, .99):.2f} ms",
                                 f"echo p50 {echo_p50:.2f} ms", f"{pct(lat, .5) / echo_p50:.1f}x echo p50"))

            restart_full = restart_time(leader)
            empty = LeaderProcess("us-west", Path(tmp) / "empty")
            empty.start()
            restart_empty = restart_time(empty)
            empty.stop()
            print(f"restart to serving: {restart_full:.2f}s with {args.messages} messages, "
                  f"{restart_empty:.2f}s empty", flush=True)
            rows.append((f"Leader restart to serving, {args.messages} messages stored", f"{restart_full:.2f} s",
                         f"empty: {restart_empty:.2f} s",
                         f"{restart_full / restart_empty:.2f}x (target <= 2 s)"))
        finally:
            leader.stop()
            echo.terminate()
            echo.wait()
            valkey.stop()

    print("\n| measure | mlchat | baseline (same run) | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def restart_time(leader: LeaderProcess) -> float:
    """Seconds from starting a stopped leader to its first answered ListMessages."""
    leader.stop()
    t = time.perf_counter()
    leader.start()
    with ChatClient(leader.address) as client:
        client.claim("bench_user", "bench-claim-key-0001")
        client.list("big", limit=50, newest_first=True)
    return time.perf_counter() - t


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":
        asyncio.run(run_echo_server(int(sys.argv[2])))
    else:
        main()
