"""The pure parts of the metrics endpoint: the final status of a call, the RPC histogram, and the HTTP answer."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter

from mlchat.leader.metrics import RPC_BUCKETS, RpcMetrics, _Recorded, final_code, http_response


def test_the_final_code_is_the_one_set_else_what_the_failure_means_else_ok() -> None:
    assert final_code(grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN) is grpc.StatusCode.INVALID_ARGUMENT
    assert final_code(None, grpc.StatusCode.CANCELLED) is grpc.StatusCode.CANCELLED
    assert final_code(None, None) is grpc.StatusCode.OK


def test_get_metrics_answers_the_registry_and_anything_else_404() -> None:
    registry = CollectorRegistry()
    Counter("mlchat_things", "things", registry=registry).inc(3)
    head, _, body = http_response(b"GET /metrics?x=1 HTTP/1.1\r\n", registry).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and b"Content-Type: text/plain; version=" in head
    assert b"mlchat_things_total 3.0" in body and f"Content-Length: {len(body)}".encode() in head
    for line in (b"GET /other HTTP/1.1\r\n", b"POST /metrics HTTP/1.1\r\n", b"\r\n"):
        assert http_response(line, registry).startswith(b"HTTP/1.0 404 Not Found")


def test_a_calls_latency_counts_in_every_bucket_whose_bound_it_is_within_a_bound_included() -> None:
    registry = CollectorRegistry()
    metrics = RpcMetrics(registry)
    recorded = metrics._methods.setdefault("m", _Recorded())
    for seconds in (RPC_BUCKETS[0], RPC_BUCKETS[0] * 1.5, RPC_BUCKETS[-1] * 2):
        recorded.ended("OK", seconds)
    recorded.ended("CANCELLED", 0)
    metrics._methods.setdefault("never called", _Recorded())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in registry.collect() for s in family.samples}
    assert samples[("mlchat_rpc_total", (("code", "OK"), ("method", "m")))] == 3
    assert samples[("mlchat_rpc_total", (("code", "CANCELLED"), ("method", "m")))] == 1
    bucket = {labels[0][1]: value for (name, labels), value in samples.items() if name == "mlchat_rpc_seconds_bucket"}
    assert bucket["0.001"] == 2 and bucket["0.0025"] == 3 and bucket["300.0"] == 3 and bucket["+Inf"] == 4
    assert samples[("mlchat_rpc_seconds_count", (("method", "m"),))] == 4
    assert samples[("mlchat_rpc_seconds_sum", (("method", "m"),))] == sum((RPC_BUCKETS[0], RPC_BUCKETS[0] * 1.5,
                                                                           RPC_BUCKETS[-1] * 2))
    assert not any(dict(labels).get("method") == "never called" for _, labels in samples)
