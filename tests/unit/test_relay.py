"""What a region's stream to one peer carries: its own changes at once, relays only when the peer lacks them."""

from __future__ import annotations

from dataclasses import replace

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import StatusValue
from mlchat.crdt.replica import Delta, Relayed, combine
from mlchat.geo.relay import RelayQueue

DELAY = 1000


def own(hlc: str, vector: dict[str, str]) -> Delta:
    return Delta(statuses=(StatusValue("u1", 1, "", hlc, "b"),), vector=vector)


def relayed(source: str, origins: dict[str, str] | None, before: dict[str, str], vector: dict[str, str]) -> Delta:
    statuses = tuple(StatusValue(f"u-{o}", 1, "", h, o) for o, h in (origins or {}).items())
    return Delta(statuses=statuses, vector=vector, relayed=Relayed(source, origins, before))


def heartbeat(vector: dict[str, str]) -> Delta:
    return Delta(vector=vector, members={"b": "b"})


def test_own_changes_and_changes_of_unknown_origin_go_at_once_with_their_vector():
    queue = RelayQueue("c", DELAY, 100)
    mine = own("05", {"b": "05"})
    unknown = relayed("a", None, {"b": "05"}, {"a": "03", "b": "05"})
    assert queue.next([mine, unknown], {}, now_ms=0) == [mine, unknown]


def test_a_change_is_never_sent_back_to_the_peer_it_came_from_or_that_wrote_it_only_its_vector():
    queue = RelayQueue("a", DELAY, 100)
    from_a = relayed("a", {"c": "02"}, {}, {"a": "03", "c": "02"})
    by_a = relayed("c", {"a": "03"}, {}, {"a": "04", "c": "02"})
    assert queue.next([from_a, by_a], {}, now_ms=0) == [Delta(vector={"c": "02"}), Delta(vector={"a": "04"})]
    assert queue.held == 0


def test_a_relay_waits_then_goes_only_if_the_peer_still_lacks_it():
    queue = RelayQueue("c", DELAY, 100)
    first = relayed("a", {"a": "03"}, {"a": "01"}, {"a": "03", "b": "05"})
    second = relayed("a", {"a": "04"}, {"a": "03"}, {"a": "04", "b": "05"})
    assert queue.next([first, second], {}, now_ms=0) == []
    assert queue.next([], {}, now_ms=DELAY - 1) == []
    # The peer got the first by the direct path meanwhile; the second it still lacks when it falls due.
    sent = queue.next([], {"a": "03"}, now_ms=DELAY)
    assert [d.statuses for d in sent] == [second.statuses]
    assert queue.held == 0


def test_while_a_relay_is_held_the_vector_told_the_peer_stops_before_it():
    queue = RelayQueue("c", DELAY, 100)
    held = relayed("a", {"a": "07", "d": "04"}, {"a": "03", "d": "02", "b": "05"}, {"a": "07", "d": "04", "b": "05"})
    assert queue.next([held], {}, now_ms=0) == []
    told = queue.next([own("06", {"a": "07", "d": "04", "b": "06"})], {}, now_ms=10)
    assert told[0].vector == {"a": "03", "d": "02", "b": "06"}  # its own entry is never held back
    released = queue.next([heartbeat({"a": "07", "d": "04", "b": "06"})], {}, now_ms=DELAY)
    assert [d.vector for d in released] == [held.vector, {"a": "07", "d": "04", "b": "06"}]


def test_an_origin_the_region_held_nothing_of_is_left_out_of_the_vector_while_held():
    queue = RelayQueue("c", DELAY, 100)
    queue.next([relayed("a", {"a": "03"}, {"b": "05"}, {"a": "03", "b": "05"})], {}, now_ms=0)
    assert queue.next([heartbeat({"a": "03", "b": "05"})], {}, now_ms=1)[0].vector == {"b": "05"}


def test_released_relays_go_before_what_arrived_since():
    queue = RelayQueue("c", DELAY, 100)
    old = relayed("a", {"a": "03"}, {"a": "01"}, {"a": "03", "b": "05"})
    queue.next([old], {}, now_ms=0)
    mine = own("06", {"a": "03", "b": "06"})
    assert [d.statuses for d in queue.next([mine], {}, now_ms=DELAY)] == [old.statuses, mine.statuses]


def test_beyond_its_capacity_the_oldest_held_relay_goes_at_once():
    queue = RelayQueue("c", DELAY, 2)
    relays = [relayed("a", {"a": f"0{i}"}, {"a": f"0{i - 1}"}, {"a": f"0{i}"}) for i in range(1, 4)]
    sent = queue.next(relays, {}, now_ms=0)
    assert [d.statuses for d in sent] == [relays[0].statuses]
    assert queue.held == 2


def test_without_a_delay_relays_go_at_once_but_never_back():
    queue = RelayQueue("c", 0, 100)
    to_c = relayed("a", {"a": "03"}, {}, {"a": "03"})
    back = relayed("c", {"c": "02"}, {}, {"c": "02"})
    assert queue.next([to_c, back], {}, now_ms=0) == [to_c, Delta(vector={"c": "02"})]


def test_a_stream_tells_each_vector_entry_once_until_it_moves():
    queue = RelayQueue("c", DELAY, 100)
    first = own("05", {"a": "03", "b": "05"})
    second = own("06", {"a": "03", "b": "06"})
    idle = heartbeat({"a": "03", "b": "06"})
    assert [d.vector for d in queue.told([first, second, idle])] == [{"a": "03", "b": "05"}, {"b": "06"}, {}]
    assert queue.told([idle])[0].members == idle.members  # a heartbeat stays one, its vector told already


