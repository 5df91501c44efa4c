"""The leader process: storage, the Region, and the gRPC server, started and stopped as one.

SIGTERM or SIGINT shuts down gracefully: health turns NOT_SERVING, subscriptions end cleanly, calls
in flight get `grace_s` to finish, then Redis (and an embedded Valkey) stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from mlchat import tls
from mlchat.geo.modes import Mode
from mlchat.leader import limits
from mlchat.leader.consensus import Consensus
from mlchat.leader.gateways import Gateways, GatewayServicer, unary_methods
from mlchat.leader.leadership import Leadership
from mlchat.leader.metrics import GatewaysCollector, RpcMetrics, metrics_registry, serve_metrics
from mlchat.leader.process import on_termination
from mlchat.leader.region import Region
from mlchat.leader.replication import ReplicationServicer, Replicator
from mlchat.leader.servicer import Authenticator, ChatServicer, ClusterServicer, wall_ms
from mlchat.leader.settings import LeaderSettings
from mlchat.leader.sockdir import private_socket_dir
from mlchat.leader.store import Store
from mlchat.leader.tokens import TokenSigner
from mlchat.leader.valkey import EmbeddedValkey
from mlchat.leader.writes import Writes
from mlchat.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)

log = logging.getLogger(__name__)
SERVICES = ("mlchat.v1.ChatService", "mlchat.v1.ClusterService", "mlchat.v1.ReplicationService")


def load_secret(path: Path) -> bytes:
    """The cluster secret from `path`, created (random, mode 600) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    secret = path.read_text().strip().encode()
    if len(secret) < 16:
        raise SystemExit(f"cluster secret in {path} is shorter than 16 bytes")
    return secret


CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelUrl:
    """`redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[?sentinel_password=P]`: the
    Sentinels to ask, the name they monitor the region's primary under, the password of the Redis
    servers, and that of the Sentinels (if they require one)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME.removesuffix("://"):
            raise ValueError(f"not a {SENTINEL_SCHEME} URL")
        auth, _, hosts = parts.netloc.rpartition("@")
        password = urllib.parse.unquote(auth.partition(":")[2]) if auth else None
        sentinels = []
        for host_port in hosts.split(","):
            host, sep, port = host_port.rpartition(":")
            if not (sep and host and port.isdigit()):
                raise ValueError(f"{SENTINEL_SCHEME} URL: {host_port!r} is not HOST:PORT of a Sentinel")
            sentinels.append((host.strip("[]"), int(port)))
        service = parts.path.strip("/")
        if not service:
            raise ValueError(f"{SENTINEL_SCHEME} URL names no service: add /NAME, as in `sentinel monitor NAME ...`")
        query = urllib.parse.parse_qs(parts.query)
        return cls(tuple(sentinels), service, password or None, (query.get("sentinel_password") or [None])[0])


def redis_client(url: str) -> aioredis.Redis | RedisCluster:
    """A client for `url`: `redis+cluster://[:password@]host:port` (any one node) is a Redis Cluster,
    which the client discovers from that node; `redis+sentinel://...` (see `SentinelUrl`) the primary
    that the Sentinels name, found again after a failover; `redis://`, `rediss://` and `unix://` one
    server."""
    # One quick retry on a fresh connection rides over a Redis restart; a call that still fails
    # answers UNAVAILABLE at once, so the client can retry or go elsewhere.
    retry = Retry(ExponentialBackoff(cap=0.1, base=0.01), 1)
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):], retry=retry, health_check_interval=5)
    if url.startswith(SENTINEL_SCHEME):
        where = SentinelUrl.parse(url)
        sentinel = Sentinel(where.sentinels, sentinel_kwargs={"password": where.sentinel_password,
                                                              "socket_timeout": 1.0})
        # Each new connection asks the Sentinels for the primary: after a failover, the promoted replica.
        return sentinel.master_for(where.service, password=where.password, retry=retry,
                                   retry_on_error=[ConnectionError, TimeoutError], health_check_interval=5)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=[ConnectionError, TimeoutError],
                                   health_check_interval=5)


async def serve(settings: LeaderSettings) -> None:
    try:  # before anything starts: a leader with bad TLS material must not half-start
        client_tls, peer_tls = (tls.load(f) if f else None for f in (settings.tls, settings.peer_tls))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    with _held(settings.data_dir):
        await _on_storage(settings, client_tls, peer_tls)


@contextlib.contextmanager
def _held(data_dir: Path) -> Iterator[None]:
    """The data directory, for this leader alone while it runs: a second leader on it would run a second Valkey
    on the same files, and take over the first one's sockets. The kernel lets go of the lock when the process
    ends, however it ends, so a leader killed with SIGKILL does not keep its successor out."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "leader.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SystemExit(f"--data-dir {data_dir} is in use by another leader (pid {lock.read().strip() or '?'}): "
                             "each leader needs a data directory of its own") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


