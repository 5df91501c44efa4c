"""A region served by several processes on one address (`mlchat leader --processes 3`): the core and two
gateways, real processes, real sockets. Which process serves a connection is the kernel's choice: a
test tells by the core's `mlchat_gateway_calls_total`, which moves only for calls a gateway passed on."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import dcsim_run, flush, pid_alive, sample, wait_until

from dcsim.prometheus import scrape
from mlchat import certs
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, descendants, free_port
from mlchat.tls import client_channel
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import chat_pb2_grpc, cluster_pb2, cluster_pb2_grpc


class Region:
    def __init__(self, leader: LeaderProcess, metrics_url: str) -> None:
        self.leader = leader
        self.metrics_url = metrics_url

    def metric(self, name: str) -> float:
        return sample(scrape(self.metrics_url), name)

    def gateway_pids(self) -> set[int]:
        assert self.leader.proc is not None
        return descendants(self.leader.proc.pid)


def start_region(data_dir: Path, redis_url: str, *args: str, tls_ca: Path | None = None) -> Region:
    """A region of three processes (`args` may say otherwise: a later flag wins)."""
    port = free_port()
    leader = LeaderProcess("us-east", data_dir, redis_url=redis_url, peer_port=free_port(), tls_ca=tls_ca,
                           log_level="INFO", extra_args=("--processes", "3", "--metrics-port", str(port), *args))
    leader.start()
    return Region(leader, f"http://127.0.0.1:{port}/metrics")


@pytest.fixture(scope="module")
def region(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    flush(redis_url)
    r = start_region(tmp_path_factory.mktemp("processes"), redis_url, "--user-rate", "20", "--user-burst", "60")
    try:
        yield r
    finally:
        r.leader.stop()


@pytest.fixture
def own_region(own_valkey, tmp_path: Path) -> Iterator[Region]:  # noqa: ANN001 - conftest's EmbeddedValkey
    r = start_region(tmp_path / "leader", own_valkey.url)
    try:
        yield r
    finally:
        r.leader.stop()


class Connection:
    """A connection of its own to the region (channels to one address otherwise share one)."""

    def __init__(self, address: str, token: str, *options: tuple[str, int]) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), *options])
        self.stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def post(self, channel: str, body: str, client_msg_id: str) -> pb.PostMessageResponse:
        return self.stub.PostMessage(pb.PostMessageRequest(channel=channel, body=body, client_msg_id=client_msg_id),
                                     metadata=self.metadata, timeout=10)


def token_of(region: Region, username: str) -> str:
    with ChatClient(region.leader.address) as c:
        return c.claim(username, f"key-of-{username}-0123456789").token


def connections(region: Region, token: str, channel: str, *options: tuple[str, int], tries: int = 60
                ) -> tuple[Connection, Connection]:
    """A connection a gateway serves, and one the core serves, told apart by posting on fresh connections
    (each post is one message in `channel`)."""
    by_gateway = by_core = None
    for i in range(tries):
        conn = Connection(region.leader.address, token, *options)
        before = region.metric("mlchat_gateway_calls_total")
        conn.post(channel, f"probe {i}", f"probe-{i}")
        if region.metric("mlchat_gateway_calls_total") > before:
            by_gateway = by_gateway or conn
        else:
            by_core = by_core or conn
        if by_gateway and by_core:
            return by_gateway, by_core
    raise AssertionError(f"{tries} connections did not reach both a gateway and the core")


def started_by_core(region: Region) -> float:
    """Subscriptions gateways have started (once started, a subscription gets every later post)."""
    return sample(scrape(region.metrics_url), "mlchat_rpc_total", code="OK",
                  method="mlchat.v1.GatewayService/SubscribeUntilLive")


def bodies(conn: Connection, channel: str) -> list[str]:
    page = conn.stub.ListMessages(pb.ListMessagesRequest(channel=channel, limit=500), metadata=conn.metadata)
    return [m.body for m in page.messages]


def test_posts_through_any_process_are_stored_once_and_a_retry_elsewhere_is_a_duplicate(region: Region,
                                                                                         unique: str) -> None:
    via_gateway, via_core = connections(region, token_of(region, f"u_{unique}"), unique)
    probes = bodies(via_core, unique)

    first = via_gateway.post(unique, "hello", "m1")
    again = via_core.post(unique, "hello", "m1")  # the same post, retried on another process
    assert not first.duplicate and again.duplicate
    assert again.message.id == first.message.id and again.message.hlc == first.message.hlc
    second = via_core.post(unique, "there", "m2")
    assert via_gateway.post(unique, "there", "m2").duplicate

    stored = bodies(via_gateway, unique)
    assert stored == probes + ["hello", "there"]
    assert second.message.id != first.message.id


def test_a_gateway_answers_every_call_as_the_core_does(region: Region, unique: str) -> None:
    token = token_of(region, f"u_{unique}")
    via_gateway, via_core = connections(region, token, unique)

    def failure(conn: Connection, call: str, request: object, metadata: tuple = ()) -> tuple:
        method = getattr(conn.stub, call)
        with pytest.raises(grpc.RpcError) as refused:
            result = method(request, metadata=metadata or conn.metadata, timeout=10)
            for _ in result if call == "Subscribe" else ():
                pass
        return refused.value.code(), refused.value.details()

    owner = Connection(region.leader.address, token_of(region, f"o_{unique}"))
    owner.stub.CreatePrivateChannel(pb.CreatePrivateChannelRequest(channel=f"{unique}-private"),
                                    metadata=owner.metadata, timeout=10)
    cases = [
        ("PostMessage", pb.PostMessageRequest(channel=unique, body="", client_msg_id="e1"), ()),
        ("PostMessage", pb.PostMessageRequest(channel=unique, body="hi", client_msg_id="e2"),
         (("authorization", "Bearer forged"),)),
        ("PostMessage", pb.PostMessageRequest(channel=f"{unique}-private", body="hi", client_msg_id="e3"), ()),
        ("PostMessage", pb.PostMessageRequest(channel=unique, body="x" * 70_000, client_msg_id="e4"), ()),
        ("ListMessages", pb.ListMessagesRequest(channel=unique, cursor="not a cursor"), ()),
        ("Subscribe", pb.SubscribeRequest(channel=f"{unique}-private"), ()),
        ("GetStatus", pb.GetStatusRequest(), ()),
    ]
    for call, request, metadata in cases:
        through_gateway = failure(via_gateway, call, request, metadata)
        assert through_gateway == failure(via_core, call, request, metadata)
        assert through_gateway[0] != grpc.StatusCode.UNKNOWN and through_gateway[1]

    # The core alone holds a request to the size limit, on what it parses: a field sent twice counts once.
    twice = (pb.PostMessageRequest(channel=unique, body="x" * 70_000, client_msg_id="t1").SerializeToString()
             + pb.PostMessageRequest(body="hi").SerializeToString())
    for conn in (via_gateway, via_core):
        raw = conn.channel.unary_unary("/mlchat.v1.ChatService/PostMessage")
        assert pb.PostMessageResponse.FromString(raw(twice, metadata=conn.metadata, timeout=10)).message.body == "hi"

    # Health, and the cluster service, through the gateway.
    health = health_pb2_grpc.HealthStub(via_gateway.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    status = cluster_pb2_grpc.ClusterServiceStub(via_gateway.channel).GetClusterStatus(
        cluster_pb2.GetClusterStatusRequest(), metadata=via_gateway.metadata, timeout=10)
    assert status.region == "us-east" and status.messages >= 1


def test_the_rate_limit_holds_across_the_regions_processes_with_its_trailer(region: Region, unique: str) -> None:
    token = token_of(region, f"u_{unique}")
    via_gateway, via_core = connections(region, token, unique)
    futures = [conn.stub.PostMessage.future(
        pb.PostMessageRequest(channel=unique, body="x", client_msg_id=f"burst-{i}"), metadata=conn.metadata, timeout=10)
        for i in range(100) for conn in (via_gateway, via_core)]
    refused = [f for f in futures if f.exception() is not None]
    accepted = len(futures) - len(refused)
    # One bucket of 60 for the user in the whole region (less the probes' posts, plus its refill at 20/s);
    # a bucket per process would have let about 120 through.
    assert 30 <= accepted < 100
    for f in refused:
        assert f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert any(k == "retry-after-ms" and int(v) > 0 for k, v in f.trailing_metadata())


def test_a_subscriber_on_a_gateway_sees_posts_made_on_the_core(region: Region, unique: str) -> None:
    via_gateway, via_core = connections(region, token_of(region, f"u_{unique}"), unique)
    started = started_by_core(region)
    stream = via_gateway.stub.Subscribe(pb.SubscribeRequest(channel=f"{unique}-live"), metadata=via_gateway.metadata,
                                        timeout=20)
    wait_until(lambda: started_by_core(region) == started + 1, what="the subscription started by the core")
    via_core.post(f"{unique}-live", "live one", "l1")
    event = next(stream)
    assert event.message.body == "live one" and event.stream_cursor
    stream.cancel()


def test_a_gateway_that_dies_is_started_again_and_the_region_keeps_serving(own_region: Region) -> None:
    gateways = own_region.gateway_pids()
    assert len(gateways) == 2 and own_region.metric("mlchat_gateways") == 2
    victim = min(gateways)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: own_region.metric("mlchat_gateway_restarts_total") == 1
               and own_region.metric("mlchat_gateways") == 2, deadline_s=30, what="a gateway started again")
    assert victim not in own_region.gateway_pids() and len(own_region.gateway_pids()) == 2

    token = token_of(own_region, "after_restart")
    via_gateway, _ = connections(own_region, token, "again")  # a gateway serves new connections again
    assert not via_gateway.post("again", "still here", "s1").duplicate


def test_gateways_die_with_their_core_and_leave_the_port_free(own_region: Region) -> None:
    gateways = own_region.gateway_pids()
    own_region.leader.kill()
    wait_until(lambda: not any(pid_alive(p) for p in gateways), deadline_s=15, what="the gateways exited")
    own_region.leader.start()  # the same address: nothing of the old region holds it
    token = token_of(own_region, "after_core_restart")
    via_gateway, _ = connections(own_region, token, "back")
    assert via_gateway.post("back", "hello again", "b1").message.body == "hello again"


def test_shutdown_ends_a_gateways_subscribers_cleanly(own_region: Region) -> None:
    token = token_of(own_region, "subscriber")
    via_gateway, _ = connections(own_region, token, "bye")
    stream = via_gateway.stub.Subscribe(pb.SubscribeRequest(channel="bye"), metadata=via_gateway.metadata,
                                        timeout=30)
    wait_until(lambda: started_by_core(own_region) == 1, what="the subscription started by the core")
    gateways = own_region.gateway_pids()
    code = own_region.leader.stop()
    assert code == 0, f"exit status {code}; the region's log:\n{own_region.leader.log_tail(80)}"
    assert list(stream) == []  # ended with OK: iterating raises on any other status
    assert stream.code() == grpc.StatusCode.OK
    assert not any(pid_alive(p) for p in gateways)


def test_a_gateways_subscribers_of_a_channel_share_one_feed_from_the_core(region: Region, unique: str) -> None:
    via_gateway, via_core = connections(region, token_of(region, f"u_{unique}"), unique)
    channel = f"{unique}-shared"
    started = started_by_core(region)
    streams = [via_gateway.stub.Subscribe(pb.SubscribeRequest(channel=channel), metadata=via_gateway.metadata,
                                          timeout=20) for _ in range(6)]
    wait_until(lambda: started_by_core(region) == started + 6, what="every subscription started by the core")
    for i in range(3):
        via_core.post(channel, f"to all {i}", f"a{i}")
    for stream in streams:
        assert [next(stream).message.body for _ in range(3)] == ["to all 0", "to all 1", "to all 2"]
    # The core feeds the gateway once for the channel, and counts the six subscribers the gateway feeds.
    wait_until(lambda: region.metric("mlchat_gateway_feeds") == 1 and region.metric("mlchat_subscribers") == 6,
               what="one feed, six subscribers")
    for stream in streams:
        stream.cancel()
    wait_until(lambda: region.metric("mlchat_gateway_feeds") == 0 and region.metric("mlchat_subscribers") == 0,
               what="the feed closed with its last subscriber")


def test_a_subscription_through_a_gateway_resumes_without_gap_or_repeat(region: Region, unique: str) -> None:
    via_gateway, via_core = connections(region, token_of(region, f"u_{unique}"), unique)
    channel = f"{unique}-resume"
    for i in range(5):
        via_core.post(channel, f"m{i}", f"m{i}")
    # The stream cursor of m1, from a subscription that saw it.
    first = via_core.stub.Subscribe(pb.SubscribeRequest(channel=channel, resume_cursor="0-0"),
                                    metadata=via_core.metadata, timeout=10)
    seen = [next(first) for _ in range(5)]
    first.cancel()
    stream = via_gateway.stub.Subscribe(pb.SubscribeRequest(channel=channel, resume_cursor=seen[1].stream_cursor),
                                        metadata=via_gateway.metadata, timeout=20)
    assert [next(stream).message.body for _ in range(3)] == ["m2", "m3", "m4"]  # the backlog, from the core
    via_core.post(channel, "m5", "m5")
    via_gateway.post(channel, "m6", "m6")
    assert [next(stream).message.body for _ in range(2)] == ["m5", "m6"]  # live, from the feed
    stream.cancel()


def test_a_member_removed_loses_a_gateways_stream_as_the_cores(region: Region, unique: str) -> None:
    member_token = token_of(region, f"m_{unique}")
    via_gateway, _ = connections(region, member_token, unique)
    owner = Connection(region.leader.address, token_of(region, f"o_{unique}"))
    channel = f"{unique}-private"
    owner.stub.CreatePrivateChannel(pb.CreatePrivateChannelRequest(channel=channel), metadata=owner.metadata,
                                    timeout=10)
    member_id = via_gateway.stub.GetUser(pb.GetUserRequest(username=f"m_{unique}"), metadata=via_gateway.metadata,
                                         timeout=10).user.user_id
    owner.stub.AddChannelMember(pb.ChannelMemberRequest(channel=channel, user_id=member_id),
                                metadata=owner.metadata, timeout=10)
    started = started_by_core(region)
    stream = via_gateway.stub.Subscribe(pb.SubscribeRequest(channel=channel), metadata=via_gateway.metadata,
                                        timeout=20)
    wait_until(lambda: started_by_core(region) == started + 1, what="the subscription started by the core")
    owner.post(channel, "before", "b1")
    assert next(stream).message.body == "before"
    owner.stub.RemoveChannelMember(pb.ChannelMemberRequest(channel=channel, user_id=member_id),
                                   metadata=owner.metadata, timeout=10)
    with pytest.raises(grpc.RpcError) as ended:
        next(stream)
    assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert member_id in ended.value.details() and channel in ended.value.details()


def test_a_slow_subscriber_on_a_gateway_is_cut_off_without_stalling_the_others(own_valkey, tmp_path: Path) -> None:
    region = start_region(tmp_path / "leader", own_valkey.url, "--processes", "2", "--subscriber-buffer", "20")
    try:
        token = token_of(region, "slow_ann")
        # A fixed 64 KiB receive window (no BDP probing, which on loopback grows it to megabytes) makes the
        # slowness reach the gateway after a few messages. Both subscribers are on the one gateway.
        slow_conn, poster = connections(region, token, "probes", ("grpc.http2.bdp_probe", 0))
        fast_conn, _ = connections(region, token, "probes")
        started = started_by_core(region)
        slow = slow_conn.stub.Subscribe(pb.SubscribeRequest(channel="general"), metadata=slow_conn.metadata,
                                        timeout=30)
        fast = fast_conn.stub.Subscribe(pb.SubscribeRequest(channel="general"), metadata=fast_conn.metadata,
                                        timeout=30)
        wait_until(lambda: started_by_core(region) == started + 2, what="both subscriptions started by the core")
        body = "x" * 3900  # large, so that gRPC's own flow-control windows fill quickly
        for i in range(300):
            poster.post("general", f"{i}:{body}", f"s{i}")
        assert [int(next(fast).message.body.partition(":")[0]) for _ in range(300)] == list(range(300))
        fast.cancel()
        received = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in slow:
                received += 1
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume" in err.value.details() and received < 300
    finally:
        region.leader.stop()


def test_gateways_serve_tls_with_the_regions_certificate(own_valkey, tmp_path: Path) -> None:
    certs.ensure(tmp_path / "pki", ["us-east"])
    pem, key, ca = (tmp_path / "pki" / name for name in ("us-east.pem", "us-east-key.pem", "ca.pem"))
    region = start_region(tmp_path / "leader", own_valkey.url, "--tls-cert", str(pem), "--tls-key", str(key),
                          tls_ca=ca)
    try:
        with ChatClient(region.leader.address, tls_ca=ca) as c:
            token = c.claim("tls_user", "tls-user-claim-key-0123").token
        metadata = (("authorization", f"Bearer {token}"),)
        for i in range(40):  # fresh connections until gateways took some, every one over TLS
            with client_channel(region.leader.address, ca, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                chat_pb2_grpc.ChatServiceStub(ch).PostMessage(
                    pb.PostMessageRequest(channel="tls", body=f"m{i}", client_msg_id=f"m{i}"), metadata=metadata,
                    timeout=10)
            if region.metric("mlchat_gateway_calls_total") >= 3:
                break
        assert region.metric("mlchat_gateway_calls_total") >= 3
        for _ in range(10):  # plaintext is refused by every process
            with grpc.insecure_channel(region.leader.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                with pytest.raises(grpc.RpcError) as refused:
                    chat_pb2_grpc.ChatServiceStub(ch).PostMessage(
                        pb.PostMessageRequest(channel="tls", body="plain", client_msg_id="plain"),
                        metadata=metadata, timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        region.leader.stop()


def test_regions_on_several_processes_replicate_through_the_wan(tmp_path: Path) -> None:
    """Two regions of two processes each behind dc-sim's WAN: posts through either process of one region
    reach the other, and a subscriber there (whichever process serves it) gets them live."""
    east, west = "us-east", "eu-west"
    with dcsim_run(tmp_path / "run", (east, west), leader_args=("--processes", "2")) as state:
        regions = state["regions"]

        def gateway_calls(region: str) -> float:
            return sample(scrape(regions[region]["metrics"]), "mlchat_gateway_calls_total")

        watchers: list[Connection] = []
        while len(watchers) < 6 or not gateway_calls(west):  # until the west gateway served some of them
            assert len(watchers) < 60, "no connection reached the west region's gateway"
            with ChatClient(regions[west]["endpoints"][west], timeout_s=10) as c:
                c.claim(f"watcher_{len(watchers)}", f"watcher-{len(watchers)}-claim-key-0123")
            # Each on a connection of its own, where the kernel puts it.
            watchers.append(Connection(regions[west]["endpoints"][west], c.token))
            watchers[-1].stub.GetUser(pb.GetUserRequest(user_id=c.user.user_id), metadata=watchers[-1].metadata,
                                      timeout=10)
        # From the channel's subscribe cursor: whenever a subscription starts, it misses nothing after it.
        start = watchers[0].stub.ListMessages(pb.ListMessagesRequest(channel="across"), metadata=watchers[0].metadata,
                                              timeout=10).subscribe_cursor
        streams = [w.stub.Subscribe(pb.SubscribeRequest(channel="across", resume_cursor=start), metadata=w.metadata,
                                    timeout=60) for w in watchers]

        posted = 0
        while posted < 12 or not gateway_calls(east):  # until the east gateway took some of the posts
            assert posted < 60, "no connection reached the east region's gateway"
            with ChatClient(regions[east]["endpoints"][east], timeout_s=10) as poster:
                poster.claim(f"poster_{posted}", f"poster-{posted}-claim-key-0123")
                poster.post("across", f"from the east {posted}", f"e{posted}")
            posted += 1
        expected = sorted(f"from the east {i}" for i in range(posted))
        for stream in streams:
            assert sorted(next(stream).message.body for _ in range(posted)) == expected
            stream.cancel()


def test_a_write_through_a_gateway_is_forwarded_to_the_primary_in_single_leader_mode(tmp_path: Path) -> None:
    """The core serves a gateway's call with the call's own metadata and deadline: in single-leader mode a
    follower forwards it, token and all, to the primary."""
    primary, follower = "us-east", "eu-west"
    with dcsim_run(tmp_path / "run", (primary, follower), mode="single-leader",
                   leader_args=("--processes", "2")) as state:
        regions = state["regions"]
        address = regions[follower]["endpoints"][follower]
        with ChatClient(address, timeout_s=10) as c:
            wait_until(lambda: _signed_in(c, "forwarded_author"), deadline_s=30, what="a claim taken by the primary")
            token = c.token
        before = sample(scrape(regions[follower]["metrics"]), "mlchat_gateway_calls_total")
        for i in range(60):  # fresh connections until one is served by the follower's gateway
            conn = Connection(address, token)
            posted = conn.post("forwarded", f"through a gateway {i}", f"f{i}")
            assert posted.message.origin_region == primary
            if sample(scrape(regions[follower]["metrics"]), "mlchat_gateway_calls_total") > before:
                break
        else:
            raise AssertionError("no connection reached the follower's gateway")


def _signed_in(c: ChatClient, user: str) -> bool:
    try:
        c.claim(user, f"{user}-claim-key-0123456789")
        return True
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:  # until the primary holds its lease
            raise
        return False
