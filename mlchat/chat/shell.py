"""`mlchat chat`: the terminal client's I/O shell around `mlchat.chat.core`.

The main thread reads lines (a terminal or a pipe) and runs each command. Each followed channel has a
thread printing its live Subscribe stream, and one thread polls the username claim until it settles.
Calls on the ChatClient are made one at a time under a lock (it holds the causal token, and a failover
replaces its stub); streams are read outside it. A message is printed once, whichever path shows it
first: its stream, the catch-up after a region switch, or the post that sent it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

import grpc

from mlchat.chat import core
from mlchat.errors import InvalidArgument, MlchatError
from mlchat.geo.client import ChatClient
from mlchat.v1 import chat_pb2 as pb

T = TypeVar("T")
ECHO_WAIT_S = 2.0  # a post waits this long for its own stream to show it, so a piped session reads in order
CATCH_UP_LIMIT = 500


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def default_key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mlchat" / "claim-key"


def claim_key(path: Path) -> str:
    """The secret that makes this user's claims repeatable, created at random on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def dcsim_endpoints(run_dir: Path, at: str | None) -> dict[str, str]:
    """Each region's address as seen by a client located in region `at` (default: the first region)."""
    try:
        regions = json.loads((run_dir / "state.json").read_text())["regions"]
    except (OSError, ValueError, KeyError) as e:
        raise InvalidArgument(f"no dcsim run is up in {run_dir} ({e}): start one with 'dcsim up'") from None
    location = at or next(iter(regions))
    if location not in regions:
        raise InvalidArgument(f"--at {location}: the run's regions are {', '.join(regions)}")
    return {region: info["endpoints"][location] for region, info in regions.items()}


def _name(enum: object, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)  # type: ignore[attr-defined]


@dataclass
class Follow:
    stream: Iterator[pb.SubscribeResponse]  # the Subscribe call, cancelled to stop following
    thread: threading.Thread


