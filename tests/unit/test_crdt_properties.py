"""Merge laws of the CRDT core, checked with Hypothesis over random histories."""


from hypothesis import given, settings
from hypothesis import strategies as st

from mlchat.crdt import lww, vector
from mlchat.crdt.claims import Claim, ClaimState, claim_state, owner
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.replica import Replica

REGIONS = ("us-east", "eu-west", "ap-northeast")
hlc_texts = st.builds(lambda w, c: Hlc(w, c).encode(), st.integers(0, 50), st.integers(0, 3))
statuses = st.builds(StatusValue, st.just("u1"), st.integers(0, 4), st.sampled_from(["", "lunch", "busy"]),
                     hlc_texts, st.sampled_from(REGIONS))


@given(statuses, statuses, statuses)
def test_status_merge_is_commutative_associative_idempotent(a, b, c):
    assert lww.merge(a, b) == lww.merge(b, a)
    assert lww.merge(lww.merge(a, b), c) == lww.merge(a, lww.merge(b, c))
    assert lww.merge(a, a) == a


@given(st.lists(statuses, min_size=1, max_size=8), st.randoms())
def test_status_winner_is_max_hlc_region_in_any_order(values, rnd):
    rnd.shuffle(values)
    merged = None
    for v in values:
        merged = lww.merge(merged, v)
    assert merged is not None
    assert (merged.hlc, merged.region) == max((v.hlc, v.region) for v in values)


memberships = st.builds(MemberValue, st.just("team"), st.just("u1"), st.booleans(), hlc_texts,
                        st.sampled_from(REGIONS))


@given(memberships, memberships, memberships)
def test_membership_merge_is_commutative_associative_idempotent_and_the_latest_write_wins(a, b, c):
    assert lww.merge(a, b) == lww.merge(b, a)
    assert lww.merge(lww.merge(a, b), c) == lww.merge(a, lww.merge(b, c))
    assert lww.merge(a, a) == a
    assert lww.merge(lww.merge(a, b), c).rank == max(a.rank, b.rank, c.rank)


claims = st.builds(Claim, hlc_texts, st.sampled_from(REGIONS), st.sampled_from(["u1", "u2", "u3"]), st.just("bob"))


@given(st.lists(claims, min_size=1, max_size=6), st.randoms())
def test_claim_owner_is_the_same_in_any_order_and_every_other_user_loses(cs, rnd):
    shuffled = list(cs)
    rnd.shuffle(shuffled)
    assert owner(shuffled) == owner(cs) == min(cs)
    top = "9999999999999.999999"
    for c in set(cs):
        expected = ClaimState.CONFIRMED if c.user_id == min(cs).user_id else ClaimState.LOST
        assert claim_state(c, cs, watermark=top) == expected


def test_claim_is_provisional_until_the_watermark_passes_it():
    c = Claim(Hlc(10).encode(), "us-east", "u1", "bob")
    assert claim_state(c, [c], watermark=Hlc(9).encode()) == ClaimState.PROVISIONAL
    assert claim_state(c, [c], watermark=Hlc(10).encode()) == ClaimState.CONFIRMED


# Whole replicas -----------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("post"), st.integers(0, 2), st.sampled_from(["a", "b"]), st.integers(0, 5)),
        st.tuples(st.just("status"), st.integers(0, 2), st.sampled_from(["u1", "u2"]), st.integers(0, 4)),
        st.tuples(st.just("claim"), st.integers(0, 2), st.sampled_from(["ann", "bob"]), st.integers(0, 2)),
        st.tuples(st.just("create"), st.integers(0, 2), st.sampled_from(["a", "b"]), st.integers(0, 2)),
        st.tuples(st.just("member"), st.integers(0, 2), st.sampled_from(["a", "b"]), st.integers(0, 5)),
        st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("deliver"), st.integers(0, 1000), st.booleans(), st.just(0)),
    ),
    max_size=40,
)


def make_replicas():
    return [Replica(r, client_id=i + 1, regions=frozenset(REGIONS), bucket_ms=20) for i, r in enumerate(REGIONS)]


def run_history(history, rnd):
    """Apply ops with clocks that drift per region; deltas travel through a lossy-order network."""
    replicas = make_replicas()
    network = []  # (target, delta): delivered in random order, possibly duplicated
    now = [100, 90, 110]  # skewed wall clocks
    for kind, i, x, y in history:
        now = [t + rnd.randint(0, 7) for t in now]
        r = replicas[i] if kind != "deliver" else None
        if kind == "post":
            # User ids repeat across regions, so retries of one client_msg_id land in several regions.
            r.post(f"user{y % 2}", x, f"body {y}", f"m{y}", now[i])
        elif kind == "status":
            r.set_status(x, y, f"text {y} from {r.region}", now[i])
        elif kind == "claim":
            r.claim(x, f"user-{i}-{y}", now[i])
        elif kind == "create":
            r.create_channel(x, f"user{y}", now[i])
        elif kind == "member":
            r.set_member(x, f"user{y % 3}", y < 3, now[i])
        elif kind == "send":
            network.append((x, r.delta_for(replicas[x].state())))
        elif kind == "deliver" and network:
            k = i % len(network)
            target, delta = network[k] if x else network.pop(k)
            replicas[target].apply(delta, now[target])
    return replicas, network, now


