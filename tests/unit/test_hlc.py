from hypothesis import given
from hypothesis import strategies as st

from mlchat.crdt.hlc import MAX_COUNTER, Hlc

walls = st.integers(min_value=0, max_value=10**13 - 2)
counters = st.integers(min_value=0, max_value=MAX_COUNTER)
hlcs = st.builds(Hlc, walls, counters)


@given(hlcs, walls)
def test_tick_moves_forward_and_never_behind_wall_clock(clock, now):
    after = clock.tick(now)
    assert after > clock
    assert after.wall_ms >= now


@given(hlcs, hlcs, walls)
def test_absorb_is_after_both_clocks(local, remote, now):
    after = local.absorb(remote, now)
    assert after > local and after > remote
    assert after.wall_ms >= now


@given(hlcs, hlcs)
def test_encoding_sorts_like_the_clock_and_round_trips(a, b):
    assert (a.encode() < b.encode()) == (a < b)
    assert Hlc.decode(a.encode()) == a


def test_full_counter_moves_to_the_next_millisecond():
    assert Hlc(5, MAX_COUNTER).tick(0) == Hlc(6, 0)


def test_malformed_text_is_rejected():
    for text in ["", "12", "0000000000001.00000x", "0000000000001-000000", "00000000000001.000000"]:
        try:
            Hlc.decode(text)
        except ValueError:
            continue
        raise AssertionError(f"{text!r} decoded")
