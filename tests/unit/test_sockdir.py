"""Socket directories: one per data directory, private, taken over after a crash, removed after a clean stop."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from mlchat.leader.sockdir import made_private, private_socket_dir, socket_dir


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system's temporary directory, as these tests see it: one of their own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def test_a_data_directory_has_one_short_socket_directory_of_its_own(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 200)
    assert socket_dir("mlv-", deep) == socket_dir("mlv-", tmp_path / ("d" * 200) / ".." / ("d" * 200))
    assert socket_dir("mlv-", deep) != socket_dir("mlv-", tmp_path / "other")
    assert socket_dir("mlv-", deep) != socket_dir("mlg-", deep)
    assert len(socket_dir("mlv-", deep).name) < 30  # a Unix socket path is limited to about 100 bytes


def test_it_is_created_private_and_a_leftover_of_a_crash_is_taken_over(tmp_path: Path) -> None:
    path = made_private("t-", tmp_path)
    assert path == socket_dir("t-", tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    (path / "stale.sock").touch()  # what a killed server left
    assert made_private("t-", tmp_path) == path


@pytest.mark.parametrize("in_the_way", ["open to others", "a symlink"])
def test_when_its_name_is_taken_the_sockets_go_in_a_fresh_private_directory(tmp_path: Path, in_the_way: str) -> None:
    """Anyone can work out the name: what they put there must not keep the server from starting, nor be used."""
    taken = socket_dir("t-", tmp_path)
    if in_the_way == "a symlink":
        taken.symlink_to(tmp_path)
    else:
        taken.mkdir()
        os.chmod(taken, 0o755)
    path = made_private("t-", tmp_path)
    assert path != taken and path.name.startswith("t-")
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o700


def test_it_is_removed_with_its_sockets_once_the_server_stops(tmp_path: Path) -> None:
    with private_socket_dir("t-", tmp_path) as path:
        (path / "core.sock").touch()
    assert not path.exists()
