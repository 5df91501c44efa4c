"""`make demo`: one region's leader, and a scripted conversation against it through gRPC.

It starts a leader (with its embedded Valkey) in a temporary directory, has two users talk, shows
retries deduplicating, a live subscription, status, bad input being refused, and a leader restart
that loses nothing. Every step prints what a user would see.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from pathlib import Path

import grpc

from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess
from mlchat.v1 import chat_pb2 as pb


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlchat-demo-") as tmp:
        leader = LeaderProcess("us-east", Path(tmp) / "us-east")
        step("start region us-east (leader + embedded Valkey with AOF)")
        started = time.monotonic()
        leader.start()
        say(f"leader serving on {leader.address} after {time.monotonic() - started:.2f}s")
        try:
            converse(leader)
        finally:
            code = leader.stop()
            say(f"\nleader stopped with SIGTERM (exit code {code}); its Valkey stopped with it")


def converse(leader: LeaderProcess) -> None:
    alice_key, bob_key = secrets.token_hex(16), secrets.token_hex(16)
    with ChatClient(leader.address) as alice, ChatClient(leader.address) as bob, \
            ChatClient(leader.address) as mallory:
        step("claim usernames")
        for client, name, key in ((alice, "alice", alice_key), (bob, "bob", bob_key)):
            user = client.claim(name, key).user
            say(f"{name}: user id {user.user_id}, claim {pb.ClaimState.Name(user.claim_state)} "
                f"in {user.claim_region}")
        try:
            mallory.claim("alice", secrets.token_hex(16))
        except grpc.RpcError as e:
            say(f"mallory tries 'alice': {e.code().name}: {e.details()}")
        again = alice.claim("alice", alice_key).user
        say(f"alice repeats her claim with her key: same user {again.user_id} (idempotent)")

        step("bob subscribes to #general; alice talks")
        received: list[tuple[pb.SubscribeResponse, float]] = []
        stream = bob.subscribe("general")

        def read() -> None:
            try:
                received.extend((event, time.monotonic()) for event in stream)
            except grpc.RpcError:  # cancelled at the end of the demo
                pass

        threading.Thread(target=read, daemon=True).start()
        while bob.cluster_status().subscribers < 1:
            time.sleep(0.01)
        sent: dict[str, float] = {}
        for i, text in enumerate(["hi bob!", "are you around?", "the deploy is done"]):
            sent[text] = time.monotonic()
            alice.post("general", text, f"alice-{i}")
        deadline = time.monotonic() + 5
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        for event, at in received:
            say(f"bob sees live: alice: {event.message.body!r} "
                f"({(at - sent[event.message.body]) * 1000:.1f} ms after alice sent it)")

        step("a retry never makes a second message")
        first = alice.post("general", "lunch at noon?", "alice-lunch")
        retry = alice.post("general", "lunch at noon?", "alice-lunch")
        say(f"post: id {first.message.id}, duplicate={first.duplicate}")
        say(f"retry with the same client_msg_id: id {retry.message.id}, duplicate={retry.duplicate}")

        step("status (last writer wins, by hybrid logical clock)")
        bob.set_status(pb.PRESENCE_BUSY, "in a meeting")
        bob.set_status(pb.PRESENCE_ONLINE, "back at my desk")
        status = alice.get_status(bob.user.user_id).status
        say(f"alice reads bob's status: {pb.Presence.Name(status.presence)} {status.text!r} (hlc {status.hlc})")

        step("bad input is refused and changes nothing")
        for label, call in [
            ("empty message", lambda: alice.post("general", "   ", "alice-empty")),
            ("invalid channel", lambda: alice.post("No Spaces Allowed", "hi", "alice-x")),
            ("forged token", lambda: ChatClient(leader.address).stub.ListMessages(
                pb.ListMessagesRequest(channel="general"), metadata=(("authorization", "Bearer v1.e30.forged"),))),
        ]:
            try:
                call()
                say(f"{label}: accepted?!")
            except grpc.RpcError as e:
                say(f"{label}: {e.code().name}: {e.details()}")

        step("history, newest first")
        for m in alice.list("general", limit=10, newest_first=True).messages:
            who = "alice" if m.user_id == alice.user.user_id else "bob"
            say(f"  [{m.hlc}] {who}: {m.body}")
        stream.cancel()

    step("restart the leader: nothing acknowledged is lost")
    leader.kill()
    say("leader killed with SIGKILL")
    leader.start()
    with ChatClient(leader.address) as alice:
        alice.claim("alice", alice_key)
        bodies = [m.body for m in alice.list("general", limit=100).messages]
        say(f"after restart #general holds {len(bodies)} messages: {bodies}")
        retry = alice.post("general", "lunch at noon?", "alice-lunch")
        say(f"retrying an old post after the restart: duplicate={retry.duplicate}")
        status = alice.cluster_status(with_digest=True)
        say(f"cluster status: region {status.region}, mode {status.mode}, {status.users} users, "
            f"{status.channels} channels, {status.messages} messages, digest {status.state_digest[:16]}...")


if __name__ == "__main__":
    main()
