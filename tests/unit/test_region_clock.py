"""A region's clock: the causal token it tells, over random histories of stamps, settles, ticks and floors."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.regionclock import RegionClock

steps = st.lists(st.one_of(
    st.tuples(st.just("stamp"), st.integers(0, 3)),  # ms the wall clock moved on
    st.tuples(st.just("settle"), st.integers(0, 7)),  # which unsettled stamps: a bit mask
    st.tuples(st.just("fail"), st.integers(0, 7)),
    st.tuples(st.just("tick"), st.integers(0, 3)),
    st.tuples(st.just("floor"), st.integers(0, 3)),
    st.tuples(st.just("absorb"), st.integers(0, 50)),
), max_size=40)


@settings(max_examples=300)
@given(steps, st.booleans())
@example([("stamp", 0), ("stamp", 1), ("settle", 2)], False)  # a later write settled, an earlier one not yet
def test_the_token_tells_the_own_entry_up_to_the_last_settled_write_and_no_further_than_the_vector(history, restarted):
    """The token's own entry is the vector's own entry, stopped at the last write settled; with no write
    settled (and no floor from an earlier run), the token has no own entry. Other regions' entries are the
    vector's."""
    clock = RegionClock("us-east", Hlc(5, 0).encode() if restarted else "", {"eu-west": Hlc(1, 0).encode()})
    now, issued = 10, []
    for step, n in history:
        if step == "stamp":
            now += n
            issued.append(clock.stamp(now))
        elif step in ("settle", "fail"):
            chosen = [s for i, s in enumerate(issued) if n >> (i % 3) & 1]
            clock.settle(chosen, stored=step == "settle")
            issued = [s for s in issued if s not in chosen]
        elif step == "tick":
            now += n
            clock.tick(now)
        elif step == "floor":
            now += n
            clock.floor_saved(clock.floor_target(now))
        else:
            clock.absorb({"eu-west": Hlc(n, 0).encode()}, now)
        told, current = clock.token(), clock.vector
        if clock.last_settled:
            assert told == {**current, "us-east": min(current["us-east"], clock.last_settled)}
        else:
            assert told == {r: h for r, h in current.items() if r != "us-east"}
        assert clock.token(("us-east", Hlc(10_000, 0).encode()))["us-east"] == Hlc(10_000, 0).encode()
