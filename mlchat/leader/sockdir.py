"""Short private directories for Unix sockets, one per data directory.

A Unix socket's path is limited to about 100 bytes, so a socket cannot live in any data directory: it lives
in a short directory under the system's temporary directory, named after the data directory it serves. A
process killed before it removed its directory leaves it behind; the next start on the same data directory
takes it over (a server that binds a socket path replaces a stale socket), so crashes do not pile
directories up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def socket_dir(prefix: str, data_dir: Path) -> Path:
    """Where the sockets of the server of `data_dir` live (not created: see `made_private`)."""
    digest = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"{prefix}{digest}"


def made_private(path: Path) -> Path:
    """`path`, created if need be, once it is a directory only this user may enter. Its name is predictable,
    so one that another user made (or a symlink) is refused rather than used."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise RuntimeError(f"{path} is in the way of this server's sockets: it is not a directory that only "
                               "this user may enter; remove it") from None
    return path


@contextlib.contextmanager
def private_socket_dir(prefix: str, data_dir: Path) -> Iterator[Path]:
    """The socket directory of `data_dir`'s server while it runs, removed with whatever it holds after."""
    path = made_private(socket_dir(prefix, data_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
