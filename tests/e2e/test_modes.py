"""Each replication mode's guarantee, and its documented anomaly, on three real regions behind the WAN proxy."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from support import dcsim_run, wait_until

from dcsim import cli as dcsim
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import cluster_pb2

REGIONS = ("us-east", "eu-west", "ap-northeast")


def start(tmp_path_factory: pytest.TempPathFactory, mode: str, sync_acks: str = "quorum") -> Iterator[dict]:
    with dcsim_run(tmp_path_factory.mktemp(mode) / "run", REGIONS, mode=mode, sync_acks=sync_acks) as state:
        connected(state)
        yield state


@pytest.fixture(scope="module")
def strong_names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield from start(tmp_path_factory, "strong-names")


@pytest.fixture(scope="module")
def sync_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield from start(tmp_path_factory, "sync", "all")


@pytest.fixture(scope="module")
def sync_quorum(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield from start(tmp_path_factory, "sync", "quorum")


def control(cluster: dict, command: str, **args: object) -> object:
    return dcsim.control(cluster["run_dir"], {"command": command, **args})


def connect(cluster: dict, region: str, timeout_s: float = 10) -> ChatClient:
    return ChatClient(cluster["regions"][region]["endpoints"][region], timeout_s=timeout_s)


def client(cluster: dict, region: str, user: str) -> ChatClient:
    c = connect(cluster, region)
    c.claim(user, f"{user}-claim-key-0123456789")
    return c


def isolate(cluster: dict, region: str) -> None:
    """Cut `region` off from the others, and wait until it sees them gone and they see it gone."""
    watcher = client(cluster, region, "partition_watcher")  # signed in first: claims may need a majority
    for other in REGIONS:
        if other != region:
            control(cluster, "partition", a=region, b=other)
    views = [connect(cluster, other) for other in REGIONS if other != region]
    for view in views:
        view.token = watcher.token  # any region verifies a token

    def cut_off() -> bool:
        return (all(p.state != cluster_pb2.PEER_STATE_UP for p in watcher.cluster_status().peers)
                and all(p.state != cluster_pb2.PEER_STATE_UP
                        for view in views for p in view.cluster_status().peers if p.region == region))

    wait_until(cut_off, 15, f"{region} and its peers see each other unreachable")
    for view in views:
        view.close()


def heal(cluster: dict) -> None:
    control(cluster, "heal")
    connected(cluster)


def connected(cluster: dict) -> None:
    """Wait until every region's streams from its peers are up (a sync write may be refused until then,
    the watcher's claim included)."""
    for region in REGIONS:
        watcher = connect(cluster, region)

        def peers_up(w: ChatClient = watcher) -> bool:
            try:
                if not w.token:
                    w.claim("partition_watcher", "partition_watcher-claim-key-0123456789")
                return all(p.state == cluster_pb2.PEER_STATE_UP for p in w.cluster_status().peers)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False

        wait_until(peers_up, 20, f"{region} sees its peers")


