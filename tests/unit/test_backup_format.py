"""The backup's pure parts: which key is read when, how keys are grouped, and the file format."""

from __future__ import annotations

import io

import pytest

from mlchat.errors import InvalidArgument
from mlchat.leader.backup import HEADER, Phase, data_groups, encode_record, hash_tag, phase, read_records


def test_summaries_first_indexes_last_and_everything_else_is_data():
    assert [phase(k) for k in (b"meta:vector", b"meta:hlc", b"shards")] == [Phase.SUMMARY] * 3
    assert [phase(k) for k in (b"users", b"channels", b"u:abc")] == [Phase.INDEX] * 3
    assert [phase(k) for k in (b"n:ann", b"s:abc", b"c:{lobby}:z", b"px:n:ann", b"meta:members", b"unknown")] \
        == [Phase.DATA] * 6


def test_a_channels_keys_are_read_together():
    assert hash_tag(b"y:{lobby}:7:u") == b"lobby" and hash_tag(b"n:{}x") is None and hash_tag(b"s:x") is None
    keys = [b"c:{a}:z", b"n:ann", b"y:{a}:1:snap", b"c:{b}:ids", b"cm:{a}:u1", b"meta:hlc", b"u:x", b"s:u1"]
    assert data_groups(keys) == [[b"c:{a}:z", b"cm:{a}:u1", b"y:{a}:1:snap"], [b"c:{b}:ids"], [b"n:ann", b"s:u1"]]


def _file(records: list[tuple[bytes, bytes]], trailer: int | None) -> io.BytesIO:
    body = HEADER + b"".join(encode_record(k, v) for k, v in records)
    if trailer is not None:
        body += encode_record(b"", str(trailer).encode())
    return io.BytesIO(body)


def test_records_round_trip():
    records = [(b"k1", b"\x00\x01binary"), (b"k2", b"")]
    assert list(read_records(_file(records, 2))) == records


@pytest.mark.parametrize(("stream", "error"), [
    (io.BytesIO(b"something else"), "not an mlchat backup"),
    (_file([(b"k", b"v")], None), "truncated"),
    (_file([(b"k", b"v")], 3), "holds 1 records but its trailer says 3"),
    (io.BytesIO(_file([(b"k", b"value")], 1).getvalue()[:len(HEADER) + 10]), "truncated"),
])
def test_a_broken_file_is_refused(stream: io.BytesIO, error: str):
    with pytest.raises(InvalidArgument, match=error):
        list(read_records(stream))
