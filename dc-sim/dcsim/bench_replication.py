"""Replication benchmark: lag between regions under load, and catch-up after a partition.

Lag: three regions with the default WAN; in each, a writer posts 200 messages/s while subscribers in
the other regions (in a process of their own) note when each message arrives. Lag = arrival - commit (the
message's hlc) - the link's one-way delay. Baseline, in the same run over a proxied link with the same
delay: Valkey's own replication (a replica with REPLICAOF), the lag of an XADD on the primary to the
wake-up of an XREAD BLOCK on the replica. The ratio is given both for the lag beyond the one-way delay
and for the whole time from commit to visible. Over the same run, the bytes the WAN links carried per
message delivered to a region, against the message's raw payload.

Catch-up: one region cut off while another posts a backlog; after the heal, the time until the cut
region holds it all, and the bytes sent to it per message against the raw message payload.

Resume: two regions share a history (messages in 200 channels, a user with a status for every four
messages); one is killed while the other posts a few more messages, then restarted. The time the other
took to send it the catch-up (its `mlchat_catch_up_seconds_total`), and the bytes sent: resuming from
its cursor of the peer's outbox, against the same run with `--outbox-retention 0` (the outbox never
reaches back, so the two compare states).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import tempfile
import threading
import time
from pathlib import Path

import grpc
import redis

from dcsim import cli as dcsim
from dcsim.prometheus import scrape
from dcsim.proxy import Link
from mlchat.crdt.hlc import Hlc
from mlchat.geo.client import ChatClient
from mlchat.leader.process import free_port
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, cluster_pb2

REGIONS = ("us-east", "eu-west", "ap-northeast")
ONE_WAY_MS = 40.25  # us-east -> eu-west in the default WAN matrix: the native baseline's link
PAYLOAD = 100 + len("u") + 16 + len("b12345")  # a message's raw bytes: body, user id, client_msg_id
WORDS = ("the deploy is done so we can ship today lunch at noon anyone around for a quick call "
         "review my change please the build is green again thanks everyone see you tomorrow").split()


def body(i: int) -> str:
    """About 100 bytes of chat-like text, different for every message (compresses like real text)."""
    rng = random.Random(i)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < 100:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:100]


def now_ms() -> float:
    return time.time_ns() / 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def paced_posts(address: str, token: str, rate: float, seconds: float, tag: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        start = time.monotonic()
        pending = set()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            pending.add(asyncio.ensure_future(stub.PostMessage(
                pb.PostMessageRequest(channel="lag", body=body(i), client_msg_id=f"{tag}-{i}"), metadata=metadata)))
            pending = {p for p in pending if not p.done()}
        await asyncio.gather(*pending)


def wan_bytes(run_dir: Path) -> int:
    """Bytes delivered so far over every link between two regions."""
    return sum(p["bytes"] for p in dcsim.control(run_dir, {"command": "status"})["paths"].values())


def watch_lags(endpoints: dict[str, str], tokens: dict[str, str], one_way: dict[tuple[str, str], float],
               expected: int, timeout_s: float, results: multiprocessing.Queue) -> None:
    """Subscribe to the lag channel in every region and put, per (origin, receiving region), the lag of each
    message from another region. Runs in a process of its own, so that the writers' work never delays the
    noting of an arrival."""
    async def run() -> dict[tuple[str, str], list[float]]:
        lags: dict[tuple[str, str], list[float]] = {}
        received = 0
        all_in = asyncio.Event()

        async def watch(region: str) -> None:
            nonlocal received
            async with grpc.aio.insecure_channel(endpoints[region]) as channel:
                stream = chat_pb2_grpc.ChatServiceStub(channel).Subscribe(
                    pb.SubscribeRequest(channel="lag"), metadata=(("authorization", f"Bearer {tokens[region]}"),))
                async for event in stream:
                    m = event.message
                    if m.origin_region != region:
                        lag = now_ms() - Hlc.decode(m.hlc).wall_ms - one_way[(m.origin_region, region)]
                        lags.setdefault((m.origin_region, region), []).append(lag)
                        received += 1
                        if received == expected:
                            all_in.set()

        watchers = [asyncio.create_task(watch(region)) for region in endpoints]
        try:
            await asyncio.wait_for(all_in.wait(), timeout_s)
        except TimeoutError:
            pass  # reported as it is: fewer lags than messages
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return lags

    results.put(asyncio.run(run()))


def mlchat_lag(status: dict, run_dir: Path, rate: float,
               seconds: float) -> tuple[dict[tuple[str, str], list[float]], float]:
    """The lags per (origin, receiving region), and the WAN bytes per message delivered to a region."""
    endpoints = {r: status["regions"][r]["endpoints"][r] for r in REGIONS}
    one_way = {tuple(k.split("->")): v["latency_ms"] for k, v in status["paths"].items()}
    clients = {}
    for region in REGIONS:
        clients[region] = ChatClient(endpoints[region])
        clients[region].claim(f"bench_{region.replace('-', '_')}", f"bench-key-{region}-000000")

    # Measure the steady state: every replication stream up, every subscriber live.
    while not all(p.state == cluster_pb2.PEER_STATE_UP for c in clients.values() for p in c.cluster_status().peers):
        time.sleep(0.05)
    expected = int(rate * seconds) * (len(REGIONS) - 1)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no gRPC state inherited
    results = spawn.Queue()
    watcher = spawn.Process(target=watch_lags, args=(
        endpoints, {r: c.token for r, c in clients.items()}, one_way, expected * len(REGIONS), seconds + 60, results))
    watcher.start()
    while any(c.cluster_status().subscribers < 1 for c in clients.values()):
        time.sleep(0.01)

    async def load() -> None:
        await asyncio.gather(*(paced_posts(endpoints[r], clients[r].token, rate, seconds, r) for r in REGIONS))

    sent_before = wan_bytes(run_dir)
    asyncio.run(load())
    lags = results.get()
    watcher.join()
    per_delivery = (wan_bytes(run_dir) - sent_before) / (expected * len(REGIONS))
    for c in clients.values():
        c.close()
    return lags, per_delivery


def native_lag(one_way_ms: float, rate: float, seconds: float, workdir: Path) -> list[float]:
    """Valkey primary -> replica through a proxy link with `one_way_ms` each way."""
    primary = EmbeddedValkey(workdir / "primary", port=free_port())
    primary.start()
    replica_port = free_port()
    lags: list[float] = []

    async def run() -> None:
        link = Link("native", ("127.0.0.1", primary.port or 0))
        await link.start()
        link.set("up", latency_ms=one_way_ms)
        link.set("down", latency_ms=one_way_ms)
        replica = EmbeddedValkey(workdir / "replica", port=replica_port)
        await asyncio.to_thread(replica.start)
        r = redis.Redis.from_url(replica.url)
        r.config_set("masterauth", primary.password)
        r.execute_command("REPLICAOF", "127.0.0.1", link.listen_port)
        while r.info("replication").get("master_link_status") != "up":  # noqa: ASYNC110 - polls Valkey
            await asyncio.sleep(0.05)
        done = threading.Event()

        def read() -> None:
            reader = redis.Redis.from_url(replica.url)
            last = "$"
            while not done.is_set():
                for _, entries in reader.xread({"lag": last}, block=200) or []:
                    for entry_id, fields in entries:
                        lags.append(now_ms() - float(fields[b"t"]) - one_way_ms)
                        last = entry_id
            reader.close()

        reader = threading.Thread(target=read)
        reader.start()
        writer = redis.asyncio.Redis.from_url(primary.url)
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await writer.xadd("lag", {"t": repr(now_ms()), "b": body(i)})
        while len(lags) < int(rate * seconds):  # noqa: ASYNC110 - filled by the reader thread
            await asyncio.sleep(0.05)
        done.set()
        await asyncio.to_thread(reader.join)
        await writer.aclose()
        r.close()
        await asyncio.to_thread(replica.stop)
        await link.stop()

    try:
        asyncio.run(run())
    finally:
        primary.stop()
    return lags


def catch_up(status: dict, run_dir: Path, backlog: int) -> tuple[float, float]:
    """(seconds to converge, bytes sent to the cut region per message)."""
    east = ChatClient(status["regions"]["us-east"]["endpoints"]["us-east"], timeout_s=30)
    east.claim("backlog_writer", "backlog-writer-key-0001")
    west = ChatClient(status["regions"]["eu-west"]["endpoints"]["eu-west"], timeout_s=30)
    west.claim("backlog_reader", "backlog-reader-key-0001")
    before = west.cluster_status().messages
    for other in ("us-east", "ap-northeast"):
        dcsim.control(run_dir, {"command": "partition", "a": "eu-west", "b": other})

    async def fill() -> None:
        metadata = (("authorization", f"Bearer {east.token}"),)
        async with grpc.aio.insecure_channel(east.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            numbers = iter(range(backlog))

            async def worker() -> None:
                for i in numbers:
                    await stub.PostMessage(pb.PostMessageRequest(channel="backlog", body=body(i),
                                                                 client_msg_id=f"b{i}"), metadata=metadata)

            await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(fill())
    paths = dcsim.control(run_dir, {"command": "status"})["paths"]
    sent_before = sum(paths[f"{src}->eu-west"]["bytes"] for src in ("us-east", "ap-northeast"))
    started = time.monotonic()
    dcsim.control(run_dir, {"command": "heal"})
    while west.cluster_status().messages < before + backlog:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    paths = dcsim.control(run_dir, {"command": "status"})["paths"]
    sent = sum(paths[f"{src}->eu-west"]["bytes"] for src in ("us-east", "ap-northeast")) - sent_before
    east.close()
    west.close()
    return elapsed, sent / backlog


def post_many(address: str, token: str, count: int, start: int, channels: int) -> None:
    """`count` messages (numbered from `start`) spread over `channels` channels, 64 at a time."""
    async def fill() -> None:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            numbers = iter(range(start, start + count))

            async def worker() -> None:
                for i in numbers:
                    await stub.PostMessage(pb.PostMessageRequest(channel=f"history{i % channels}", body=body(i),
                                                                 client_msg_id=f"h{i}"), metadata=metadata)

            await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(fill())


def resume(workdir: Path, retention: int | None, history: int, outage: int) -> tuple[float, float]:
    """(seconds the peer took to send the catch-up to a region killed for `outage` messages, once it is back,
    bytes sent to it per message), with the leaders' default outbox or `--outbox-retention retention`."""
    run_dir = workdir / f"resume-{retention}"
    extra = () if retention is None else (f"--outbox-retention={retention}",)
    status = dcsim.up(run_dir, ("us-east", "eu-west"), None, None, leader_args=("--user-rate=0", *extra))
    try:
        east = ChatClient(status["regions"]["us-east"]["endpoints"]["us-east"], timeout_s=30)
        for i in range(history // 4):  # users with a status: registers that a comparison of states scans
            east.claim(f"member{i}", f"member-key-{i:012d}")
            east.set_status(pb.PRESENCE_ONLINE, f"status {i}")
        east.claim("history_writer", "history-writer-key-0001")
        post_many(east.address, east.token, history, 0, 200)
        west = ChatClient(status["regions"]["eu-west"]["endpoints"]["eu-west"], timeout_s=30)
        west.claim("history_reader", "history-reader-key-0001")
        while west.cluster_status().messages < history:
            time.sleep(0.05)
        west.close()
        dcsim.control(run_dir, {"command": "kill", "region": "eu-west"})
        post_many(east.address, east.token, outage, history, 200)
        paths = dcsim.control(run_dir, {"command": "status"})["paths"]
        sent_before = paths["us-east->eu-west"]["bytes"]
        seconds = "mlchat_catch_up_seconds_total"
        before = sum(v for (name, _), v in scrape(status["regions"]["us-east"]["metrics"]).items() if name == seconds)
        dcsim.control(run_dir, {"command": "restart", "region": "eu-west"})
        west = ChatClient(status["regions"]["eu-west"]["endpoints"]["eu-west"], timeout_s=30)
        west.claim("history_reader", "history-reader-key-0001")
        while west.cluster_status().messages < history + outage:
            time.sleep(0.01)
        while (elapsed := sum(v for (name, _), v in scrape(status["regions"]["us-east"]["metrics"]).items()
                              if name == seconds) - before) == 0:  # counted once its last part is sent
            time.sleep(0.01)
        sent = dcsim.control(run_dir, {"command": "status"})["paths"]["us-east->eu-west"]["bytes"] - sent_before
        east.close()
        west.close()
    finally:
        dcsim.down(run_dir)
    return elapsed, sent / outage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="messages per second per region")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=20_000, help="resume: messages both regions hold")
    parser.add_argument("--outage", type=int, default=500, help="resume: messages posted while one is down")
    parser.add_argument("--only-resume", action="store_true", help="measure resume only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlchat-bench-") as tmp:
        print(f"resume after {args.outage} messages missed, on a {args.history}-message history", flush=True)
        outbox = resume(Path(tmp), None, args.history, args.outage)
        states = resume(Path(tmp), 0, args.history, args.outage)
    resumed = (f"| restart after missing {args.outage} messages, on a {args.history}-message history | from the "
               f"outbox: {outbox[0]:.2f} s, {outbox[1]:.0f} B sent per message | comparing states (--outbox-retention "
               f"0): {states[0]:.2f} s, {states[1]:.0f} B | {outbox[0] / states[0]:.2f}x the time |")
    if args.only_resume:
        print(resumed)
        return
    with tempfile.TemporaryDirectory(prefix="mlchat-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        status = dcsim.up(run_dir, REGIONS, None, None, leader_args=("--user-rate=0",))  # writers at full speed
        try:
            print(f"replication lag at {args.rate:g} messages/s per region for {args.seconds:g}s", flush=True)
            lags, per_delivery = mlchat_lag(status, run_dir, args.rate, args.seconds)
            print(f"catch-up after a {args.backlog}-message backlog", flush=True)
            elapsed, per_message = catch_up(status, run_dir, args.backlog)
        finally:
            dcsim.down(run_dir)
        native = native_lag(ONE_WAY_MS, args.rate, args.seconds, Path(tmp))
    everything = [lag for values in lags.values() for lag in values]
    east_west = lags.get(("us-east", "eu-west"), [])
    print("| measure | mlchat | baseline (same run) | ratio |\n|---|---|---|---|")
    for label, values in (("lag us-east -> eu-west, minus the one-way delay", east_west),
                          ("lag over all six directed links, minus each one-way delay", everything)):
        # Commit to visible, one-way delay included, on the baseline's own link only.
        whole = (f"; commit to visible {(ONE_WAY_MS + pct(values, .99)) / (ONE_WAY_MS + pct(native, .99)):.2f}x"
                 if values is east_west else "")
        print(f"| {label} | p50 {pct(values, .5):.1f} ms, p99 {pct(values, .99):.1f} ms | Valkey REPLICAOF over "
              f"the us-east -> eu-west link: p50 {pct(native, .5):.1f} ms, p99 {pct(native, .99):.1f} ms | "
              f"p99 beyond the one-way delay {pct(values, .99) / max(pct(native, .99), 0.1):.1f}x{whole} "
              "(targets: p99 <= 25 ms, <= 1.5x) |")
    print(f"| WAN bytes per message delivered to a region, at {args.rate:g} messages/s per region | "
          f"{per_delivery:.0f} B | raw payload {PAYLOAD} B | {per_delivery / PAYLOAD:.2f}x |")
    print(f"| catch-up of {args.backlog} messages after a partition | {elapsed:.1f} s, {per_message:.0f} B sent "
          f"per message | raw payload {PAYLOAD} B per message | {per_message / PAYLOAD:.2f}x (target <= 1.5x) |")
    print(resumed)


if __name__ == "__main__":
    main()
