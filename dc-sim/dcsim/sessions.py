"""Runs of a cluster in one replication mode, and users whose every call is recorded.

Scenarios and the comparison both start a fresh cluster per mode (`run`), put users in regions
(`Session`), and keep what each user saw as a history of `checker.Op`s: one per call, with its region,
its start and end, whether it was acknowledged, and what it returned. A session talks to any region
as seen from its home location (through the WAN proxy), so it can move between regions, and it
carries its causal token across them unless a call is made without it.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from dcsim import cli as dcsim
from dcsim.checker import FinalState, Op
from mlchat.crdt import vector
from mlchat.geo.client import ChatClient
from mlchat.geo.modes import Mode, SyncAcks, describe
from mlchat.v1 import chat_pb2 as pb
from mlchat.v1 import cluster_pb2

REGIONS = ("us-east", "eu-west", "ap-northeast")
# Every mode the comparison runs, as (mode, sync acks).
MODES: tuple[tuple[Mode, SyncAcks], ...] = (
    (Mode.ASYNC, SyncAcks.QUORUM), (Mode.SYNC, SyncAcks.QUORUM), (Mode.SYNC, SyncAcks.ALL),
    (Mode.SINGLE_LEADER, SyncAcks.QUORUM), (Mode.STRONG_NAMES, SyncAcks.QUORUM))
CLAIM_STATES = {pb.CLAIM_STATE_PROVISIONAL: "PROVISIONAL", pb.CLAIM_STATE_CONFIRMED: "CONFIRMED",
                pb.CLAIM_STATE_LOST: "LOST"}


def label(mode: Mode, acks: SyncAcks) -> str:
    return describe(mode, acks)


def now_ms() -> float:
    return time.time_ns() / 1e6


def wait(condition: Callable[[], bool], deadline_s: float = 15.0) -> bool:
    """Poll `condition` until it holds or the deadline passes; whether it held."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def claimed(client: ChatClient, username: str, claim_key: str, deadline_s: float = 15.0) -> bool:
    """Claim a username, again while the region answers UNAVAILABLE (a region that joined lately takes
    claims once every member counts it in); whether it was taken."""
    def attempt() -> bool:
        try:
            client.claim(username, claim_key)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    return wait(attempt, deadline_s)


@contextlib.contextmanager
def run(mode: Mode, acks: SyncAcks, regions: tuple[str, ...] = REGIONS) -> Iterator[Run]:
    """A fresh cluster in `mode`, with every region's peers connected; stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="dcsim-") as tmp:
        run_dir = Path(tmp) / "run"
        state = dcsim.up(run_dir, regions, None, None, str(mode), str(acks))
        try:
            cluster = Run(run_dir, state, regions)
            cluster.wait_connected()
            yield cluster
        finally:
            dcsim.down(run_dir)


class Run:
    def __init__(self, run_dir: Path, state: dict[str, Any], regions: tuple[str, ...]) -> None:
        self.run_dir = run_dir
        self.state = state
        self.regions = regions
        self.history: list[Op] = []
        self._lock = threading.Lock()
        self._observers: dict[str, ChatClient] = {}  # per region: signed in early, to read the final state

    def address(self, region: str, seen_from: str) -> str:
        return str(self.state["regions"][region]["endpoints"][seen_from])

    def control(self, command: str, **args: Any) -> Any:
        return dcsim.control(self.run_dir, {"command": command, **args})

    def record(self, op: Op) -> None:
        with self._lock:
            self.history.append(op)

    def observer(self, region: str) -> ChatClient:
        """A client of `region` for status and final reads (signed in while every region is up)."""
        if region not in self._observers:
            c = ChatClient(self.address(region, region), timeout_s=10)
            c.claim("observer", "observer-claim-key-0123456789")
            self._observers[region] = c
        return self._observers[region]

    def wait_connected(self, deadline_s: float = 30) -> None:
        """Wait until every region's streams from its peers are up (before then, a sync write may be
        refused, the observer's claim included)."""
        for region in self.regions:
            def up(r: str = region) -> bool:
                try:
                    peers = self.observer(r).cluster_status().peers
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    return False
                return all(p.state == cluster_pb2.PEER_STATE_UP for p in peers)

            if not wait(up, deadline_s):
                raise RuntimeError(f"{region} did not connect to its peers within {deadline_s:.0f}s")

    def isolate(self, region: str) -> None:
        for other in self.regions:
            if other != region:
                self.control("partition", a=region, b=other)

    def digests(self) -> dict[str, str]:
        return {r: self.observer(r).cluster_status(with_digest=True).state_digest for r in self.regions}

    def converged(self) -> bool:
        try:
            return len(set(self.digests().values())) == 1
        except grpc.RpcError:
            return False

    def final_state(self, channels: list[str], usernames: dict[str, list[str]]) -> FinalState:
        """What every region holds: the channels' messages, each name's owner, each claimant's state."""
        messages: dict[str, dict[str, list[tuple[str, str, str]]]] = {}
        owners: dict[str, dict[str, str]] = {}
        states: dict[str, dict[str, str]] = {}
        for region in self.regions:
            reader = self.observer(region)
            reader.causal = {}
            messages[region] = {ch: [(m.id, m.user_id, m.client_msg_id) for m in read_all(reader, ch)]
                                for ch in channels}
            owners[region], states[region] = {}, {}
            for name, claimants in usernames.items():
                if (owner := _user(reader, username=name)) is not None:
                    owners[region][name] = owner.user_id
                for user_id in claimants:
                    if (claimant := _user(reader, user_id=user_id)) is not None:
                        states[region][user_id] = CLAIM_STATES.get(claimant.claim_state, "")
        return FinalState(messages, owners, states, self.digests())


def _user(reader: ChatClient, **key: str) -> pb.User | None:
    """The user as the reader's region knows it, or None if it knows none (any other error is raised: a
    final state that could not be read must not pass for a disagreement between regions)."""
    try:
        return reader.get_user(**key).user
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise
        return None


def read_all(c: ChatClient, channel: str) -> list[pb.Message]:
    """Every message of a channel, oldest first, page by page."""
    out: list[pb.Message] = []
    cursor = ""
    while True:
        page = c.list(channel, cursor=cursor, limit=500)
        out.extend(page.messages)
        if len(page.messages) < 500:
            return out
        cursor = page.next_cursor


class Session:
    """One user, at home in one region, whose calls are recorded in the run's history. Several threads
    may call at once (each has its own connections); the causal token is shared."""

    def __init__(self, cluster: Run, name: str, home: str, timeout_s: float = 10) -> None:
        self.cluster = cluster
        self.name = name
        self.home = home
        self.timeout_s = timeout_s
        self._clients: dict[tuple[str, int], ChatClient] = {}  # (region, thread) -> client
        self._lock = threading.Lock()
        self.token = ""
        self.user_id = ""
        self.causal: dict[str, str] = {}

    def client(self, region: str) -> ChatClient:
        key = (region, threading.get_ident())
        with self._lock:
            if key not in self._clients:
                self._clients[key] = ChatClient(self.cluster.address(region, self.home), timeout_s=self.timeout_s)
            c = self._clients[key]
            c.token, c.causal = self.token, dict(self.causal)
        return c

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def _call(self, region: str, kind: str, call: Callable[[ChatClient], Any], with_token: bool = True,
              **fields: Any) -> tuple[Op, Any]:
        # The span recorded covers taking the token and giving it back: a call that starts after
        # another ended has seen that call's token, as the checker assumes.
        start = now_ms()
        c = self.client(region)
        if not with_token:
            c.causal = {}
        try:
            response, more = call(c)
            ok = True
        except grpc.RpcError as e:
            response, more, ok = e, {}, False
        with self._lock:
            self.causal = vector.merge(self.causal, c.causal)
        op = Op(self.name, region, kind, start, now_ms(), ok, with_token, **{**fields, **more})
        self.cluster.record(op)
        return op, response

    def claim(self, region: str, username: str, claim_key: str) -> tuple[Op, Any]:
        """Claim a name; this session becomes that user if the claim is not refused."""
        def call(c: ChatClient) -> tuple[Any, dict[str, Any]]:
            try:
                resp = c.claim(username, claim_key)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return e, {"claim_state": "TAKEN"}
                raise
            self.token, self.user_id = resp.token, resp.user.user_id
            return resp, {"claim_state": CLAIM_STATES.get(resp.user.claim_state, ""), "user_id": resp.user.user_id}

        return self._call(region, "claim", call, username=username)

    def post(self, region: str, channel: str, body: str, client_msg_id: str) -> tuple[Op, Any]:
        def call(c: ChatClient) -> tuple[Any, dict[str, Any]]:
            resp = c.post(channel, body, client_msg_id)
            return resp, {"message_id": resp.message.id}

        return self._call(region, "post", call, channel=channel, client_msg_id=client_msg_id, user_id=self.user_id)

    def read(self, region: str, channel: str, with_token: bool = True) -> tuple[Op, Any]:
        def call(c: ChatClient) -> tuple[Any, dict[str, Any]]:
            messages = read_all(c, channel)
            return messages, {"seen": tuple(m.id for m in messages)}

        return self._call(region, "read", call, with_token, channel=channel)

    def set_status(self, region: str, presence: int, text: str) -> tuple[Op, Any]:
        def call(c: ChatClient) -> tuple[Any, dict[str, Any]]:
            resp = c.set_status(presence, text)
            return resp, {"hlc": resp.status.hlc}

        return self._call(region, "set_status", call, user_id=self.user_id)

    def get_status(self, region: str, user_id: str, with_token: bool = True) -> tuple[Op, Any]:
        def call(c: ChatClient) -> tuple[Any, dict[str, Any]]:
            resp = c.get_status(user_id)
            return resp, {"hlc": resp.status.hlc}

        return self._call(region, "get_status", call, with_token, user_id=user_id)
