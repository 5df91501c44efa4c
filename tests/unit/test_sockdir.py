"""Socket directories: one per data directory, private, taken over after a crash, removed after a clean stop."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mlchat.leader.sockdir import made_private, private_socket_dir, socket_dir


def test_a_data_directory_has_one_short_socket_directory_of_its_own(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 200)
    assert socket_dir("mlv-", deep) == socket_dir("mlv-", tmp_path / ("d" * 200) / ".." / ("d" * 200))
    assert socket_dir("mlv-", deep) != socket_dir("mlv-", tmp_path / "other")
    assert socket_dir("mlv-", deep) != socket_dir("mlg-", deep)
    assert len(str(socket_dir("mlv-", deep) / "valkey.sock")) < 100  # a Unix socket path's limit


def test_it_is_created_private_and_a_leftover_of_a_crash_is_taken_over(tmp_path: Path) -> None:
    path = made_private(socket_dir("t-", tmp_path))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        (path / "stale.sock").touch()  # what a killed server left
        assert made_private(socket_dir("t-", tmp_path)) == path
    finally:
        (path / "stale.sock").unlink()
        path.rmdir()


def test_a_directory_others_may_enter_or_a_symlink_is_refused(tmp_path: Path) -> None:
    shared = socket_dir("t-", tmp_path / "shared")
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o755)
    link = socket_dir("t-", tmp_path / "link")
    link.symlink_to(tmp_path)
    try:
        for path in (shared, link):
            with pytest.raises(RuntimeError, match="not a directory that only this user may enter"):
                made_private(path)
    finally:
        shared.rmdir()
        link.unlink()


def test_it_is_removed_with_its_sockets_once_the_server_stops(tmp_path: Path) -> None:
    with private_socket_dir("t-", tmp_path) as path:
        (path / "core.sock").touch()
    assert not path.exists()