def race(attempts: dict[str, tuple[str, str]]) -> dict[str, pb.ClaimUsernameResponse | grpc.RpcError]:
    """Run ClaimUsername calls at the same moment: label -> (address, claim key, name) -> outcome."""
    outcomes: dict[str, pb.ClaimUsernameResponse | grpc.RpcError] = {}
    barrier = threading.Barrier(len(attempts))

    def claim(label: str, address: str, key: str, name: str) -> None:
        with ChatClient(address, timeout_s=15) as c:
            barrier.wait()
            try:
                outcomes[label] = c.claim(name, key)
            except grpc.RpcError as e:
                outcomes[label] = e

    threads = [threading.Thread(target=claim, args=(label, *args)) for label, args in attempts.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def endpoint(cluster: dict, region: str) -> str:
    return cluster["regions"][region]["endpoints"][region]


# strong-names ------------------------------------------------------------------------------------


def test_strong_names_a_concurrent_second_claim_gets_already_exists(strong_names):
    outcomes = race({r: (endpoint(strong_names, r), f"{r}-key-for-the-race-0001", "contested") for r in REGIONS})
    winners = [r for r, o in outcomes.items() if isinstance(o, pb.ClaimUsernameResponse)]
    losers = {r: o for r, o in outcomes.items() if isinstance(o, grpc.RpcError)}
    assert len(winners) == 1, outcomes
    assert {e.code() for e in losers.values()} == {grpc.StatusCode.ALREADY_EXISTS}
    assert all("is taken" in e.details() for e in losers.values())
    won = outcomes[winners[0]]
    assert won.user.claim_state == pb.CLAIM_STATE_CONFIRMED  # decided: never provisional
    for region in REGIONS:
        reader = client(strong_names, region, "owner_reader")
        wait_until(lambda r=reader: _owner(r, "contested") == won.user.user_id, 10, f"the owner in {region}")


def _owner(reader: ChatClient, name: str) -> str:
    try:
        return reader.get_user(username=name).user.user_id
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return ""
        raise


def test_strong_names_a_claim_in_a_minority_fails_clearly_and_the_majority_goes_on(strong_names):
    isolate(strong_names, "ap-northeast")
    try:
        with connect(strong_names, "ap-northeast", timeout_s=15) as cut_off, pytest.raises(grpc.RpcError) as failed:
            cut_off.claim("islander", "islander-claim-key-00001")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no majority of regions (2 of 3)" in failed.value.details()
        majority_side = connect(strong_names, "us-east").claim("mainlander", "mainlander-claim-key-0001")
        assert majority_side.user.claim_state == pb.CLAIM_STATE_CONFIRMED
    finally:
        heal(strong_names)
    # The cut-off claim's outcome was unknown; the same request, repeated, settles it either way, and
    # every region then names the same single owner.
    again = connect(strong_names, "ap-northeast").claim("islander", "islander-claim-key-00001")
    assert again.user.claim_state == pb.CLAIM_STATE_CONFIRMED
    rival = race({"rival": (endpoint(strong_names, "eu-west"), "rival-islander-key-0001", "islander")})["rival"]
    assert isinstance(rival, grpc.RpcError) and rival.code() == grpc.StatusCode.ALREADY_EXISTS


def test_strong_names_cluster_status_shows_the_mode(strong_names):
    assert client(strong_names, "eu-west", "mode_reader").cluster_status().mode == "strong-names"


# sync ---------------------------------------------------------------------------------------------


def test_sync_all_an_acknowledged_message_is_already_held_by_every_region(sync_all):
    author = client(sync_all, "us-east", "sync_author")
    readers = {r: client(sync_all, r, f"sync_reader_{i}") for i, r in enumerate(REGIONS)}
    for i in range(5):
        posted = author.post("synced", f"message {i}", f"s{i}").message
        # No causal token, no waiting: once acknowledged, every region has it.
        for region, reader in readers.items():
            reader.causal = {}
            ids = [m.id for m in reader.list("synced").messages]
            assert posted.id in ids, f"{region} lacks an acknowledged message"
    assert author.cluster_status().mode == "sync=all"


def test_sync_all_refuses_writes_while_a_region_is_unreachable(sync_all):
    author = client(sync_all, "us-east", "sync_refused")
    isolate(sync_all, "ap-northeast")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            author.post("refused", "cannot be held everywhere", "r1")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "nothing was written" in refused.value.details()
        assert author.list("refused").messages == []  # nothing half-applied
    finally:
        heal(sync_all)
    assert author.post("refused", "after the heal", "r2").message.body == "after the heal"


def test_sync_quorum_keeps_writing_with_one_region_cut_off(sync_quorum):
    author = client(sync_quorum, "us-east", "quorum_author")
    isolate(sync_quorum, "ap-northeast")
    try:
        posted = author.post("quorum", "held by a majority", "q1").message
        reader = client(sync_quorum, "eu-west", "quorum_reader")
        reader.causal = {}
        assert posted.id in [m.id for m in reader.list("quorum").messages]
    finally:
        heal(sync_quorum)
    assert sync_quorum and author.cluster_status().mode == "sync=quorum"


def test_sync_a_write_that_times_out_waiting_stays_and_a_retry_confirms_it(sync_all):
    author = client(sync_all, "us-east", "sync_in_doubt")
    # One-way cuts: us-east still hears ap-northeast (so it counts as reachable), but nothing reaches
    # ap-northeast, directly or relayed through eu-west.
    control(sync_all, "partition", a="us-east", b="ap-northeast", one_way=True)
    control(sync_all, "partition", a="eu-west", b="ap-northeast", one_way=True)
    try:
        with pytest.raises(grpc.RpcError) as waited:
            author.post("doubt", "in doubt", "d1")
        assert waited.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        heal(sync_all)
    retried = author.post("doubt", "in doubt", "d1")
    assert retried.duplicate  # the first attempt's message, not a second one
    assert [m.body for m in author.list("doubt").messages] == ["in doubt"]


def test_sync_all_a_write_waiting_as_a_cut_heals_is_acknowledged_after_it_once_every_region_holds_it(sync_all):
    author = client(sync_all, "us-east", "sync_waiter")  # its 10 s deadline lets the write wait 5 s
    home = client(sync_all, "us-east", "sync_waiter_home")
    far = client(sync_all, "ap-northeast", "sync_waiter_far")
    answer: list[pb.PostMessageResponse | grpc.RpcError] = []

    def post() -> None:
        try:
            answer.append(author.post("waiting", "sent as the cut began", "w1"))
        except grpc.RpcError as e:
            answer.append(e)

    for other in ("us-east", "eu-west"):
        control(sync_all, "partition", a="ap-northeast", b=other)
    # Sent before us-east notices ap-northeast gone (a peer timeout), the write is admitted and stored.
    writer = threading.Thread(target=post)
    writer.start()
    try:
        home.causal = {}
        wait_until(lambda: [m.body for m in home.list("waiting").messages] == ["sent as the cut began"], 3,
                   "the write stored in us-east")
        assert answer == [], "acknowledged while ap-northeast could not hold it"
    finally:
        heal(sync_all)
        writer.join()
    assert isinstance(answer[0], pb.PostMessageResponse), answer[0]
    far.causal = {}  # no token, no waiting: acknowledged means ap-northeast holds it
    assert answer[0].message.id in [m.id for m in far.list("waiting").messages]


# single-leader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_leader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    yield from start(tmp_path_factory, "single-leader")


def primary_seen_by(reader: ChatClient) -> tuple[str, int]:
    status = reader.cluster_status()
    return status.primary, status.epoch


def test_single_leader_writes_anywhere_are_taken_by_the_primary(single_leader):
    assert primary_seen_by(client(single_leader, "eu-west", "term_reader")) == ("us-east", 1)  # listed first
    author = client(single_leader, "eu-west", "forwarded_author")
    posted = author.post("primary", "written through eu-west", "p1").message
    assert posted.origin_region == "us-east"
    # The causal token from the primary lets the author read it back where it is.
    assert posted.id in [m.id for m in author.list("primary").messages]


def test_single_leader_private_channels_and_memberships_are_taken_by_the_primary(single_leader):
    author = client(single_leader, "eu-west", "private_author")
    member = client(single_leader, "ap-northeast", "private_member")
    made = author.create_private_channel("primary-private").channel
    added = author.add_member("primary-private", member.user.user_id).member
    assert made.origin_region == added.origin_region == "us-east"
    author.post("primary-private", "for the two of us", "pp1")
    member.causal = dict(author.causal)  # as if told by the author: the read waits until its region has it
    assert [m.body for m in member.list("primary-private").messages] == ["for the two of us"]


def test_single_leader_a_second_claim_of_a_name_gets_already_exists(single_leader):
    outcomes = race({r: (endpoint(single_leader, r), f"{r}-key-single-leader-1", "only_one") for r in REGIONS})
    assert sorted(type(o).__name__ for o in outcomes.values()).count("ClaimUsernameResponse") == 1, outcomes
    refused = [o for o in outcomes.values() if isinstance(o, grpc.RpcError)]
    assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}


