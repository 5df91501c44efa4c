"""The history checker: each anomaly is found in a small hand-written history and absent from its clean twin."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcsim.checker import (
    FinalState,
    Op,
    Report,
    availability,
    check,
    percentile,
    write_latencies,
    writes_within,
)

REGIONS = ("us-east", "eu-west", "ap-northeast")


def post(client: str, channel: str, mid: str, start: float, end: float, *, ok: bool = True, cmid: str = "",
         region: str = "us-east") -> Op:
    return Op(client, region, "post", start, end, ok, channel=channel, message_id=mid if ok else "",
              client_msg_id=cmid or f"k-{mid}", user_id=f"u-{client}")


def read(client: str, channel: str, seen: tuple[str, ...], start: float, end: float, *, token: bool = False,
         region: str = "eu-west") -> Op:
    return Op(client, region, "read", start, end, True, with_token=token, channel=channel, seen=seen)


def set_status(client: str, hlc: str, start: float, end: float, region: str = "us-east") -> Op:
    return Op(client, region, "set_status", start, end, True, user_id=f"u-{client}", hlc=hlc)


def get_status(client: str, user: str, hlc: str, start: float, end: float, *, token: bool = False,
               region: str = "eu-west") -> Op:
    return Op(client, region, "get_status", start, end, True, with_token=token, user_id=user, hlc=hlc)


def claim(client: str, name: str, state: str, start: float, end: float, region: str = "us-east") -> Op:
    return Op(client, region, "claim", start, end, state != "TAKEN", user_id=f"u-{client}", username=name,
              claim_state=state)


def final(messages: dict[str, list[tuple[str, str, str]]] | None = None, *, per_region=None, owners=None,
          claim_states=None, digests=None) -> FinalState:
    """The same channel listing in every region unless `per_region` overrides some."""
    listing = {region: dict(messages or {}) for region in REGIONS}
    listing.update(per_region or {})
    return FinalState(listing, owners or {r: {} for r in REGIONS}, claim_states or {r: {} for r in REGIONS},
                      digests or dict.fromkeys(REGIONS, "d0"))


def row(mid: str, client: str, cmid: str = "") -> tuple[str, str, str]:
    return (mid, f"u-{client}", cmid or f"k-{mid}")


def test_clean_history_has_no_anomalies():
    history = [post("c1", "general", "m1", 0, 10), read("c1", "general", ("m1",), 20, 30),
               set_status("c1", "h01", 0, 10), get_status("c1", "u-c1", "h01", 20, 30),
               claim("c1", "alice", "CONFIRMED", 0, 10)]
    owners = {r: {"alice": "u-c1"} for r in REGIONS}
    report = check(history, final({"general": [row("m1", "c1")]}, owners=owners))
    assert report == Report()
    assert report.violations() == 0 and report.converged and report.examples == ()


def test_acknowledged_message_missing_in_one_region_is_a_lost_write():
    history = [post("c1", "general", "m1", 0, 10), post("c1", "general", "m2", 0, 10),
               post("c2", "general", "", 0, 10, ok=False)]
    full = {"general": [row("m1", "c1"), row("m2", "c1")]}
    assert check(history, final(full)).lost_writes == 0
    partial = {r: {"general": [row("m1", "c1")]} for r in ("eu-west", "ap-northeast")}
    report = check(history, final(full, per_region=partial))
    assert report.lost_writes == 1  # m2, counted once although two regions lack it
    assert report.violations() == 1
    assert "m2" in report.examples[0] and "eu-west, ap-northeast" in report.examples[0]


def test_unacknowledged_post_may_be_missing():
    history = [post("c1", "general", "m1", 0, 10, ok=False)]
    assert check(history, final({})).lost_writes == 0


def test_one_retry_key_stored_twice_is_a_duplicate():
    history = [post("c1", "general", "m1", 0, 10, cmid="k1"), post("c1", "general", "m2", 20, 30, cmid="k2")]
    clean = {"general": [row("m1", "c1", "k1"), row("m2", "c1", "k2")]}
    assert check(history, final(clean)).duplicates == 0
    dup = {"general": [row("m1", "c1", "k1"), row("m2", "c1", "k1")]}
    report = check(history, final(dup))
    assert report.duplicates == 1  # counted once although every region lists it
    assert "k1" in report.examples[0]


def test_same_retry_key_of_two_users_is_not_a_duplicate():
    listing = {"general": [row("m1", "c1", "k1"), row("m2", "c2", "k1")]}
    assert check([], final(listing)).duplicates == 0


def test_message_listed_twice_is_a_duplicate():
    twice = {"us-east": {"general": [row("m1", "c1"), row("m1", "c1")]}}
    history = [post("c1", "general", "m1", 0, 10)]
    assert check(history, final({"general": [row("m1", "c1")]}, per_region=twice)).duplicates == 1


def test_username_confirmed_to_two_users_is_a_duplicate():
    owners = {r: {"alice": "u-c1"} for r in REGIONS}
    clean = [claim("c1", "alice", "CONFIRMED", 0, 10), claim("c2", "alice", "TAKEN", 20, 30)]
    assert check(clean, final(owners=owners)).duplicate_usernames == 0
    both = [claim("c1", "alice", "CONFIRMED", 0, 10), claim("c2", "alice", "CONFIRMED", 0, 10, region="eu-west")]
    report = check(both, final(owners=owners))
    assert report.duplicate_usernames == 1
    assert "alice" in report.examples[0]


def test_regions_disagreeing_on_an_owner_is_a_duplicate_username():
    agree = {r: {"alice": "u-c1", "bob": "u-c2"} for r in REGIONS}
    assert check([], final(owners=agree)).duplicate_usernames == 0
    disagree = agree | {"eu-west": {"alice": "u-c3", "bob": "u-c2"}}
    assert check([], final(owners=disagree)).duplicate_usernames == 1


def test_confirmed_claimant_who_is_not_the_owner_is_a_duplicate_username():
    history = [claim("c1", "alice", "CONFIRMED", 0, 10)]
    assert check(history, final(owners={r: {"alice": "u-c1"} for r in REGIONS})).duplicate_usernames == 0
    assert check(history, final(owners={r: {"alice": "u-c2"} for r in REGIONS})).duplicate_usernames == 1


def test_provisional_claims_that_lose_everywhere_and_refusals_are_counted():
    history = [claim("c1", "alice", "PROVISIONAL", 0, 10), claim("c2", "alice", "PROVISIONAL", 0, 10),
               claim("c3", "alice", "TAKEN", 50, 60)]
    owners = {r: {"alice": "u-c1"} for r in REGIONS}
    states = {r: {"u-c1": "CONFIRMED", "u-c2": "LOST"} for r in REGIONS}
    report = check(history, final(owners=owners, claim_states=states))
    assert (report.claims_lost, report.claims_refused, report.violations()) == (1, 1, 0)
    undecided = states | {"eu-west": {"u-c1": "CONFIRMED", "u-c2": "PROVISIONAL"}}
    assert check(history, final(owners=owners, claim_states=undecided)).claims_lost == 0


def test_read_missing_own_earlier_post_is_a_ryw_violation_split_by_token():
    history = [post("c1", "general", "m1", 0, 10),
               read("c1", "general", (), 20, 30, token=False),
               read("c1", "general", (), 40, 50, token=True),
               read("c1", "general", ("m1",), 60, 70, token=True)]
    report = check(history, final({"general": [row("m1", "c1")]}))
    assert (report.ryw_violations_with_token, report.ryw_violations_without_token) == (1, 1)
    assert report.violations() == 0
    assert any("without token" in e and "missed its own message m1" in e for e in report.examples)


def test_read_concurrent_with_the_post_or_by_another_client_is_not_a_ryw_violation():
    history = [post("c1", "general", "m1", 0, 10),
               read("c1", "general", (), 5, 15),  # overlaps the post
               read("c1", "general", (), 10, 20),  # starts as the post ends
               read("c2", "general", (), 20, 30),  # another client
               read("c1", "random", (), 20, 30)]  # another channel
    report = check(history, final({"general": [row("m1", "c1")]}))
    assert report == Report()


def test_read_losing_a_message_seen_before_is_a_monotonic_violation():
    history = [post("c2", "general", "m1", 0, 10),
               read("c1", "general", ("m1",), 20, 30, region="us-east"),
               read("c1", "general", ("m1",), 25, 45, region="us-east"),
               read("c1", "general", (), 40, 50, token=True, region="eu-west"),  # overlaps the second only
               read("c1", "general", (), 60, 70, region="eu-west")]
    report = check(history, final({"general": [row("m1", "c2")]}))
    assert (report.monotonic_violations_with_token, report.monotonic_violations_without_token) == (1, 1)
    assert report.ryw_violations_with_token + report.ryw_violations_without_token == 0


def test_reads_that_only_grow_are_monotonic():
    history = [read("c1", "general", (), 0, 10), read("c1", "general", ("m1",), 20, 30),
               read("c1", "general", ("m1", "m2"), 40, 50)]
    assert check(history, final({"general": [row("m1", "c2"), row("m2", "c2")]})) == Report()


def test_status_older_than_seen_before_is_a_regression_split_by_token():
    history = [get_status("c1", "u-c2", "h05", 0, 10),
               get_status("c1", "u-c2", "h03", 20, 30),  # regression, no token
               get_status("c1", "u-c2", "", 40, 50, token=True)]  # "" is older than anything
    report = check(history, final())
    assert (report.status_regressions_with_token, report.status_regressions_without_token) == (1, 1)
    clean = [get_status("c1", "u-c2", "h03", 0, 10), get_status("c1", "u-c2", "h05", 20, 30),
             get_status("c1", "u-c2", "h05", 40, 50), get_status("c1", "u-c3", "h01", 60, 70)]
    assert check(clean, final()) == Report()


def test_status_older_than_own_write_is_a_regression():
    history = [set_status("c1", "h07", 0, 10), get_status("c1", "u-c1", "h04", 20, 30, token=True)]
    assert check(history, final()).status_regressions_with_token == 1
    concurrent = [set_status("c1", "h07", 0, 25), get_status("c1", "u-c1", "h04", 20, 30, token=True)]
    assert check(concurrent, final()).status_regressions_with_token == 0
    other_client = [set_status("c1", "h07", 0, 10), get_status("c2", "u-c1", "h04", 20, 30)]
    assert check(other_client, final()).status_regressions_without_token == 0


def test_differing_digests_mean_not_converged():
    assert check([], final(digests={"us-east": "a", "eu-west": "a", "ap-northeast": "a"})).converged
    report = check([], final(digests={"us-east": "a", "eu-west": "a", "ap-northeast": "b"}))
    assert not report.converged and report.divergent_regions == ("ap-northeast",)
    assert report.violations() == 0 and "ap-northeast" in report.examples[0]
    tie = check([], final(digests={"us-east": "a", "eu-west": "b"}))
    assert tie.divergent_regions == ("us-east",)  # the tie goes to eu-west, first alphabetically


def test_examples_are_few_and_cover_every_kind():
    history = [post("c1", "general", f"m{i}", 0, 10) for i in range(20)]
    history += [read("c1", "general", (), 20 + i, 21 + i) for i in range(20)]
    report = check(history, final({}))
    assert report.lost_writes == 20 and report.ryw_violations_without_token == 20
    assert len(report.examples) == 6
    assert sum("missed its own" in e for e in report.examples) == 3


def test_unknown_op_kind_is_refused():
    with pytest.raises(ValueError, match="delete"):
        check([replace(read("c1", "general", (), 0, 1), kind="delete")], final())


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 0.2, 0.5, 0.99, 1)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile(values, 50)


def test_latencies_and_availability_count_writes_only():
    history = [post("c1", "general", "m1", 0, 10), post("c1", "general", "", 20, 100, ok=False, region="eu-west"),
               set_status("c1", "h01", 30, 35, region="eu-west"), claim("c1", "alice", "TAKEN", 40, 41),
               read("c1", "general", ("m1",), 0, 500)]
    assert write_latencies(history) == [10, 5]
    assert write_latencies(history, "eu-west") == [5]
    assert availability(history, {"eu-west"}, 0, 100) == 0.5
    assert availability(history, {"us-east"}, 0, 40) == 1.0  # the refused claim starts at 40, outside
    assert availability(history, REGIONS, 0, 100) == 2 / 4
    assert math.isnan(availability(history, {"ap-northeast"}, 0, 100))


def test_availability_leaves_out_writes_answered_after_the_window():
    # A partition from 1000 to 6000 ms: the posts sent in it were refused; a claim sent in it waited out the
    # cut and was acknowledged after the heal (as a sync claim admitted before the cut was noticed is).
    refused = [post("c1", "general", "", start, start + 2, ok=False) for start in (2000, 3000, 4000)]
    waited = claim("racer", "contested", "PROVISIONAL", 1500, 6200)
    history = [*refused, waited, post("c2", "general", "m1", 5990, 6001)]
    assert writes_within(history, {"us-east"}, 1000, 6000) == refused
    assert availability(history, {"us-east"}, 1000, 6000) == 0.0
    assert availability(history, {"us-east"}, 1000, 6300) == 2 / 5  # answered within a longer window


# A single linearizable store: every op takes effect at one instant inside [start, end], so whatever a client
# saw or wrote before an op started is visible to that op, and every region ends with the same state.

KIND_NAMES = ("post", "read", "set_status", "get_status", "claim")
Spec = tuple[int, int, int, int, int, float, bool, int, bool]  # client, kind, target, start, duration, at, ok, ...


def consistent_run(specs: list[Spec]) -> tuple[list[Op], FinalState]:
    channels: dict[str, list[tuple[str, str, str]]] = {}
    statuses: dict[str, str] = {}
    names: dict[str, str] = {}
    history: list[Op] = []
    order = sorted(range(len(specs)), key=lambda i: specs[i][3] + specs[i][5] * specs[i][4])
    for n, i in enumerate(order):
        client_no, kind_no, target, start, duration, _, ok, region_no, token = specs[i]
        client, user, kind = f"c{client_no}", f"u-c{client_no}", KIND_NAMES[kind_no]
        op = Op(client, REGIONS[region_no], kind, start, start + duration, ok, with_token=token)
        applied = ok or n % 2 == 0  # a failed write may still have taken effect
        if kind == "post":
            channel, mid = f"ch{target}", f"m{n}"
            if applied:
                channels.setdefault(channel, []).append((mid, user, f"k{n}"))
            op = replace(op, channel=channel, message_id=mid if ok else "", client_msg_id=f"k{n}", user_id=user)
        elif kind == "read":
            channel = f"ch{target}"
            op = replace(op, channel=channel, seen=tuple(m[0] for m in channels.get(channel, ())) if ok else ())
        elif kind == "set_status":
            if applied:
                statuses[user] = f"{n:012d}"
            op = replace(op, user_id=user, hlc=f"{n:012d}")
        elif kind == "get_status":
            op = replace(op, user_id=f"u-c{target}", hlc=statuses.get(f"u-c{target}", "") if ok else "")
        else:
            name = f"name{target}"
            if ok:
                names.setdefault(name, user)
            state = "CONFIRMED" if names.get(name) == user else "TAKEN" if ok else ""
            op = replace(op, ok=state == "CONFIRMED", user_id=user, username=name, claim_state=state)
        history.append(op)
    claimants = {op.user_id for op in history if op.kind == "claim"}
    states = {u: "CONFIRMED" if u in names.values() else "LOST" for u in claimants}
    return history, FinalState({r: channels for r in REGIONS}, {r: names for r in REGIONS},
                               {r: states for r in REGIONS}, dict.fromkeys(REGIONS, "digest"))


specs = st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 3), st.integers(0, 100),
                  st.integers(0, 30), st.floats(0, 1), st.booleans(), st.integers(0, 2), st.booleans())


def session_anomalies(report: Report) -> int:
    return (report.ryw_violations_with_token + report.ryw_violations_without_token
            + report.monotonic_violations_with_token + report.monotonic_violations_without_token
            + report.status_regressions_with_token + report.status_regressions_without_token)


@settings(max_examples=200)
@given(st.lists(specs, max_size=40))
def test_a_linearizable_store_has_no_anomalies(ops):
    report = check(*consistent_run(ops))
    assert report.violations() == 0 and session_anomalies(report) == 0 and report.converged, report.examples


@given(st.lists(specs, min_size=1, max_size=40), st.randoms(), st.sampled_from(REGIONS))
def test_dropping_an_acknowledged_message_from_one_region_is_one_lost_write(ops, rnd, region):
    history, state = consistent_run(ops)
    acked = [op for op in history if op.kind == "post" and op.ok]
    if not acked:
        return
    victim = rnd.choice(acked)
    kept = {ch: [m for m in msgs if m[0] != victim.message_id] for ch, msgs in state.messages[region].items()}
    report = check(history, replace(state, messages={**state.messages, region: kept}))
    assert report.lost_writes == 1 and victim.message_id in report.examples[0]


def test_a_50k_op_history_is_checked():
    rnd = random.Random(7)
    ops = [(rnd.randrange(200), rnd.choice((0, 1, 1, 2, 3, 4)), rnd.randrange(60), rnd.randrange(600_000),
            rnd.randrange(1, 400), rnd.random(), rnd.random() > 0.05, rnd.randrange(3), rnd.random() > 0.5)
           for _ in range(50_000)]
    history, state = consistent_run(ops)
    report = check(history, state)
    assert report.violations() == 0 and session_anomalies(report) == 0 and report.converged
