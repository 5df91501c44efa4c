"""Prometheus metrics of one leader, on a registry of its own, served over HTTP (`--metrics-port`).

RPCs are measured as they finish: method, final status code, latency. Each servicer's methods are wrapped
once, where they are registered (a server interceptor would run again for every call).
Everything else is read from the live objects when Prometheus scrapes (peer links, stream queues, hot
shards, subscribers, and the counts those objects keep), so no other part of the leader knows
about Prometheus, and a gauge never goes stale.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mlchat.geo.membership import PeerState
from mlchat.geo.modes import describe

if TYPE_CHECKING:
    from mlchat.leader.gateways import Gateways, GatewayServicer
    from mlchat.leader.region import Region
    from mlchat.leader.replication import ReplicationServicer, Replicator

# Seconds; Subscribe and Replicate streams land in the last buckets, every other call well below.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 300.0)
CONFLICT_KINDS = ("status", "membership", "claim", "channel")


def final_code(set_code: grpc.StatusCode | None, failure: grpc.StatusCode | None) -> grpc.StatusCode:
    """The status a call ended with: the one the handler set (an abort sets it), else what its
    failure means to gRPC (an exception is UNKNOWN, a cancelled call CANCELLED), else OK."""
    return set_code or failure or grpc.StatusCode.OK


class RpcMetrics(Collector):
    """Counts every call by method and final status code, and times it. The counts are plain numbers, read
    when Prometheus scrapes (on the event loop, between two steps of the leader): a call costs a few
    additions, where prometheus_client's own series take a lock for each, about 10 us a call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[str, _Recorded] = {}
        registry.register(self)

    def measured(self, service: ServiceDescriptor, servicer: Any) -> SimpleNamespace:
        """What to register in place of `servicer`: its methods of `service`, each measured."""
        return SimpleNamespace(**{m.name: self._measured(f"{service.full_name}/{m.name}", getattr(servicer, m.name))
                                  for m in service.methods})

    def _measured(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        recorded = self._methods.setdefault(method, _Recorded())
        # Streaming handlers either yield their responses or write them (health's Watch): keep the shape.
        if inspect.isasyncgenfunction(behavior):
            async def streamed(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with _Call(recorded, context):
                    async for response in behavior(request, context):
                        yield response
            return streamed

        async def awaited(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Call(recorded, context):
                return await behavior(request, context)
        return awaited

    def collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily("mlchat_rpc", "RPCs finished, by method and final status code",
                                    labels=["method", "code"])
        seconds = HistogramMetricFamily("mlchat_rpc_seconds", "RPC latency (streams: their whole life), by method",
                                        labels=["method"])
        for method, recorded in self._methods.items():
            if recorded.calls:  # a method never called has no series
                for code, count in recorded.calls.items():
                    calls.add_metric([method, code], count)
                seconds.add_metric([method], recorded.buckets(), recorded.seconds)
        return [calls, seconds]


class _Recorded:
    """One method's calls: how many ended with each status code, and a histogram of their latency."""

    __slots__ = ("calls", "in_bucket", "seconds")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.in_bucket = [0] * (len(RPC_BUCKETS) + 1)  # calls by the first bound they are within; the last: none
        self.seconds = 0.0

    def ended(self, code: str, seconds: float) -> None:
        self.calls[code] = self.calls.get(code, 0) + 1
        self.in_bucket[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """The histogram's buckets as Prometheus counts them: each with every call within its bound."""
        return [(floatToGoString(bound), count)
                for bound, count in zip((*RPC_BUCKETS, math.inf), itertools.accumulate(self.in_bucket), strict=True)]


class _Call:
    """A call being measured (a context manager: a class, not a generator, as it runs on every call)."""

    __slots__ = ("recorded", "context", "started")

    def __init__(self, recorded: _Recorded, context: grpc.aio.ServicerContext) -> None:
        self.recorded, self.context, self.started = recorded, context, time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        failure = None
        if kind is not None and issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            failure = grpc.StatusCode.CANCELLED  # the client went away, or the server stops
        elif kind is not None and issubclass(kind, Exception):
            failure = grpc.StatusCode.UNKNOWN
        self.recorded.ended(final_code(self.context.code(), failure).name, time.perf_counter() - self.started)


class LeaderCollector(Collector):
    """Gauges and counters read from the live leader at scrape time."""

    def __init__(self, region: Region, replicator: Replicator, replication: ReplicationServicer) -> None:
        self.region = region
        self.replicator = replicator
        self.replication = replication

    def collect(self) -> Iterable[Metric]:
        region, settings = self.region, self.region.settings
        info = GaugeMetricFamily("mlchat_region_info", "This leader's region and replication mode",
                                 labels=["region", "mode"])
        info.add_metric([region.name, describe(settings.mode, settings.sync_acks)], 1)
        yield info

        now, timeout_s = time.monotonic(), settings.peer_timeout_ms / 1000
        links, queues = self.replicator.links, self.replication.queues
        up = GaugeMetricFamily("mlchat_peer_up", "1 if the stream from the peer is up (not suspect, not down)",
                               labels=["peer"])
        lag = GaugeMetricFamily("mlchat_replication_lag_ms", "Commit in the peer to applied here, for the "
                                "latest change from the peer that carried messages", labels=["peer"])
        applied = CounterMetricFamily("mlchat_deltas_applied", "Deltas with changes received from the peer "
                                      "and applied here (by this process)", labels=["peer"])
        for peer, link in links.items():
            up.add_metric([peer], float(link.state(now, timeout_s) is PeerState.UP))
            lag.add_metric([peer], link.lag_ms)
            applied.add_metric([peer], link.applied)
        backlog = GaugeMetricFamily("mlchat_replication_backlog", "Changes queued here for the peer, not yet "
                                    "sent on its stream", labels=["peer"])
        for peer in sorted({*links, *queues}):
            backlog.add_metric([peer], max((changes.pending for changes, _ in queues.get(peer, ())), default=0))
        catch_ups = CounterMetricFamily("mlchat_catch_ups", "Streams the peer opened here, by how they caught up: "
                                        "from the outbox after the peer's cursor, or by comparing states",
                                        labels=["peer", "kind"])
        for (peer, kind), count in sorted(self.replication.catch_ups.items()):
            catch_ups.add_metric([peer, kind], count)
        catch_up_seconds = CounterMetricFamily("mlchat_catch_up_seconds", "Time those streams took from the "
                                               "peer's request to the last part of its catch-up sent",
                                               labels=["peer", "kind"])
        for (peer, kind), seconds in sorted(self.replication.catch_up_seconds.items()):
            catch_up_seconds.add_metric([peer, kind], seconds)
        outbox = GaugeMetricFamily("mlchat_outbox_entries", "Changes kept in this region's outbox for peers "
                                   "that resume, at its latest trim", value=self.replicator.outbox_entries)
        sent = CounterMetricFamily("mlchat_deltas_sent", "Deltas with changes sent to the peer on its stream "
                                   "(by this process)", labels=["peer"])
        for peer, count in sorted(self.replication.sent.items()):
            sent.add_metric([peer], count)
        relays = CounterMetricFamily("mlchat_relays", "Changes from other regions held back for the peer (it "
                                     "may have them by the direct path), by outcome: sent to it, or dropped "
                                     "because it said it held them", labels=["peer", "outcome"])
        for (peer, outcome), count in sorted(self.replication.relays.items()):
            relays.add_metric([peer, outcome], count)
        held = GaugeMetricFamily("mlchat_relays_held", "Changes held back for the peer now", labels=["peer"])
        for peer in sorted({*links, *queues}):
            held.add_metric([peer], sum(relays.held for _, relays in queues.get(peer, ())))
        yield from (up, lag, applied, backlog, sent, relays, held, catch_ups, catch_up_seconds, outbox)

        conflicts = CounterMetricFamily("mlchat_conflicts", "Values from peers that met a different one held "
                                        "here: a status or membership that lost, a claim or private channel "
                                        "record on a name another user holds", labels=["kind"])
        for kind in CONFLICT_KINDS:
            conflicts.add_metric([kind], region.conflicts[kind])
        yield conflicts

        yield CounterMetricFamily("mlchat_post_commits", "Batches of posts committed, each in one Redis round trip "
                                  "(posts per commit: PostMessage calls / commits)", value=region.commits)
        yield GaugeMetricFamily("mlchat_subscribers", "Open Subscribe streams (on the gateways too)",
                                value=region.subscriber_count())
        sizes = region.hot_shard_sizes()
        yield GaugeMetricFamily("mlchat_hot_shards", "Message-log shards held in memory", value=len(sizes))
        yield GaugeMetricFamily("mlchat_hot_shard_bytes", "Memory of the hot shards, estimated as the bytes Redis "
                                "holds of them (snapshot and updates since)", value=sum(sizes))


class GatewaysCollector(Collector):
    """The region's gateway processes, as their core sees them."""

    def __init__(self, gateways: Gateways, passed: GatewayServicer) -> None:
        self.gateways = gateways
        self.passed = passed

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("mlchat_gateways", "Gateway processes running beside this core (--processes - 1 "
                                "when all are up)", value=self.gateways.running())
        yield CounterMetricFamily("mlchat_gateway_restarts", "Gateway processes that died and were started again",
                                  value=self.gateways.restarts)
        yield GaugeMetricFamily("mlchat_gateway_feeds", "Channel feeds open to gateways, each shared by a "
                                "gateway's subscribers of the channel", value=len(self.passed.region.fed))
        yield CounterMetricFamily("mlchat_gateway_calls", "Unary calls gateways passed to this core in batches "
                                  "(also counted in mlchat_rpc_total by method)", value=self.passed.calls)
        yield CounterMetricFamily("mlchat_gateway_batches", "Messages those calls came in (calls per batch: "
                                  "calls / batches)", value=self.passed.batches)


def metrics_registry(region: Region, replicator: Replicator,
                     replication: ReplicationServicer) -> tuple[CollectorRegistry, RpcMetrics]:
    """A registry of this leader's metrics, and what feeds its RPC metrics."""
    # The leader process serves one registry, this one: its counters need no `_created` series.
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(LeaderCollector(region, replicator, replication))
    return registry, RpcMetrics(registry)


def http_response(request_line: bytes, registry: CollectorRegistry) -> bytes:
    """The HTTP/1.0 answer to a request line: the metrics for `GET /metrics`, else 404."""
    parts = request_line.split()
    if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
        status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    else:
        status, content_type, body = "404 Not Found", "text/plain; charset=utf-8", b"metrics are at GET /metrics\n"
    head = f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> asyncio.Server:
    """Serve the registry over HTTP on the event loop (so a scrape reads the live objects between
    two steps of the leader, never in the middle of one)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request_line = await reader.readline()
                while (await reader.readline()).strip():  # headers: none matters
                    pass
                writer.write(http_response(request_line, registry))
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # a scraper that went away or never finished its request
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
