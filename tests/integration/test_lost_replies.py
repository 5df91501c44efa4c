"""Writes whose reply from Redis is lost: Redis ran the script, and the leader never heard. The leader
reaches Valkey through the WAN proxy, which holds Valkey's replies and cuts the connections; a peer's
replication stream must still get every change Redis stored, whether the leader's retry of the call
answered or failed too."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from support import wait_until

from dcsim.proxy import Link
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess
from mlchat.leader.servicer import PEER_PREFIX
from mlchat.leader.tokens import TokenSigner
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import replication_pb2 as rpb
from mlchat.v1 import replication_pb2_grpc


class Proxy:
    """A `Link` in front of Valkey, run by a loop of its own."""

    def __init__(self, valkey: EmbeddedValkey) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.link = Link("redis", ("127.0.0.1", valkey.port or 0))
        asyncio.run_coroutine_threadsafe(self.link.start(), self.loop).result()
        self.url = f"redis://:{valkey.password}@127.0.0.1:{self.link.listen_port}"

    def do(self, action) -> None:  # type: ignore[no-untyped-def]
        """Run `action()` in the proxy's loop, and wait for it."""
        async def run() -> None:
            action()
        asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.link.stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class PeerStream:
    """A replication stream opened as region eu-west: the status texts it receives, by user."""

    def __init__(self, leader: LeaderProcess) -> None:
        secret = (leader.data_dir / "cluster-secret").read_bytes().strip()
        token, _ = TokenSigner(secret).issue(PEER_PREFIX + "eu-west", "eu-west", int(time.time() * 1000))
        self.channel = grpc.insecure_channel(leader.address)
        self.stream = replication_pb2_grpc.ReplicationServiceStub(self.channel).Replicate(
            rpb.ReplicateRequest(region="eu-west"), metadata=(("authorization", f"Bearer {token}"),))
        self.statuses: dict[str, set[str]] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for message in self.stream:
                for status in message.statuses:
                    self.statuses.setdefault(status.user_id, set()).add(status.text)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def script_waiting(direct: redis.Redis) -> bool:
    """Whether a script call with a change's arguments waits in the paused Valkey (a heartbeat's script,
    which only raises the clock floor, has a tenth of their bytes)."""
    listing = direct.execute_command("CLIENT", "LIST").decode()
    clients = [dict(f.split("=", 1) for f in line.split()) for line in listing.splitlines()]
    return any("b" in c["flags"] and c["cmd"] == "evalsha" and int(c["argv-mem"]) > 200 for c in clients)


def held_write(proxy: Proxy, valkey: EmbeddedValkey, pool: ThreadPoolExecutor, write: Callable[[], Any],
               stored: Callable[[redis.Redis], bool]) -> Future:
    """Start `write` and return once Valkey has run it (`stored` says so) and holds its reply back (the
    proxy does)."""
    with redis.Redis(host="127.0.0.1", port=valkey.port, password=valkey.password) as direct:
        # Paused, Valkey takes reads (and health checks) but holds the script until the reply can be held.
        direct.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            call = pool.submit(write)
            wait_until(lambda: script_waiting(direct), 10, "the write's script waiting in Valkey")
            proxy.do(lambda: proxy.link.set("down", blackhole=True))
        finally:
            direct.execute_command("CLIENT", "UNPAUSE")
        wait_until(lambda: stored(direct), 10, "the write stored")
    return call


def held_status(region: Region, valkey: EmbeddedValkey, pool: ThreadPoolExecutor, text: str) -> Future:
    user_id = region.client.user.user_id
    return held_write(region.proxy, valkey, pool, lambda: region.client.set_status(pb.PRESENCE_BUSY, text),
                      lambda direct: direct.hget(f"s:{user_id}", "t") == text.encode())


def held_post(region: Region, valkey: EmbeddedValkey, pool: ThreadPoolExecutor, body: str) -> Future:
    return held_write(region.proxy, valkey, pool, lambda: region.client.post("lobby", body, "held-post"),
                      lambda direct: direct.xlen("c:{lobby}:s") == 1)


