"""A leader's Prometheus metrics, scraped over HTTP from a real leader process."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.error import HTTPError
from urllib.request import urlopen

import grpc
import pytest
import redis
from support import sample, wait_until

from dcsim.prometheus import scrape
from mlchat.geo.client import ChatClient
from mlchat.leader.process import LeaderProcess, free_port

CHAT = "mlchat.v1.ChatService/"


@pytest.fixture(scope="module")
def metered(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LeaderProcess, str]]:
    redis.Redis.from_url(redis_url).flushall()
    port = free_port()
    with LeaderProcess("us-east", tmp_path_factory.mktemp("metered"), redis_url=redis_url,
                       extra_args=("--metrics-port", str(port))) as proc:
        yield proc, f"http://127.0.0.1:{port}/metrics"


def chat_calls(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == "mlchat_rpc_total" and dict(labels)["method"].startswith(CHAT))


def test_rpcs_are_counted_by_method_and_code_and_timed(metered: tuple[LeaderProcess, str], unique: str) -> None:
    leader, url = metered
    before = scrape(url)
    with ChatClient(leader.address) as c:
        c.claim(unique, "metrics-claim-key-0001")
        with pytest.raises(grpc.RpcError) as refused:
            c.post("Not A Channel", "hello", "m1")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An abort sends its status before the handler has unwound, so the count may trail the answer a little.
    wait_until(lambda: chat_calls(scrape(url)) - chat_calls(before) >= 2, what="both calls counted")
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("mlchat_rpc_total", method=CHAT + "ClaimUsername", code="OK") == 1
    assert moved("mlchat_rpc_total", method=CHAT + "PostMessage", code="INVALID_ARGUMENT") == 1
    assert moved("mlchat_rpc_total", method=CHAT + "PostMessage", code="OK") == 0
    assert chat_calls(after) - chat_calls(before) == 2  # and nothing else was counted
    for method in ("ClaimUsername", "PostMessage"):
        assert moved("mlchat_rpc_seconds_count", method=CHAT + method) == 1
        assert moved("mlchat_rpc_seconds_bucket", method=CHAT + method, le="+Inf") == 1
        assert moved("mlchat_rpc_seconds_sum", method=CHAT + method) > 0


def test_subscribers_gauge_follows_open_streams(metered: tuple[LeaderProcess, str], unique: str) -> None:
    leader, url = metered
    with ChatClient(leader.address) as c:
        c.claim(unique, "metrics-claim-key-0002")
        assert sample(scrape(url), "mlchat_subscribers") == 0
        stream = c.subscribe(unique)
        wait_until(lambda: sample(scrape(url), "mlchat_subscribers") == 1, what="the subscriber counted")
        c.post(unique, "to the subscriber", "m1")
        assert next(stream).message.body == "to the subscriber"
        assert sample(scrape(url), "mlchat_hot_shards") >= 1
        assert sample(scrape(url), "mlchat_hot_shard_bytes") > len("to the subscriber")
        stream.cancel()
        wait_until(lambda: sample(scrape(url), "mlchat_subscribers") == 0, what="the subscriber gone")
    wait_until(lambda: sample(scrape(url), "mlchat_rpc_total", method=CHAT + "Subscribe", code="CANCELLED") == 1,
               what="the cancelled stream counted")


def test_region_info_and_nothing_but_metrics(metered: tuple[LeaderProcess, str]) -> None:
    _, url = metered
    samples = scrape(url)
    assert sample(samples, "mlchat_region_info", region="us-east", mode="async") == 1
    assert {name for name, _ in samples} >= {"mlchat_subscribers", "mlchat_hot_shards", "mlchat_hot_shard_bytes"}
    assert {dict(labels)["kind"] for name, labels in samples if name == "mlchat_conflicts_total"} == {
        "status", "membership", "claim", "channel"}
    with pytest.raises(HTTPError) as missing:
        urlopen(url.replace("/metrics", "/other"), timeout=5)
    missing.value.close()
    assert missing.value.code == 404
