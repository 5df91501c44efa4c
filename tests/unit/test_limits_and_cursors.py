import pytest

from mlchat.crdt.hlc import Hlc
from mlchat.crdt.msglog import order_key
from mlchat.errors import InvalidArgument
from mlchat.leader import limits
from mlchat.leader.region import decode_cursor, encode_cursor, membership_refusal, user_id_for


def test_documented_limits_hold_at_their_edges():
    assert limits.body("x" * limits.BODY_MAX_CHARS)
    with pytest.raises(InvalidArgument):
        limits.body("x" * (limits.BODY_MAX_CHARS + 1))
    assert limits.username("abc") and limits.username("a" * 32)
    with pytest.raises(InvalidArgument):
        limits.username("a" * 33)
    assert limits.channel("c" * 64)
    with pytest.raises(InvalidArgument):
        limits.channel("c" * 65)
    assert limits.page_size(0) == limits.PAGE_DEFAULT and limits.page_size(limits.PAGE_MAX) == limits.PAGE_MAX
    assert limits.body("line one\nline two\ttabbed")


def test_cursor_round_trips_and_rejects_anything_else():
    key = order_key(Hlc(1_700_000_000_000, 3).encode(), "eu-west", "0123456789abcdef")
    assert decode_cursor(encode_cursor(key)) == key
    for junk in ["", "%%%", encode_cursor("short"), encode_cursor(key[:-1]), encode_cursor(key.replace("\x00", "-"))]:
        with pytest.raises(InvalidArgument, match="cursor"):
            decode_cursor(junk)


def test_user_id_depends_on_name_and_key_only():
    assert user_id_for("ann", "k" * 16) == user_id_for("ann", "k" * 16)
    assert user_id_for("ann", "k" * 16) != user_id_for("ann", "j" * 16)
    assert user_id_for("ann", "k" * 16) != user_id_for("bob", "k" * 16)


def test_a_rate_limiter_allows_a_burst_then_the_rate():
    limiter = limits.RateLimiter(rate=10, burst=3)
    assert [limiter.wait_s("u", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("u", 0.0) == pytest.approx(0.1)  # the next token comes in a tenth of a second
    assert limiter.wait_s("other", 0.0) == 0.0  # buckets are per user
    assert limiter.wait_s("u", 0.1) == 0.0
    assert limiter.wait_s("u", 0.1) > 0
    assert [limiter.wait_s("u", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled, never above the burst
    assert limiter.wait_s("u", 10.0) > 0
    assert limits.RateLimiter(0, 0).wait_s("u", 0.0) == 0.0  # rate 0: no limit


# (actor, actor is a member, target, add) -> allowed, in a channel created by "ann"
MEMBERSHIP_RULES = [
    ("ann", False, "bob", True, True),  # the creator adds, even after leaving
    ("ann", False, "bob", False, True),  # and removes anyone
    ("bob", True, "cat", True, True),  # a member adds anyone
    ("bob", False, "cat", True, False),  # a non-member adds no one
    ("bob", True, "bob", False, True),  # a member leaves
    ("bob", True, "cat", False, False),  # but removes no one else
    ("bob", True, "ann", False, False),  # not even the creator
]


@pytest.mark.parametrize(("actor", "is_member", "target", "add", "allowed"), MEMBERSHIP_RULES)
def test_who_may_add_and_remove_members_of_a_private_channel(actor, is_member, target, add, allowed):
    refusal = membership_refusal(actor, "ann", is_member, target, add)
    assert (refusal == "") == allowed, refusal
