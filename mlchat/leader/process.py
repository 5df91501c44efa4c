"""Run a leader as a child process (for the demo, the tests, benchmarks and dc-sim)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlchat.leader.valkey import dying_with_parent
from mlchat.tls import client_channel

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def on_termination() -> asyncio.Event:
    """An event set at SIGTERM or SIGINT (Ctrl-C), from now on: a process asks for it before it starts serving,
    so that a signal during its start is a graceful shutdown once started, not the end of it there and then."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux)."""
    out: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out |= {int(child), *descendants(int(child))}
    except FileNotFoundError:  # it exited meanwhile
        pass
    return out


def free_port() -> int:
    """A loopback port free now, below the range the kernel takes the local ports of outgoing connections
    from: a port from that range (what binding port 0 gives) can be taken by any client connection before
    the server that was meant to have it binds it."""
    low = min(20_000, _ephemeral_low() // 2)
    for _ in range(1000):
        port = random.randint(low, _ephemeral_low() - 1)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def wait_serving(address: str, timeout_s: float, tls_ca: Path | None = None) -> None:
    """Block until the gRPC health check at `address` answers SERVING."""
    deadline = time.monotonic() + timeout_s
    with client_channel(address, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"leader at {address} not serving after {timeout_s}s")
            time.sleep(0.02)


class LeaderProcess:
    """`mlchat leader` in a child process; `start()` returns once it serves."""

    def __init__(self, region: str, data_dir: Path, redis_url: str | None = None, port: int | None = None,
                 extra_args: tuple[str, ...] = (), log_level: str = "WARNING", peer_port: int | None = None,
                 tls_ca: Path | None = None) -> None:
        """`peer_port`: serve replication on a port of its own; `tls_ca`: the client API serves TLS (given
        by `--tls-cert` in `extra_args`) with a certificate this CA signed."""
        self.region = region
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.port = port or free_port()
        self.peer_port = peer_port
        self.tls_ca = tls_ca
        self.extra_args = extra_args
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def peer_address(self) -> str:
        """Where other regions reach it."""
        return f"127.0.0.1:{self.peer_port}" if self.peer_port else self.address

    def start(self, timeout_s: float = 30.0) -> LeaderProcess:
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def spawn(self) -> None:
        """Start the process without waiting. Call it from a thread that outlives the leader: the
        leader gets SIGTERM when that thread ends (so that no leader outlives its launcher)."""
        args = [sys.executable, "-m", "mlchat", "--log-level", self.log_level, "leader", "--region", self.region,
                "--listen", self.address, "--data-dir", str(self.data_dir), *self.extra_args]
        if self.redis_url:
            args += ["--redis", self.redis_url]
        if self.peer_port:
            args += ["--peer-listen", self.peer_address]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "leader.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(dying_with_parent(args), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        try:
            wait_serving(self.address, timeout_s, self.tls_ca)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"leader {self.region} did not start; log:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        path = self.data_dir / "leader.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> LeaderProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