def test_a_relay_pushed_out_past_capacity_is_never_covered_by_a_message_before_it():
    queue = RelayQueue("c", DELAY, 1)
    older = relayed("a", {"a": "03"}, {"a": "01", "b": "05"}, {"a": "03", "b": "05"})
    queue.next([older], {}, now_ms=0)
    mine = own("06", {"a": "03", "b": "06"})
    newer = relayed("a", {"a": "04"}, {"a": "03", "b": "06"}, {"a": "04", "b": "06"})
    sent = queue.next([mine, newer], {}, now_ms=1)
    assert [d.statuses for d in sent] == [mine.statuses, older.statuses]
    assert sent[0].vector == {"a": "01", "b": "06"}  # the older relay goes after it


def test_combined_messages_keep_every_entry_their_deltas_told():
    (message,) = combine([own("06", {"a": "03", "b": "06"}), Delta(vector={"a": "04"})])
    assert message.vector == {"a": "04", "b": "06"}


def stamp(ms: int) -> str:
    return Hlc(ms, 0).encode()


def test_the_outbox_cursor_told_the_peer_stays_below_every_held_relay():
    queue = RelayQueue("c", DELAY, 100)
    held = replace(relayed("a", {"a": "07"}, {"a": "03"}, {"a": "07"}), cursor=stamp(19))
    held = replace(held, relayed=replace(held.relayed, stamp=stamp(20)))  # its outbox entry here
    assert queue.next([held], {}, now_ms=0) == []
    told = queue.next([replace(own("06", {"b": "06"}), cursor=stamp(30))], {}, now_ms=10)
    assert told[0].cursor == Hlc(20, 0).previous().encode()  # a restarted peer resumes before the relay
    # The peer got it by the direct path: the relay is dropped, and the cursor passes it.
    later = queue.next([replace(heartbeat({"b": "06"}), cursor=stamp(31))], {"a": "07"}, now_ms=20)
    assert [d.cursor for d in later] == [stamp(31)]


def test_the_cursor_goes_on_heartbeats_once_each_time_it_moves():
    queue = RelayQueue("a", DELAY, 100)
    back = replace(relayed("a", {"c": "02"}, {}, {"a": "03", "c": "02"}), cursor=stamp(40))
    beat = replace(heartbeat({"c": "02"}), cursor=stamp(40))
    sent = queue.told(queue.next([back, beat, beat], {}, now_ms=0))
    assert [d.cursor for d in sent] == ["", stamp(40), ""]
    assert queue.told([replace(heartbeat({}), cursor=stamp(39))])[0].cursor == ""  # never backwards


PACE, ACK_DELAY = 8, 20


def test_a_paced_stream_sends_a_change_at_once_and_the_next_ones_together_a_pace_later():
    queue = RelayQueue("c", DELAY, 100, PACE, ACK_DELAY)
    first, second, third = (own(f"0{i}", {"b": f"0{i}"}) for i in (1, 2, 3))
    assert queue.next([first], {}, now_ms=100) == [first]
    assert queue.next([second], {}, now_ms=103) == []
    assert queue.wait_ms(103) == PACE - 3
    assert queue.next([third], {}, now_ms=105) == []
    assert queue.next([], {}, now_ms=100 + PACE) == [second, third]
    assert queue.wait_ms(100 + PACE) is None  # nothing waits
    # A change that comes a pace or more after the last one sent goes at once.
    later = own("09", {"b": "09"})
    assert queue.next([later], {}, now_ms=100 + 2 * PACE) == [later]


def test_an_acknowledgement_rides_with_the_next_change_or_goes_alone_when_due():
    queue = RelayQueue("a", DELAY, 100, PACE, ACK_DELAY)
    ack = relayed("a", {"a": "03"}, {}, {"a": "03", "b": "05"})
    assert queue.next([ack], {}, now_ms=0) == []
    assert queue.wait_ms(5) == ACK_DELAY - 5
    mine = own("06", {"b": "06"})
    assert queue.next([mine], {}, now_ms=5) == [Delta(vector={"a": "03"}), mine]
    assert queue.next([ack], {}, now_ms=10) == []
    assert queue.next([], {}, now_ms=10 + ACK_DELAY) == [Delta(vector={"a": "03"})]


def test_a_heartbeat_goes_at_once_with_whatever_waits():
    queue = RelayQueue("c", DELAY, 100, PACE, ACK_DELAY)
    queue.next([own("01", {"b": "01"})], {}, now_ms=0)
    waiting = own("02", {"b": "02"})
    assert queue.next([waiting], {}, now_ms=2) == []
    beat = heartbeat({"b": "02"})
    assert queue.next([beat], {}, now_ms=3) == [waiting, beat]
    after = own("03", {"b": "03"})
    assert queue.next([after], {}, now_ms=4) == []  # paced from the last change sent, at 3
    assert queue.wait_ms(4) == PACE - 1


def test_only_changes_set_the_pace_not_a_heartbeat_or_an_acknowledgement_sent_alone():
    queue = RelayQueue("a", DELAY, 100, PACE, ACK_DELAY)
    beat = heartbeat({"b": "01"})
    assert queue.next([beat], {}, now_ms=100) == [beat]
    ack = relayed("a", {"a": "03"}, {}, {"a": "03", "b": "01"})
    assert queue.next([ack], {}, now_ms=101) == []
    assert queue.next([], {}, now_ms=101 + ACK_DELAY) == [Delta(vector={"a": "03"})]
    change = own("02", {"b": "02"})
    assert queue.next([change], {}, now_ms=102 + ACK_DELAY) == [change]

