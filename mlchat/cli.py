"""The `mlchat` command."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path

from mlchat import logs
from mlchat.certs import LEAF_DAYS, ensure
from mlchat.errors import MlchatError
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.leader import limits
from mlchat.leader.settings import LeaderSettings
from mlchat.tls import TlsFiles
from mlchat.topology import TopologyError, load_topology


def _region(name: str) -> str:
    if not re.match(limits.REGION_PATTERN, name):
        raise argparse.ArgumentTypeError(f"region {name!r} must match {limits.REGION_PATTERN}")
    return name


def _peer(text: str) -> tuple[str, str]:
    region, sep, address = text.partition("=")
    if not sep or not address:
        raise argparse.ArgumentTypeError(f"--peer {text!r}: expected REGION=HOST:PORT")
    return _region(region), address


def _regions(text: str) -> list[str]:
    return [_region(name) for name in text.split(",") if name]


def _host(text: str) -> tuple[str, str]:
    """`NAME` (every region's certificate) or `REGION=NAME` (that region's)."""
    region, sep, host = text.rpartition("=")
    if not host or (sep and not region):
        raise argparse.ArgumentTypeError(f"--host {text!r}: expected NAME or REGION=NAME")
    return (_region(region) if sep else ""), host


def _endpoint(text: str) -> tuple[str, str]:
    region, sep, address = text.rpartition("=")
    return (_region(region) if sep else ""), address


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `mlchat` parser, and its `leader` subparser (which a topology file gives defaults)."""
    parser = argparse.ArgumentParser(prog="mlchat", description="mlchat: a multi-region chat backend")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels, help="log events from this level up")
    sub = parser.add_subparsers(dest="command", required=True)

    leader = sub.add_parser("leader", help="run one region's leader")
    # Also after `leader`, where the rest of a leader's command line is.
    leader.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="log events from this level up")
    leader.add_argument("--region", required=True, type=_region)
    leader.add_argument("--topology", type=Path, default=None, metavar="FILE",
                        help="cluster topology (TOML): this region's addresses, peers, storage, mode and secret "
                        "come from it; flags given override it (--peer adds to its peers)")
    leader.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT of the client API")
    leader.add_argument("--redis", default=None, help="Redis URL; default: embedded Valkey in --data-dir")
    leader.add_argument("--data-dir", type=Path, default=None, help="default: ./data/REGION")
    leader.add_argument("--secret-file", type=Path, default=None,
                        help="cluster secret (shared by all regions); default: DATA_DIR/cluster-secret")
    leader.add_argument("--token-ttl", type=float, default=24 * 3600, help="token lifetime in seconds")
    leader.add_argument("--peer", action="append", default=[], type=_peer, metavar="REGION=HOST:PORT",
                        help="another region of the cluster (repeat for each)")
    leader.add_argument("--join", default="", metavar="HOST:PORT",
                        help="join a running cluster through any member (at the first start)")
    leader.add_argument("--advertise", default="", metavar="HOST:PORT",
                        help="where other regions reach this one (default: --peer-listen, else --listen)")
    leader.add_argument("--peer-listen", default="", metavar="HOST:PORT",
                        help="serve replication to other regions here only (default: on --listen)")
    leader.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve the client API over TLS with this "
                        "certificate (chain); needs --tls-key and --peer-listen")
    leader.add_argument("--tls-key", type=Path, metavar="PEM")
    leader.add_argument("--peer-cert", type=Path, metavar="PEM", help="mutual TLS between regions: this region's "
                        "certificate (from `mlchat certs`); needs --peer-key, --peer-ca and --peer-listen")
    leader.add_argument("--peer-key", type=Path, metavar="PEM")
    leader.add_argument("--peer-ca", type=Path, metavar="PEM",
                        help="the cluster CA: a peer whose certificate it did not sign is refused")
    leader.add_argument("--routes", type=Path, default=None, metavar="FILE",
                        help="JSON {region: host:port} overriding members' addresses, read at each connection")
    leader.add_argument("--heartbeat-ms", type=int, default=500)
    leader.add_argument("--peer-timeout-ms", type=int, default=3000,
                        help="a peer silent this long is suspect; twice this long, down")
    leader.add_argument("--compare-states-every", type=float, default=3600.0, metavar="SECONDS",
                        help="anti-entropy: also compare states with each peer this often, beside the live "
                             "stream, so that whatever a stream missed arrives all the same (0: never; default: "
                             "3600)")
    leader.add_argument("--outbox-retention", type=int, default=50_000, metavar="N",
                        help="changes kept in the outbox beyond what every peer holds (on Redis Cluster, per copy "
                             "of the outbox): a peer away for longer catches up by comparing states "
                             "(default: 50000)")
    leader.add_argument("--mode", default=Mode.ASYNC, type=Mode, choices=list(Mode),
                        help="replication mode, the same for every region of a cluster (default: async)")
    leader.add_argument("--sync", default=SyncAcks.QUORUM, type=SyncAcks, choices=list(SyncAcks), dest="sync_acks",
                        help="sync mode: a write waits until every region holds it, or a majority (default)")
    leader.add_argument("--write-timeout-ms", type=int, default=5000,
                        help="longest a write waits for other regions (sync, consensus, forwarding to the primary)")
    leader.add_argument("--primary", default=None, type=_region,
                        help="single-leader mode: the first primary (default: the first region by name)")
    leader.add_argument("--user-rate", type=float, default=limits.USER_RATE,
                        help="calls a second each user may make on this leader (0: no limit)")
    leader.add_argument("--user-burst", type=int, default=limits.USER_BURST,
                        help="calls a user may make at once after a quiet spell")
    leader.add_argument("--subscriber-buffer", type=int, default=limits.SUBSCRIBER_BUFFER,
                        help="messages a subscriber may fall behind before it is cut off")
    leader.add_argument("--processes", type=int, default=1, metavar="N",
                        help="processes serving the client API on --listen: this one (the core, which alone talks "
                             "to Redis and to other regions) and N-1 gateways that pass calls to it; N > 1 "
                             "needs --peer-listen (default: 1)")
    leader.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="serve Prometheus metrics at http://LISTEN_HOST:PORT/metrics (default 0: off)")

    gateway = sub.add_parser("gateway", help="a gateway process of a region (a leader run with --processes "
                             "starts its own; not run by hand)")
    gateway.add_argument("--region", required=True, type=_region)
    gateway.add_argument("--listen", required=True, help="HOST:PORT of the region's client API")
    gateway.add_argument("--core", required=True, help="the core process's socket (unix:PATH)")
    gateway.add_argument("--grace", type=float, default=5.0, help="seconds calls in flight get at SIGTERM")
    gateway.add_argument("--subscriber-buffer", type=int, default=limits.SUBSCRIBER_BUFFER)
    gateway.add_argument("--tls-cert", type=Path, metavar="PEM")
    gateway.add_argument("--tls-key", type=Path, metavar="PEM")

    certs = sub.add_parser("certs", help="create a CA and per-region certificates for mutual TLS between regions")
    certs.add_argument("--out", type=Path, required=True, help="directory for ca.pem, REGION.pem and their keys")
    certs.add_argument("--regions", required=True, type=_regions, help="comma-separated, e.g. us-east,eu-west")
    certs.add_argument("--host", action="append", default=[], type=_host, metavar="[REGION=]NAME",
                       help="a DNS name or IP address to add to every certificate, or to one region's "
                       "(repeat; localhost, 127.0.0.1 and ::1 are always there)")
    certs.add_argument("--days", type=int, default=LEAF_DAYS, help="validity of the regions' certificates")
    certs.add_argument("--new-ca", action="store_true",
                       help="replace the CA (every certificate it signed is then issued again)")

    chat = sub.add_parser("chat", help="the interactive terminal client (commands on stdin: /help)")
    chat.add_argument("--user", required=True, help="the username to claim (or to sign in as again)")
    where = chat.add_mutually_exclusive_group()
    where.add_argument("--region", type=_region, help="talk to this region (failing over to the others)")
    where.add_argument("--near", dest="region", action="store_const", const=None,
                       help="talk to the nearest region, by health-check round trip (the default)")
    cluster = chat.add_mutually_exclusive_group(required=True)
    cluster.add_argument("--connect", action="append", type=_endpoint, metavar="[REGION=]HOST:PORT",
                         help="a region of the cluster (repeat for each)")
    cluster.add_argument("--dcsim", type=Path, metavar="RUN_DIR", help="the regions of a 'dcsim up' run")
    chat.add_argument("--at", type=_region, default=None,
                      help="with --dcsim: the region the client sits in (default: the run's first region)")
    chat.add_argument("--key-file", type=Path, default=None,
                      help="the secret that keeps the username yours (default: ~/.config/mlchat/claim-key)")

    for name, what in (("backup", "write a region's whole state to a file, while it serves"),
                       ("restore", "load a backup into an empty region (its leader then catches up from peers)")):
        command = sub.add_parser(name, help=what)
        storage = command.add_mutually_exclusive_group(required=True)
        storage.add_argument("--redis", help="the region's Redis URL")
        storage.add_argument("--data-dir", type=Path, help="the region's --data-dir, for an embedded Valkey")
        if name == "backup":
            command.add_argument("--out", type=Path, required=True, metavar="FILE")
        else:
            command.add_argument("--in", type=Path, required=True, metavar="FILE", dest="src")
    return parser, leader


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a leader's --topology file read in as defaults of its flags."""
    parser, leader = _parser()
    args = parser.parse_args(argv)
    if args.command == "leader" and args.topology is not None:
        try:
            options = load_topology(args.topology).leader_options(args.region)
        except TopologyError as e:
            parser.error(str(e))
        flags = {action.dest for action in leader._actions}
        if missing := sorted(set(options) - flags):
            parser.error(f"{args.topology}: {', '.join(missing)}: this build of mlchat has no such option "
                         "; remove them from the file")
        leader.set_defaults(**options)
        args = parser.parse_args(argv)
    if args.command == "leader":
        if (args.tls_cert is None) != (args.tls_key is None):
            parser.error("--tls-cert and --tls-key go together")
        if len({args.peer_cert is None, args.peer_key is None, args.peer_ca is None}) > 1:
            parser.error("--peer-cert, --peer-key and --peer-ca go together")
    return args


