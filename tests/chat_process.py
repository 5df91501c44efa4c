"""`mlchat chat` in a child process, fed lines on its stdin, its output read as it comes."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

from support import wait_until


class ChatProcess:
    def __init__(self, user: str, key_file: Path, *where: str) -> None:
        """`where`: the cluster arguments, e.g. ("--connect", "127.0.0.1:50051")."""
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlchat", "chat", "--user", user, "--key-file", str(key_file), *where],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def send(self, *lines: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write("".join(line + "\n" for line in lines))
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, deadline_s: float = 15.0) -> str:
        """The first output line matching the regular expression `pattern`, once it has been printed."""
        found: list[str] = []

        def printed() -> bool:
            found[:] = [line for line in self.lines if re.search(pattern, line)]
            return bool(found)

        try:
            wait_until(printed, deadline_s, f"a line matching {pattern!r}")
        except AssertionError:
            raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines)) from None
        return found[0]

    def finish(self, timeout_s: float = 30.0) -> str:
        """Close stdin (end of input), wait for a clean exit, and return stderr."""
        assert self.proc.stdin and self.proc.stderr
        self.proc.stdin.close()
        stderr = self.proc.stderr.read()
        assert self.proc.wait(timeout_s) == 0, stderr
        return stderr

    def stop(self) -> None:
        """Kill it if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe:
                pipe.close()
