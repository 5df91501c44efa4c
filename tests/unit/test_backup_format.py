"""The backup's pure parts: which key is read when, how keys are grouped, and the file format."""

from __future__ import annotations

import io

import pytest

from mlchat.errors import InvalidArgument
from mlchat.leader.backup import (
    CLUSTER_HEADER,
    HEADER,
    Phase,
    data_groups,
    encode_record,
    hash_tag,
    phase,
    read_header,
    read_records,
)


def test_summaries_first_indexes_last_and_everything_else_is_data():
    assert [phase(k) for k in (b"meta:vector", b"meta:hlc", b"shards")] == [Phase.SUMMARY] * 3
    assert [phase(k) for k in (b"users", b"channels", b"u:abc")] == [Phase.INDEX] * 3
    assert [phase(k) for k in (b"n:ann", b"s:abc", b"c:{lobby}:z", b"px:n:ann", b"meta:members", b"unknown")] \
        == [Phase.DATA] * 6
    # A restored region starts a new outbox: the old one, and its cursors of peers' outboxes, are left out.
    assert [phase(k) for k in (b"outbox", b"outbox:trimmed", b"meta:epoch", b"meta:cursors")] == [Phase.LEFT_OUT] * 4


def test_on_a_cluster_every_copy_of_a_region_wide_key_is_read_in_that_keys_phase():
    assert [phase(k) for k in (b"meta:{meta}:vector", b"meta:hlc:{3f2}", b"shards:{a}")] == [Phase.SUMMARY] * 3
    assert [phase(k) for k in (b"users:{3f2}", b"channels:{1}", b"meta:copies")] == [Phase.INDEX] * 3
    # Meta keys other than the vector are data; a channel named like a tag is the channel's.
    assert [phase(k) for k in (b"meta:{meta}:members", b"meta:{meta}:term", b"c:{3f2}:z", b"y:{shards}:1:u")] \
        == [Phase.DATA] * 4
    assert [phase(k) for k in (b"outbox:{3f2}", b"outbox:trimmed:{1}", b"meta:{meta}:epoch", b"meta:{meta}:cursors")] \
        == [Phase.LEFT_OUT] * 4


def test_a_channels_keys_are_read_together():
    assert hash_tag(b"y:{lobby}:7:u") == b"lobby" and hash_tag(b"n:{}x") is None and hash_tag(b"s:x") is None
    keys = [b"c:{a}:z", b"n:ann", b"y:{a}:1:snap", b"c:{b}:ids", b"cm:{a}:u1", b"meta:hlc", b"u:x", b"s:u1"]
    assert data_groups(keys) == [[b"c:{a}:z", b"cm:{a}:u1", b"y:{a}:1:snap"], [b"c:{b}:ids"], [b"n:ann", b"s:u1"]]


def _file(records: list[tuple[bytes, bytes]], trailer: int | None, header: bytes = HEADER) -> io.BytesIO:
    body = header + b"".join(encode_record(k, v) for k, v in records)
    if trailer is not None:
        body += encode_record(b"", str(trailer).encode())
    return io.BytesIO(body)


def _read(stream: io.BytesIO) -> tuple[bool, list[tuple[bytes, bytes]]]:
    return read_header(stream), list(read_records(stream))


def test_records_round_trip_and_the_header_says_which_layout_they_are_named_for():
    records = [(b"k1", b"\x00\x01binary"), (b"k2", b"")]
    assert _read(_file(records, 2)) == (False, records)
    assert _read(_file(records, 2, CLUSTER_HEADER)) == (True, records)


@pytest.mark.parametrize(("stream", "error"), [
    (io.BytesIO(b"something else"), "not an mlchat backup"),
    (io.BytesIO(b"mlchat-backup 1 cluster and more\n"), "not an mlchat backup"),
    (_file([(b"k", b"v")], None), "truncated"),
    (_file([(b"k", b"v")], 3), "holds 1 records but its trailer says 3"),
    (io.BytesIO(_file([(b"k", b"value")], 1).getvalue()[:len(HEADER) + 10]), "truncated"),
])
def test_a_broken_file_is_refused(stream: io.BytesIO, error: str):
    with pytest.raises(InvalidArgument, match=error):
        _read(stream)
