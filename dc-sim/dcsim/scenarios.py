"""`dcsim scenario NAME`: one conflict case, told from the point of view of a user in each region.

Each scenario starts a fresh three-region cluster in every mode asked for (all of them by default),
plays its script through real clients behind the WAN proxy, and prints what each user saw: answers,
errors, what each region shows, and how long things took.

- username-race: users in three regions claim one name at the same moment.
- status-conflict: one user, signed in on two devices in two regions, sets two statuses at once.
- partition-heal: a region is cut off, users on both sides post and claim one name, the partition heals.
- region-failover: a region dies under a user who keeps posting (with a client that fails over).
- client-moves-region: a user posts at home, flies to another region and reads at once.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from dcsim import sessions
from dcsim.sessions import REGIONS, Run
from mlchat.geo.client import ChatClient
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.v1 import chat_pb2 as pb

STATES = {pb.CLAIM_STATE_PROVISIONAL: "provisional", pb.CLAIM_STATE_CONFIRMED: "confirmed",
          pb.CLAIM_STATE_LOST: "lost"}


def say(text: str) -> None:
    print(text, flush=True)


def user(cluster: Run, region: str, name: str, timeout_s: float = 10) -> ChatClient:
    c = ChatClient(cluster.address(region, region), timeout_s=timeout_s)
    c.claim(name, f"{name}-scenario-claim-key-01")
    return c


def error(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]


def at_once(calls: dict[str, Callable[[], Any]]) -> dict[str, tuple[Any, float]]:
    """Run calls at the same moment, one thread each: label -> (result or RpcError, seconds taken)."""
    results: dict[str, tuple[Any, float]] = {}
    start = threading.Barrier(len(calls))

    def run(label: str, call: Callable[[], Any]) -> None:
        start.wait()
        t = time.perf_counter()
        try:
            outcome = call()
        except grpc.RpcError as e:
            outcome = e
        results[label] = (outcome, time.perf_counter() - t)

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def username_race(cluster: Run) -> None:
    racers = {r: ChatClient(cluster.address(r, r), timeout_s=15) for r in REGIONS}
    say("  three users, one in each region, claim the name 'ringo' at the same moment:")
    results = at_once({r: (lambda c=c, r=r: c.claim("ringo", f"ringo-in-{r}-claim-key-01")) for r, c in racers.items()})
    for region, (outcome, took) in results.items():
        claimed_now = isinstance(outcome, pb.ClaimUsernameResponse)
        answer = f"claimed, {STATES.get(outcome.user.claim_state, '?')}" if claimed_now else error(outcome)
        say(f"    {region:13} user sees: {answer}  ({took * 1000:.0f} ms)")
    claimed = {r: c for r, c in racers.items() if c.token}

    def settled() -> bool:
        return all(c.get_user(user_id=c.user.user_id).user.claim_state != pb.CLAIM_STATE_PROVISIONAL
                   for c in claimed.values())

    sessions.wait(settled, 20)
    say("  once the regions have exchanged their claims:")
    for region, c in racers.items():
        if region not in claimed:
            say(f"    {region:13} user was refused at once and holds no claim")
            continue
        state = STATES.get(c.get_user(user_id=c.user.user_id).user.claim_state, "?")
        owner = c.get_user(username="ringo").user.user_id
        say(f"    {region:13} user's claim is {state}; this region says 'ringo' belongs to "
            f"{'this user' if owner == c.user.user_id else owner}")
        if state == "lost":
            other = f"ringo_{region.split('-')[0]}"
            again = c.claim(other, f"ringo-in-{region}-claim-key-01")
            say(f"    {'':13} so the user picks '{other}' instead: {STATES.get(again.user.claim_state, '?')}")


def status_conflict(cluster: Run) -> None:
    phone = user(cluster, "us-east", "kenji")
    laptop = ChatClient(cluster.address("ap-northeast", "ap-northeast"), timeout_s=10)
    laptop.claim("kenji", "kenji-scenario-claim-key-01")  # the same user, signed in on another device
    say("  kenji's phone (us-east) and laptop (ap-northeast) set his status at the same moment:")
    results = at_once({"phone in us-east": lambda: phone.set_status(pb.PRESENCE_BUSY, "in a meeting"),
                       "laptop in ap-northeast": lambda: laptop.set_status(pb.PRESENCE_AWAY, "on a plane")})
    for label, (outcome, took) in results.items():
        answer = f"'{outcome.status.text}'" if isinstance(outcome, pb.SetStatusResponse) else error(outcome)
        say(f"    {label:24} is answered {answer}  ({took * 1000:.0f} ms)")
    readers = {r: user(cluster, r, f"friend_{r.split('-')[0]}") for r in REGIONS}

    def shown(r: str) -> str:
        readers[r].causal = {}
        try:
            return readers[r].get_status(phone.user.user_id).status.text or "(none)"
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return "(not arrived yet)"

    say("  right away, friends in each region see: " + ", ".join(f"{r} {shown(r)!r}" for r in REGIONS))
    agreed = sessions.wait(lambda: len({shown(r) for r in REGIONS}) == 1, 15)
    say(f"  {'then every region agrees' if agreed else 'regions still disagree'}: '{shown('us-east')}' "
        "(the later stamp (hlc, region) wins, in every region)")


def partition_heal(cluster: Run) -> None:
    users = {r: user(cluster, r, f"writer_{r.split('-')[0]}", timeout_s=6) for r in REGIONS}
    cluster.isolate("ap-northeast")
    say("  ap-northeast is cut off from the other two regions; each region's user posts:")
    for region, c in users.items():
        t = time.perf_counter()
        try:
            c.post("news", f"posted in {region} during the partition", f"part-{region}")
            outcome = "accepted"
        except grpc.RpcError as e:
            outcome = error(e)
        say(f"    {region:13} {outcome}  ({(time.perf_counter() - t) * 1000:.0f} ms)")
    for region, c in users.items():
        c.causal = {}
        say(f"    {region:13} sees {len(c.list('news').messages)} message(s) in 'news'")
    say("  a user on each side claims the name 'islander' at the same moment:")
    claimers = {r: ChatClient(cluster.address(r, r), timeout_s=10) for r in ("us-east", "ap-northeast")}
    results = at_once({r: (lambda c=c, r=r: c.claim("islander", f"islander-{r}-claim-key-01"))
                       for r, c in claimers.items()})
    for region, (outcome, took) in results.items():
        answer = (f"claimed, {STATES.get(outcome.user.claim_state, '?')}"
                  if isinstance(outcome, pb.ClaimUsernameResponse) else error(outcome))
        say(f"    {region:13} {answer}  ({took * 1000:.0f} ms)")
    cluster.control("heal")
    healed = time.perf_counter()
    converged = sessions.wait(cluster.converged, 30)
    say(f"  healed: every region holds the same state after {time.perf_counter() - healed:.2f} s"
        if converged else "  healed, but the regions have not converged within 30 s")
    for region, c in users.items():
        c.causal = {}
        say(f"    {region:13} sees {len(c.list('news').messages)} message(s) in 'news'")
    for region, c in claimers.items():
        if c.token:
            sessions.wait(lambda c=c: c.get_user(user_id=c.user.user_id).user.claim_state
                          != pb.CLAIM_STATE_PROVISIONAL, 15)
            state = STATES.get(c.get_user(user_id=c.user.user_id).user.claim_state, "?")
            say(f"    {region:13} user's claim on 'islander' ends {state}")
        c.close()


def region_failover(cluster: Run) -> None:
    traveller = ChatClient({r: cluster.address(r, "us-east") for r in REGIONS}, timeout_s=3)
    traveller.claim("maria", "maria-scenario-claim-key-01")
    say(f"  maria, in us-east, talks to the nearest region first: {' > '.join(traveller.order)}")
    status = traveller.cluster_status()
    if status.primary:
        say(f"  the primary is {status.primary} (epoch {status.epoch})")
    cluster.control("kill", region="us-east")
    say("  us-east's leader is killed; maria keeps posting, once a second:")
    for i in range(10):
        t = time.perf_counter()
        try:
            message = traveller.post("failover", f"message {i}", f"failover-{i}").message
            outcome = f"accepted by {traveller.region}, written in {message.origin_region}"
        except grpc.RpcError as e:
            outcome = error(e)
        took = time.perf_counter() - t
        say(f"    post {i}: {outcome}  ({took * 1000:.0f} ms)")
        time.sleep(max(0.0, 1 - took))
    if status.primary:
        now = traveller.cluster_status()
        say(f"  {traveller.region} now follows primary {now.primary} (epoch {now.epoch})")
    cluster.control("restart", region="us-east")
    say(f"  us-east restarted; maria sees {len(traveller.list('failover').messages)} of her messages")


def client_moves_region(cluster: Run) -> None:
    yuki = user(cluster, "us-east", "yuki")
    for i, with_token in enumerate((False, True)):
        body = f"boarding flight {i + 1}"
        yuki.post("travel", body, f"travel-{i}")
        say(f"  yuki posts '{body}' in us-east, lands in ap-northeast and reads at once, "
            f"{'with' if with_token else 'without'} her causal token:")
        reader = ChatClient(cluster.address("ap-northeast", "ap-northeast"), timeout_s=10)
        reader.token, reader.causal = yuki.token, dict(yuki.causal) if with_token else {}
        t = time.perf_counter()
        seen = [m.body for m in reader.list("travel").messages]
        took = (time.perf_counter() - t) * 1000
        verdict = "her own post is there" if body in seen else "her own post is MISSING (read-your-writes broken)"
        say(f"    sees {seen or 'nothing'}: {verdict}  ({took:.0f} ms)")
        reader.close()


SCENARIOS: dict[str, Callable[[Run], None]] = {
    "username-race": username_race, "status-conflict": status_conflict, "partition-heal": partition_heal,
    "region-failover": region_failover, "client-moves-region": client_moves_region}


def play(name: str, modes: Sequence[tuple[Mode, SyncAcks]]) -> None:
    for mode, acks in modes:
        say(f"\n== {name}, mode {sessions.label(mode, acks)}")
        with sessions.run(mode, acks) as cluster:
            SCENARIOS[name](cluster)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dcsim scenario", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=list(SCENARIOS))
    parser.add_argument("--modes", default="all", help="comma-separated modes (default: every mode)")
    args = parser.parse_args(argv)
    by_label = {sessions.label(m, a): (m, a) for m, a in sessions.MODES}
    wanted = list(by_label) if args.modes == "all" else args.modes.split(",")
    unknown = [m for m in wanted if m not in by_label]
    if unknown:
        raise SystemExit(f"dcsim scenario: unknown mode {unknown[0]!r}; choose from {', '.join(by_label)}")
    play(args.name, [by_label[m] for m in wanted])


if __name__ == "__main__":
    main()
