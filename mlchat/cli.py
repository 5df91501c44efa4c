"""The `mlchat` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from pathlib import Path

from mlchat.errors import MlchatError
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


def _endpoint(text: str) -> tuple[str, str]:
    region, sep, address = text.rpartition("=")
    return (_region(region) if sep else ""), address


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlchat", description="mlchat: a multi-region chat backend")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    leader = sub.add_parser("leader", help="run one region's leader")
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

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "leader":
        from mlchat.leader.server import serve

        settings = LeaderSettings(
            region=args.region, listen=args.listen, redis_url=args.redis,
            data_dir=args.data_dir or Path("data") / args.region, secret_file=args.secret_file,
            token_ttl_ms=int(args.token_ttl * 1000), subscriber_buffer=args.subscriber_buffer,
            peers=dict(args.peer), heartbeat_ms=args.heartbeat_ms, peer_timeout_ms=args.peer_timeout_ms,
            join=args.join, advertise=args.advertise, routes_file=args.routes, mode=args.mode,
            sync_acks=args.sync_acks, write_timeout_ms=args.write_timeout_ms, primary=args.primary or "",
            user_rate=args.user_rate, user_burst=args.user_burst)
        asyncio.run(serve(settings))
    elif args.command == "chat":
        from mlchat.chat import shell

        try:
            endpoints = args.connect or list(shell.dcsim_endpoints(args.dcsim, args.at).items())
        except MlchatError as e:
            parser.error(str(e))
        sys.exit(shell.main(args.user, endpoints, args.region, args.key_file or shell.default_key_file()))


if __name__ == "__main__":
    main()