async def _on_storage(settings: LeaderSettings, client_tls: tls.TlsMaterial | None,
                      peer_tls: tls.TlsMaterial | None) -> None:
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedValkey(settings.data_dir / "valkey")
        # Started from the main thread, before serving: the child's parent-death signal is tied
        # to the thread that forks it, and a worker thread may exit at any time.
        embedded.start()
        url = embedded.url
    try:
        client = redis_client(url)
    except ValueError as e:  # the URL is not shown: it may hold a password
        raise SystemExit(f"--redis: {e}") from None
    store = Store(client)
    supervisor = asyncio.create_task(_supervise(embedded)) if embedded is not None else None
    # With gateways, the core's socket for them, in a short directory of its own (`mlchat.leader.sockdir`).
    sockets = (private_socket_dir("mlg-", settings.data_dir) if settings.processes > 1
               else contextlib.nullcontext())
    try:
        with sockets as socket_dir:
            await _serve(settings, store, client_tls, peer_tls, Path(socket_dir) if socket_dir else None)
    finally:
        if supervisor is not None:
            supervisor.cancel()
        await store.close()
        if embedded is not None:
            embedded.stop()


async def _supervise(embedded: EmbeddedValkey) -> None:
    """Start the embedded Valkey again whenever it dies (calls answer UNAVAILABLE meanwhile). It runs
    on the main thread, as the first start did: the child's parent-death signal follows that thread."""
    while True:
        await asyncio.sleep(0.2)
        if not embedded.alive():
            log.warning("embedded Valkey died: starting it again")
            try:
                embedded.restart()
            except (RuntimeError, TimeoutError):
                log.exception("embedded Valkey did not start again; retrying")


