"""What a region's replication mode asks of a write before the client is told it succeeded.

`async` asks nothing more. `sync` and `single-leader` refuse a write up front when too few regions are
reachable to hold it, and after committing it wait until enough regions hold it: a peer holds a write
once the version vector it streams back covers the write's stamp. A write that waits too long stays
committed (the log only grows: it reaches the other regions when they are reachable again) and the
client hears UNAVAILABLE, saying so; retrying the same request waits for it again. Username claims
in `strong-names` and `single-leader` are decided by consensus across regions.

In `single-leader`, a region that is not the primary forwards writes to it (once: a forwarded call
that lands on a region that is not the primary either fails, rather than travel on); the primary
takes them only while it holds its lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from mlchat.errors import Relayed, Unavailable
from mlchat.geo.modes import copies_needed, describe, names_by_consensus
from mlchat.leader.consensus import Consensus
from mlchat.leader.leadership import Leadership
from mlchat.leader.region import Region, UserView
from mlchat.leader.replication import Replicator
from mlchat.v1 import chat_pb2_grpc

FORWARDED = "x-mlchat-forwarded-by"  # metadata on a write forwarded to the primary
T = TypeVar("T")


class Stamped(Protocol):
    """What a write stored: it names the region that stamped it, and its stamp ("" if nothing was written)."""

    region: str
    hlc: str


class Writes:
    def __init__(self, region: Region, replicator: Replicator, consensus: Consensus,
                 leadership: Leadership | None = None) -> None:
        self.region = region
        self.replicator = replicator
        self.consensus = consensus
        self.leadership = leadership
        settings = region.settings
        self.mode = describe(settings.mode, settings.sync_acks)
        self.timeout_s = settings.write_timeout_ms / 1000

    def _copies(self) -> int:
        settings = self.region.settings
        return copies_needed(settings.mode, settings.sync_acks, len(self.region.members) + 1)

    def _timeout(self, time_remaining: float | None) -> float:
        """How long to wait on other regions: keep a margin of the caller's deadline to answer it."""
        return self.timeout_s if time_remaining is None else max(0.0, min(time_remaining - 0.2, self.timeout_s))

    async def run(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                  commit: Callable[[], Awaitable[T]], stamped: Callable[[T], Stamped],
                  respond: Callable[[T, bytes], Any]) -> Any:
        """A write call, as every mode asks: forwarded to the primary, or admitted, committed (`commit`), and
        confirmed held by enough regions; then answered (`respond`, given the result and its causal token)."""
        if self.leadership is not None and not self.leadership.may_write():
            return await self.forwarded(method, request, context)
        self.admit(self._copies())
        result = await commit()
        stamp = stamped(result)
        if not stamp.hlc:  # nothing was written
            return respond(result, self.region.causal_token())
        copies = self._copies()  # (a region may have joined meanwhile)
        if self.leadership is not None or copies:  # (async mode asks nothing: no call to wait on)
            await self.confirm(stamp.region, stamp.hlc, copies, context.time_remaining())
        return respond(result, self.region.causal_token((stamp.region, stamp.hlc)))

    async def forwarded(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """single-leader mode, in a region that is not the primary: the primary's answer to the call."""
        assert self.leadership is not None
        term = self.leadership.term
        metadata = context.invocation_metadata() or ()
        if term.primary == self.region.name:
            raise Unavailable(f"region {self.region.name} is the primary (epoch {term.epoch}) but does not hold its "
                              "lease: it cannot reach a majority of regions, or has just been elected and is "
                              "catching up; retry shortly")
        if any(k == FORWARDED for k, _ in metadata):
            raise Unavailable(f"region {self.region.name} is not the primary either (it follows {term.primary}, "
                              f"epoch {term.epoch}); retry shortly")
        if term.primary not in self.region.members:
            raise Unavailable(f"region {self.region.name} follows primary {term.primary} (epoch {term.epoch}), "
                              "which is not a member it knows; retry shortly")
        if term.primary not in self.replicator.reachable():
            raise Unavailable(f"the primary region {term.primary} (epoch {term.epoch}) is unreachable from region "
                              f"{self.region.name}: nothing was written. Retry shortly (a new primary is elected "
                              "if it stays silent), or in a region that reaches it")
        passed_on = tuple((k, v) for k, v in metadata if k == "authorization") + ((FORWARDED, self.region.name),)
        stub = chat_pb2_grpc.ChatServiceStub(self.replicator.channel(term.primary))
        try:
            return await getattr(stub, method)(request, metadata=passed_on,
                                               timeout=self._timeout(context.time_remaining()))
        except grpc.aio.AioRpcError as e:
            raise Relayed(e.code().name, f"forwarded by {self.region.name} to the primary region {term.primary} "
                                         f"(epoch {term.epoch}): {e.details()}") from None
        except grpc.aio.UsageError:  # the channel closed: this leader is shutting down
            raise Unavailable(f"region {self.region.name} is shutting down; retry elsewhere") from None

    def admit(self, copies: int) -> None:
        """Refuse a write that `copies` other regions cannot hold now, before anything is written."""
        if copies == 0:
            return
        reachable = self.replicator.reachable()
        if len(reachable) < copies:
            raise Unavailable(f"mode {self.mode} needs {copies} other region(s) to hold a write before it is "
                              f"acknowledged, and region {self.region.name} reaches {len(reachable)} "
                              f"({', '.join(reachable) or 'none'}): nothing was written; retry later")

    async def confirm(self, origin: str, hlc: str, copies: int, time_remaining: float | None) -> None:
        """Return once `copies` other regions hold the write stamped `hlc` in `origin`."""
        if copies == 0 or await self.replicator.held(origin, hlc, copies, self._timeout(time_remaining)):
            if self.leadership is not None and not self.leadership.may_write():
                raise Unavailable(f"region {self.region.name} lost its lease as primary while the write waited: it "
                                  "is stored and reaches the other regions, but a new primary may not have had it "
                                  "when elected. Retry the same request")
            return
        holders = self.replicator.holders(origin, hlc)
        raise Unavailable(f"the write is stored in region {self.region.name}, but only {len(holders)} of the "
                          f"{copies} other region(s) mode {self.mode} waits for hold it yet. It is not lost: it "
                          "reaches the others when they are reachable. Retry the same request to wait again")

    async def claim(self, username: str, claim_key: str, time_remaining: float | None) -> UserView:
        if not names_by_consensus(self.region.settings.mode):
            return await self.region.claim(username, claim_key)
        timeout_s = self._timeout(time_remaining)

        async def decide(name: str, user_id: str) -> str:
            return await self.consensus.propose(f"name:{name}", user_id, timeout_s)

        return await self.region.claim(username, claim_key, decide)