def test_single_leader_failover_loses_no_acknowledged_write_and_fences_the_old_primary(single_leader):
    author = client(single_leader, "eu-west", "failover_author")
    # Signed in beforehand: while there is no primary, claims (writes) cannot be taken.
    readers = {r: client(single_leader, r, "term_reader") for r in REGIONS}
    acked = [author.post("failover", f"before {i}", f"b{i}").message.id for i in range(20)]
    control(single_leader, "kill", region="us-east")
    survivors = [r for r in REGIONS if r != "us-east"]

    def new_primary() -> bool:
        terms = {primary_seen_by(readers[r]) for r in survivors}
        return len(terms) == 1 and next(iter(terms))[0] in survivors

    wait_until(new_primary, 30, "the survivors agree on a new primary")
    primary, epoch = primary_seen_by(readers["eu-west"])
    assert epoch >= 2

    def write_taken() -> bool:
        try:
            return author.post("failover", "after", "a1").message.origin_region == primary
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:  # the new primary may still be taking its lease
                raise
            return False

    wait_until(write_taken, 20, "writes taken by the new primary")
    reader = readers[primary]
    reader.causal = dict(author.causal)
    ids = [m.id for m in reader.list("failover", limit=500).messages]
    assert set(acked) <= set(ids) and len(ids) == len(set(ids)) == 21

    # The old primary comes back: it never takes a write itself again in its old epoch.
    control(single_leader, "restart", region="us-east")
    revived = connect(single_leader, "us-east")
    revived.token = author.token  # any region verifies a token
    outcomes = []

    def forwarded_to_the_new_primary() -> bool:
        try:
            outcomes.append(revived.post("failover", "to the revived one", "r1").message.origin_region)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            outcomes.append("refused")
        return outcomes[-1] == primary

    wait_until(forwarded_to_the_new_primary, 20, "the revived region forwarding to the new primary")
    assert "us-east" not in outcomes
    revived.causal = {}
    assert primary_seen_by(revived) == (primary, epoch)


def test_dcsim_scenario_tells_what_each_region_saw(capsys):
    from dcsim import cli as dcsim_cli

    dcsim_cli.main(["scenario", "username-race", "--modes", "strong-names"])
    out = capsys.readouterr().out
    assert "== username-race, mode strong-names" in out
    assert out.count("user sees: claimed, confirmed") == 1
    assert out.count("user sees: ALREADY_EXISTS: username 'ringo' is taken") == 2
    assert out.count("user was refused at once and holds no claim") == 2


def test_single_leader_a_region_cut_off_from_the_primary_refuses_writes_and_claims_clearly(single_leader):
    primary, _ = primary_seen_by(client(single_leader, "us-east", "term_reader"))
    cut = next(r for r in REGIONS if r != primary)  # a follower (an earlier test may have moved the primary)
    author = client(single_leader, cut, "cut_off_author")
    isolate(single_leader, cut)
    try:
        for call in (lambda: author.post("cut", "from the minority", "c1"),
                     lambda: connect(single_leader, cut).claim("cut_off_name", "cut-off-claim-key-0001")):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"is unreachable from region {cut}: nothing was written" in refused.value.details()
    finally:
        heal(single_leader)
    assert author.post("cut", "after the heal", "c2").message.origin_region == primary
