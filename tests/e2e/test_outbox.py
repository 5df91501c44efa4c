"""The outbox end to end: a region that reconnects resumes from its cursor of the peer's outbox, kept in
Redis across restarts of either side, and compares states only when the outbox no longer reaches back that
far. Two real regions behind dc-sim's WAN proxies, each keeping at most 20 changes beyond what the other holds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import sample, wait_until

from dcsim import cli as dcsim
from dcsim.prometheus import scrape
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb

EAST, WEST = "us-east", "eu-west"
RETENTION = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    run_dir = tmp_path_factory.mktemp("outbox") / "run"
    state = dcsim.up(run_dir, (EAST, WEST), None, None, leader_args=("--outbox-retention", str(RETENTION)))
    state["run_dir"] = run_dir
    try:
        yield state
    finally:
        dcsim.down(run_dir)


def control(cluster: dict, command: str, **args: object) -> object:
    return dcsim.control(cluster["run_dir"], {"command": command, **args})


def catch_ups(cluster: dict, region: str, peer: str, kind: str) -> float:
    """Streams `peer` opened at `region` (since its leader started) that caught up so."""
    return sample(scrape(cluster["regions"][region]["metrics"]), "mlchat_catch_ups_total", peer=peer, kind=kind)


def client(cluster: dict, region: str, user: str) -> ChatClient:
    c = ChatClient(cluster["regions"][region]["endpoints"][region], timeout_s=5)
    c.claim(user, f"{user}-claim-key-0123456789")
    return c


def bodies(c: ChatClient, channel: str) -> list[str]:
    return [m.body for m in c.list(channel, limit=500).messages]


def resumed(cluster: dict, region: str, peer: str) -> None:
    wait_until(lambda: catch_ups(cluster, region, peer, "outbox") + catch_ups(cluster, region, peer, "states") > 0,
               20, f"{peer}'s stream from {region} up")


def test_a_restarted_region_resumes_from_its_cursor(cluster):
    east, west = client(cluster, EAST, "outbox_east"), client(cluster, WEST, "outbox_west")
    east.post("resume", "before", "b0")
    wait_until(lambda: bodies(west, "resume") == ["before"], 15, "the first message in eu-west")
    outbox, states = catch_ups(cluster, EAST, WEST, "outbox"), catch_ups(cluster, EAST, WEST, "states")
    control(cluster, "kill", region=WEST)  # SIGKILL: its cursor is what Redis held
    for i in range(5):
        east.post("resume", f"while away {i}", f"a{i}")
    east.set_status(pb.PRESENCE_BUSY, "while away")
    control(cluster, "restart", region=WEST)
    west = client(cluster, WEST, "outbox_west")
    wait_until(lambda: len(bodies(west, "resume")) == 6, 20, "every message in the restarted region")
    assert west.get_status(east.user.user_id).status.text == "while away"
    assert catch_ups(cluster, EAST, WEST, "outbox") > outbox
    assert catch_ups(cluster, EAST, WEST, "states") == states


def test_a_region_away_for_longer_than_the_outbox_reaches_compares_states(cluster):
    east = client(cluster, EAST, "trim_east")
    states = catch_ups(cluster, EAST, WEST, "states")
    control(cluster, "kill", region=WEST)
    for i in range(RETENTION + 10):  # more than the outbox keeps: its cursor is trimmed past
        east.post("trimmed", f"m{i}", f"t{i}")
    control(cluster, "restart", region=WEST)
    west = client(cluster, WEST, "trim_west")
    wait_until(lambda: len(bodies(west, "trimmed")) == RETENTION + 10, 20, "every message in eu-west")
    assert catch_ups(cluster, EAST, WEST, "states") > states


def test_a_sender_killed_while_shipping_is_resumed_from_after_its_restart(cluster):
    east = client(cluster, EAST, "sender_east")
    acked = [east.post("sender", f"m{i}", f"s{i}").message.id for i in range(10)]
    control(cluster, "kill", region=EAST)  # some may not have left yet
    control(cluster, "restart", region=EAST)
    resumed(cluster, EAST, WEST)
    west = client(cluster, WEST, "sender_west")
    wait_until(lambda: len(bodies(west, "sender")) == 10, 20, "every acknowledged message in eu-west")
    ids = [m.id for m in west.list("sender", limit=100).messages]
    assert sorted(ids) == sorted(acked)
    assert catch_ups(cluster, EAST, WEST, "outbox") >= 1 and catch_ups(cluster, EAST, WEST, "states") == 0

