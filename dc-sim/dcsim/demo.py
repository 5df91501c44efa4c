"""`make demo`: three regions under dc-sim, replicating to each other across a simulated WAN.

It starts us-east, eu-west and ap-northeast (a leader with its own embedded Valkey each, behind the
WAN proxy mesh with the default round-trip times), then tells, step by step, what each user sees in
their own region: claims, a conversation that replicates between regions, a retry, a cut link that
messages route around, a region cut off that keeps taking writes and converges after the heal, two
users racing for one username, bad input, a fourth region joining, and a region killed and restarted.
It ends with `dcsim compare`'s table: the same workload and faults under every replication mode.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from dcsim import cli as dcsim
from dcsim import compare, sessions
from dcsim.sessions import wait
from mlchat.crdt.hlc import Hlc
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import cluster_pb2

REGIONS = ("us-east", "eu-west", "ap-northeast")
HOME = {"alice": "us-east", "bob": "eu-west", "chika": "ap-northeast"}


def say(text: str) -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n== {title}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Demo:
    def __init__(self, run_dir: Path, status: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.status = status
        self.keys = {user: secrets.token_hex(16) for user in HOME}
        self.clients = {user: ChatClient(self.endpoint(region, region)) for user, region in HOME.items()}
        self.names: dict[str, str] = {}  # user id -> name, for printing
        self.seen: dict[str, list[tuple[pb.Message, int]]] = {user: [] for user in HOME}

    def endpoint(self, region: str, located_in: str) -> str:
        return str(self.status["regions"][region]["endpoints"][located_in])

    def control(self, command: str, **args: str) -> None:
        say(f"$ dcsim {command} {' '.join(args.values())}".rstrip())
        say(f"  {dcsim.control(self.run_dir, {'command': command, **args})}")

    def subscribe(self, user: str, channel: str) -> None:
        stream = self.clients[user].subscribe(channel)

        def read() -> None:
            try:
                for event in stream:
                    self.seen[user].append((event.message, now_ms()))
            except grpc.RpcError:  # the demo is over
                pass

        threading.Thread(target=read, daemon=True).start()

    def digests(self) -> dict[str, str]:
        return {region: self.clients[user].cluster_status(with_digest=True).state_digest
                for user, region in HOME.items()}

    def run(self) -> None:
        step("each user claims a name in their own region")
        for user, client in self.clients.items():
            self.names[client.claim(user, self.keys[user]).user.user_id] = user
        wait(lambda: all(p.state == cluster_pb2.PEER_STATE_UP
                         for c in self.clients.values() for p in c.cluster_status().peers))
        for user, client in self.clients.items():
            state = client.get_user(user_id=client.user.user_id).user.claim_state
            say(f"{user} in {HOME[user]}: {pb.ClaimState.Name(state)} (until every region has seen past it)")
        wait(lambda: all(c.get_user(user_id=c.user.user_id).user.claim_state == pb.CLAIM_STATE_CONFIRMED
                         for c in self.clients.values()))
        say("a moment later, every claim is CONFIRMED: each region's clock watermark has passed them all")

        step("a conversation in #general: everyone writes and reads in their own region")
        for user in HOME:
            self.subscribe(user, "general")
        wait(lambda: all(c.cluster_status().subscribers >= 1 for c in self.clients.values()))
        for i, (user, text) in enumerate([("alice", "morning all"), ("bob", "hi from Dublin"),
                                          ("chika", "hello from Tokyo")]):
            self.clients[user].post("general", text, f"{user}-{i}")
        wait(lambda: all(len(seen) >= 3 for seen in self.seen.values()))
        for user, seen in self.seen.items():
            for message, at in seen:
                lag = at - Hlc.decode(message.hlc).wall_ms
                where = "written here" if message.origin_region == HOME[user] else f"replicated in {lag} ms"
                say(f"  {user} ({HOME[user]}) sees {self.names[message.user_id]}: {message.body!r} ({where})")
        retry = self.clients["bob"].post("general", "hi from Dublin", "bob-1")
        say(f"bob's client retries a post: duplicate={retry.duplicate}, nothing new for anyone")

        step("cut the us-east <-> eu-west link: messages route around it through ap-northeast")
        self.control("partition", a="us-east", b="eu-west")
        self.clients["alice"].post("general", "can you still hear me, bob?", "alice-cut")
        if wait(lambda: any(m.body == "can you still hear me, bob?" for m, _ in self.seen["bob"])):
            say("  bob (eu-west) got alice's message, relayed by ap-northeast")
        self.control("heal")

        step("cut eu-west off completely: both sides keep taking writes, then converge")
        self.control("partition", a="eu-west", b="us-east")
        self.control("partition", a="eu-west", b="ap-northeast")
        self.clients["bob"].post("general", "it's quiet over here", "bob-alone")
        self.clients["alice"].post("general", "bob seems offline", "alice-alone")
        bob_sees = [m.body for m in self.clients["bob"].list("general", limit=50).messages]
        say(f"  during the partition eu-west holds {len(bob_sees)} messages, us-east "
            f"{len(self.clients['alice'].list('general', limit=50).messages)}: each side has only its own news")
        racer_east = ChatClient(self.endpoint("us-east", "us-east"))
        racer_west = ChatClient(self.endpoint("eu-west", "eu-west"))
        east_claim = racer_east.claim("dave", secrets.token_hex(16)).user
        west_claim = racer_west.claim("dave", secrets.token_hex(16)).user
        say(f"  two people claim 'dave', one in each side: both accepted, "
            f"{pb.ClaimState.Name(east_claim.claim_state)} and {pb.ClaimState.Name(west_claim.claim_state)}")
        self.control("heal")
        converged = wait(lambda: len(set(self.digests().values())) == 1, 30)
        say(f"  after the heal every region holds the same state: {converged} "
            f"(digest {next(iter(self.digests().values()))[:16]}...)")
        wait(lambda: all(c.get_user(user_id=u.user_id).user.claim_state != pb.CLAIM_STATE_PROVISIONAL
                         for c, u in ((racer_east, east_claim), (racer_west, west_claim))))
        for label, client, user in (("us-east", racer_east, east_claim), ("eu-west", racer_west, west_claim)):
            state = client.get_user(user_id=user.user_id).user.claim_state
            say(f"  the 'dave' who claimed in {label}: {pb.ClaimState.Name(state)}")
        owner = self.clients["chika"].get_user(username="dave").user
        say(f"  every region agrees the owner is {owner.user_id} (the earlier claim, by hybrid logical clock); "
            "the other is told LOST and can claim another name")
        racer_east.close()
        racer_west.close()

        step("bad input is refused and changes nothing")
        for label, call in [
            ("empty message", lambda: self.clients["alice"].post("general", "   ", "alice-empty")),
            ("invalid channel", lambda: self.clients["alice"].post("No Spaces", "hi", "alice-x")),
            ("oversized message", lambda: self.clients["alice"].post("general", "x" * 5000, "alice-big")),
        ]:
            try:
                call()
            except grpc.RpcError as e:
                say(f"  {label}: {e.code().name}: {e.details()}")

        step("a fourth region, ap-southeast, joins the running cluster")
        self.control("add", region="ap-southeast")
        status = dcsim.control(self.run_dir, {"command": "status"})
        with ChatClient(status["regions"]["ap-southeast"]["endpoints"]["ap-southeast"]) as dana:
            counted_in = sessions.claimed(dana, "dana", secrets.token_hex(16))
            say(f"  ap-southeast takes username claims once every member counts it in: {counted_in}")
            caught_up = wait(lambda: len(dana.list("general", limit=100).messages)
                             == len(self.clients["alice"].list("general", limit=100).messages))
            say(f"  dana, in ap-southeast, reads the whole history of #general there: {caught_up}")
            dana.post("general", "hi all, new office in Singapore", "dana-1")
            seen = wait(lambda: any(m.body == "hi all, new office in Singapore" for m, _ in self.seen["bob"]))
            say(f"  bob, in eu-west, sees dana's first message: {seen}")
            follows = wait(lambda: any(p.region == "ap-southeast" for p in self.clients["bob"].cluster_status().peers))
            say(f"  eu-west follows ap-southeast too, having learned of it by gossip from the others: {follows}")

        step("kill ap-northeast (SIGKILL) while the others keep talking, then restart it")
        self.control("kill", region="ap-northeast")
        for i in range(5):
            self.clients["alice"].post("general", f"update {i} while Tokyo is down", f"alice-down-{i}")
        self.control("restart", region="ap-northeast")
        chika = self.clients["chika"]
        sessions.claimed(chika, "chika", self.keys["chika"])  # once the newcomer counts it in
        caught_up = wait(lambda: len(set(self.digests().values())) == 1, 30)
        say(f"  ap-northeast caught up on what it missed: {caught_up}; #general holds "
            f"{len(chika.list('general', limit=100).messages)} messages in every region")
        for m in chika.list("general", limit=4, newest_first=True).messages:
            say(f"    [{m.origin_region}] {self.names.get(m.user_id, 'someone')}: {m.body}")

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlchat-demo-") as tmp:
        run_dir = Path(tmp) / "run"
        step("dcsim up: three regions, each a leader with its own Valkey, replicating over mutual TLS "
             "behind a simulated WAN")
        status = dcsim.up(run_dir, REGIONS, None, None)
        demo = Demo(run_dir, status)
        try:
            dcsim.print_status(status)
            demo.run()
        finally:
            demo.close()
            dcsim.down(run_dir)
            step("dcsim down: every leader, Valkey and proxy stopped")
    step("the same workload and faults under every replication mode (dcsim compare, short phases)")
    compare.compare(compare.Plan(phase_s=5.0), sessions.MODES, Path("compare-report"))


if __name__ == "__main__":
    main()
