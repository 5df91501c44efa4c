"""The `mlchat` command."""

from __future__ import annotations

import argparse
import asyncio
import re
from pathlib import Path

from mlchat import logs
from mlchat.geo.modes import Mode, SyncAcks
from mlchat.leader import limits
from mlchat.leader.settings import LeaderSettings


def _region(name: str) -> str:
    if not re.match(limits.REGION_PATTERN, name):
        raise argparse.ArgumentTypeError(f"region {name!r} must match {limits.REGION_PATTERN}")
    return name


def _peer(text: str) -> tuple[str, str]:
    region, sep, address = text.partition("=")
    if not sep or not address:
        raise argparse.ArgumentTypeError(f"--peer {text!r}: expected REGION=HOST:PORT")
    return _region(region), address


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlchat", description="mlchat: a multi-region chat backend")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", default="INFO", choices=levels, help="log events from this level up")
    sub = parser.add_subparsers(dest="command", required=True)

    leader = sub.add_parser("leader", help="run one region's leader")
    # Also after `leader`, where the rest of a leader's command line is.
    leader.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels, help="log events from this level up")
    leader.add_argument("--region", required=True, type=_region)
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
                        help="where other regions reach this one (default: --listen)")
    leader.add_argument("--routes", type=Path, default=None, metavar="FILE",
                        help="JSON {region: host:port} overriding members' addresses, read at each connection")
    leader.add_argument("--heartbeat-ms", type=int, default=500)
    leader.add_argument("--peer-timeout-ms", type=int, default=3000,
                        help="a peer silent this long is suspect; twice this long, down")
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
    leader.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="serve Prometheus metrics at http://LISTEN_HOST:PORT/metrics (default 0: off)")

    args = parser.parse_args(argv)
    if args.command == "leader":
        logs.configure(args.log_level, args.region)
        from mlchat.leader.server import serve

        settings = LeaderSettings(
            region=args.region, listen=args.listen, redis_url=args.redis,
            data_dir=args.data_dir or Path("data") / args.region, secret_file=args.secret_file,
            token_ttl_ms=int(args.token_ttl * 1000), subscriber_buffer=args.subscriber_buffer,
            peers=dict(args.peer), heartbeat_ms=args.heartbeat_ms, peer_timeout_ms=args.peer_timeout_ms,
            join=args.join, advertise=args.advertise, routes_file=args.routes, mode=args.mode,
            sync_acks=args.sync_acks, write_timeout_ms=args.write_timeout_ms, primary=args.primary or "",
            user_rate=args.user_rate, user_burst=args.user_burst, metrics_port=args.metrics_port)
        asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