def leader_settings(args: argparse.Namespace) -> LeaderSettings:
    return LeaderSettings(
        region=args.region, listen=args.listen, redis_url=args.redis,
        data_dir=args.data_dir or Path("data") / args.region, secret_file=args.secret_file,
        token_ttl_ms=int(args.token_ttl * 1000), subscriber_buffer=args.subscriber_buffer,
        peers=dict(args.peer), heartbeat_ms=args.heartbeat_ms, peer_timeout_ms=args.peer_timeout_ms,
        outbox_retention=args.outbox_retention, compare_states_every_s=args.compare_states_every,
        join=args.join, advertise=args.advertise, routes_file=args.routes, mode=args.mode,
        sync_acks=args.sync_acks, write_timeout_ms=args.write_timeout_ms, primary=args.primary or "",
        user_rate=args.user_rate, user_burst=args.user_burst, peer_listen=args.peer_listen,
        tls=TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None,
        peer_tls=TlsFiles(args.peer_cert, args.peer_key, args.peer_ca) if args.peer_cert else None,
        metrics_port=args.metrics_port, processes=args.processes)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logs.configure(args.log_level, getattr(args, "region", None) or "-")
    if args.command == "certs":
        hosts: dict[str, list[str]] = {}
        for region, host in args.host:
            hosts.setdefault(region, []).append(host)
        for line in ensure(args.out, args.regions, hosts, renew_ca=args.new_ca, days=args.days) or ["up to date"]:
            print(line)
    elif args.command == "leader":
        from mlchat.leader.server import serve

        try:
            settings = leader_settings(args)
        except ValueError as e:
            raise SystemExit(f"mlchat leader: {e}") from None
        asyncio.run(serve(settings))
    elif args.command == "gateway":
        from mlchat.leader import gateway

        asyncio.run(gateway.serve(args.region, args.listen, args.core,
                                  TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None, args.grace,
                                  args.subscriber_buffer))
    elif args.command == "chat":
        from mlchat.chat import shell

        try:
            endpoints = args.connect or list(shell.dcsim_endpoints(args.dcsim, args.at).items())
        except MlchatError as e:
            raise SystemExit(f"mlchat chat: {e}") from None
        sys.exit(shell.main(args.user, endpoints, args.region, args.key_file or shell.default_key_file()))
    else:
        import redis

        try:
            _backup_or_restore(args)
        except (MlchatError, FileNotFoundError, redis.RedisError, redis.exceptions.RedisClusterException) as e:
            # the URL is not shown: it holds a password
            raise SystemExit(f"mlchat {args.command}: {e}") from None


def _backup_or_restore(args: argparse.Namespace) -> None:
    import redis

    from mlchat.leader import backup
    from mlchat.leader.valkey import EmbeddedValkey, running_url

    if args.command == "backup":
        with backup.connect(args.redis or running_url(args.data_dir)) as client:
            count = backup.take(client, args.out)
        print(f"backed up {count} keys to {args.out}")
        return
    if args.redis:
        with backup.connect(args.redis) as client:
            count = backup.restore(client, args.src)
    else:
        # An embedded region: load its Valkey (AOF on) now; the leader started later finds it there.
        home = args.data_dir / "valkey"
        if home.exists() and any(home.iterdir()):
            raise backup.BackupError(f"{home} holds a Valkey's files already: restore into a fresh --data-dir")
        server = EmbeddedValkey(home)
        server.start()
        try:
            with redis.Redis.from_url(server.url) as client:
                count = backup.restore(client, args.src)
        finally:
            server.stop()
    print(f"restored {count} keys from {args.src}")


if __name__ == "__main__":
    main()
