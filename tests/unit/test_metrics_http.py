"""The pure parts of the metrics endpoint: the final status of a call, and the HTTP answer."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter

from mlchat.leader.metrics import final_code, http_response


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