async def _serve(settings: LeaderSettings, store: Store, client_tls: tls.TlsMaterial | None,
                 peer_tls: tls.TlsMaterial | None, socket_dir: Path | None) -> None:
    terminated = on_termination()
    signer = TokenSigner(load_secret(settings.secret_file or settings.data_dir / "cluster-secret"),
                         settings.token_ttl_ms)
    # A fresh pycrdt client id per process: two live docs sharing one would diverge.
    region = Region(settings, store, client_id=secrets.randbits(52) + 1, now_ms=wall_ms)
    await region.start()
    auth = Authenticator(signer, limits.RateLimiter(settings.user_rate, settings.user_burst))

    replicator = Replicator(region, signer, wall_ms, tls.peer_credentials(peer_tls) if peer_tls else None)
    rng = random.Random()
    consensus = Consensus(region, replicator.stub, replicator.metadata, rng, wall_ms)
    replication_servicer = ReplicationServicer(region, auth, replicator, consensus)
    registry, rpc_metrics = metrics_registry(region, replicator, replication_servicer)
    leadership = (Leadership(region, replicator, consensus, wall_ms, rng)
                  if settings.mode is Mode.SINGLE_LEADER else None)
    writes = Writes(region, replicator, consensus, leadership)
    health_servicer = health.aio.HealthServicer()
    # grpc's servicer says the server is SERVING from the start: not until it is (gateways and all, below).
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    chat = Service(chat_pb2.DESCRIPTOR.services_by_name["ChatService"], chat_pb2_grpc.add_ChatServiceServicer_to_server,
                   ChatServicer(region, auth, writes))
    cluster = Service(cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"],
                      cluster_pb2_grpc.add_ClusterServiceServicer_to_server,
                      ClusterServicer(region, auth, replicator.peer_status, lambda: replicator.term()))
    replication = Service(replication_pb2.DESCRIPTOR.services_by_name["ReplicationService"],
                          replication_pb2_grpc.add_ReplicationServiceServicer_to_server, replication_servicer)
    health_service = Service(health_pb2.DESCRIPTOR.services_by_name["Health"],
                             health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
    # With gateways, every process of the region listens on its address (SO_REUSEPORT).
    gateways = Gateways(settings, settings.processes - 1, socket_dir) if socket_dir else None
    shared = gateways is not None
    if settings.peer_listen:
        # Replication only on the peer port: were it on the client port too, mutual TLS would guard nothing.
        # Chat there too, for the users' writes a region forwards to the primary (single-leader mode).
        servers = [_server(settings.listen, client_tls, rpc_metrics, health_service, chat, cluster, shared=shared),
                   _server(settings.peer_listen, peer_tls, rpc_metrics, health_service, replication, chat)]
    else:
        servers = [_server(settings.listen, None, rpc_metrics, health_service, chat, cluster, replication,
                           shared=shared)]
    if gateways is not None:
        passed = GatewayServicer(unary_methods(*((s.descriptor, rpc_metrics.measured(s.descriptor, s.servicer))
                                                 for s in (chat, cluster))), chat.servicer)
        registry.register(GatewaysCollector(gateways, passed))
        servers.append(_server(gateways.core_address, None, rpc_metrics, health_service, chat, cluster,
                               Service(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
                                       gateway_pb2_grpc.add_GatewayServiceServicer_to_server, passed),
                               internal=True))
    metrics_server = None
    if settings.metrics_port:
        host = settings.listen.rpartition(":")[0].strip("[]")
        try:
            metrics_server = await serve_metrics(registry, host, settings.metrics_port)
        except OSError as e:
            raise SystemExit(f"cannot serve metrics on {host}:{settings.metrics_port}: {e.strerror}") from None
        log.info("metrics at http://%s:%s/metrics", host, settings.metrics_port)
    if leadership is not None:  # before serving: no write is taken, nor vote given, without a term
        await leadership.start()
    for server in servers:
        await server.start()
    if gateways is not None:  # before the region is healthy: it serves on all its processes then
        await gateways.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await replicator.start()
    where = settings.listen + (f", regions on {settings.peer_listen}" if settings.peer_listen else "")
    if gateways is not None:
        where += f" (with {gateways.count} gateway process{'es' if gateways.count > 1 else ''})"
    log.info("leader serving on %s (mode %s, client TLS %s, peer TLS %s, peers %s)", where,
             settings.mode, "on" if settings.tls else "off", "mutual" if settings.peer_tls else "off",
             ", ".join(region.members) or "none")
    print(f"mlchat leader {settings.region} serving on {where}", flush=True)

    await terminated.wait()

    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    region.fanout.close_all()
    region.feed.close_all()
    if gateways is not None:  # while the core still serves them: their calls in flight get the grace time
        await gateways.stop(settings.grace_s + 5)
    if leadership is not None:
        await leadership.stop()
    # Calls in flight may still forward through the replicator's channels.
    await asyncio.gather(*(server.stop(settings.grace_s) for server in servers))
    await replicator.stop()
    if metrics_server is not None:
        metrics_server.close()
        await metrics_server.wait_closed()
    log.info("stopped")


@dataclass(frozen=True)
class Service:
    descriptor: ServiceDescriptor
    add_to_server: Callable[[Any, grpc.aio.Server], None]  # the generated add_*Servicer_to_server
    servicer: Any


def _server(address: str, material: tls.TlsMaterial | None, rpc_metrics: RpcMetrics, *services: Service,
            shared: bool = False, internal: bool = False) -> grpc.aio.Server:
    """A gRPC server on `address` (TLS if given material; `shared` with the region's gateways) with these
    services (health among them) and reflection; every call measured. An `internal` one, for the region's
    gateways, has no limit of its own on calls at once: each gateway holds its clients to it."""
    server = grpc.aio.server(options=limits.server_options(shared),
                             maximum_concurrent_rpcs=None if internal else limits.MAX_CONCURRENT_RPCS)
    handlers = _GenericHandlersOnly(server)
    for service in services:
        service.add_to_server(rpc_metrics.measured(service.descriptor, service.servicer), handlers)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer([*(s.descriptor.full_name for s in services), reflection.SERVICE_NAME]),
        handlers)
    tls.listen(server, address, material)
    return server


class _GenericHandlersOnly:
    """A server as the generated `add_*Servicer_to_server` functions see it: it takes their service's generic
    handler, and leaves out the registration of each method. For every registered method, grpc.aio's server
    keeps a call requested from gRPC core, and for every call it waits on all of them again (one future each):
    with this leader's 20-odd methods, a few percent of the calls a second it serves. A generic handler is one."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass
