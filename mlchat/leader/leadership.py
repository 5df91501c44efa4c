"""Single-leader mode in a running region: the failover core (`mlchat.geo.failover`) fed and acted on.

Every heartbeat interval it tells the core what each peer's stream last said (its term, and the
latest of this region's clock stamps it holds), stores the term when it changes, and runs an
election when the core calls for one: Paxos on "epoch:<n>" with this region as the candidate. A
winner first catches up with what the majority that promised it held, so every write the old primary
had acknowledged (held by a majority) is here before the new primary takes a write.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from mlchat.crdt import vector
from mlchat.crdt.hlc import Hlc
from mlchat.errors import Unavailable
from mlchat.geo.failover import Advertised, Failover, Term
from mlchat.leader.consensus import Consensus
from mlchat.leader.region import Region
from mlchat.leader.replication import Replicator

log = logging.getLogger(__name__)


class Leadership:
    def __init__(self, region: Region, replicator: Replicator, consensus: Consensus,
                 now_ms: Callable[[], int], rng: random.Random) -> None:
        self.region = region
        self.replicator = replicator
        self.consensus = consensus
        self.now_ms = now_ms
        self.rng = rng
        self.failover: Failover | None = None
        self._task: asyncio.Task[None] | None = None
        self._election: asyncio.Task[None] | None = None
        self._caught_up = 0  # the latest epoch of this region's own whose catch-up is done
        self._advertised = Advertised(keep_ms=4 * region.settings.peer_timeout_ms)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("leadership already started")
        settings = self.region.settings
        saved, voted = await self.region.store.term()
        if settings.primary and settings.peers and settings.primary not in self.region.regions:
            raise SystemExit(f"--primary {settings.primary} is not a region of this cluster "
                             f"({', '.join(sorted(self.region.regions))})")
        term = Term.decode(saved) if saved else Term(1, settings.primary or min(self.region.regions))
        # A primary restarting in its own term holds what it took: only an election's winner catches up.
        self._caught_up = term.epoch if term.primary == self.region.name else 0
        self.failover = Failover(self.region.name, term, lease_ms=settings.peer_timeout_ms,
                                 election_timeout_ms=2 * settings.peer_timeout_ms, now_ms=self.now_ms(),
                                 voted=voted)
        self.replicator.term = lambda: self.term
        self.replicator.voted = lambda: self.failover.voted if self.failover else 0
        self.consensus.may_promise = self._may_promise
        log.info("single-leader: epoch %d, primary %s", term.epoch, term.primary)
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._election) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def term(self) -> Term:
        assert self.failover is not None, "leadership not started"
        return self.failover.term

    def may_write(self) -> bool:
        """Whether this region is the primary, holds its lease, and (if elected) has caught up."""
        return (self.failover is not None and self._caught_up == self.failover.term.epoch
                and self.failover.may_write(self.region.regions, self.now_ms()))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.region.settings.heartbeat_ms / 1000)
            try:
                await self._observe()
                assert self.failover is not None
                idle = self._election is None or self._election.done()
                if idle and self.failover.should_elect(self.region.regions, self.now_ms()):
                    # Its own task: heartbeats go on being observed while the election runs.
                    self._election = asyncio.create_task(self._elect())
            except Exception:  # storage down, say: the next interval tries again
                log.warning("watching the primary failed", exc_info=True)

    async def _observe(self) -> None:
        assert self.failover is not None
        now, mono = self.now_ms(), time.monotonic()
        self._advertised.mark(self.region.vector[self.region.name], now)
        self._held(now)
        adopted = False
        for link in self.replicator.links.values():
            if link.term is None:
                continue
            stamp = link.vector.get(self.region.name)
            holds_ms = self._advertised.sent_after(stamp) if stamp else 0
            heard_ms = now - int((mono - link.last_heard) * 1000)
            adopted |= self.failover.heard(link.region, link.term, holds_ms, heard_ms, link.voted)
        if adopted:
            await self._adopted()

    async def _may_promise(self, key: str, proposer: str) -> bool:
        """The acceptor's question before an election's Prepare: vote, or keep following a live primary?"""
        assert self.failover is not None
        if not key.startswith("epoch:"):
            return True
        self._held(self.now_ms())  # the newest stamps of the primary, not those of the last heartbeat
        before = self.failover.voted
        vote = self.failover.may_vote(int(key.removeprefix("epoch:")), proposer, self.region.regions, self.now_ms())
        if self.failover.voted != before:  # stored before the answer leaves
            await self.region.store.save_term(self.term.encode(), self.failover.voted)
        return vote

    def _held(self, now: int) -> None:
        assert self.failover is not None
        self.failover.held({r: Hlc.decode(h).wall_ms for r, h in self.region.vector.items()}, now)

    async def _adopted(self) -> None:
        term = self.term
        await self.region.store.save_term(term.encode(), self.failover.voted if self.failover else 0)
        log.info("follows primary %s (epoch %d)", term.primary, term.epoch)

    async def _elect(self) -> None:
        assert self.failover is not None
        epoch = self.failover.electing()
        log.info("primary %s silent: electing a primary for epoch %d",
                 self.failover.term.primary, epoch)
        timeout_s = self.region.settings.write_timeout_ms / 1000
        held: dict[str, str] = {}
        try:
            winner = await self.consensus.propose(f"epoch:{epoch}", self.region.name, timeout_s, held.update)
        except Exception as e:  # undecided (no majority in time), or storage down
            log.info("election for epoch %d undecided: %s", epoch, e)
            self.failover.election_failed(self.now_ms() + int(self.rng.uniform(0, 1000)))
            return
        if winner == self.region.name:
            await self._catch_up(epoch, held)
        if self.failover.adopt(Term(epoch, winner), self.now_ms()):
            await self._adopted()

    async def _catch_up(self, epoch: int, held: dict[str, str]) -> None:
        """Hold what the majority that elected this region held (every write the old primary had
        acknowledged) before taking a write; however this region then learns of its own term."""
        assert self.failover is not None
        while self.failover.term.epoch <= epoch:
            try:
                await self.region.wait_for(vector.encode_token(held), self.region.settings.write_timeout_ms / 1000)
            except Unavailable as e:
                log.info("elected for epoch %d, still catching up: %s", epoch, e)
                continue
            self._caught_up = epoch
            return
