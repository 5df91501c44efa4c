"""The outbox end to end: a region that reconnects resumes from its cursor of the peer's outbox, kept in
Redis across restarts of either side, and compares states only when the outbox no longer reaches back that
far. Two real regions behind dc-sim's WAN proxies, each keeping at most 20 changes beyond what the other holds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from support import dcsim_run, sample, wait_until

from dcsim import cli as dcsim
from dcsim.prometheus import scrape
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import StatusValue
from mlchat.geo.client import ChatClient
from mlchat.leader.store import rank_key
from mlchat.leader.valkey import AUTH_CONF, url_from_conf
from mlchat.v1 import chat_pb2 as pb

EAST, WEST = "us-east", "eu-west"
RETENTION = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with dcsim_run(tmp_path_factory.mktemp("outbox") / "run", (EAST, WEST),
                   leader_args=("--outbox-retention", str(RETENTION))) as state:
        yield state


def control(cluster: dict, command: str, **args: object) -> object:
    return dcsim.control(cluster["run_dir"], {"command": command, **args})


def now_ms() -> int:
    return int(time.time() * 1000)


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


def stored_cursor(cluster: dict, region: str, peer: str) -> str:
    """The stamp up to which `region` has stored that it holds `peer`'s outbox (saved on heartbeats)."""
    conf = (cluster["run_dir"] / region / "valkey" / AUTH_CONF).read_text()
    with redis.Redis.from_url(url_from_conf(conf)) as direct:
        return (direct.hget("meta:cursors", peer) or b"").decode().partition(":")[2]


def test_a_restarted_region_resumes_from_its_cursor(cluster):
    east, west = client(cluster, EAST, "outbox_east"), client(cluster, WEST, "outbox_west")
    before = east.post("resume", "before", "b0").message.hlc
    wait_until(lambda: bodies(west, "resume") == ["before"], 15, "the first message in eu-west")
    # Killed before a heartbeat stored its cursor, it would have nothing to resume from.
    wait_until(lambda: stored_cursor(cluster, WEST, EAST) >= before, 15, "eu-west's cursor stored")
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


def test_regions_compare_states_now_and_then_so_a_change_no_stream_carried_arrives(tmp_path):
    """Anti-entropy: a status stored in us-east's Redis behind the leader's back (no outbox entry, nothing on
    its streams) reaches eu-west all the same, by the comparisons of states beside the live stream."""
    run_dir = tmp_path / "run"
    with dcsim_run(run_dir, (EAST, WEST), leader_args=("--compare-states-every", "0.5")) as status:
        east = ChatClient(status["regions"][EAST]["endpoints"][EAST], timeout_s=5)
        east.claim("audited_ann", "audited-ann-key-000001")
        west = ChatClient(status["regions"][WEST]["endpoints"][WEST], timeout_s=5)
        west.claim("audit_reader", "audit-reader-key-000001")
        wait_until(lambda: west.cluster_status().users == 2, 10, "both users in eu-west")
        value = StatusValue(east.user.user_id, pb.PRESENCE_BUSY, "behind its back", Hlc(now_ms(), 0).encode(), EAST)
        with redis.Redis.from_url(url_from_conf((run_dir / EAST / "valkey" / AUTH_CONF).read_text())) as direct:
            direct.hset(f"s:{value.user_id}", mapping={"k": rank_key(value), "p": value.presence, "t": value.text,
                                                      "h": value.hlc, "r": value.region})
        wait_until(lambda: west.get_status(east.user.user_id).status.text == "behind its back", 15,
                   "the status compared into eu-west")
        assert catch_ups(status, EAST, WEST, "states") >= 2  # the stream's own, and at least one comparison
        assert sample(scrape(status["regions"][WEST]["metrics"]), "mlchat_peer_up", peer=EAST) == 1
