"""TLS on real leaders: mutual TLS between regions on a peer port of their own, TLS on the client API.

Three regions on the session Redis (a database each): us-east and eu-west hold certificates from the
cluster CA; ap-northeast, a rogue, holds one from another CA (and trusts both, so that it is the
cluster's leaders that refuse it, in both directions).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from support import wait_until

from mlchat import certs
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.servicer import PEER_PREFIX
from mlchat.leader.tokens import TokenSigner
from mlchat.v1 import cluster_pb2, replication_pb2_grpc
from mlchat.v1 import replication_pb2 as rpb

REGIONS = {"us-east": 11, "eu-west": 12, "ap-northeast": 13}  # region -> its Redis database


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cluster's certificates, another CA's, and the rogue's trust bundle (both CAs)."""
    root = tmp_path_factory.mktemp("pki")
    certs.ensure(root / "cluster", ["us-east", "eu-west", "client-of-cluster"])
    certs.ensure(root / "other", ["ap-northeast", "eu-west"])
    bundle = root / "both-cas.pem"
    bundle.write_bytes((root / "cluster" / "ca.pem").read_bytes() + (root / "other" / "ca.pem").read_bytes())
    (root / "secret").write_text("a-cluster-secret-shared-by-all-of-them")
    return {"cluster": root / "cluster", "other": root / "other", "bundle": bundle, "secret": root / "secret"}


@pytest.fixture(scope="module")
def regions(redis_url: str, pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, LeaderProcess]]:
    for db in REGIONS.values():
        redis.Redis.from_url(f"{redis_url}/{db}").flushdb()
    peer_ports = {region: free_port() for region in REGIONS}
    leaders = {}
    for region, db in REGIONS.items():
        rogue = region == "ap-northeast"
        issued_by, trusted = (pki["other"], pki["bundle"]) if rogue else (pki["cluster"], pki["cluster"] / "ca.pem")
        client_tls = () if rogue else ("--tls-cert", str(issued_by / f"{region}.pem"),
                                       "--tls-key", str(issued_by / f"{region}-key.pem"))
        peers = [a for other, port in peer_ports.items() if other != region
                 for a in ("--peer", f"{other}=127.0.0.1:{port}")]
        leaders[region] = LeaderProcess(
            region, tmp_path_factory.mktemp(region), redis_url=f"{redis_url}/{db}", peer_port=peer_ports[region],
            tls_ca=None if rogue else pki["cluster"] / "ca.pem", extra_args=(
                "--secret-file", str(pki["secret"]), "--user-rate", "0", *client_tls,
                "--peer-cert", str(issued_by / f"{region}.pem"), "--peer-key", str(issued_by / f"{region}-key.pem"),
                "--peer-ca", str(trusted), *peers))
    for leader in leaders.values():
        leader.start()
    try:
        yield leaders
    finally:
        for leader in leaders.values():
            leader.stop()


def _client(leader: LeaderProcess, user: str) -> ChatClient:
    c = ChatClient(leader.address, timeout_s=5, tls_ca=leader.tls_ca)
    c.claim(user, f"{user}-claim-key-0123456789")
    return c


def _has(c: ChatClient, channel: str, body: str) -> bool:
    return body in [m.body for m in c.list(channel).messages]


def test_regions_with_cluster_certificates_replicate_and_a_rogue_is_refused_both_ways(regions, pki):
    east, west, rogue = (_client(regions[r], f"tls_{r.replace('-', '_')}") for r in REGIONS)
    with east, west, rogue:
        rogue.post("tls", "from the rogue", "rogue-1")
        east.post("tls", "from us-east", "east-1")
        west.post("tls", "from eu-west", "west-1")
        wait_until(lambda: _has(east, "tls", "from eu-west") and _has(west, "tls", "from us-east"),
                   what="us-east and eu-west hold each other's message")
        # The rogue wrote first; what came later from eu-west has arrived, its message has not.
        assert not _has(east, "tls", "from the rogue") and not _has(west, "tls", "from the rogue")
        assert not _has(rogue, "tls", "from us-east") and not _has(rogue, "tls", "from eu-west")
        peers = {p.region: p.state for p in east.cluster_status().peers}
        assert peers["eu-west"] == cluster_pb2.PEER_STATE_UP and peers["ap-northeast"] != cluster_pb2.PEER_STATE_UP


