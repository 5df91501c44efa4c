"""Single-leader failover core: terms, leases, election timeouts and the role table; then, through the
deterministic simulation in `sim.failover_world`, every region's core over a faulty network, on schedules that
Hypothesis draws (and shrinks) and on schedules that once let two regions write at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings, target
from hypothesis import strategies as st
from sim import failover_world
from sim.failover_world import ABC, ABCDE, SIM_LEASE_MS, SIM_TIMEOUT_MS, STEP_MS, T1, Faults, Sim

from mlchat.geo.failover import Advertised, Failover, Role, Term

LEASE_MS = 1000
TIMEOUT_MS = 2000  # the shell's choice: twice the lease


def core(me: str, term: Term = T1, now_ms: int = 0) -> Failover:
    return Failover(me, term, LEASE_MS, TIMEOUT_MS, now_ms)


# Unit behaviour ----------------------------------------------------------------------------------------


def test_the_configured_primary_starts_primary_and_the_others_follow():
    assert core("a").role is Role.PRIMARY
    assert core("b").role is core("c").role is Role.FOLLOWER
    assert core("b").term == T1


def test_the_primary_writes_only_while_a_majority_holds_a_fresh_stamp_of_its_term():
    a = core("a")
    assert not a.may_write(ABC, 0)  # nobody has reported yet
    assert a.may_write(["a"], 0)  # alone, it is its own majority
    a.heard("b", T1, 500, 600)
    assert a.may_write(ABC, 600) and a.may_write(ABC, 1500)  # 500 is within the lease until 1500
    assert not a.may_write(ABC, 1501)
    assert not a.may_write(ABCDE, 600)  # one of four others is not a majority of five
    a.heard("d", T1, 550, 600)
    assert a.may_write(ABCDE, 1500) and not a.may_write(ABCDE, 1501)
    a.heard("z", T1, 1400, 1500)  # not a member: does not count
    assert not a.may_write(ABCDE, 1501)


def test_only_peers_following_this_very_term_count_for_the_lease():
    a = core("a", Term(3, "a"))
    a.heard("b", Term(2, "c"), 900, 1000)  # b still follows an older term
    assert not a.may_write(ABC, 1000)
    a.heard("c", Term(3, "a"), 900, 1000)
    assert a.may_write(ABC, 1000)


def test_the_lease_lapses_when_the_peers_stamps_get_old_and_comes_back_with_fresh_ones():
    a = core("a")
    a.heard("b", T1, 100, 200)
    a.heard("c", T1, 100, 200)
    assert a.may_write(ABC, 1100)
    assert not a.may_write(ABC, 1101)  # still heard from recently, but only of old stamps
    a.heard("c", T1, 1050, 1101)
    assert a.may_write(ABC, 1101) and not a.may_write(ABC, 2051)


def test_a_follower_elects_only_after_a_full_timeout_of_silence_from_the_primary():
    b = core("b", now_ms=1000)  # a region that starts counts from its start
    assert not b.should_elect(ABC, 1000 + TIMEOUT_MS)
    assert b.should_elect(ABC, 1001 + TIMEOUT_MS)
    b.heard("a", T1, 0, 2500)
    assert not b.should_elect(ABC, 2500 + TIMEOUT_MS) and b.should_elect(ABC, 2501 + TIMEOUT_MS)
    b.heard("c", T1, 0, 4000)  # another follower is no news of the primary
    assert b.should_elect(ABC, 2501 + TIMEOUT_MS)


def test_a_primary_elects_only_after_failing_to_renew_its_lease_for_a_full_timeout():
    a = core("a")
    a.heard("b", T1, 900, 1000)
    assert not a.should_elect(ABC, 1000)  # holds its lease (until 1900)
    assert not a.should_elect(ABC, 1900)  # as it is asked every heartbeat
    assert not a.should_elect(ABC, 1900 + TIMEOUT_MS)
    assert a.should_elect(ABC, 1901 + TIMEOUT_MS)
    assert a.electing() == 2 and a.role is Role.CANDIDATE


def test_a_higher_term_from_a_heartbeat_demotes_the_primary_and_promotes_the_named_region():
    a, c = core("a"), core("c")
    a.heard("b", T1, 0, 50)
    assert a.heard("b", Term(2, "c"), 0, 100)
    assert a.role is Role.FOLLOWER and a.term == Term(2, "c")
    assert not a.may_write(ABC, 100)
    assert c.heard("b", Term(2, "c"), 0, 100)
    assert c.role is Role.PRIMARY and c.term == Term(2, "c")
    c.heard("b", Term(2, "c"), 100, 200)
    assert c.may_write(ABC, 200)
    # The adopted term's silence counts from when it was adopted.
    assert not a.should_elect(ABC, 100 + TIMEOUT_MS) and a.should_elect(ABC, 101 + TIMEOUT_MS)


def test_lower_and_equal_terms_are_ignored():
    a = core("a", Term(3, "a"))
    for term in (Term(2, "b"), Term(3, "b"), Term(3, "a"), Term(1, "z")):
        assert not a.heard("b", term, 0, 100)
        assert not a.adopt(term, 100)
        assert a.role is Role.PRIMARY and a.term == Term(3, "a")
    b = core("b", Term(3, "a"), now_ms=0)
    assert not b.adopt(Term(3, "b"), 5000)  # an equal epoch names no new primary
    assert b.role is Role.FOLLOWER and b.should_elect(ABC, 5000)  # nor restarts the timeout


def test_illegal_transitions_raise():
    b = core("b")
    assert b.electing() == 2
    with pytest.raises(RuntimeError):
        b.electing()  # one election at a time
    assert b.role is Role.CANDIDATE and b.term == T1
    with pytest.raises(RuntimeError):
        b._to(Role.CANDIDATE)
    for role in Role:  # the table's one illegal move is the one above
        for to in Role:
            f = core("b")
            f.role = role
            if (role, to) == (Role.CANDIDATE, Role.CANDIDATE):
                with pytest.raises(RuntimeError):
                    f._to(to)
            else:
                f._to(to)
                assert f.role is to


def test_election_outcomes():
    b = core("b")
    assert b.electing() == 2 and b.role is Role.CANDIDATE
    assert not b.should_elect(ABC, 10**9)  # a candidate is already electing
    b.election_failed(3000)
    assert b.role is Role.FOLLOWER
    assert not b.should_elect(ABC, 3000 + TIMEOUT_MS) and b.should_elect(ABC, 3001 + TIMEOUT_MS)
    b.election_failed(9000)  # not a candidate: nothing to undo, no timer moved
    assert b.role is Role.FOLLOWER and b.should_elect(ABC, 3001 + TIMEOUT_MS)
    b.electing()
    assert b.adopt(Term(2, "b"), 4000) and b.role is Role.PRIMARY  # won
    c = core("c")
    c.electing()
    assert c.adopt(Term(2, "b"), 4000) and c.role is Role.FOLLOWER  # lost to b
    d = core("d")
    d.electing()
    assert d.heard("b", Term(2, "b"), 0, 4000) and d.role is Role.FOLLOWER  # told by a heartbeat mid-election


def test_a_follower_votes_only_once_no_new_stamp_of_its_primary_came_for_a_lease():
    b = core("b")
    b.held({"a": 900}, 1000)  # a stamp of a's reaches b (directly or through another region)
    b.held({"a": 900}, 1500)  # the same stamp again is no news
    assert not b.may_vote(2, "c", ABC, 1999) and b.voted == 0
    assert b.may_vote(2, "a", ABC, 1999)  # the primary renewing itself moves no one
    assert b.may_vote(2, "c", ABC, 2000) and b.voted == 2
    assert b.may_vote(1, "c", ABC, 0)  # an epoch already decided: promising changes nothing


def test_a_region_does_not_vote_within_a_lease_of_its_start():
    # What it reported before a restart may still count toward the primary's lease.
    fresh = core("b", now_ms=5000)
    assert not fresh.may_vote(2, "c", ABC, 5999)
    assert fresh.may_vote(2, "c", ABC, 6000)


def test_a_primary_votes_against_itself_only_without_its_lease():
    a = core("a")
    a.heard("b", T1, 900, 1000)
    assert not a.may_vote(2, "c", ABC, 1900)
    assert a.may_vote(2, "c", ABC, 1901) and a.voted == 2


def test_votes_for_a_later_epoch_end_the_lease():
    a = core("a")
    a.heard("b", T1, 900, 1000, voted=2)  # b follows a, but has voted in the election for epoch 2
    assert not a.may_write(ABC, 1000)
    a.heard("c", T1, 900, 1000, voted=1)
    assert a.may_write(ABC, 1000)
    assert a.may_vote(2, "c", ABC, 5000)  # a voted against itself itself
    a.heard("c", T1, 4900, 5000)
    assert not a.may_write(ABC, 5000)
    restarted = Failover("a", T1, LEASE_MS, TIMEOUT_MS, 6000, voted=2)  # the vote is stored
    restarted.heard("c", T1, 5900, 6000)
    assert restarted.voted == 2 and not restarted.may_write(ABC, 6000)


@pytest.mark.parametrize("timeout_ms", [LEASE_MS, LEASE_MS - 1, 0])
def test_the_election_timeout_must_exceed_the_lease(timeout_ms):
    with pytest.raises(ValueError):
        Failover("a", T1, LEASE_MS, timeout_ms, 0)
    assert Failover("a", T1, LEASE_MS, LEASE_MS + 1, 0).role is Role.PRIMARY


@given(st.integers(), st.text())
def test_term_encode_decode_round_trip(epoch, primary):
    term = Term(epoch, primary)
    assert Term.decode(term.encode()) == term


def test_terms_order_by_epoch_first():
    assert Term(1, "z") < Term(2, "a") < Term(2, "b")


@dataclass(frozen=True)
class Scenario:
    members: tuple[str, ...]
    seed: int  # for the loss and delay of each message, and the election backoffs
    schedule: tuple[Faults, ...]


@st.composite
def faults(draw: st.DrawFn, members: tuple[str, ...]) -> Faults:
    directed = [(s, d) for s in members for d in members if s != d]
    both_ways = draw(st.one_of(
        st.just(set()),
        st.sets(st.sampled_from(directed), min_size=1, max_size=2),  # a partial partition: some pairs apart
        st.sets(st.sampled_from(members), min_size=1, max_size=len(members) - 1).map(  # one side from the rest
            lambda side: {(s, d) for s in side for d in members if d not in side}),
    ))
    return Faults(
        steps=draw(st.integers(1, 120)),
        cut=frozenset(draw(st.just(set()) | st.sets(st.sampled_from(directed), max_size=2)) | both_ways
                      | {(d, s) for s, d in both_ways}),
        slow=draw(st.just(frozenset()) | st.frozensets(st.sampled_from(directed), min_size=1, max_size=3)),
        lag=draw(st.integers(1, 10)),
        loss=draw(st.sampled_from([0.0, 0.0, 0.0, 0.05, 0.2, 0.5])),
        max_delay=draw(st.integers(1, 4)),
        down=draw(st.sampled_from([frozenset()] * 3 + [frozenset({m}) for m in members])
                  | st.frozensets(st.sampled_from(members), max_size=len(members) // 2 + 1)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    members = ABCDE[: draw(st.sampled_from([3, 5]))]
    return Scenario(members, draw(st.integers(0, 2**32)),
                    tuple(draw(st.lists(faults(members), min_size=1, max_size=6))))


# Schedules that have had a and another region writing at once. c, cut off from the primary a, elects itself
# with b's vote; b follows c at once, but its last report to a, holding a's stamp of a moment ago, keeps a's
# lease alive, and b's next report never reaches a.
A_VOTER_SWITCHES = Scenario(ABC, 0, (
    Faults(steps=36, cut=frozenset({("a", "c"), ("c", "a")})),
    Faults(steps=40, cut=frozenset({("a", "c"), ("c", "a"), ("b", "a")})),
))
# b vouches for a's lease, crashes, restarts having heard from no one, and votes for c at once.
A_VOTER_RESTARTS = Scenario(ABC, 0, (
    Faults(steps=36, cut=frozenset({("a", "c"), ("c", "a")})),
    Faults(steps=1, cut=frozenset({("a", "c"), ("c", "a")}), down=frozenset({"b"})),
    Faults(steps=40, cut=frozenset({("a", "c"), ("c", "a"), ("b", "a")})),
))
# b never hears from a directly, but holds a's recent stamps through c and reports them to a: it votes for d,
# while its last report before the vote, slow to reach a, still counts towards a's lease.
A_VOTER_HEARS_THE_PRIMARY_SECONDHAND = Scenario(ABCDE, 0, (
    Faults(steps=20, cut=frozenset({("a", "d"), ("d", "a")}), down=frozenset({"b", "e"})),
    Faults(steps=60, cut=frozenset({("a", "b"), ("a", "d"), ("d", "a"), ("a", "e"), ("e", "a")}),
           slow=frozenset({("b", "a"), ("c", "a"), ("c", "d")}), lag=10),
))


@settings(max_examples=150, deadline=None)
@example(A_VOTER_SWITCHES)
@example(A_VOTER_RESTARTS)
@example(A_VOTER_HEARS_THE_PRIMARY_SECONDHAND)
@given(scenarios())
def test_one_primary_per_epoch_and_at_most_one_writer_at_any_instant(scenario):
    sim = Sim(scenario.members, scenario.seed)
    try:
        for phase in scenario.schedule:
            sim.run(phase)
        sim.run(Faults(steps=3 * SIM_TIMEOUT_MS // STEP_MS))
    finally:
        target(max(sim.overlap, -10 * SIM_LEASE_MS), label="second-longest lease held by a primary (ms)")


@settings(max_examples=60, deadline=None)
@example(A_VOTER_SWITCHES)
@example(A_VOTER_RESTARTS)
@example(A_VOTER_HEARS_THE_PRIMARY_SECONDHAND)
@given(scenarios())
def test_a_single_writer_emerges_once_the_faults_stop(scenario):
    sim = Sim(scenario.members, scenario.seed)
    for phase in scenario.schedule:
        sim.run(phase, check_leases=False)  # the test above checks the leases
    sim.settle()


# Clocks set 5 s apart, beyond the margin between the election timeout and the lease: a lease counted from the
# values of its stamps (hybrid, they follow the fastest clock) let a and d write at once in the first seed.
@pytest.mark.parametrize("seed", [238373792, *range(30)])
def test_leases_count_on_the_primarys_own_clock_however_far_apart_clocks_are_set(seed):
    failover_world.run_seed(seed, 300, max_skew_ms=2500)


def test_a_peer_holding_a_stamp_got_it_after_the_own_entry_was_last_below_it():
    sent = Advertised(keep_ms=1000)
    for entry, at in (("05", 100), ("09", 200), ("09", 250), ("12", 300)):
        sent.mark(entry, at)
    assert sent.sent_after("09") == 100  # the entry reached 09 after 100: no message carried it before
    assert sent.sent_after("10") == sent.sent_after("12") == 200
    assert sent.sent_after("13") == 300
    assert sent.sent_after("03") == 0  # older than anything marked: proves nothing
    sent.mark("20", 5000)  # marks older than keep_ms go, but the last of them stays as a bound
    assert sent.sent_after("13") == 300 and sent.sent_after("21") == 5000
