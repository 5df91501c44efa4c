"""Leader settings, built by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlchat.crdt.replica import HOUR_MS
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.leader import limits
from mlchat.tls import TlsFiles

PACE_MS, ACK_DELAY_MS = 8, 20  # see `LeaderSettings.paced`


@dataclass(frozen=True)
class LeaderSettings:
    region: str
    listen: str  # host:port for the client API
    data_dir: Path
    redis_url: str | None = None  # None: start an embedded Valkey in data_dir
    secret_file: Path | None = None  # cluster secret; None: data_dir/cluster-secret, created if absent
    mode: Mode = Mode.ASYNC  # the same in every region of a cluster (see mlchat.geo.modes)
    sync_acks: SyncAcks = SyncAcks.QUORUM  # sync mode: a write waits for every region, or a majority
    write_timeout_ms: int = 5000  # longest a write waits for other regions (sync, consensus, forwarding)
    primary: str = ""  # single-leader mode: the first primary; default, the first region by name
    token_ttl_ms: int = 24 * 3600 * 1000
    bucket_ms: int = HOUR_MS  # width of a message-log shard; the same in every region
    hot_shards: int = 64  # pycrdt shards kept in memory (least recently used leave)
    compact_after: int = 2000  # pycrdt updates in a shard's list, at least, before it is snapshotted again
    user_rate: float = limits.USER_RATE  # calls a second per user on this leader (0: no limit)
    user_burst: int = limits.USER_BURST
    subscriber_buffer: int = limits.SUBSCRIBER_BUFFER
    stream_retention: int = limits.SUBSCRIBE_RETENTION
    grace_s: float = 5.0  # SIGTERM: how long in-flight calls get to finish
    tls: TlsFiles | None = None  # the client API serves TLS with this certificate; None: plaintext
    # host:port where other regions reach the replication service; "" serves it on `listen`. A port
    # of its own lets peers be held to mutual TLS while clients present no certificate.
    peer_listen: str = ""
    peer_tls: TlsFiles | None = None  # mutual TLS between regions (needs peer_listen and a CA); None: plaintext
    peers: dict[str, str] = field(default_factory=dict)  # region -> host:port of the other regions
    advertise: str = ""  # where other regions reach this one; default: peer_listen, else listen
    join: str = ""  # host:port of any member, to join a running cluster at first start
    routes_file: Path | None = None  # JSON region -> host:port overriding members' addresses
    heartbeat_ms: int = 500  # a replication stream with nothing to send sends this often
    peer_timeout_ms: int = 3000  # a peer silent this long is suspect, twice this long down
    metrics_port: int = 0  # Prometheus metrics over HTTP on the listen host at this port; 0: none
    feed_buffer: int = 10_000  # changes a peer may fall behind before its stream is cut (it reconnects)
    # Outbox entries kept beyond what every member holds: a peer away longer than they last resumes by
    # comparing states instead.
    outbox_retention: int = 50_000
    # Anti-entropy: how often a region also compares states with each peer, beside the live stream (0: never).
    compare_states_every_s: float = 3600.0
    # Processes serving the client API on `listen`: the core (this process) and processes - 1 gateways.
    processes: int = 1

    def __post_init__(self) -> None:
        if self.peer_tls is not None and (self.peer_tls.ca is None or not self.peer_listen):
            raise ValueError("mutual TLS between regions needs the cluster CA and a peer port of its own "
                             "(--peer-ca, --peer-listen)")
        if self.processes < 1:
            raise ValueError(f"--processes {self.processes}: a region runs at least one process")
        if self.processes > 1 and (not self.peer_listen or self.listen.endswith(":0")):
            # Gateways serve clients only; other regions must reach the core, on a port of its own.
            raise ValueError("several processes (--processes) share the client API's port: give it a port "
                             "number (not 0), and other regions a port of their own (--peer-listen)")
        if self.tls is not None and not self.peer_listen:
            # Peers would have to dial the client API's TLS port with nothing to prove who they are.
            raise ValueError("a client API over TLS needs a peer port of its own (--peer-listen)")

    @property
    def relay_delay_ms(self) -> int:
        """How long a change applied from one peer waits before it is relayed to another that may have it
        by the direct path (`mlchat.geo.relay`): peers tell their vectors at least every heartbeat, so two
        suffice. In single-leader mode relays go at once: a region's vote waits on hearing the primary's
        stamps by any path, and the failover timing counts on that."""
        return 0 if self.mode is Mode.SINGLE_LEADER else 2 * self.heartbeat_ms

    @property
    def paced(self) -> bool:
        """Whether replication streams trade a few milliseconds for fewer, larger messages: a stream sends at
        most one message every PACE_MS and holds acknowledgements up to ACK_DELAY_MS for a change to ride
        with (`mlchat.geo.relay`), and a receiver applies what arrived while it was applying as one change.
        Not where writes wait on other regions' copies (sync, single-leader): each one's latency is what
        the mode is about."""
        return self.mode not in (Mode.SYNC, Mode.SINGLE_LEADER)

    @property
    def pace_ms(self) -> tuple[int, int]:
        """(pace, acknowledgement delay) of a stream to a peer: see `paced`."""
        return (PACE_MS, ACK_DELAY_MS) if self.paced else (0, 0)

    @property
    def peer_address(self) -> str:
        """Where other regions reach this one."""
        return self.advertise or self.peer_listen or self.listen
