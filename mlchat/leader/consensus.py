"""Paxos across regions, driven over gRPC: this region's acceptor, and proposals it makes.

The protocol itself is `mlchat.geo.paxos` (pure). Here an acceptor's state lives in Redis and is
stored before the answer leaves; a proposal sends each phase to every member at once (this region
included, through the same code), feeds the answers to the proposer as they come, and starts a higher
ballot after a random pause when it was pre-empted or a phase went unanswered. A proposal that finds
no majority before its deadline raises `Unavailable`: its outcome is then unknown (a value accepted
by a minority may still be chosen later), which is why callers make proposals they can repeat.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from mlchat.crdt import vector
from mlchat.errors import InvalidArgument, Unavailable
from mlchat.geo import paxos
from mlchat.geo.modes import majority
from mlchat.leader import limits
from mlchat.leader.region import Region
from mlchat.v1 import replication_pb2 as rpb
from mlchat.v1 import replication_pb2_grpc

log = logging.getLogger(__name__)
R = TypeVar("R")
ROUND_TIMEOUT_S = 1.0  # a phase unanswered by a majority this long starts a new ballot
MAX_BACKOFF_S = 0.2  # pause before a new ballot: random, so that rival proposers stop colliding


async def _always(key: str, proposer: str) -> bool:
    return True


def _key(key: str) -> str:
    """An instance key as proposers make them: "name:<username>" or "epoch:<n>"."""
    kind, _, rest = key.partition(":")
    if not ((kind == "name" and re.fullmatch(limits.USERNAME_PATTERN, rest))
            or (kind == "epoch" and rest.isascii() and rest.isdigit() and len(rest) < 19)):
        raise InvalidArgument(f"consensus key {key[:80]!r} is invalid: use name:<username> or epoch:<n>")
    return key


def _ballot(message: rpb.Ballot) -> paxos.Ballot:
    ballot = ballot_of(message)
    if not paxos.proper(ballot) or not re.fullmatch(limits.REGION_PATTERN, ballot[1]):
        raise InvalidArgument(f"ballot ({ballot[0]}, {ballot[1][:40]!r}) is invalid: a round of at least 1 and a "
                              "region name")
    return ballot


def ballot_pb(ballot: paxos.Ballot) -> rpb.Ballot:
    return rpb.Ballot(round=ballot[0], region=ballot[1])


def ballot_of(message: rpb.Ballot) -> paxos.Ballot:
    return (message.round, message.region)


class Consensus:
    def __init__(self, region: Region, stub: Callable[[str], replication_pb2_grpc.ReplicationServiceStub],
                 metadata: Callable[[], tuple[tuple[str, str], ...]], rng: random.Random,
                 now_ms: Callable[[], int]) -> None:
        self.region = region
        self.stub = stub
        self.metadata = metadata
        self.rng = rng
        self.now_ms = now_ms
        self._round = 0
        self._proposing: dict[str, tuple[asyncio.Lock, int]] = {}  # key -> its lock, and the proposals using it
        # Whether to take part in an instance at all (single-leader mode declines elections while its
        # primary lives); declining is always safe for Paxos.
        self.may_promise: Callable[[str, str], Awaitable[bool]] = _always

    def _first_round(self) -> int:
        """A round no earlier proposal of this region used, in this process or a previous one: ballots
        must be unique, and a restarted region must not reuse one (clock milliseconds, times 1000)."""
        self._round = max(self._round + 1, self.now_ms() * 1000)
        return self._round

    # Acceptor -----------------------------------------------------------------------------------

    async def prepare(self, request: rpb.PrepareRequest) -> rpb.PrepareResponse:
        msg = paxos.Prepare(_key(request.key), _ballot(request.ballot))
        if not await self.may_promise(msg.key, msg.ballot[1]):
            # No answer at all, rather than a refusal: a refusal would pre-empt the proposer, and one
            # region that still hears the old primary would cancel every round of an election that the
            # others could win.
            raise Unavailable(f"region {self.region.name} takes no part in {msg.key} yet: it still follows a live "
                              "primary")
        promise = await self._step(msg.key, lambda state: paxos.on_prepare(state, msg, self.region.name))
        return rpb.PrepareResponse(
            ok=promise.ok, promised=ballot_pb(promise.promised), accepted_ballot=ballot_pb(promise.accepted_ballot),
            has_accepted_value=promise.accepted_value is not None, accepted_value=promise.accepted_value or "",
            vector=self.region.vector)

    async def accept(self, request: rpb.AcceptRequest) -> rpb.AcceptResponse:
        msg = paxos.Accept(_key(request.key), _ballot(request.ballot), request.value)
        accepted = await self._step(msg.key, lambda state: paxos.on_accept(state, msg, self.region.name))
        return rpb.AcceptResponse(ok=accepted.ok, promised=ballot_pb(accepted.promised))

    async def _step(self, key: str, step: Callable[[paxos.AcceptorState], tuple[paxos.AcceptorState, R]]) -> R:
        def stored(raw: str | None) -> tuple[str, R]:
            state, answer = step(paxos.AcceptorState.decode(raw))
            return state.encode(), answer

        return await self.region.store.acceptor_step(key, stored)

    # Proposer -----------------------------------------------------------------------------------

    async def propose(self, key: str, value: str, timeout_s: float,
                      promised: Callable[[dict[str, str]], None] = lambda _: None) -> str:
        """The value chosen for `key`: `value`, or one chosen before. `promised` gets the vectors of the
        majority that promised the winning ballot (what they held then), merged."""
        # One proposal per key at a time from this region: the next one learns what the first decided.
        lock, waiting = self._proposing.get(key, (asyncio.Lock(), 0))
        self._proposing[key] = (lock, waiting + 1)
        try:
            async with asyncio.timeout(timeout_s), lock:
                return await self._propose(key, value, promised)
        except TimeoutError:
            members = len(self.region.regions)
            raise Unavailable(f"no majority of regions ({majority(members)} of {members}) answered "
                              f"within {timeout_s:.1f}s, so {key} could not be decided: its outcome is unknown "
                              "until the regions reach each other again; retry the same request then") from None
        finally:
            lock, waiting = self._proposing.pop(key)
            if waiting > 1:
                self._proposing[key] = (lock, waiting - 1)

    async def _propose(self, key: str, value: str, promised: Callable[[dict[str, str]], None]) -> str:
        proposer = paxos.Proposer(key, value, self.region.name, self.region.regions, self._first_round())
        try:
            return await self._rounds(proposer, promised)
        finally:  # rounds a retry raised are used too: the next proposal starts above them
            self._round = max(self._round, proposer.ballot[0])

    async def _rounds(self, proposer: paxos.Proposer, promised: Callable[[dict[str, str]], None]) -> str:
        request: paxos.Prepare = proposer.prepare()
        while True:
            vectors: list[dict[str, str]] = []
            accept = await self._phase(proposer, self._send_prepare(request, vectors), proposer.on_promise)
            if isinstance(accept, paxos.Accept):
                decided = await self._phase(proposer, self._send_accept(accept), proposer.on_accepted)
                if decided is not None:
                    promised(functools.reduce(vector.merge, vectors, {}))
                    return str(decided)
            await asyncio.sleep(self.rng.uniform(0, MAX_BACKOFF_S))
            request = proposer.retry()

    @staticmethod
    async def _phase(proposer: paxos.Proposer, send: Callable[[str], Awaitable[Any]],
                     handle: Callable[[Any], Any]) -> Any:
        """Send one phase to every member; return the first non-None result `handle` gives an answer,
        or None when the phase fails (pre-empted, or no majority in time)."""
        calls = [asyncio.ensure_future(send(region)) for region in proposer.members]
        try:
            for call in asyncio.as_completed(calls, timeout=ROUND_TIMEOUT_S):
                answer = await call
                if answer is None:
                    continue
                result = handle(answer)
                if result is not None:
                    return result
                if proposer.phase is paxos.Phase.PREEMPTED:
                    return None
        except TimeoutError:
            return None
        finally:
            for call in calls:
                call.cancel()
        return None

    def _send_prepare(self, msg: paxos.Prepare, vectors: list[dict[str, str]]
                      ) -> Callable[[str], Awaitable[paxos.Promise | None]]:
        request = rpb.PrepareRequest(key=msg.key, ballot=ballot_pb(msg.ballot))

        async def send(region: str) -> paxos.Promise | None:
            reply = await self._call(region, request, self.prepare, "Prepare")
            if reply is None:
                return None
            if reply.ok:
                vectors.append(dict(reply.vector))
            return paxos.Promise(msg.key, msg.ballot, region, reply.ok, ballot_of(reply.promised),
                                 ballot_of(reply.accepted_ballot),
                                 reply.accepted_value if reply.has_accepted_value else None)

        return send

    def _send_accept(self, msg: paxos.Accept) -> Callable[[str], Awaitable[paxos.Accepted | None]]:
        request = rpb.AcceptRequest(key=msg.key, ballot=ballot_pb(msg.ballot), value=msg.value)

        async def send(region: str) -> paxos.Accepted | None:
            reply = await self._call(region, request, self.accept, "Accept")
            if reply is None:
                return None
            return paxos.Accepted(msg.key, msg.ballot, region, reply.ok, ballot_of(reply.promised))

        return send

    async def _call(self, region: str, request: Any, local: Callable[[Any], Awaitable[Any]], method: str) -> Any:
        """One acceptor's answer, or None if it did not give one (it is unreachable, or failed)."""
        try:
            if region == self.region.name:
                return await local(request)
            call = getattr(self.stub(region), method)
            return await call(request, metadata=self.metadata(), timeout=ROUND_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.debug("%s to %s failed: %s", method, region, e.details())
        except Unavailable as e:  # this region's own acceptor, declining
            log.debug("%s to itself: %s", method, e)
        except Exception:
            log.warning("%s to %s failed", method, region, exc_info=True)
        return None
