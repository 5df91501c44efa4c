"""The terminal client's core: what a typed line asks for, and how what comes back is shown.

A line starting with `/` is a command (`/join general`); any other non-blank line is a message to the
current channel. `parse_line` turns a line into one of the command classes below, or raises
InvalidArgument with the usage to show. The formatting functions turn plain values into the lines the
client prints; the arrival latency of a live message is the local clock minus the wall-clock part of
its hlc, so it is the replication and delivery delay when the clocks agree (on one machine, exactly),
and negative if the origin region's clock runs ahead. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from mlchat.errors import InvalidArgument

PRESENCES = ("online", "away", "busy")
DEFAULT_HISTORY = 20


@dataclass(frozen=True)
class Post:
    body: str


@dataclass(frozen=True)
class Join:
    channel: str


@dataclass(frozen=True)
class Leave:
    channel: str  # empty: the current channel


@dataclass(frozen=True)
class SetStatus:
    presence: str  # one of PRESENCES
    text: str


@dataclass(frozen=True)
class SwitchRegion:
    region: str  # empty: show the current region and the others


@dataclass(frozen=True)
class Who:
    username: str


@dataclass(frozen=True)
class History:
    count: int


@dataclass(frozen=True)
class Private:
    channel: str


@dataclass(frozen=True)
class Add:
    username: str


@dataclass(frozen=True)
class Name:
    username: str


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Quit:
    pass


Command = Post | Join | Leave | SetStatus | SwitchRegion | Who | History | Private | Add | Name | Help | Quit

HELP = """commands:
  /join CHANNEL            follow a channel and make it the current one
  /leave [CHANNEL]         stop following a channel (default: the current one)
  /status online|away|busy [TEXT]
  /region [REGION]         talk to another region (no argument: show the regions)
  /who USER                a user's claim and status
  /history [N]             the last N messages of the current channel (default 20)
  /private CHANNEL         create a private channel and join it
  /add USER                add a user to the current (private) channel
  /name USERNAME           claim another username
  /quit                    (or end of input)
anything else is posted to the current channel"""


def _one(name: str, rest: str, usage: str) -> str:
    words = rest.split()
    if len(words) != 1:
        raise InvalidArgument(f"usage: /{name} {usage}")
    return words[0]


def parse_line(line: str) -> Command | None:
    """The command a typed line asks for; None for a blank line."""
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    if not text.startswith("/"):
        return Post(text)
    name, _, rest = text[1:].partition(" ")
    rest = rest.strip()
    if name == "join":
        return Join(_one(name, rest, "CHANNEL"))
    if name == "leave":
        return Leave(_one(name, rest, "[CHANNEL]") if rest else "")
    if name == "status":
        presence, _, status_text = rest.partition(" ")
        if presence not in PRESENCES:
            raise InvalidArgument(f"usage: /status {'|'.join(PRESENCES)} [TEXT]")
        return SetStatus(presence, status_text.strip())
    if name == "region":
        return SwitchRegion(_one(name, rest, "[REGION]") if rest else "")
    if name == "who":
        return Who(_one(name, rest, "USER"))
    if name == "history":
        count = _one(name, rest, "[N]") if rest else str(DEFAULT_HISTORY)
        if not count.isdigit() or not 1 <= int(count) <= 500:
            raise InvalidArgument("usage: /history [N], N from 1 to 500")
        return History(int(count))
    if name == "private":
        return Private(_one(name, rest, "CHANNEL"))
    if name == "add":
        return Add(_one(name, rest, "USER"))
    if name == "name":
        return Name(_one(name, rest, "USERNAME"))
    if name == "help":
        return Help()
    if name == "quit":
        return Quit()
    raise InvalidArgument(f"unknown command /{name}: /help lists them")


def arrival_ms(created_at_ms: int, now_ms: int) -> int:
    """How long a message took from its commit in its origin region to this client."""
    return now_ms - created_at_ms


def clock(ms: int, tz: dt.tzinfo | None = None) -> str:
    """HH:MM:SS of a wall-clock time in milliseconds (local time unless `tz` is given)."""
    return dt.datetime.fromtimestamp(ms / 1000, tz).strftime("%H:%M:%S")


def message_line(created_at_ms: int, channel: str, username: str, region: str, body: str,
                 latency_ms: int | None = None, tz: dt.tzinfo | None = None) -> str:
    """`[12:01:02] #general alice@eu-west (+85 ms): hello`; history lines have no latency."""
    latency = "" if latency_ms is None else f" ({latency_ms:+d} ms)"
    return f"[{clock(created_at_ms, tz)}] #{channel} {username}@{region}{latency}: {body}"


def claim_notice(username: str, state: str, winner_region: str) -> str | None:
    """What to tell the user when their claim on `username` settles (state CONFIRMED or LOST)."""
    if state == "CONFIRMED":
        return f"* your username {username} is confirmed: every region agrees it is yours"
    if state == "LOST":
        return (f"* your username {username} was lost to a concurrent claim in region {winner_region}; "
                "pick another with /name")
    return None
