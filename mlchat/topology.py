"""A cluster's topology file (TOML): every region's addresses, storage and TLS material, and the
settings every region shares, so that one file describes a cluster running across machines.

Parsing is pure: text in, a `Topology` out, or a `TopologyError` naming the file, the table and the
key that is wrong. `Topology.leader_options(region)` gives one region's leader options keyed like the
`mlchat leader` flags, so the command line sets them as defaults and a flag given still overrides.
Relative paths in the file are taken from the file's directory, so the file can travel with them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlchat.errors import MlchatError
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.leader import limits

# Keys of [cluster] and of each [regions.NAME], with the type each must have.
_CLUSTER_KEYS: dict[str, type] = {
    "mode": str, "sync": str, "primary": str, "secret_file": str, "peer_ca": str,
    "heartbeat_ms": int, "peer_timeout_ms": int, "write_timeout_ms": int,
}
_REGION_KEYS: dict[str, type] = {
    "address": str, "listen": str, "peer_listen": str, "peer_address": str, "redis": str, "data_dir": str,
    "tls_cert": str, "tls_key": str, "peer_cert": str, "peer_key": str, "processes": int,
}
_TOML_TYPES = {str: "a string", int: "an integer", dict: "a table"}
_PATHS = {"secret_file", "peer_ca", "data_dir", "tls_cert", "tls_key", "peer_cert", "peer_key"}
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}$")


class TopologyError(MlchatError, ValueError):
    """The topology file is not one mlchat can run (the message says where and why)."""


@dataclass(frozen=True)
class RegionEntry:
    name: str
    address: str  # host:port where clients (and, without a peer port, other regions) reach it
    listen: str  # host:port its client API binds; default: address
    peer_listen: str = ""  # host:port of a replication port of its own; "" serves it on listen
    peer_address: str = ""  # host:port where other regions reach that port (given with peer_listen)
    redis: str | None = None  # None: an embedded Valkey in data_dir
    data_dir: Path | None = None
    tls_cert: Path | None = None  # client API TLS
    tls_key: Path | None = None
    peer_cert: Path | None = None  # mutual TLS between regions (with the cluster's peer_ca)
    peer_key: Path | None = None
    processes: int | None = None  # processes serving the client API (`mlchat leader --processes`)

    @property
    def reached_at(self) -> str:
        """Where other regions reach this one."""
        return self.peer_address or self.address


@dataclass(frozen=True)
class Topology:
    regions: dict[str, RegionEntry]
    mode: Mode = Mode.ASYNC
    sync: SyncAcks = SyncAcks.QUORUM
    primary: str = ""
    secret_file: Path | None = None
    peer_ca: Path | None = None
    heartbeat_ms: int | None = None
    peer_timeout_ms: int | None = None
    write_timeout_ms: int | None = None

    def leader_options(self, region: str) -> dict[str, Any]:
        """One region's leader options, keyed like `mlchat leader`'s flags (argparse dests); options the
        file leaves out are absent, so the flags' own defaults stay."""
        if region not in self.regions:
            raise TopologyError(f"region {region!r} is not in the topology (it has {', '.join(sorted(self.regions))})")
        me = self.regions[region]
        options: dict[str, Any] = {
            "listen": me.listen, "advertise": me.reached_at, "mode": self.mode, "sync_acks": self.sync,
            "peer": sorted((r.name, r.reached_at) for r in self.regions.values() if r.name != region),
            "primary": self.primary or None, "redis": me.redis, "data_dir": me.data_dir,
            "secret_file": self.secret_file, "peer_listen": me.peer_listen or None,
            "tls_cert": me.tls_cert, "tls_key": me.tls_key,
            "peer_cert": me.peer_cert, "peer_key": me.peer_key, "peer_ca": self.peer_ca if me.peer_cert else None,
            "heartbeat_ms": self.heartbeat_ms, "peer_timeout_ms": self.peer_timeout_ms,
            "write_timeout_ms": self.write_timeout_ms, "processes": me.processes,
        }
        return {k: v for k, v in options.items() if v is not None}


