"""Single-decree Paxos: acceptor rules, proposer transitions, and safety and liveness over a simulated
network that loses, duplicates and reorders messages and crashes acceptors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlchat.geo.paxos import (
    NULL_BALLOT,
    Accept,
    Accepted,
    AcceptorState,
    Ballot,
    Phase,
    Prepare,
    Promise,
    Proposer,
    on_accept,
    on_prepare,
    safe_value,
)

KEY = "name:alice"
REGIONS = ("a", "b", "c", "d", "e")
ABC = REGIONS[:3]


def promise(sender: str, ballot: Ballot = (1, "a"), ok: bool = True, accepted: Ballot = NULL_BALLOT,
            value: str | None = None, key: str = KEY) -> Promise:
    return Promise(key, ballot, sender, ok, ballot if ok else (9, "z"), accepted, value)


def accepted(sender: str, ballot: Ballot = (1, "a"), ok: bool = True, key: str = KEY) -> Accepted:
    return Accepted(key, ballot, sender, ok, ballot if ok else (9, "z"))


# Acceptor -----------------------------------------------------------------------------------------


def test_prepare_promises_higher_ballots_and_refuses_lower_ones():
    s, p = on_prepare(AcceptorState(), Prepare(KEY, (2, "b")), "a")
    assert p == Promise(KEY, (2, "b"), "a", True, (2, "b"), NULL_BALLOT, None)
    assert s == AcceptorState(promised=(2, "b"))
    s2, p2 = on_prepare(s, Prepare(KEY, (2, "a")), "a")
    assert s2 == s and not p2.ok and p2.promised == (2, "b")
    s3, p3 = on_prepare(s, Prepare(KEY, (3, "a")), "a")
    assert p3.ok and s3.promised == (3, "a")


def test_resent_prepare_is_answered_again_without_change():
    s, _ = on_prepare(AcceptorState(), Prepare(KEY, (2, "b")), "a")
    s2, p2 = on_prepare(s, Prepare(KEY, (2, "b")), "a")
    assert s2 == s and p2.ok


def test_promise_reports_what_was_accepted():
    s, _ = on_accept(AcceptorState(), Accept(KEY, (1, "b"), "bob"), "a")
    _, p = on_prepare(s, Prepare(KEY, (2, "c")), "a")
    assert p.ok and (p.accepted_ballot, p.accepted_value) == ((1, "b"), "bob")


def test_accept_needs_a_ballot_at_least_the_promised_one():
    s, _ = on_prepare(AcceptorState(), Prepare(KEY, (2, "b")), "a")
    s_low, r_low = on_accept(s, Accept(KEY, (1, "c"), "x"), "a")
    assert s_low == s and not r_low.ok and r_low.promised == (2, "b")
    s_eq, r_eq = on_accept(s, Accept(KEY, (2, "b"), "y"), "a")
    assert r_eq.ok and s_eq == AcceptorState((2, "b"), (2, "b"), "y")
    s_hi, r_hi = on_accept(s_eq, Accept(KEY, (3, "c"), "z"), "a")
    assert r_hi.ok and s_hi == AcceptorState((3, "c"), (3, "c"), "z")


def test_null_ballot_is_refused():
    s = AcceptorState()
    assert not on_prepare(s, Prepare(KEY, NULL_BALLOT), "a")[1].ok
    assert on_accept(s, Accept(KEY, NULL_BALLOT, "v"), "a") == (s, Accepted(KEY, NULL_BALLOT, "a", False, NULL_BALLOT))


ballots = st.tuples(st.integers(1, 10**12), st.sampled_from(["us-east", "eu-west", "ap-ñ\"\\"]))


@given(ballots, ballots, st.text())
def test_encode_decode_round_trip(b1, b2, value):
    lo, hi = sorted([b1, b2])
    for state in (AcceptorState(), AcceptorState(hi), AcceptorState(hi, lo, value), AcceptorState(hi, hi, value)):
        assert AcceptorState.decode(state.encode()) == state


def test_decode_of_nothing_is_a_fresh_state():
    assert AcceptorState.decode(None) == AcceptorState.decode("") == AcceptorState()


@pytest.mark.parametrize("text", [
    "{", "[]", "null", "{}", '"x"',
    '{"promised":[1,"a"],"accepted":[0,""]}',
    '{"promised":[1,"a"],"accepted":[0,""],"value":null,"extra":1}',
    '{"promised":[1],"accepted":[0,""],"value":null}',
    '{"promised":["1","a"],"accepted":[0,""],"value":null}',
    '{"promised":[true,"a"],"accepted":[0,""],"value":null}',
    '{"promised":[1.0,"a"],"accepted":[0,""],"value":null}',
    '{"promised":[-1,"a"],"accepted":[0,""],"value":null}',
    '{"promised":[0,"a"],"accepted":[0,""],"value":null}',
    '{"promised":[1,2],"accepted":[0,""],"value":null}',
    '{"promised":[1,"a"],"accepted":[0,""],"value":7}',
    '{"promised":[1,"a"],"accepted":[0,""],"value":"v"}',
    '{"promised":[1,"a"],"accepted":[1,"a"],"value":null}',
    '{"promised":[1,"a"],"accepted":[2,"a"],"value":"v"}',
])
def test_decode_of_malformed_text_raises(text):
    with pytest.raises(ValueError):
        AcceptorState.decode(text)


# Proposer -----------------------------------------------------------------------------------------


def test_proposer_needs_to_be_a_member_and_a_positive_round():
    with pytest.raises(ValueError):
        Proposer(KEY, "v", "z", ABC)
    with pytest.raises(ValueError):
        Proposer(KEY, "v", "a", ABC, round_=0)
    assert Proposer(KEY, "v", "a", REGIONS).quorum == 3
    assert Proposer(KEY, "v", "a", ["a", "b", "c", "d"]).quorum == 3


def test_proposer_decides_its_own_value_on_an_empty_instance():
    p = Proposer(KEY, "alice-1", "a", ABC)
    assert p.prepare() == Prepare(KEY, (1, "a")) and p.phase is Phase.PREPARING
    assert p.on_promise(promise("a")) is None
    assert p.on_promise(promise("b")) == Accept(KEY, (1, "a"), "alice-1")
    assert p.phase is Phase.ACCEPTING
    assert p.on_promise(promise("c")) is None  # late promise: already accepting
    assert p.on_accepted(accepted("c")) is None
    assert p.on_accepted(accepted("a")) == "alice-1"
    assert p.phase is Phase.DECIDED and p.decided == "alice-1"
    assert p.on_accepted(accepted("b")) is None and p.decided == "alice-1"


def test_duplicate_replies_count_once():
    p = Proposer(KEY, "v", "a", ABC)
    assert p.on_promise(promise("b")) is None
    assert p.on_promise(promise("b")) is None
    assert p.phase is Phase.PREPARING
    assert p.on_promise(promise("c")) is not None
    assert p.on_accepted(accepted("c")) is None
    assert p.on_accepted(accepted("c")) is None
    assert p.phase is Phase.ACCEPTING
    assert p.on_accepted(accepted("a")) == "v"


@pytest.mark.parametrize("stray", [
    promise("b", ballot=(0, "a")),  # a stale ballot
    promise("b", ballot=(2, "a")),  # a ballot this proposer never used
    promise("b", ballot=(1, "b")),  # someone else's ballot
    promise("b", key="name:bob"),
    promise("z"),  # not a member
])
def test_stray_promises_are_ignored(stray):
    p = Proposer(KEY, "v", "a", ABC)
    assert p.on_promise(stray) is None
    assert p.on_promise(promise("a")) is None  # one stray plus one real promise is not a quorum
    assert p.phase is Phase.PREPARING
    refused = Promise(stray.key, stray.ballot, stray.sender, False, (5, "b"), NULL_BALLOT, None)
    assert p.on_promise(refused) is None
    assert p.phase is Phase.PREPARING


def test_stray_acceptances_are_ignored():
    p = Proposer(KEY, "v", "a", ABC)
    p.on_promise(promise("a"))
    p.on_accepted(accepted("b"))  # before the Accept was sent: ignored
    p.on_promise(promise("b"))
    for stray in (accepted("b", ballot=(2, "a")), accepted("b", key="name:bob"), accepted("z"),
                  accepted("b", ballot=(1, "b"), ok=False)):
        assert p.on_accepted(stray) is None
    assert p.on_accepted(accepted("a")) is None
    assert p.phase is Phase.ACCEPTING
    assert p.on_accepted(accepted("c")) == "v"


def test_proposer_adopts_the_value_accepted_under_the_highest_ballot():
    p = Proposer(KEY, "mine", "a", REGIONS, round_=5)
    b = (5, "a")
    p.on_promise(promise("a", b))
    p.on_promise(promise("b", b, accepted=(2, "c"), value="older"))
    accept = p.on_promise(promise("c", b, accepted=(3, "d"), value="newer"))
    assert accept == Accept(KEY, b, "newer")
    assert p.highest_seen == b
    assert p.on_accepted(accepted("a", b)) is None
    assert p.on_accepted(accepted("b", b)) is None
    assert p.on_accepted(accepted("c", b)) == "newer" and p.decided == "newer"


def test_safe_value():
    assert safe_value([], "own") == "own"
    assert safe_value([promise("a"), promise("b")], "own") == "own"
    assert safe_value([promise("a", accepted=(1, "b"), value="x"), promise("b", accepted=(1, "c"), value="y"),
                       promise("c")], "own") == "y"


def test_refused_prepare_preempts_and_retry_outbids_every_ballot_seen():
    p = Proposer(KEY, "v", "b", ABC)
    p.on_promise(promise("a", (1, "b")))
    assert p.on_promise(Promise(KEY, (1, "b"), "c", False, (7, "a"), (4, "c"), "w")) is None
    assert p.phase is Phase.PREEMPTED and p.highest_seen == (7, "a")
    assert p.on_promise(promise("b", (1, "b"))) is None  # too late: already preempted
    assert p.phase is Phase.PREEMPTED
    assert p.retry() == Prepare(KEY, (8, "b"))
    assert p.phase is Phase.PREPARING and p.prepare() == Prepare(KEY, (8, "b"))
    # The promise collected under round 1 does not count under round 8.
    assert p.on_promise(promise("a", (8, "b"))) is None
    assert p.on_promise(promise("c", (8, "b"), accepted=(4, "c"), value="w")) == Accept(KEY, (8, "b"), "w")


def test_refused_accept_preempts():
    p = Proposer(KEY, "v", "a", ABC)
    p.on_promise(promise("a"))
    p.on_promise(promise("b"))
    assert p.on_accepted(Accepted(KEY, (1, "a"), "c", False, (3, "c"))) is None
    assert p.phase is Phase.PREEMPTED and p.highest_seen == (3, "c")
    assert p.retry().ballot == (4, "a")


def test_stale_replies_still_raise_the_next_round():
    p = Proposer(KEY, "v", "a", ABC)
    p.on_promise(Promise(KEY, (0, "q"), "b", False, (6, "c"), NULL_BALLOT, None))
    assert p.phase is Phase.PREPARING and p.highest_seen == (6, "c")
    assert p.retry().ballot == (7, "a")


def test_timer_retry_from_preparing_and_accepting():
    p = Proposer(KEY, "v", "a", ABC, round_=3)
    assert p.retry().ballot == (4, "a")
    p.on_promise(promise("a", (4, "a")))
    p.on_promise(promise("b", (4, "a")))
    assert p.phase is Phase.ACCEPTING
    assert p.retry().ballot == (5, "a")
    assert p.on_accepted(accepted("a", (4, "a"))) is None  # the abandoned ballot no longer counts
    assert p.phase is Phase.PREPARING


def test_illegal_transitions_raise():
    p = Proposer(KEY, "v", "a", ["a"])
    assert p.quorum == 1
    assert p.on_promise(promise("a")) == Accept(KEY, (1, "a"), "v")
    with pytest.raises(RuntimeError):
        p.prepare()  # nothing to prepare while accepting
    assert p.on_accepted(accepted("a")) == "v"
    with pytest.raises(RuntimeError):
        p.retry()  # decided is final
    with pytest.raises(RuntimeError):
        p._to(Phase.PREEMPTED)
    assert p.phase is Phase.DECIDED and p.decided == "v"
    q = Proposer(KEY, "v", "a", ABC)
    with pytest.raises(RuntimeError):
        q._to(Phase.DECIDED)  # cannot skip the accept phase
    q.on_promise(promise("b", ok=False))
    with pytest.raises(RuntimeError):
        q.prepare()
    with pytest.raises(RuntimeError):
        q._to(Phase.ACCEPTING)


# Simulated network ----------------------------------------------------------------------------------

Message = Prepare | Accept | Promise | Accepted
ACTIONS = ("deliver",) * 8 + ("drop", "duplicate", "timeout", "crash")


@dataclass
class Sim:
    """Acceptors whose only state is what they stored; proposers; a pool of (destination, message)."""

    members: tuple[str, ...]
    proposers: dict[str, Proposer]
    store: dict[str, str] = field(default_factory=dict)  # durable AcceptorState.encode() per region
    pool: list[tuple[str, Message]] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    acceptances: dict[Ballot, dict[str, str]] = field(default_factory=dict)  # ballot -> acceptor -> value

    @classmethod
    def start(cls, data: st.DataObject) -> Sim:
        members = REGIONS[: data.draw(st.sampled_from([3, 5]), label="members")]
        n = data.draw(st.integers(2, 3), label="proposers")
        regions = data.draw(st.permutations(members), label="proposer regions")[:n]
        sim = cls(members, {r: Proposer(KEY, f"value-of-{r}", r, members, data.draw(st.integers(1, 3)))
                            for r in regions})
        for p in sim.proposers.values():
            sim.broadcast(p.prepare())
        return sim

    def broadcast(self, msg: Message) -> None:
        self.pool.extend((m, msg) for m in self.members)

    def deliver(self, i: int) -> None:
        dest, msg = self.pool.pop(i)
        if isinstance(msg, Prepare | Accept):
            old = AcceptorState.decode(self.store.get(dest))  # a restarted acceptor reads what it stored
            if isinstance(msg, Prepare):
                new, reply = on_prepare(old, msg, dest)
            else:
                new, reply = on_accept(old, msg, dest)
                if reply.ok:
                    self.acceptances.setdefault(msg.ballot, {})[dest] = msg.value
            assert new.promised >= old.promised and new.accepted_ballot >= old.accepted_ballot
            self.store[dest] = new.encode()  # stored before the reply leaves
            self.pool.append((msg.ballot[1], reply))
        elif isinstance(msg, Promise):
            accept = self.proposers[dest].on_promise(msg)
            if accept is not None:
                self.broadcast(accept)
        else:
            decided = self.proposers[dest].on_accepted(msg)
            if decided is not None:
                assert decided == self.proposers[dest].decided
                self.decisions.append(decided)

    def settle(self, allow: Callable[[str, Message], bool] = lambda dest, msg: True) -> None:
        """Deliver the allowed messages in order, new ones included, until none is left; drop the rest."""
        while (i := next((i for i, (dest, msg) in enumerate(self.pool) if allow(dest, msg)), None)) is not None:
            self.deliver(i)
        self.pool.clear()

    def step(self, data: st.DataObject) -> None:
        action = data.draw(st.sampled_from(ACTIONS))
        if action in ("deliver", "drop", "duplicate") and self.pool:
            i = data.draw(st.integers(0, len(self.pool) - 1))
            if action == "deliver":
                self.deliver(i)
            elif action == "drop":
                self.pool.pop(i)
            else:
                self.pool.append(self.pool[i])
        elif action == "crash":
            region = data.draw(st.sampled_from(self.members))
            stored = self.store.get(region)
            self.pool = [(dest, msg) for dest, msg in self.pool if dest != region]
            assert self.store.get(region) == stored
        else:
            waiting = sorted(r for r, p in self.proposers.items() if p.phase is not Phase.DECIDED)
            if waiting:
                self.broadcast(self.proposers[data.draw(st.sampled_from(waiting))].retry())

    def check(self) -> None:
        quorum = len(self.members) // 2 + 1
        chosen = {v for by in self.acceptances.values() for v in by.values() if len(by) >= quorum}
        assert all(len(set(by.values())) == 1 for by in self.acceptances.values())  # one value per ballot
        assert len(chosen) <= 1, f"several values chosen: {chosen}"
        assert set(self.decisions) <= chosen
        assert chosen <= {p.value for p in self.proposers.values()}


def test_a_later_ballot_carries_the_value_accepted_under_the_highest_earlier_one():
    # A is accepted by a minority under round 1, then B is chosen under round 2 by another quorum. Round 3
    # hears of both and must carry B.
    pa, pb, pc = (Proposer(KEY, v, r, ABC, round_=n) for v, r, n in (("A", "a", 1), ("B", "b", 2), ("C", "c", 3)))
    sim = Sim(ABC, {"a": pa, "b": pb, "c": pc})
    sim.broadcast(pa.prepare())
    sim.settle(lambda dest, msg: not isinstance(msg, Accept) or dest == "a")
    sim.broadcast(pb.prepare())
    sim.settle(lambda dest, msg: not isinstance(msg, Prepare | Accept) or dest != "a")
    assert sim.decisions == ["B"]
    sim.broadcast(pc.prepare())
    sim.settle(lambda dest, msg: not isinstance(msg, Prepare) or dest != "c")
    assert (pa.phase, pb.decided, pc.decided) == (Phase.ACCEPTING, "B", "B")
    sim.check()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_at_most_one_value_is_ever_chosen(data):
    sim = Sim.start(data)
    for _ in range(data.draw(st.integers(20, 200), label="steps")):
        sim.step(data)
        sim.check()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_proposer_left_alone_on_a_reliable_network_decides(data):
    sim = Sim.start(data)
    for _ in range(data.draw(st.integers(0, 60), label="chaotic steps")):
        sim.step(data)
    sim.check()
    p = sim.proposers[data.draw(st.sampled_from(sorted(sim.proposers)), label="survivor")]
    # Each refusal teaches the survivor a ballot held by another proposer or by some acceptor, and with no
    # other proposer retrying there are only so many of those.
    for _ in range(len(sim.members) + len(sim.proposers) + 1):
        if p.phase is Phase.DECIDED:
            break
        sim.broadcast(p.retry())
        sim.settle()
        sim.check()
    assert p.decided is not None
    assert {p.decided} == set(sim.decisions) | {p.decided}
