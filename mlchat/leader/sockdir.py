"""Short private directories for Unix sockets, one per data directory.

A Unix socket's path is limited to about 100 bytes, so a socket cannot live in any data directory: it lives
in a short directory under the system's temporary directory, named after the data directory it serves. A
process killed before it removed its directory leaves it behind; the next start on the same data directory
takes it over (a server that binds a socket path replaces what is there), so crashes do not pile
directories up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def socket_dir(prefix: str, data_dir: Path) -> Path:
    """The name of the socket directory of the server of `data_dir` (see `made_private`)."""
    digest = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"{prefix}{digest}"


def made_private(prefix: str, data_dir: Path) -> Path:
    """The socket directory of the server of `data_dir`, created if need be: the one named after `data_dir` (a
    leftover of a crash taken over), or, should something else hold that name (a symlink, another user's
    directory, one that others may enter), a fresh one of a random name: a name anyone can work out must not
    let anyone keep the server from starting."""
    path = socket_dir(prefix, data_dir)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            log.warning("%s is not a directory that only this user may enter: the sockets go elsewhere", path)
            return Path(tempfile.mkdtemp(prefix=prefix))
    return path


@contextlib.contextmanager
def private_socket_dir(prefix: str, data_dir: Path) -> Iterator[Path]:
    """The socket directory of `data_dir`'s server while it runs, removed with whatever it holds after."""
    path = made_private(prefix, data_dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