def parse_topology(text: str, source: str = "topology", base: Path = Path()) -> Topology:
    """The topology in `text` (TOML); `source` names it in errors, `base` anchors relative paths."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"{source}: not valid TOML: {e}") from None
    _no_unknown(doc, {"cluster": dict, "regions": dict}, source)
    cluster = _table(doc.get("cluster", {}), "cluster", _CLUSTER_KEYS, source, base)
    raw_regions = doc.get("regions")
    if not raw_regions:
        raise TopologyError(f"{source}: no regions: add a [regions.NAME] table for each region")
    regions = {}
    for name, raw in raw_regions.items():
        where = f"regions.{name}"
        if not re.match(limits.REGION_PATTERN, name):
            raise TopologyError(f"{source}: [{where}]: region name must match {limits.REGION_PATTERN}")
        if not isinstance(raw, dict):
            raise TopologyError(f"{source}: {where} must be a table ([{where}])")
        entry = _table(raw, where, _REGION_KEYS, source, base)
        if "address" not in entry:
            raise TopologyError(f"{source}: [{where}]: missing 'address' (host:port where other regions reach it)")
        for key in ("address", "listen", "peer_listen", "peer_address"):
            if key in entry and not _ADDRESS.match(entry[key]):
                raise TopologyError(f"{source}: [{where}]: {key} = {entry[key]!r} is not HOST:PORT")
        for a, b in (("tls_cert", "tls_key"), ("peer_cert", "peer_key"), ("peer_listen", "peer_address")):
            if (a in entry) != (b in entry):
                raise TopologyError(f"{source}: [{where}]: {a} and {b} go together")
        if entry.get("processes", 1) < 1:
            raise TopologyError(f"{source}: [{where}]: processes must be at least 1")
        if entry.get("processes", 1) > 1 and "peer_listen" not in entry:
            raise TopologyError(f"{source}: [{where}]: processes > 1 needs peer_listen (other regions reach the "
                                "core process on a port of its own)")
        if "peer_cert" in entry and "peer_ca" not in cluster:
            raise TopologyError(f"{source}: [{where}]: peer_cert needs the cluster CA ([cluster] peer_ca)")
        regions[name] = RegionEntry(name=name, listen=entry.pop("listen", entry["address"]), **entry)
    try:
        mode = Mode(cluster.pop("mode", Mode.ASYNC))
        sync = SyncAcks(cluster.pop("sync", SyncAcks.QUORUM))
    except ValueError as e:
        choices = f"mode: {', '.join(Mode)}; sync: {', '.join(SyncAcks)}"
        raise TopologyError(f"{source}: [cluster]: {e} ({choices})") from None
    for key in ("heartbeat_ms", "peer_timeout_ms", "write_timeout_ms"):
        if cluster.get(key, 1) <= 0:
            raise TopologyError(f"{source}: [cluster]: {key} must be positive")
    primary = cluster.get("primary", "")
    if primary and primary not in regions:
        raise TopologyError(f"{source}: [cluster]: primary {primary!r} is not one of the regions")
    return Topology(regions=regions, mode=mode, sync=sync, **cluster)


def load_topology(path: Path) -> Topology:
    try:
        text = path.read_text()
    except OSError as e:
        raise TopologyError(f"cannot read topology {path}: {e.strerror}") from None
    return parse_topology(text, str(path), path.parent)


def _no_unknown(table: dict[str, Any], known: dict[str, type], where: str) -> None:
    for key, value in table.items():
        if key not in known:
            raise TopologyError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        if not isinstance(value, known[key]) or isinstance(value, bool):
            raise TopologyError(f"{where}: {key} must be {_TOML_TYPES[known[key]]}, not {type(value).__name__}")


def _table(raw: dict[str, Any], name: str, known: dict[str, type], source: str, base: Path) -> dict[str, Any]:
    _no_unknown(raw, known, f"{source}: [{name}]")
    return {k: (base / v if k in _PATHS else v) for k, v in raw.items()}
