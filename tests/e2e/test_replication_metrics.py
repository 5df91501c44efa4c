"""Replication metrics end to end: two real regions behind dc-sim's WAN proxies, scraped over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import dcsim_run, sample, wait_until

from dcsim import cli as dcsim
from dcsim.prometheus import scrape
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb

EAST, WEST = "us-east", "eu-west"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with dcsim_run(tmp_path_factory.mktemp("metrics") / "run", (EAST, WEST)) as state:
        yield state


def metrics(cluster: dict, region: str) -> dict:
    return scrape(cluster["regions"][region]["metrics"])


def client(cluster: dict, region: str) -> ChatClient:
    return ChatClient(cluster["regions"][region]["endpoints"][region], timeout_s=5)


def test_each_region_reports_replication_per_peer(cluster: dict) -> None:
    for region, peer in ((EAST, WEST), (WEST, EAST)):
        wait_until(lambda: sample(metrics(cluster, region), "mlchat_peer_up", peer=peer) == 1,  # noqa: B023
                   20, f"{region}'s stream from {peer} up")
        samples = metrics(cluster, region)
        assert sample(samples, "mlchat_region_info", region=region, mode="async") == 1
        assert ("mlchat_replication_backlog", frozenset({("peer", peer)})) in samples
    sent_before = sample(metrics(cluster, EAST), "mlchat_deltas_sent_total", peer=WEST)
    applied_before = sample(metrics(cluster, WEST), "mlchat_deltas_applied_total", peer=EAST)
    with client(cluster, EAST) as east:
        east.claim("metered_poster", "metered-poster-key-0001")
        east.post("metered", "across the WAN", "m1")
    # A claim and a message: one delta or two (a lagging stream merges what it has queued).
    wait_until(lambda: sample(metrics(cluster, WEST), "mlchat_deltas_applied_total", peer=EAST) > applied_before,
               20, "eu-west applying what us-east sent")
    assert sample(metrics(cluster, EAST), "mlchat_deltas_sent_total", peer=WEST) > sent_before
    # The message crosses the WAN on the live stream: its lag counts the one-way delay at least.
    wait_until(lambda: sample(metrics(cluster, WEST), "mlchat_replication_lag_ms", peer=EAST) > 0,
               20, "eu-west's lag from us-east measured on the message")
    assert sample(metrics(cluster, WEST), "mlchat_hot_shards") >= 1


def test_concurrent_status_writes_count_a_conflict(cluster: dict) -> None:
    def conflicts(region: str) -> float:
        return sample(metrics(cluster, region), "mlchat_conflicts_total", kind="status")

    before = {region: conflicts(region) for region in (EAST, WEST)}
    with client(cluster, EAST) as east, client(cluster, WEST) as west:
        east.claim("two_minds", "two-minds-claim-key-0001")
        west.token, west.causal = east.token, dict(east.causal)  # the same user, in the other region
        west.get_user(east.user.user_id)  # waits, with the causal token, until eu-west has the claim
        dcsim.control(cluster["run_dir"], {"command": "partition", "a": EAST, "b": WEST})
        try:
            east.set_status(pb.PRESENCE_ONLINE, "from the east")
            west.set_status(pb.PRESENCE_AWAY, "from the west")
        finally:
            dcsim.control(cluster["run_dir"], {"command": "heal"})

        def final() -> set[tuple[str, str]]:
            statuses = [c.get_status(east.user.user_id).status for c in (east, west)]
            return {(s.text, s.origin_region) for s in statuses}

        wait_until(lambda: len(final()) == 1, 20, "both regions holding the same status")
        (_, winner), = final()
    # The region holding the winner saw the other write arrive and lose.
    wait_until(lambda: conflicts(winner) >= before[winner] + 1, 20, f"a status conflict counted in {winner}")


def test_concurrent_claims_on_one_name_count_a_conflict_in_each_region(cluster: dict) -> None:
    def conflicts(region: str) -> float:
        return sample(metrics(cluster, region), "mlchat_conflicts_total", kind="claim")

    before = {region: conflicts(region) for region in (EAST, WEST)}
    with client(cluster, EAST) as east, client(cluster, WEST) as west:
        dcsim.control(cluster["run_dir"], {"command": "partition", "a": EAST, "b": WEST})
        try:
            east.claim("contested", "contested-east-key-0001")
            west.claim("contested", "contested-west-key-0001")
        finally:
            dcsim.control(cluster["run_dir"], {"command": "heal"})
    for region in (EAST, WEST):  # each region receives the other's claim on a name it holds
        wait_until(lambda: conflicts(region) == before[region] + 1, 20,  # noqa: B023
                   f"a claim conflict counted in {region}")
