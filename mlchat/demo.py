"""`make demo`: three regions under dc-sim, with a WAN between them, and users who talk across it.

It starts us-east, eu-west and ap-northeast (a leader with its own embedded Valkey each, behind the WAN
proxy mesh with the default round-trip times), then tells, step by step, what each user sees:
claims, a conversation held in one region by users near and far, retries that never duplicate, a
partition and its heal, bad input refused, and a region killed and restarted without losing anything.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from pathlib import Path

import grpc

from dcsim import cli as dcsim
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb

REGIONS = ("us-east", "eu-west", "ap-northeast")
HOME = {"alice": "us-east", "bob": "eu-west", "chika": "ap-northeast"}


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


def timed(call):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = call()
    return result, (time.perf_counter() - started) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlchat-demo-") as tmp:
        run_dir = Path(tmp) / "run"
        step("dcsim up: three regions, each a leader with its own Valkey, behind a simulated WAN")
        status = dcsim.up(run_dir, REGIONS, None, None)
        try:
            dcsim.print_status(status)
            converse(run_dir, status)
        finally:
            dcsim.down(run_dir)
            step("dcsim down: every leader, Valkey and proxy stopped")


def converse(run_dir: Path, status: dict) -> None:  # type: ignore[type-arg]
    def endpoint(user: str, region: str) -> str:
        return status["regions"][region]["endpoints"][HOME[user]]

    keys = {user: secrets.token_hex(16) for user in HOME}
    # Everyone talks in us-east: alice lives there, bob and chika reach it across the WAN.
    clients = {user: ChatClient(endpoint(user, "us-east")) for user in HOME}
    try:
        step("claim usernames (each user's call crosses the WAN from their home to us-east)")
        for user, client in clients.items():
            resp, ms = timed(lambda c=client, u=user: c.claim(u, keys[u]))
            say(f"{user} (in {HOME[user]}): {pb.ClaimState.Name(resp.user.claim_state)}, "
                f"user id {resp.user.user_id}, {ms:.0f} ms")
        try:
            ChatClient(endpoint("alice", "us-east")).claim("bob", secrets.token_hex(16))
        except grpc.RpcError as e:
            say(f"someone else tries 'bob': {e.code().name}: {e.details()}")

        step("alice subscribes to #general; everyone talks")
        received: list[tuple[pb.SubscribeResponse, float]] = []
        stream = clients["alice"].subscribe("general")

        def read() -> None:
            try:
                received.extend((event, time.perf_counter()) for event in stream)
            except grpc.RpcError:  # cancelled at the end
                pass

        threading.Thread(target=read, daemon=True).start()
        while clients["alice"].cluster_status().subscribers < 1:
            time.sleep(0.01)
        names = {c.user.user_id: u for u, c in clients.items()}
        lines = [("alice", "morning all"), ("bob", "hi from Dublin"), ("chika", "hello from Tokyo"),
                 ("alice", "standup in 5")]
        for i, (user, text) in enumerate(lines):
            resp, ms = timed(lambda u=user, t=text, n=i: clients[u].post("general", t, f"{u}-{n}"))
            say(f"{user} posts {text!r}: acknowledged after {ms:.0f} ms (from {HOME[user]})")
        _wait(lambda: len(received) >= len(lines))
        for event, _ in received:
            say(f"  alice's stream: {names[event.message.user_id]}: {event.message.body}")

        step("a retry never makes a second message")
        again, ms = timed(lambda: clients["bob"].post("general", "hi from Dublin", "bob-1"))
        say(f"bob's client retries its post: duplicate={again.duplicate}, same id {again.message.id}")

        step("partition eu-west <-> us-east")
        say(dcsim.control(run_dir, {"command": "partition", "a": "eu-west", "b": "us-east"}))
        bob = ChatClient(endpoint("bob", "us-east"), timeout_s=1.0)
        bob.token = clients["bob"].token
        try:
            bob.post("general", "anyone there?", "bob-partitioned")
        except grpc.RpcError as e:
            say(f"bob's post to us-east: {e.code().name} after its 1 s deadline (the WAN path hangs)")
        resp, ms = timed(lambda: clients["chika"].post("general", "still here", "chika-partition"))
        say(f"chika (ap-northeast) is not cut off: acknowledged after {ms:.0f} ms")
        with ChatClient(endpoint("bob", "eu-west")) as local:
            local.claim("bob", keys["bob"])
            local.post("general", "writing to my own region meanwhile", "bob-local")
            say("bob's own region eu-west still takes his writes: every region is a leader")
        say(dcsim.control(run_dir, {"command": "heal"}))
        resp = clients["bob"].post("general", "anyone there?", "bob-partitioned")
        if resp.duplicate:
            say("after the heal bob's client retries the failed post: duplicate=True. The request had been "
                "held on the partitioned path and reached us-east at the heal; the retry returned it "
                "instead of posting it twice")
        else:
            say("after the heal bob's client retries the failed post: stored now, once")
        bob.close()

        step("bad input is refused and changes nothing")
        for label, call in [
            ("empty message", lambda: clients["alice"].post("general", "   ", "alice-empty")),
            ("invalid channel", lambda: clients["alice"].post("No Spaces", "hi", "alice-x")),
            ("oversized message", lambda: clients["alice"].post("general", "x" * 5000, "alice-big")),
        ]:
            try:
                call()
            except grpc.RpcError as e:
                say(f"{label}: {e.code().name}: {e.details()}")

        step("kill us-east (SIGKILL) and restart it: nothing acknowledged is lost")
        stream.cancel()
        history = [m.body for m in clients["alice"].list("general", limit=100).messages]
        say(dcsim.control(run_dir, {"command": "kill", "region": "us-east"}))
        say(dcsim.control(run_dir, {"command": "restart", "region": "us-east"}))
        clients["alice"].claim("alice", keys["alice"])
        after = [m.body for m in clients["alice"].list("general", limit=100).messages]
        say(f"#general in us-east before the kill: {len(history)} messages; after the restart: {len(after)}, "
            f"{'identical' if after == history else 'DIFFERENT'}")
        for m in clients["alice"].list("general", limit=3, newest_first=True).messages:
            say(f"  latest: [{m.hlc}] {names[m.user_id]}: {m.body}")
    finally:
        for client in clients.values():
            client.close()


def _wait(condition, deadline_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


if __name__ == "__main__":
    main()
