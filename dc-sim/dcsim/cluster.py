"""A simulated multi-region cluster on one machine: one leader per region and a mesh of WAN proxies.

For every client location L and region R there is a proxy link `L->R` in front of R's leader; a client
in L reaches R through it. Leaders replicate on a port of their own, over mutual TLS with certificates
from the run's CA (`certs/`, made as `mlchat certs` makes them), so for every two regions L and R there
is also a peer link `L->R` in front of R's peer port, through which L's leader reaches R's. A link's
`up` direction carries traffic from L to R and its `down` direction the replies, so the path "from A to
B" is link A->B up plus link B->A down. The cluster keeps the toxics of every directed path and applies
them to every link of the path at once, while everything runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from dcsim import topology
from dcsim.proxy import Link, Toxics
from dcsim.topology import Topology
from mlchat import certs
from mlchat.leader.process import LeaderProcess, free_port
from mlchat.leader.servicer import PEER_PREFIX
from mlchat.leader.tokens import TokenSigner
from mlchat.tls import TlsFiles, load, peer_credentials
from mlchat.v1 import replication_pb2 as rpb
from mlchat.v1 import replication_pb2_grpc


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(child) for child in (task / "children").read_text().split()]
    return out


CONTROLLER = "dcsim"  # the controller's own certificate, for its calls to the leaders' peer ports


class ClusterError(Exception):
    """A command that cannot be carried out; the message says why."""


def port_is_free(port: int) -> bool:
    """True if a server could listen on the port now (as servers do, with SO_REUSEADDR: connections
    of an earlier run lingering in TIME_WAIT do not hold it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    run_dir: Path
    topology: Topology
    base_port: int | None = None
    topology_file: Path | None = None
    leader_args: tuple[str, ...] = ()  # given to every leader, e.g. its replication mode
    leaders: dict[str, LeaderProcess] = field(default_factory=dict)
    links: dict[tuple[str, str], Link] = field(default_factory=dict)  # (location, region): clients' way in
    peer_links: dict[tuple[str, str], Link] = field(default_factory=dict)  # (a, b): a's leader to b's peer port
    paths: dict[tuple[str, str], Toxics] = field(default_factory=dict)  # (a, b): what traffic a -> b meets
    _ports_of: dict[str, int] = field(default_factory=dict)  # region -> its leader's port
    _peer_ports_of: dict[str, int] = field(default_factory=dict)  # region -> its leader's peer port
    _metrics_of: dict[str, int] = field(default_factory=dict)  # region -> its leader's metrics port

    @property
    def certs_dir(self) -> Path:
        return self.run_dir / "certs"

    def _tls(self, name: str) -> TlsFiles:
        """`name`'s certificate and key, and the run's CA."""
        return TlsFiles(self.certs_dir / f"{name}.pem", self.certs_dir / f"{name}-key.pem", self.certs_dir / "ca.pem")

    def _ports(self, count: int) -> list[int]:
        if self.base_port is None:
            return [free_port() for _ in range(count)]
        # After those handed out.
        first = self.base_port + len(self.links) + len(self.peer_links) + 3 * len(self._ports_of)
        ports = list(range(first, first + count))
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise ClusterError(f"port {busy[0]} is in use (ports {ports[0]}-{ports[-1]} are needed): "
                               "choose another --base-port")
        return ports

    async def start(self) -> None:
        regions = self.topology.regions
        secret = self.run_dir / "cluster-secret"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        certs.ensure(self.certs_dir, [*regions, CONTROLLER])
        for region in regions:
            await self._add_links(region)
        self._write_routes()
        for region in regions:
            # A region reaches its peers through the WAN, like its users do (its routes file).
            peers = [f"{other}=127.0.0.1:{self._peer_ports_of[other]}" for other in regions if other != region]
            self._new_leader(region, *[a for p in peers for a in ("--peer", p)])
        for leader in self.leaders.values():
            leader.spawn()  # from the loop's thread, which lives as long as the cluster
        await asyncio.gather(*(asyncio.to_thread(leader.wait_ready) for leader in self.leaders.values()))

    async def _add_links(self, region: str) -> None:
        """A leader port, a peer port and a metrics port for `region`, and the proxy links between it and every
        region so far."""
        known = [*self._ports_of, region]
        fresh = iter(self._ports(3 + 2 * len(known) - 1 + 2 * (len(known) - 1)))
        self._ports_of[region], self._peer_ports_of[region], self._metrics_of[region] = next(fresh), next(fresh), \
            next(fresh)
        for src, dst in {(region, other) for other in known} | {(other, region) for other in known}:
            self.links[src, dst] = Link(f"{src}->{dst}", ("127.0.0.1", self._ports_of[dst]), next(fresh))
            await self.links[src, dst].start()
            if src != dst:
                self.peer_links[src, dst] = Link(f"{src}->{dst} (peers)", ("127.0.0.1", self._peer_ports_of[dst]),
                                                 next(fresh))
                await self.peer_links[src, dst].start()
            self.paths[src, dst] = Toxics(latency_ms=self.topology.one_way_ms(src, dst))
        self._apply()

    def _write_routes(self) -> None:
        for region in self._ports_of:
            (self.run_dir / region).mkdir(parents=True, exist_ok=True)
            routes = {other: self.peer_links[region, other].address for other in self._ports_of if other != region}
            (self.run_dir / region / "routes.json").write_text(json.dumps(routes))

    def _new_leader(self, region: str, *args: str) -> LeaderProcess:
        tls = self._tls(region)
        leader = LeaderProcess(region, self.run_dir / region, port=self._ports_of[region],
                               peer_port=self._peer_ports_of[region], extra_args=(
            "--secret-file", str(self.run_dir / "cluster-secret"),
            "--routes", str(self.run_dir / region / "routes.json"),
            "--peer-cert", str(tls.cert), "--peer-key", str(tls.key), "--peer-ca", str(tls.ca),
            "--metrics-port", str(self._metrics_of[region]), *self.leader_args, *args))
        self.leaders[region] = leader
        return leader

    async def add(self, region: str) -> str:
        """Start a new region that joins the running cluster through one of its members."""
        if region in self._ports_of:
            raise ClusterError(f"region {region} is already part of this run")
        try:
            self.topology = topology.load((*self._ports_of, region), self.topology_file)
        except topology.TopologyError as e:
            raise ClusterError(str(e)) from None
        member = next(r for r, leader in self.leaders.items() if leader.proc is not None)
        certs.ensure(self.certs_dir, [region])
        await self._add_links(region)
        self._write_routes()
        leader = self._new_leader(region, "--join", self.peer_links[region, member].address)
        leader.spawn()
        await asyncio.to_thread(leader.wait_ready)
        return f"{region} joined through {member}; clients in {region} connect to {self.links[region, region].address}"

    async def leave(self, region: str) -> str:
        """Take a region out of the cluster for good, then stop its leader."""
        region = self._region(region)
        for other, leader in self.leaders.items():
            if other != region and leader.proc is not None:
                await self._peer_call(leader, "Leave", rpb.LeaveRequest(region=region))
        await asyncio.to_thread(self.leaders[region].stop)
        return f"{region} left the cluster"

    async def _peer_call(self, leader: LeaderProcess, method: str, request: object) -> None:
        secret = (self.run_dir / "cluster-secret").read_bytes().strip()
        token, _ = TokenSigner(secret).issue(PEER_PREFIX + "dcsim", "dcsim", time.time_ns() // 1_000_000)
        credentials = peer_credentials(load(self._tls(CONTROLLER)))
        async with grpc.aio.secure_channel(leader.peer_address, credentials) as channel:
            stub = replication_pb2_grpc.ReplicationServiceStub(channel)
            await getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)

    async def stop(self) -> None:
        # Leaders first, together, while the proxies still carry their goodbyes.
        await asyncio.gather(*(asyncio.to_thread(leader.stop) for leader in self.leaders.values()))
        for link in [*self.links.values(), *self.peer_links.values()]:
            await link.stop()

    def _apply(self) -> None:
        for links in (self.links, self.peer_links):
            for (src, dst), link in links.items():
                link.set_toxics("up", self.paths[src, dst])
                link.set_toxics("down", self.paths[dst, src])

    def _change(self, a: str, b: str, **changes: float | bool) -> None:
        self.paths[a, b] = replace(self.paths[a, b], **changes)

    def _region(self, name: str) -> str:
        if name not in self.leaders:
            raise ClusterError(f"unknown region {name!r}; regions: {', '.join(self.leaders)}")
        return name

    # Commands -----------------------------------------------------------------------------------

    def partition(self, a: str, b: str, one_way: bool = False) -> str:
        a, b = self._region(a), self._region(b)
        if a == b:
            raise ClusterError("a region cannot be partitioned from itself")
        self._change(a, b, blackhole=True)
        if not one_way:
            self._change(b, a, blackhole=True)
        self._apply()
        return f"partitioned {a} -> {b}" + ("" if one_way else f" and {b} -> {a}")

    def heal(self, a: str | None = None, b: str | None = None) -> str:
        if a is None or b is None:
            for x, y in self.paths:
                self._change(x, y, blackhole=False)
            self._apply()
            return "healed every partition"
        a, b = self._region(a), self._region(b)
        self._change(a, b, blackhole=False)
        self._change(b, a, blackhole=False)
        self._apply()
        return f"healed {a} <-> {b}"

    def latency(self, a: str, b: str, ms: float, jitter: float = 0.0) -> str:
        a, b = self._region(a), self._region(b)
        if ms < 0 or jitter < 0:
            raise ClusterError("latency and jitter must not be negative")
        self._change(a, b, latency_ms=ms, jitter_ms=jitter)
        self._change(b, a, latency_ms=ms, jitter_ms=jitter)
        self._apply()
        return f"one-way delay {a} <-> {b} is now {ms:g} ms (jitter {jitter:g} ms)"

    def bandwidth(self, a: str, b: str, kbps: float) -> str:
        a, b = self._region(a), self._region(b)
        if kbps < 0:
            raise ClusterError("bandwidth must not be negative (0 removes the cap)")
        self._change(a, b, bandwidth_kbps=kbps)
        self._apply()
        return f"traffic {a} -> {b} capped at {kbps:g} KiB/s" if kbps else f"traffic {a} -> {b} uncapped"

    def reset(self, a: str, b: str) -> str:
        a, b = self._region(a), self._region(b)
        for link in {self.links[a, b], self.links[b, a], self.peer_links.get((a, b)), self.peer_links.get((b, a))}:
            if link is not None:
                link.reset()
        return f"reset every connection between {a} and {b}"

    def kill(self, region: str) -> str:
        leader = self.leaders[self._region(region)]
        if leader.proc is None:
            raise ClusterError(f"region {region} is not running")
        leader.kill()
        return f"killed {region} (SIGKILL)"

    def kill_storage(self, region: str) -> str:
        """SIGKILL a region's embedded Valkey (its leader starts it again)."""
        leader = self.leaders[self._region(region)]
        if leader.proc is None:
            raise ClusterError(f"region {region} is not running")
        for pid in _children(leader.proc.pid):
            if b"valkey-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                return f"killed {region}'s Valkey (SIGKILL, pid {pid})"
        raise ClusterError(f"region {region} runs no embedded Valkey")

    async def restart(self, region: str) -> str:
        leader = self.leaders[self._region(region)]
        if leader.proc is not None:
            await asyncio.to_thread(leader.stop)
        leader.spawn()
        await asyncio.to_thread(leader.wait_ready)
        return f"restarted {region} on {leader.address}"

    def _bytes(self, a: str, b: str) -> int:
        """Bytes delivered from a to b, clients' and leaders' together."""
        return sum(links[a, b].delivered["up"] + links[b, a].delivered["down"]
                   for links in (self.links, self.peer_links))

    def status(self) -> dict[str, object]:
        return {
            "regions": {
                r: {"leader": leader.address, "peers_on": leader.peer_address,
                    "pid": leader.proc.pid if leader.proc else None,
                    "running": leader.proc is not None and leader.proc.poll() is None,
                    "metrics": f"http://127.0.0.1:{self._metrics_of[r]}/metrics",
                    "endpoints": {src: self.links[src, r].address for src in self.leaders}}
                for r, leader in self.leaders.items()
            },
            "partitions": sorted(f"{a}->{b}" for (a, b), t in self.paths.items() if t.blackhole),
            "paths": {f"{a}->{b}": {"latency_ms": t.latency_ms, "jitter_ms": t.jitter_ms,
                                    "bandwidth_kbps": t.bandwidth_kbps, "bytes": self._bytes(a, b)}
                      for (a, b), t in sorted(self.paths.items()) if a != b},
        }