class Session:
    """One signed-in user at the terminal: claims the name at once, then `run` takes the typed lines."""

    def __init__(self, client: ChatClient, username: str, key: str, out: TextIO, poll_s: float = 1.0) -> None:
        self.client = client
        self.key = key
        self.out = out
        self.poll_s = poll_s
        self.calls = threading.Lock()
        self.printing = threading.Condition()
        self.shown: set[str] = set()
        self.channel = ""
        self.follows: dict[str, Follow] = {}
        # Per channel, the (order key, cursor) of the latest message shown: a region switch resumes after it.
        self.position: dict[str, tuple[tuple[str, ...], str]] = {}
        self.usernames: dict[str, str] = {}
        self.settled: set[str] = set()  # user ids whose claim outcome was told
        self.sent = 0
        self.session_id = uuid.uuid4().hex[:12]
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch_claim, daemon=True)
        self.home = client.region
        self._claim(username)

    def rpc(self, call: Callable[[], T]) -> T:
        with self.calls:
            return call()

    def say(self, line: str) -> None:
        with self.printing:
            print(line, file=self.out, flush=True)

    # Commands ----------------------------------------------------------------------------------------

    def run(self, lines: Iterable[str]) -> None:
        """Run typed lines until /quit or the end of input; errors are shown, never raised."""
        self.watcher.start()
        try:
            for line in lines:
                try:
                    command = core.parse_line(line)
                    if isinstance(command, core.Quit):
                        break
                    if command is not None:
                        self.execute(command)
                except grpc.RpcError as e:
                    self.say(f"! {e.code().name}: {e.details()}")  # type: ignore[attr-defined]
                except MlchatError as e:
                    self.say(f"! {e}")
        finally:
            self.close()

    def execute(self, command: core.Command) -> None:
        match command:
            case core.Post(body):
                self._post(body)
            case core.Join(channel):
                if channel not in self.follows:
                    self._follow(channel, None)
                self.channel = channel
                self.say(f"* now in #{channel} (following {', '.join('#' + c for c in self.follows)})")
            case core.Leave(channel):
                self._leave(channel or self._current())
            case core.SetStatus(presence, text):
                status = self.rpc(lambda: self.client.set_status(
                    pb.Presence.Value(f"PRESENCE_{presence.upper()}"), text)).status
                self.say(self._status_line(self._username(status.user_id), status))
            case core.SwitchRegion(""):
                regions = ", ".join(r or self.home for r in self.client.order)
                self.say(f"* talking to {self.where()}; regions, nearest first: {regions}")
            case core.SwitchRegion(region):
                self._switch(region)
            case core.Who(username):
                user = self.rpc(lambda: self.client.get_user(username=username)).user
                self.usernames[user.user_id] = user.username
                self.say(f"* {user.username}: claim {_name(pb.ClaimState, user.claim_state, 'CLAIM_STATE_')}"
                         f" (claimed in {user.claim_region})")
                status = self.rpc(lambda: self.client.get_status(user.user_id)).status
                self.say(self._status_line(user.username, status))
            case core.History(count):
                channel = self._current()
                page = self.rpc(lambda: self.client.list(channel, limit=count, newest_first=True))
                for m in reversed(page.messages):
                    self.say(core.message_line(m.created_at_ms, m.channel, self._username(m.user_id),
                                               m.origin_region, m.body))
            case core.Private(channel):
                self.rpc(lambda: self.client.create_private_channel(channel))
                self.say(f"* created private channel #{channel}")
                self.execute(core.Join(channel))
            case core.Add(username):
                channel = self._current()
                user = self.rpc(lambda: self.client.get_user(username=username)).user
                self.rpc(lambda: self.client.add_member(channel, user.user_id))
                self.say(f"* added {user.username} to #{channel}")
            case core.Name(username):
                self._claim(username)
            case core.Help():
                self.say(core.HELP)

    def where(self) -> str:
        return self.client.region or self.home

    def _current(self) -> str:
        if not self.channel:
            raise InvalidArgument("no current channel: /join CHANNEL first")
        return self.channel

    def _claim(self, username: str) -> None:
        user = self.rpc(lambda: self.client.claim(username, self.key)).user
        if not self.home:  # a lone address given without its region: ask its name (a signed-in call)
            self.home = self.rpc(self.client.cluster_status).region
        self.usernames[user.user_id] = user.username
        state = _name(pb.ClaimState, user.claim_state, "CLAIM_STATE_")
        if state != "PROVISIONAL":
            self.settled.add(user.user_id)
        self.say(f"* signed in as {user.username} in {self.where()} (claim {state})")

    def _post(self, body: str) -> None:
        channel = self._current()
        self.sent += 1
        client_msg_id = f"{self.session_id}-{self.sent}"  # the same on every retry, so none duplicates
        message = self.rpc(lambda: self.client.post(channel, body, client_msg_id)).message
        with self.printing:
            self.printing.wait_for(lambda: message.id in self.shown, ECHO_WAIT_S)
        self._show(message, core.arrival_ms(message.created_at_ms, now_ms()))

    def _switch(self, region: str) -> None:
        """Move to `region`: the causal token comes along, so reads there wait for this user's writes."""
        self.rpc(lambda: self.client.use_region(region))  # first: an unknown region changes nothing
        channels = list(self.follows)
        for channel in channels:
            self._unfollow(channel)
        self.say(f"* now talking to {region}")
        for channel in channels:
            self._follow(channel, self.position[channel][1])

    # Live messages -----------------------------------------------------------------------------------

    def _follow(self, channel: str, after: str | None) -> None:
        """Subscribe to `channel`. Given a cursor `after`, first show what was committed after it."""
        if after is None:
            page = self.rpc(lambda: self.client.list(channel, limit=1, newest_first=True))
            latest = page.messages[0] if page.messages else None
            self.position[channel] = ((latest.hlc, latest.origin_region, latest.id), latest.cursor) if latest \
                else ((), "")
        else:
            page = self.rpc(lambda: self.client.list(channel, cursor=after, limit=CATCH_UP_LIMIT))
            for m in page.messages:
                self._show(m, None)
        stream = self.rpc(lambda: self.client.subscribe(channel, resume_cursor=page.subscribe_cursor))
        thread = threading.Thread(target=self._pump, args=(channel, stream), daemon=True)
        self.follows[channel] = Follow(stream, thread)
        thread.start()

    def _unfollow(self, channel: str) -> None:
        follow = self.follows.pop(channel)
        follow.stream.cancel()  # type: ignore[attr-defined]
        follow.thread.join()

    def _leave(self, channel: str) -> None:
        if channel not in self.follows:
            raise InvalidArgument(f"not following #{channel}")
        self._unfollow(channel)
        if channel == self.channel:
            self.channel = next(iter(self.follows), "")
        self.say(f"* left #{channel}" + (f"; now in #{self.channel}" if self.channel else ""))

    def _pump(self, channel: str, stream: Iterable[pb.SubscribeResponse]) -> None:
        try:
            for resp in stream:
                self._show(resp.message, core.arrival_ms(resp.message.created_at_ms, now_ms()))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                self.say(f"! live messages of #{channel} stopped: {e.code().name}: {e.details()}"  # type: ignore[attr-defined]
                         f" (/leave {channel} and /join {channel} to follow again)")
            return
        if not self.stop.is_set():
            self.say(f"! {self.where()} ended the stream of #{channel}"
                     f" (/leave {channel} and /join {channel} to follow again)")

    def _show(self, m: pb.Message, latency_ms: int | None) -> None:
        username = self._username(m.user_id)
        with self.printing:
            if m.id in self.shown:
                return
            self.shown.add(m.id)
            key = (m.hlc, m.origin_region, m.id)
            if m.channel in self.position and key > self.position[m.channel][0]:
                self.position[m.channel] = (key, m.cursor)
            print(core.message_line(m.created_at_ms, m.channel, username, m.origin_region, m.body, latency_ms),
                  file=self.out, flush=True)
            self.printing.notify_all()

    def _username(self, user_id: str) -> str:
        if user_id not in self.usernames:
            try:
                self.usernames[user_id] = self.rpc(lambda: self.client.get_user(user_id=user_id)).user.username
            except grpc.RpcError:
                return user_id[:8]  # its claim has not reached this region yet: ask again next time
        return self.usernames[user_id]

    def _status_line(self, username: str, status: pb.Status) -> str:
        if not status.hlc:
            return f"* {username} has set no status"
        text = f": {status.text}" if status.text else ""
        return (f"* {username} is {_name(pb.Presence, status.presence, 'PRESENCE_').lower()}{text}"
                f" (set in {status.origin_region} at {core.clock(status.updated_at_ms)})")

    # The claim ---------------------------------------------------------------------------------------

    def _watch_claim(self) -> None:
        while not self.stop.wait(self.poll_s):
            user = self.client.user
            if user is None or user.user_id in self.settled:
                continue
            try:
                notice = self._claim_notice(user.user_id)
            except grpc.RpcError:
                continue  # the client fails over by itself; ask again at the next poll
            if notice:
                self.settled.add(user.user_id)
                self.say(notice)

    def _claim_notice(self, user_id: str) -> str | None:
        user = self.rpc(lambda: self.client.get_user(user_id=user_id)).user
        state = _name(pb.ClaimState, user.claim_state, "CLAIM_STATE_")
        winner = (self.rpc(lambda: self.client.get_user(username=user.username)).user.claim_region
                  if state == "LOST" else "")
        return core.claim_notice(user.username, state, winner)

    def close(self) -> None:
        self.stop.set()
        for channel in list(self.follows):
            self._unfollow(channel)
        if self.watcher.is_alive():
            self.watcher.join()
        self.client.close()


def main(username: str, endpoints: list[tuple[str, str]], region: str | None, key_file: Path) -> int:
    """Run the client on stdin and stdout; the exit status. `endpoints`: (region, address), where
    one lone address may leave its region empty."""
    if len(endpoints) > 1 and not all(name for name, _ in endpoints):
        print("mlchat chat: name the region of each address: --connect REGION=HOST:PORT", file=sys.stderr)
        return 2
    try:
        client = ChatClient(endpoints[0][1] if not endpoints[0][0] else dict(endpoints))
        if region:
            client.use_region(region)
        session = Session(client, username, claim_key(key_file), sys.stdout)
    except grpc.RpcError as e:
        print(f"mlchat chat: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except MlchatError as e:
        print(f"mlchat chat: {e}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):  # run() has closed the session
        session.run(sys.stdin)
    return 0