def quiesce(replicas, network, now):
    for target, delta in network:
        replicas[target].apply(delta, now[target])
    for _ in range(2):
        for a in replicas:
            for b in replicas:
                if a is not b:
                    b.apply(a.delta_for(b.state()), now[0])


@settings(max_examples=150, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_replicas_converge_whatever_the_delivery_order(history, rnd):
    replicas, network, now = run_history(history, rnd)
    quiesce(replicas, network, now)
    digests = {r.digest() for r in replicas}
    assert len(digests) == 1
    for channel in ("a", "b"):
        assert len({r.channel_creator(channel) for r in replicas}) == 1, "two creators of one channel"
        for user in ("user0", "user1", "user2"):
            assert len({r.is_member(channel, user) for r in replicas}) == 1
        listings = [[e.id for e in r.messages(channel)] for r in replicas]
        assert listings[0] == listings[1] == listings[2]
        assert len(set(listings[0])) == len(listings[0]), "a message id appears twice"


@settings(max_examples=75, deadline=None)
@given(ops, st.randoms(use_true_random=False))
def test_deltas_apply_in_either_order_and_twice_to_the_same_result(history, rnd):
    replicas, _, now = run_history(history, rnd)
    blank = Replica("ap-southeast", client_id=99).state()
    deltas = [r.delta_for(blank) for r in replicas]
    orders = [deltas, deltas[::-1], deltas + deltas[:1], [deltas[1], deltas[0], deltas[2], deltas[1]]]
    results = set()
    for order in orders:
        fresh = Replica("ap-southeast", client_id=99)
        for d in order:
            fresh.apply(d, 0)
        results.add(fresh.digest())
    assert len(results) == 1


def test_relay_through_a_third_replica_delivers_everything():
    a, b, c = make_replicas()
    a.post("u1", "general", "hello from a", "m1", 100)
    a.set_status("u1", 1, "here", 101)
    a.claim("ann", "u1", 102)
    a.create_channel("team", "u1", 103)
    a.set_member("team", "u2", True, 104)
    b.apply(a.delta_for(b.state()), 100)  # A -> B
    c.apply(b.delta_for(c.state()), 100)  # B -> C; A-C is cut
    assert c.digest() == a.digest()
    assert [e.body for e in c.messages("general")] == ["hello from a"]
    assert c.channel_creator("team").user_id == "u1"
    assert c.is_member("team", "u1") and c.is_member("team", "u2")


def test_concurrent_creations_of_a_channel_end_with_the_earliest_creator_everywhere():
    a, b, _ = make_replicas()
    b.create_channel("team", "bob", now_ms=200)
    a.create_channel("team", "ann", now_ms=100)
    a.apply(b.delta_for(a.state()), 300)
    b.apply(a.delta_for(b.state()), 300)
    assert a.channel_creator("team") == b.channel_creator("team")
    assert a.channel_creator("team").user_id == "ann"
    assert a.digest() == b.digest()


def test_a_removal_made_after_seeing_an_add_wins_even_with_a_slow_clock():
    a, b, _ = make_replicas()
    a.set_member("team", "u2", True, now_ms=10_000)
    b.apply(a.delta_for(b.state()), now_ms=5_000)
    b.set_member("team", "u2", False, now_ms=5_001)
    a.apply(b.delta_for(a.state()), now_ms=10_001)
    assert not a.is_member("team", "u2") and not b.is_member("team", "u2")


def test_a_write_made_after_seeing_another_wins_even_with_a_slow_clock():
    a, b, _ = make_replicas()
    a.set_status("u1", 1, "from a", now_ms=10_000)
    b.apply(a.delta_for(b.state()), now_ms=5_000)  # b's wall clock is 5 s behind
    later = b.set_status("u1", 2, "from b, after seeing a", now_ms=5_001)
    a.apply(b.delta_for(a.state()), now_ms=10_001)
    assert a.status("u1") == b.status("u1") == later


def test_retry_accepted_by_two_regions_reads_as_one_message_everywhere():
    a, b, _ = make_replicas()
    a.post("u1", "general", "hi", "same-id", 100)
    b.post("u1", "general", "hi", "same-id", 500)  # different time bucket too
    a.apply(b.delta_for(a.state()), 600)
    b.apply(a.delta_for(b.state()), 600)
    assert [e.id for e in a.messages("general")] == [e.id for e in b.messages("general")]
    assert len(a.messages("general")) == 1
    assert a.messages("general")[0].region == "us-east"


def test_causal_token_round_trips_and_rejects_garbage():
    v = {"us-east": Hlc(5, 1).encode(), "eu-west": Hlc(7).encode()}
    assert vector.decode_token(vector.encode_token(v)) == v
    for bad in [b"\xff", b"us-east", b"us-east=12", b"US=0000000000001.000000", b"a=1;a=1"]:
        try:
            vector.decode_token(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_vector_covers_and_missing():
    have = {"a": Hlc(5).encode()}
    assert vector.covers(have, {"a": Hlc(4).encode()})
    assert not vector.covers(have, {"b": Hlc(1).encode()})
    assert vector.missing(have, {"a": Hlc(6).encode(), "b": Hlc(1).encode()}) == {
        "a": Hlc(6).encode(), "b": Hlc(1).encode()}
    assert vector.merge(have, {"a": Hlc(3).encode(), "b": Hlc(1).encode()}) == {
        "a": Hlc(5).encode(), "b": Hlc(1).encode()}


