"""Where the region-wide keys live: unchanged names on one Redis, per-slot copies on a cluster."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from mlchat.leader.keys import (
    CHANNELS,
    COPIES,
    FLOOR,
    SHARDS,
    USERS,
    ClusterLayout,
    SingleLayout,
    single_name,
    slot_tags,
)


def test_every_slot_has_a_short_tag_that_hashes_to_it():
    tags = slot_tags()
    assert len(tags) == 16384 and len(set(tags)) == 16384 and max(map(len, tags)) <= 5
    assert all(key_slot(tag.encode()) == slot for slot, tag in enumerate(tags))


def test_one_redis_keeps_every_name():
    single = SingleLayout()
    for name in (FLOOR, SHARDS, CHANNELS, USERS):
        assert single.copy(name, "c:{general}:ids") == name and single.copies(name, {"x"}) == [name]
    assert single.tag("c:{general}:ids") is None
    assert [single.meta(m) for m in ("vector", "members", "term")] == ["meta:vector", "meta:members", "meta:term"]


@given(st.text(min_size=1, max_size=30))
def test_on_a_cluster_a_copy_shares_the_slot_of_the_keys_it_is_written_beside(name):
    cluster = ClusterLayout()
    for beside in (f"c:{{{name}}}:ids", f"s:{name}", f"n:{name}", f"u:{name}"):
        slot = key_slot(beside.encode())
        tag = cluster.tag(beside)
        for region_wide in (FLOOR, SHARDS, CHANNELS, USERS):
            copy = cluster.copy(region_wide, beside)
            assert key_slot(copy.encode()) == slot and copy in cluster.copies(region_wide, {tag})


def test_on_a_cluster_the_meta_keys_share_one_slot():
    cluster = ClusterLayout()
    names = ("vector", "members", "departed", "listed-by", "term")
    assert len({key_slot(cluster.meta(m).encode()) for m in names}) == 1


def test_every_key_of_either_layout_maps_back_to_its_name_on_one_redis():
    single, cluster, tags = SingleLayout(), ClusterLayout(), {"3f2", "a"}
    for name in (FLOOR, SHARDS, CHANNELS, USERS, "meta:vector", "meta:members", "meta:term", COPIES):
        assert single.every(name, tags) == [name]
        on_cluster = cluster.every(name, tags)
        assert on_cluster and {single_name(key) for key in on_cluster} == {name}
    assert cluster.every(SHARDS, tags) == ["shards:{3f2}", "shards:{a}"] and cluster.every(COPIES, tags) == [COPIES]
    assert cluster.every("meta:vector", tags) == ["meta:{meta}:vector"]
    for key in ("c:{3f2}:z", "y:{users}:1:u", "n:ann", "u:abc", "s:{x}", "px:name:shards"):
        assert single_name(key) == key
