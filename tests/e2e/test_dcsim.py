"""dc-sim end to end: real leader processes behind the WAN proxy mesh, driven by the dcsim command."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import pid_alive

from dcsim.cluster import port_is_free
from mlchat.geo.client import ChatClient
from mlchat.leader.process import descendants

REGIONS = "us-east,eu-west"
US_EU_RTT_MS = 80.5  # from the default matrix


def dcsim(run_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dcsim.cli", "--run-dir", str(run_dir), *args],
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"dcsim {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    run_dir = tmp_path_factory.mktemp("dcsim")
    dcsim(run_dir, "up", "--regions", REGIONS)
    state = json.loads((run_dir / "state.json").read_text())
    state["run_dir"] = run_dir
    state["processes"] = {state["pid"], *descendants(state["pid"])}
    try:
        yield state
    finally:
        if (run_dir / "state.json").exists():
            dcsim(run_dir, "down")


def _endpoint(run: dict, client_in: str, region: str) -> str:
    return run["regions"][region]["endpoints"][client_in]


def _health_rtts(address: str, count: int = 15, timeout: float = 5.0) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # connect first
        rtts = []
        for _ in range(count):
            started = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            rtts.append((time.perf_counter() - started) * 1000)
    return rtts


def test_status_lists_every_region_and_its_endpoints(run):
    out = dcsim(run["run_dir"], "status").stdout
    for region in REGIONS.split(","):
        assert f"{region:<14} running" in out
        assert f"metrics {run['regions'][region]['metrics']}" in out
    assert "delay us-east->eu-west: 40.25 ms" in out
    assert "partitions: none" in out


def test_regions_talk_mutual_tls_with_the_runs_certificates(run):
    certs = run["run_dir"] / "certs"
    ca = (certs / "ca.pem").read_bytes()

    def check(credentials: grpc.ChannelCredentials | None) -> int:
        address = run["regions"]["us-east"]["peers_on"]
        channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        with channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    for credentials in (None, grpc.ssl_channel_credentials(ca)):  # plaintext; TLS without a certificate
        with pytest.raises(grpc.RpcError) as err:
            check(credentials)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    controller = grpc.ssl_channel_credentials(ca, (certs / "dcsim-key.pem").read_bytes(),
                                              (certs / "dcsim.pem").read_bytes())
    assert check(controller) == health_pb2.HealthCheckResponse.SERVING


def test_round_trip_through_the_mesh_matches_the_wan_matrix(run):
    far = statistics.median(_health_rtts(_endpoint(run, "eu-west", "us-east")))
    near = statistics.median(_health_rtts(_endpoint(run, "us-east", "us-east")))
    assert abs(far - US_EU_RTT_MS) <= 0.1 * US_EU_RTT_MS, far
    assert near < 10, near


def test_latency_changes_at_runtime(run):
    try:
        dcsim(run["run_dir"], "latency", "us-east", "eu-west", "60")
        rtt = statistics.median(_health_rtts(_endpoint(run, "eu-west", "us-east")))
        assert abs(rtt - 120) <= 12, rtt
    finally:
        dcsim(run["run_dir"], "latency", "us-east", "eu-west", str(US_EU_RTT_MS / 2))


def test_partition_makes_calls_fail_by_their_deadline_and_heal_restores_them(run):
    address = _endpoint(run, "eu-west", "us-east")
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        dcsim(run["run_dir"], "partition", "eu-west", "us-east")
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2
            assert "eu-west->us-east" in dcsim(run["run_dir"], "status").stdout
        finally:
            dcsim(run["run_dir"], "heal")
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_reset_breaks_open_connections_and_clients_reconnect(run):
    address = _endpoint(run, "eu-west", "us-east")
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert "reset" in dcsim(run["run_dir"], "reset", "eu-west", "us-east").stdout
        # The channel notices the reset and reconnects by itself (wait_for_ready rides it out).
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_bandwidth_cap_delivers_large_responses_intact(run):
    address = _endpoint(run, "eu-west", "us-east")
    with ChatClient(address) as client:
        client.claim("dcsim_bulk", "dcsim-claim-key-bulk")
        bodies = [f"{i:03d}" + "y" * 3000 for i in range(60)]  # about 180 KiB in one page
        for i, body in enumerate(bodies):
            client.post("bulk", body, f"b{i}")
        dcsim(run["run_dir"], "bandwidth", "us-east", "eu-west", "256")
        try:
            assert "capped at 256 KiB/s" in dcsim(run["run_dir"], "status").stdout
            assert [m.body for m in client.list("bulk", limit=100).messages] == bodies
        finally:
            dcsim(run["run_dir"], "bandwidth", "us-east", "eu-west", "0")


def test_kill_and_restart_a_region_keeps_its_data(run):
    address = _endpoint(run, "us-east", "eu-west")
    with ChatClient(address) as client:
        client.claim("dcsim_ann", "dcsim-claim-key-001")
        client.post("general", "before the crash", "m1")
    dcsim(run["run_dir"], "kill", "eu-west")
    with ChatClient(address, timeout_s=2) as client, pytest.raises(grpc.RpcError) as err:
        client.claim("dcsim_ann", "dcsim-claim-key-001")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    dcsim(run["run_dir"], "restart", "eu-west")
    with ChatClient(address) as client:
        client.claim("dcsim_ann", "dcsim-claim-key-001")
        assert [m.body for m in client.list("general").messages] == ["before the crash"]


def test_clear_errors(run, tmp_path):
    bad = dcsim(run["run_dir"], "partition", "us-east", "mars", check=False)
    assert bad.returncode != 0 and "unknown region 'mars'" in bad.stderr
    again = dcsim(run["run_dir"], "up", check=False)
    assert again.returncode != 0 and "already up" in again.stderr
    nothing = dcsim(tmp_path / "empty", "status", check=False)
    assert nothing.returncode != 0 and "no run is up" in nothing.stderr
    unknown = dcsim(tmp_path / "other", "up", "--regions", "us-east,mars", check=False)
    assert unknown.returncode != 0 and "mars" in unknown.stderr


def test_topology_file_overrides_the_default_matrix(tmp_path):
    topology = tmp_path / "wan.csv"
    topology.write_text("# a closer eu-west\nregion_a,region_b,rtt_ms\nus-east,eu-west,20\n")
    run_dir = tmp_path / "run"
    dcsim(run_dir, "up", "--regions", "us-east,eu-west", "--topology", str(topology))
    try:
        assert "delay us-east->eu-west: 10 ms" in dcsim(run_dir, "status").stdout
        state = json.loads((run_dir / "state.json").read_text())
        endpoints = state["regions"]["us-east"]["endpoints"]
        # What the link adds to a round trip: the same call made without it is the baseline (a loaded machine
        # takes a few milliseconds of its own).
        added = statistics.median(_health_rtts(endpoints["eu-west"])) - statistics.median(
            _health_rtts(endpoints["us-east"]))
        assert abs(added - 20) <= 3, added
    finally:
        dcsim(run_dir, "down")
    bad = tmp_path / "bad.csv"
    bad.write_text("region_a,region_b,rtt_ms\nus-east,eu-west,fast\n")
    result = dcsim(tmp_path / "run2", "up", "--regions", "us-east,eu-west", "--topology", str(bad), check=False)
    assert result.returncode != 0 and "expected rows of region_a,region_b,rtt_ms" in result.stderr


def test_port_in_use_is_reported(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = dcsim(tmp_path, "up", "--regions", "us-east", "--base-port", str(port), check=False)
    assert result.returncode != 0 and f"port {port} is in use" in result.stderr
    assert not (tmp_path / "state.json").exists()


def test_down_leaves_no_process_behind(tmp_path):
    dcsim(tmp_path, "up", "--regions", "us-east,eu-west")
    state = json.loads((tmp_path / "state.json").read_text())
    processes = {state["pid"], *descendants(state["pid"])}
    assert len(processes) >= 5  # controller, two leaders, two Valkeys
    ports = [int(info[key].rsplit(":", 1)[1]) for info in state["regions"].values() for key in ("leader", "peers_on")]
    ports += [int(addr.rsplit(":", 1)[1]) for info in state["regions"].values() for addr in info["endpoints"].values()]
    ports += [int(info["metrics"].rsplit(":", 1)[1].split("/")[0]) for info in state["regions"].values()]
    dcsim(tmp_path, "down")
    assert not [p for p in processes if pid_alive(p)]
    assert not (tmp_path / "state.json").exists()
    assert all(port_is_free(p) for p in ports)