@dataclass
class Region:
    """A leader reaching Valkey through `proxy`, a client of it, a peer's stream from it, and a subscriber of
    its channel "lobby"."""

    proxy: Proxy
    client: ChatClient
    peer: PeerStream
    lobby: list[str]  # what the subscriber received

    def shipped(self, text: str) -> bool:
        return text in self.peer.statuses.get(self.client.user.user_id, ())


@pytest.fixture
def region(own_valkey: EmbeddedValkey, tmp_path, unique) -> Iterator[Region]:
    proxy = Proxy(own_valkey)
    try:
        with LeaderProcess("us-east", tmp_path / "leader", redis_url=proxy.url) as leader:
            client = ChatClient(leader.address, timeout_s=20)
            client.claim(f"writer_{unique}", "writer-claim-key-000001")
            client.set_status(pb.PRESENCE_ONLINE, "first")  # Valkey knows the scripts now: one call, one reply
            client.post("warm-up", "first", "first")
            peer = PeerStream(leader)
            subscriber = ChatClient(leader.address)
            subscriber.claim(f"reader_{unique}", "reader-claim-key-000001")
            lobby: list[str] = []
            stream = subscriber.subscribe("lobby")

            def read() -> None:
                try:
                    for event in stream:
                        lobby.append(event.message.body)
                except grpc.RpcError:
                    pass  # cancelled at the end of the test

            threading.Thread(target=read, daemon=True).start()
            try:
                yield Region(proxy, client, peer, lobby)
            finally:
                stream.cancel()
                subscriber.close()
                peer.close()
                client.close()
    finally:
        proxy.close()


def retry_answers(region: Region, call: Future) -> Any:
    """Release the held reply and cut the connection: the leader retries on a new one, which answers."""
    def release_and_cut() -> None:
        region.proxy.link.set("down", blackhole=False)
        region.proxy.link.reset()
    region.proxy.do(release_and_cut)
    return call.result(timeout=20)


def retry_fails_too(region: Region, call: Future) -> None:
    """Cut every attempt's connection until the call fails: it answers UNAVAILABLE."""
    while not call.done():
        region.proxy.do(region.proxy.link.reset)
        wait([call], timeout=0.05)  # returns as soon as the call is answered
    region.proxy.do(lambda: region.proxy.link.set("down", blackhole=False))
    with pytest.raises(grpc.RpcError) as failed:
        call.result()
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_write_whose_retry_answers_is_shipped(region, own_valkey):
    with ThreadPoolExecutor(1) as pool:
        assert retry_answers(region, held_status(region, own_valkey, pool, "ran twice")).status.text == "ran twice"
    wait_until(lambda: region.shipped("ran twice"), 10, "the status shipped")


def test_a_write_whose_retry_fails_too_is_shipped_once_the_outbox_is_read(region, own_valkey):
    with ThreadPoolExecutor(1) as pool:
        retry_fails_too(region, held_status(region, own_valkey, pool, "in doubt"))
    wait_until(lambda: region.shipped("in doubt"), 10, "the status shipped")


def test_a_post_whose_retry_answers_reaches_the_regions_subscribers(region, own_valkey):
    with ThreadPoolExecutor(1) as pool:
        posted = retry_answers(region, held_post(region, own_valkey, pool, "posted twice"))
        assert posted.message.body == "posted twice"
    wait_until(lambda: region.lobby == ["posted twice"], 10, "the post delivered to the subscriber")


def test_a_post_whose_retry_fails_too_reaches_the_regions_subscribers_once_the_outbox_is_read(region, own_valkey):
    with ThreadPoolExecutor(1) as pool:
        retry_fails_too(region, held_post(region, own_valkey, pool, "posted in doubt"))
    wait_until(lambda: region.lobby == ["posted in doubt"], 10, "the post delivered to the subscriber")
