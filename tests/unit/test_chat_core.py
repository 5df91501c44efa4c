"""The terminal client's core: typed lines to commands, and the lines it prints."""

from __future__ import annotations

import datetime as dt

import pytest

from mlchat.chat import core
from mlchat.errors import InvalidArgument

UTC = dt.UTC


@pytest.mark.parametrize(("line", "command"), [
    ("hello there\n", core.Post("hello there")),
    ("  indented, kept as typed", core.Post("  indented, kept as typed")),
    ("/join general", core.Join("general")),
    ("/leave", core.Leave("")),
    ("/leave random", core.Leave("random")),
    ("/status away out for lunch", core.SetStatus("away", "out for lunch")),
    ("/status online", core.SetStatus("online", "")),
    ("/region", core.SwitchRegion("")),
    ("/region eu-west", core.SwitchRegion("eu-west")),
    ("/who bob", core.Who("bob")),
    ("/history", core.History(core.DEFAULT_HISTORY)),
    ("/history 5", core.History(5)),
    ("/private ops", core.Private("ops")),
    ("/add bob", core.Add("bob")),
    ("/name alice2", core.Name("alice2")),
    ("/help", core.Help()),
    ("/quit\r\n", core.Quit()),
])
def test_a_line_becomes_its_command(line: str, command: core.Command):
    assert core.parse_line(line) == command


@pytest.mark.parametrize("line", ["", "\n", "   \n"])
def test_a_blank_line_is_nothing(line: str):
    assert core.parse_line(line) is None


@pytest.mark.parametrize(("line", "says"), [
    ("/join", "usage: /join CHANNEL"),
    ("/join a b", "usage: /join CHANNEL"),
    ("/status sleeping", "usage: /status online|away|busy"),
    ("/history many", "N from 1 to 500"),
    ("/history 0", "N from 1 to 500"),
    ("/history 501", "N from 1 to 500"),
    ("/who", "usage: /who USER"),
    ("/frobnicate", "unknown command /frobnicate: /help lists them"),
])
def test_a_malformed_command_says_how_to_write_it(line: str, says: str):
    with pytest.raises(InvalidArgument, match=says):
        core.parse_line(line)


def test_a_live_message_line_shows_channel_author_region_and_latency():
    at = int(dt.datetime(2026, 1, 2, 12, 1, 2, tzinfo=UTC).timestamp() * 1000)
    assert core.message_line(at, "general", "alice", "eu-west", "hello", 85, UTC) == \
        "[12:01:02] #general alice@eu-west (+85 ms): hello"
    assert core.message_line(at, "general", "alice", "eu-west", "hello", -3, UTC) == \
        "[12:01:02] #general alice@eu-west (-3 ms): hello"


def test_a_history_line_has_no_latency():
    at = int(dt.datetime(2026, 1, 2, 23, 59, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
    assert core.message_line(at, "ops", "bob", "us-east", "old news", tz=UTC) == "[23:59:59] #ops bob@us-east: old news"


def test_arrival_latency_is_local_time_minus_the_commit_time():
    assert core.arrival_ms(1_700_000_000_000, 1_700_000_000_085) == 85
    # The origin's clock ahead of ours shows as a negative delay rather than being hidden.
    assert core.arrival_ms(1_700_000_000_010, 1_700_000_000_000) == -10


def test_a_settled_claim_is_told_and_a_provisional_one_is_not():
    assert core.claim_notice("alice", "PROVISIONAL", "") is None
    assert "alice is confirmed" in (core.claim_notice("alice", "CONFIRMED", "") or "")
    assert core.claim_notice("alice", "LOST", "eu-west") == (
        "* your username alice was lost to a concurrent claim in region eu-west; pick another with /name")
