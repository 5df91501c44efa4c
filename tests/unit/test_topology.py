"""The topology file: the example parses into valid settings for every region, flags override it, and a
bad file gets an error that names where it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlchat.cli import leader_settings, parse
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.tls import TlsFiles
from mlchat.topology import TopologyError, load_topology, parse_topology

EXAMPLE = Path(__file__).parents[2] / "deploy" / "cluster.example.toml"

GOOD = """
[cluster]
mode = "sync"
sync = "all"
secret_file = "secret"
peer_ca = "tls/ca.pem"
heartbeat_ms = 200

[regions.us-east]
address = "10.0.0.1:50051"
listen = "0.0.0.0:50051"
peer_listen = "0.0.0.0:50052"
peer_address = "10.0.0.1:50052"
redis = "redis://10.0.0.2:6379/0"
peer_cert = "tls/us-east.pem"
peer_key = "tls/us-east.key"
processes = 4

[regions.eu-west]
address = "west.example.net:50051"
"""


def test_the_example_topology_gives_every_region_valid_settings():
    topology = load_topology(EXAMPLE)
    assert set(topology.regions) == {"us-east", "eu-west", "ap-northeast"}
    for region, entry in topology.regions.items():
        settings = leader_settings(parse(["leader", "--topology", str(EXAMPLE), "--region", region]))
        assert settings.region == region and settings.advertise == entry.address
        assert settings.listen == "0.0.0.0:50051" and settings.redis_url == entry.redis
        assert settings.peers == {r.name: r.address for r in topology.regions.values() if r.name != region}
        assert settings.secret_file == Path("/etc/mlchat/cluster-secret")


def test_flags_override_the_file():
    settings = leader_settings(parse(["leader", "--topology", str(EXAMPLE), "--region", "eu-west",
                                      "--listen", "127.0.0.1:6000", "--mode", "strong-names",
                                      "--redis", "redis://localhost:1/0", "--peer", "sa-east=10.9.9.9:1"]))
    assert (settings.listen, settings.mode, settings.redis_url) == ("127.0.0.1:6000", Mode.STRONG_NAMES,
                                                                    "redis://localhost:1/0")
    assert settings.peers["sa-east"] == "10.9.9.9:1" and "us-east" in settings.peers


def test_a_full_topology_parses_with_paths_from_its_directory(tmp_path: Path):
    topology = parse_topology(GOOD, "c.toml", tmp_path)
    assert (topology.mode, topology.sync, topology.heartbeat_ms) == (Mode.SYNC, SyncAcks.ALL, 200)
    east = topology.regions["us-east"]
    assert east.peer_cert == tmp_path / "tls/us-east.pem" and topology.secret_file == tmp_path / "secret"
    west = topology.regions["eu-west"]
    assert west.listen == west.address and west.redis is None  # defaults: bind the address, embedded Valkey
    options = topology.leader_options("us-east")
    assert options["peer"] == [("eu-west", "west.example.net:50051")]
    assert options["peer_ca"] == tmp_path / "tls/ca.pem" and "peer_ca" not in topology.leader_options("eu-west")


def test_tls_material_in_the_file_becomes_the_leaders_tls_settings(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    east = leader_settings(parse(["leader", "--topology", str(path), "--region", "us-east"]))
    tls = tmp_path / "tls"
    assert east.peer_tls == TlsFiles(tls / "us-east.pem", tls / "us-east.key", tls / "ca.pem")
    assert east.peer_listen == "0.0.0.0:50052" and east.peer_address == "10.0.0.1:50052"
    assert east.processes == 4
    west = leader_settings(parse(["leader", "--topology", str(path), "--region", "eu-west"]))
    assert west.peers == {"us-east": "10.0.0.1:50052"}  # other regions dial its peer port


@pytest.mark.parametrize(("text", "error"), [
    ("[cluster]\nmode = 'async'\n", "no regions"),
    ("[regions.us-east]\nlisten = '0.0.0.0:1'\n", "[regions.us-east]: missing 'address'"),
    ("[regions.us-east]\naddress = 'h:1'\nredis_url = 'redis://x'\n", "unknown key 'redis_url'"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nmode = 'eventual'\n", "[cluster]: 'eventual' is not a valid Mode"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nsync = 'most'\n", "'most' is not a valid SyncAcks"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nretries = 3\n", "[cluster]: unknown key 'retries'"),
    ("[regions.us-east]\naddress = 'h:1'\n[extra]\n", "unknown key 'extra'"),
    ("[regions.us-east]\naddress = 'nohost'\n", "address = 'nohost' is not HOST:PORT"),
    ("[regions.us-east]\naddress = 'h:1'\npeer_listen = '0.0.0.0:2'\n", "peer_listen and peer_address go together"),
    ("[regions.US]\naddress = 'h:1'\n", "[regions.US]: region name must match"),
    ("[regions.us-east]\naddress = 1\n", "address must be a string, not int"),
    ("[regions.us-east]\naddress = 'h:1'\ntls_cert = 'c.pem'\n", "tls_cert and tls_key go together"),
    ("[regions.us-east]\naddress = 'h:1'\npeer_cert = 'c'\npeer_key = 'k'\n", "needs the cluster CA"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nprimary = 'eu-west'\n", "primary 'eu-west' is not one"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nheartbeat_ms = 0\n", "heartbeat_ms must be positive"),
    ("[regions.us-east]\naddress = 'h:1'\n[cluster]\nheartbeat_ms = true\n", "heartbeat_ms must be an integer"),
    ("[regions.us-east]\naddress = 'h:1'\nprocesses = 0\n", "processes must be at least 1"),
    ("[regions.us-east]\naddress = 'h:1'\nprocesses = 2\n", "processes > 1 needs peer_listen"),
    ("regions = 3\n", "regions must be a table"),
    ("[regions\n", "not valid TOML"),
])
def test_a_bad_topology_is_refused_with_where_and_why(text: str, error: str):
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "c.toml")
    assert str(caught.value).startswith("c.toml: ") and error in str(caught.value), str(caught.value)


def test_an_unknown_region_is_refused_naming_the_known_ones():
    with pytest.raises(TopologyError, match="region 'mars' is not in the topology .*eu-west, us-east"):
        parse_topology(GOOD).leader_options("mars")


def test_an_unreadable_file_is_refused(tmp_path: Path):
    with pytest.raises(TopologyError, match="cannot read topology"):
        load_topology(tmp_path / "missing.toml")


@pytest.mark.parametrize(("flags", "error"), [
    (["--processes", "0"], "a region runs at least one process"),
    (["--processes", "2"], "other regions a port of their own (--peer-listen)"),
    (["--processes", "2", "--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:7001"], "give it a port number"),
])
def test_a_leader_with_processes_it_cannot_run_is_refused(flags: list[str], error: str):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):
        leader_settings(parse(["leader", "--region", "us-east", *flags]))
