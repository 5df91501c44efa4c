"""The Store against every kind of Redis it runs on: one Valkey, and a Redis Cluster of three Valkey
primaries (real servers, the bundled binary). The same tests, the same results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from support import cluster_ports

from mlchat.crdt.claims import Claim
from mlchat.crdt.hlc import Hlc
from mlchat.crdt.lww import MemberValue, StatusValue
from mlchat.crdt.msglog import LogEntry, message_id
from mlchat.leader.process import free_port
from mlchat.leader.server import redis_client
from mlchat.leader.store import Shipped, Store, past, split_entry
from mlchat.leader.valkey import EmbeddedValkey, EmbeddedValkeyCluster

T = TypeVar("T")
CAP = 1000


def run(url: str, body: Callable[[Store], Awaitable[T]]) -> T:
    """Run `body` with a Store on `url`, closed afterwards."""
    async def main() -> T:
        store = Store(redis_client(url))
        try:
            return await body(store)
        finally:
            await store.close()
    return asyncio.run(main())


def hlc(ms: int, counter: int = 0) -> str:
    return Hlc(ms, counter).encode()


def entry(channel: str, n: int, ms: int, region: str = "us-east", user: str = "u1") -> LogEntry:
    cmid = f"m{n}"
    return LogEntry(message_id(user, channel, cmid), channel, user, f"body {n}", cmid, hlc(ms, n), region)


def shard(channel: str) -> str:
    return f"{channel}/0"


def ship(stamp: str) -> Shipped:
    return Shipped(stamp, b"change " + stamp.encode())


async def post(store: Store, channel: str, entries: list[LogEntry]):
    return await store.post(shard(channel), entries, b"update", b"sv-" + channel.encode(), CAP, ship(entries[-1].hlc))


def test_post_dedup_find_and_stream(any_redis_url, unique):
    ch = f"c{unique}"
    first = [entry(ch, n, 1_000 + n) for n in range(3)]

    async def body(store: Store):
        stored = await post(store, ch, first)
        retry = await post(store, ch, [first[1], entry(ch, 9, 2_000)])  # any stored id: nothing stored
        found = await store.find(ch, first[2].id)
        after = await store.stream_after(ch, stored.stream_ids[0], 10)
        return stored, retry, found, after, await store.last_stream_id(ch)

    stored, retry, found, after, last = run(any_redis_url, body)
    assert len(stored.stream_ids) == 3 and not stored.duplicates
    assert retry.stream_ids == [] and retry.duplicates == {first[1].id: first[1].order_key}
    assert found == first[2]
    assert [e for _, e in after] == first[1:] and last == stored.stream_ids[-1]


def test_a_copy_from_another_region_replaces_a_later_one(any_redis_url, unique):
    ch = f"c{unique}"
    local = entry(ch, 1, 5_000)
    earlier = LogEntry(local.id, ch, local.user_id, local.body, local.client_msg_id, hlc(4_000), "eu-west")

    async def body(store: Store):
        await post(store, ch, [local])
        new = await store.apply(shard(ch), [earlier, entry(ch, 2, 6_000, "eu-west")], b"u2", b"sv", CAP,
                                ship(hlc(6_001)))
        return new, await store.find(ch, local.id), (await store.page(ch, "", 10, False, "u1")).entries

    new, found, page = run(any_redis_url, body)
    assert list(new) == [entry(ch, 2, 6_000, "eu-west").id]
    assert found == earlier and [e.id for e in page] == [earlier.id, entry(ch, 2, 6_000).id]


def test_paging_both_ways_covers_everything_once(any_redis_url, unique):
    ch = f"c{unique}"
    entries = [entry(ch, n, 10_000 + n) for n in range(25)]

    async def body(store: Store):
        for i in range(0, 25, 5):
            await post(store, ch, entries[i:i + 5])
        pages = []
        for newest_first in (False, True):
            seen, cursor = [], ""
            while page := (await store.page(ch, cursor, 7, newest_first, "u1")).entries:
                seen += page
                cursor = page[-1].order_key
            pages.append(seen)
        return pages

    forward, backward = run(any_redis_url, body)
    assert forward == entries and backward == entries[::-1]


def test_status_is_last_writer_wins(any_redis_url, unique):
    user = f"u{unique}"

    async def body(store: Store):
        later = await store.set_status(StatusValue(user, 1, "later", hlc(2_000), "us-east"), ship(hlc(2_000)))
        earlier = await store.set_status(StatusValue(user, 2, "earlier", hlc(1_000), "eu-west"), ship(hlc(2_001)))
        listed = [s async for s in store.statuses() if s.user_id == user]
        return later, earlier, await store.status(user), listed

    later, earlier, now, listed = run(any_redis_url, body)
    assert later[1] is True and earlier == (later[0], False)
    assert now == later[0] == StatusValue(user, 1, "later", hlc(2_000), "us-east") and listed == [now]


def test_claims_users_and_conflicts(any_redis_url, unique):
    name = f"n{unique}"

    async def body(store: Store):
        before = (await store.counts())[0]
        outcomes = [await store.claim(Claim(hlc(3_000), "us-east", "ua" + unique, name), ship(hlc(3_000))),
                    await store.claim(Claim(hlc(3_001), "us-east", "ua" + unique, name), ship(hlc(3_001))),
                    await store.claim(Claim(hlc(3_002), "us-east", "ub" + unique, name), ship(hlc(3_002)))]
        remote = await store.add_claim(Claim(hlc(2_000), "eu-west", "uc" + unique, name), ship(hlc(3_003)))
        again = await store.add_claim(Claim(hlc(2_000), "eu-west", "uc" + unique, name), ship(hlc(3_004)))
        users = (await store.counts())[0] - before
        listed = sorted(c.user_id for c in [c async for c in store.claims()] if c.name == name)
        return (outcomes, remote, again, users, await store.user_name("uc" + unique),
                await store.user_name("ub" + unique), sorted(c.user_id for c in await store.claims_on(name)), listed)

    outcomes, remote, again, users, name_c, name_b, on_name, listed = run(any_redis_url, body)
    assert outcomes == [1, 0, -1] and (remote, again) == (2, 0) and users == 2
    assert (name_c, name_b) == (name, None)
    assert on_name == listed == sorted(["ua" + unique, "uc" + unique])


def test_private_channels_and_memberships(any_redis_url, unique):
    ch, creator, other = f"p{unique}", f"ua{unique}", f"ub{unique}"

    async def body(store: Store):
        created = await store.create_channel(Claim(hlc(1_000), "us-east", creator, ch), ship(hlc(1_000)))
        again = await store.create_channel(Claim(hlc(1_001), "us-east", other, ch), ship(hlc(1_001)))
        await post(store, f"pub{unique}", [entry(f"pub{unique}", 1, 1_000)])
        public = await store.create_channel(Claim(hlc(1_002), "us-east", creator, f"pub{unique}"), ship(hlc(1_002)))
        joined = await store.set_member(MemberValue(ch, other, True, hlc(1_100), "us-east"), ship(hlc(1_100)))
        access = await store.access(ch, other), await store.access(ch, "nobody")
        members = await store.members(ch)
        everywhere = [m async for m in store.memberships() if m.channel == ch]
        records = [c async for c in store.channels() if c.name == ch]
        return created, again, public, joined, access, members, everywhere, records

    created, again, public, joined, access, members, everywhere, records = run(any_redis_url, body)
    assert (created, again, public) == (1, 0, -1) and joined[1] is True
    assert access == ((True, True), (True, False))
    assert sorted(m.user_id for m in members) == sorted(m.user_id for m in everywhere) == sorted([creator, other])
    assert [r.user_id for r in records] == [creator]


def test_a_change_and_its_outbox_entry_are_stored_together(any_redis_url, unique):
    """Every write ships its change in the same script, and only a write that changed something does; the
    clock floor covers every stamp shipped (a restarted region stamps above its outbox)."""
    ch, user = f"o{unique}", f"uo{unique}"
    base = int(time.time() * 1000) + 10**12  # above every stamp the other tests ship
    stamps = [hlc(base, n) for n in range(16)]

    async def body(store: Store):
        changed = {
            stamps[0]: (await post(store, ch, [entry(ch, 0, base)])).stream_ids != [],
            stamps[1]: bool(await store.apply(shard(ch), [entry(ch, 2, base, "eu-west")], b"u", b"sv", CAP,
                                              ship(stamps[1]))),
            stamps[2]: (await store.set_status(StatusValue(user, 1, "a", stamps[2], "us-east"), ship(stamps[2])))[1],
            stamps[3]: (await store.set_status(StatusValue(user, 1, "b", hlc(base - 1), "eu-west"),
                                               ship(stamps[3])))[1],
            stamps[4]: await store.claim(Claim(stamps[4], "us-east", user, f"n{unique}"), ship(stamps[4])) == 1,
            stamps[5]: await store.claim(Claim(stamps[5], "us-east", "x" + user, f"n{unique}"), ship(stamps[5])) == 1,
            stamps[6]: await store.add_claim(Claim(hlc(base - 2), "eu-west", "y" + user, f"n{unique}"),
                                             ship(stamps[6])) > 0,
            stamps[7]: await store.add_claim(Claim(hlc(base - 2), "eu-west", "y" + user, f"n{unique}"),
                                             ship(stamps[7])) > 0,
            stamps[8]: await store.create_channel(Claim(stamps[8], "us-east", user, f"p{unique}"),
                                                  ship(stamps[8])) == 1,
            stamps[9]: await store.create_channel(Claim(stamps[9], "us-east", user, f"p{unique}"),
                                                  ship(stamps[9])) == 1,
            stamps[10]: await store.add_channel(Claim(hlc(base - 3), "eu-west", "y" + user, f"p{unique}"),
                                                ship(stamps[10])) > 0,
            stamps[11]: (await store.set_member(MemberValue(f"p{unique}", "y" + user, True, stamps[11], "us-east"),
                                                ship(stamps[11])))[1],
            stamps[12]: (await store.set_member(MemberValue(f"p{unique}", "y" + user, True, hlc(base - 4), "eu-west"),
                                                ship(stamps[12])))[1],
        }
        return changed, await store.resolve(stamps), await store.clock_floor()

    changed, shipped, floor = run(any_redis_url, body)
    assert changed == {s: s not in (stamps[3], stamps[5], stamps[7], stamps[9], stamps[12]) for s in changed}
    assert shipped == [(s, ship(s).payload) for s in stamps if changed.get(s)]
    assert floor >= stamps[11]


def test_a_write_run_again_answers_as_it_did_the_first_time(any_redis_url, unique):
    """A client retry after a lost reply runs a script twice: the second run must still say the change was
    made, or the region would never publish it to its peers."""
    user, name, ch = f"ur{unique}", f"nr{unique}", f"pr{unique}"
    base = int(time.time() * 1000) + 3 * 10**12
    writes = [
        lambda store: store.set_status(StatusValue(user, 1, "x", hlc(base, 1), "us-east"), ship(hlc(base, 1))),
        lambda store: store.claim(Claim(hlc(base, 2), "us-east", user, name), ship(hlc(base, 2))),
        lambda store: store.add_claim(Claim(hlc(base - 1), "eu-west", "o" + user, name), ship(hlc(base, 3))),
        lambda store: store.create_channel(Claim(hlc(base, 4), "us-east", user, ch), ship(hlc(base, 4))),
        lambda store: store.add_channel(Claim(hlc(base - 2), "eu-west", "o" + user, ch), ship(hlc(base, 5))),
        lambda store: store.set_member(MemberValue(ch, "o" + user, True, hlc(base, 6), "us-east"),
                                       ship(hlc(base, 6))),
    ]

    async def body(store: Store):
        return [(await write(store), await write(store)) for write in writes]

    for first, again in run(any_redis_url, body):
        assert again == first


def test_a_write_given_up_on_is_fenced_and_stores_nothing(any_redis_url, unique):
    """Resolving a stamp in doubt that has no entry fences it: the write, if its script still waits to run
    (Redis paused, the reply lost), stores nothing. One that has an entry is found, and runs again as before."""
    user = f"uf{unique}"
    base = int(time.time() * 1000) + 4 * 10**12
    given_up, stored = hlc(base, 1), hlc(base, 2)

    async def body(store: Store):
        await store.set_status(StatusValue(user, 1, "stored", stored, "us-east"), ship(stored))
        found = await store.resolve([given_up, stored])
        with pytest.raises(redis.exceptions.ResponseError, match="FENCED"):
            await store.set_status(StatusValue(user, 2, "late", given_up, "us-east"), ship(given_up))
        again = await store.set_status(StatusValue(user, 1, "stored", stored, "us-east"), ship(stored))
        return found, again, await store.status(user), [e async for e in store.outbox_since(past(given_up))]

    found, again, status, after = run(any_redis_url, body)
    assert found == [(stored, ship(stored).payload)] and again[1] is True
    assert status.text == "stored"
    # Readers see the fence as an entry with no payload (on a cluster, one in every copy of the outbox).
    assert [stamp for stamp, payload in map(split_entry, after) if stamp <= stored and payload] == [stored]


def test_outbox_reads_after_a_cursor_and_trims_what_all_hold(any_redis_url, unique):
    ch = f"t{unique}"
    base = int(time.time() * 1000) + 5 * 10**12  # above every other test's stamps
    entries = [entry(ch, n, base + n) for n in range(6)]

    async def body(store: Store):
        for e in entries:
            await post(store, ch, [e])
        after_second = [split_entry(m)[0] async for m in store.outbox_since(past(entries[1].hlc))]
        paged = [split_entry(m)[0] async for m in store.outbox_since(past(entries[0].hlc), chunk=2)]
        left = await store.trim_outbox(entries[1].hlc, 1_000_000)  # every peer holds up to the second
        trimmed_by_peers = await store.outbox_trimmed()
        await store.trim_outbox("", 2)  # and no more than two are kept
        kept = [split_entry(m)[0] async for m in store.outbox_since(b"")]
        return after_second, paged, left, trimmed_by_peers, kept, await store.outbox_trimmed()

    after_second, paged, left, trimmed_by_peers, kept, trimmed = run(any_redis_url, body)
    stamps = [e.hlc for e in entries]
    assert after_second == stamps[2:] and paged == stamps[1:]
    assert left == 4 and trimmed_by_peers == stamps[1]
    assert kept == stamps[4:] and trimmed == stamps[3]


def test_region_wide_state_merges_every_slot(any_redis_url, unique):
    """The clock floor, the shard states and the channel set span every channel written."""
    channels = [f"w{unique}-{i}" for i in range(20)]

    async def body(store: Store):
        for i, ch in enumerate(channels):
            await post(store, ch, [entry(ch, 1, 90_000_000_000 + i)])
        await store.raise_clock_floor(hlc(80_000_000_000))  # lower: changes nothing
        states = await store.shard_states()
        messages = [e async for e in store.messages() if e.channel in channels]
        return await store.clock_floor(), states, messages, await store.counts()

    floor, states, messages, (_, n_channels, n_messages) = run(any_redis_url, body)
    assert floor >= hlc(90_000_000_019, 1)
    assert {shard(ch): b"sv-" + ch.encode() for ch in channels}.items() <= states.items()
    assert sorted(e.channel for e in messages) == sorted(channels)
    assert n_channels >= 20 and n_messages >= 20


def test_members_vector_and_acceptor_state(any_redis_url, unique):
    async def body(store: Store):
        await store.save_member(f"r{unique}", "host:1")
        await store.save_member(f"s{unique}", "host:2")
        await store.save_departure(f"s{unique}")
        await store.save_listed_by(f"r{unique}")
        await store.save_vector({f"r{unique}": hlc(5)})
        first = await store.acceptor_step(f"k{unique}", lambda raw: ("one", raw))
        second = await store.acceptor_step(f"k{unique}", lambda raw: ("two", raw))
        return await store.load_members(), await store.load_vector(), first, second

    (members, departed, listed_by), vector, first, second = run(any_redis_url, body)
    assert members[f"r{unique}"] == "host:1" and f"s{unique}" not in members and f"s{unique}" in departed
    assert f"r{unique}" in listed_by and vector[f"r{unique}"] == hlc(5)
    assert (first, second) == (None, "one")


def test_the_stored_term_and_vote_never_go_back(any_redis_url, unique):
    async def body(store: Store):
        before = await store.term()  # the session's Redis is shared: save past what it holds
        epoch, voted = (int(before[0].split()[0]) if before[0] else 0), before[1]
        await store.save_term(f"{epoch + 5} r{unique}", voted + 7)
        await store.save_term(f"{epoch + 4} s{unique}", voted + 6)  # saves that land out of order
        return (epoch, voted), await store.term()

    (epoch, voted), after = run(any_redis_url, body)
    assert after == (f"{epoch + 5} r{unique}", voted + 7)


@pytest.mark.parametrize("kind", ["valkey", "cluster"])
def test_everything_acknowledged_survives_a_restart_of_the_servers(kind, tmp_path: Path):
    server: EmbeddedValkey | EmbeddedValkeyCluster = (
        EmbeddedValkey(tmp_path / "v", port=free_port()) if kind == "valkey"
        else EmbeddedValkeyCluster(tmp_path / "c", cluster_ports()))
    server.start()
    channels = [f"d{i}" for i in range(10)]

    async def write(store: Store):
        for i, ch in enumerate(channels):
            await post(store, ch, [entry(ch, 1, 50_000 + i)])
        await store.claim(Claim(hlc(60_000), "us-east", "ud", "durable"), ship(hlc(60_000)))
        await store.set_status(StatusValue("ud", 1, "here", hlc(60_001), "us-east"), ship(hlc(60_001)))

    async def read(store: Store):
        return ([e async for e in store.messages()], await store.user_name("ud"), await store.status("ud"),
                await store.clock_floor(), await store.counts())

    try:
        run(server.url, write)
        before = run(server.url, read)
        server.kill()  # SIGKILL: the AOF must hold everything acknowledged
        server.restart()
        after = run(server.url, read)
    finally:
        server.stop()
    assert after == before and before[1] == "durable" and before[3] == hlc(60_001)
    assert before[4] == (1, 10, 10)