def _region_token(pki: dict[str, Path], region: str = "eu-west") -> tuple[tuple[str, str]]:
    token, _ = TokenSigner(pki["secret"].read_bytes().strip()).issue(PEER_PREFIX + region, region,
                                                                     int(time.time() * 1000))
    return (("authorization", f"Bearer {token}"),)


def _replicate(channel: grpc.Channel, pki: dict[str, Path]) -> rpb.Delta:
    stream = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(
        rpb.ReplicateRequest(region="eu-west"), metadata=_region_token(pki), timeout=5)
    try:
        return next(stream)
    finally:
        stream.cancel()


def test_the_peer_port_refuses_a_caller_without_a_certificate_from_the_cluster_ca(regions, pki):
    address = regions["us-east"].peer_address
    ca = (pki["cluster"] / "ca.pem").read_bytes()
    for name, credentials in [
            ("plaintext", None),
            ("TLS without a certificate", grpc.ssl_channel_credentials(ca)),
            ("a certificate from another CA", grpc.ssl_channel_credentials(
                ca, (pki["other"] / "eu-west-key.pem").read_bytes(), (pki["other"] / "eu-west.pem").read_bytes()))]:
        channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        with channel, pytest.raises(grpc.RpcError) as err:
            _replicate(channel, pki)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
    # The same call with a certificate from the cluster CA (and a region's token) is served.
    good = grpc.ssl_channel_credentials(ca, (pki["cluster"] / "client-of-cluster-key.pem").read_bytes(),
                                        (pki["cluster"] / "client-of-cluster.pem").read_bytes())
    with grpc.secure_channel(address, good) as channel:
        assert _replicate(channel, pki).from_region == "us-east"


def test_replication_is_not_served_on_the_client_port(regions, pki):
    ca = (pki["cluster"] / "ca.pem").read_bytes()
    with grpc.secure_channel(regions["us-east"].address, grpc.ssl_channel_credentials(ca)) as channel, \
            pytest.raises(grpc.RpcError) as err:
        _replicate(channel, pki)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_client_over_tls_with_the_ca_is_served_and_others_are_not(regions, pki):
    leader = regions["us-east"]
    with _client(leader, "tls_client") as c:
        assert c.post("tls-client", "over TLS", "c-1").message.body == "over TLS"
    for tls_ca in (None, pki["other"] / "ca.pem"):  # plaintext, or a CA that did not sign the leader's certificate
        with ChatClient(leader.address, timeout_s=2, tls_ca=tls_ca) as c, pytest.raises(grpc.RpcError) as err:
            c.claim("tls_stranger", "tls-stranger-claim-key-0123")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _leader_exits(tmp_path: Path, redis_url: str, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "mlchat", "leader", "--region", "us-east", "--redis", redis_url,
                          "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}", *args],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    return run.stderr


def test_a_leader_refuses_to_start_with_incomplete_or_mismatched_tls_material(tmp_path, redis_url, pki):
    cluster = pki["cluster"]
    peer = ("--peer-cert", str(cluster / "us-east.pem"), "--peer-key", str(cluster / "us-east-key.pem"),
            "--peer-ca", str(cluster / "ca.pem"))
    assert "--peer-listen" in _leader_exits(tmp_path, redis_url, *peer)
    assert "--peer-listen" in _leader_exits(tmp_path, redis_url, "--tls-cert", str(cluster / "us-east.pem"),
                                            "--tls-key", str(cluster / "us-east-key.pem"))
    assert "go together" in _leader_exits(tmp_path, redis_url, *peer[:4], "--peer-listen", f"127.0.0.1:{free_port()}")
    assert "is not the key of" in _leader_exits(
        tmp_path, redis_url, "--peer-listen", f"127.0.0.1:{free_port()}", "--peer-cert",
        str(cluster / "us-east.pem"), "--peer-key", str(cluster / "eu-west-key.pem"), "--peer-ca",
        str(cluster / "ca.pem"))
