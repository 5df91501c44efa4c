"""The `dcsim` command: launch a simulated multi-region cluster and change its WAN while it runs.

`dcsim up` starts a controller process in the background (leaders, proxies, and a control socket) and
returns once every region serves; the other commands talk to it through the socket named in the run
directory's `state.json`. `dcsim down` (or SIGTERM/SIGINT to the controller) stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcsim import topology
from dcsim.cluster import Cluster, ClusterError
from mlchat.geo.modes import Mode, SyncAcks

DEFAULT_RUN_DIR = Path("run/dcsim")
UP_TIMEOUT_S = 90.0


def _state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(_state_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return state


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# Controllers started by this process (when `up` is called as a function, from the demo or the tests):
# kept so that they can be reaped by `down`, not garbage-collected while they run.
_controllers: dict[int, subprocess.Popen[bytes]] = {}


# The controller ------------------------------------------------------------------------------------


async def serve(run_dir: Path, topo: topology.Topology, base_port: int | None, topology_file: Path | None,
                leader_args: tuple[str, ...] = ()) -> None:
    cluster = Cluster(run_dir, topo, base_port, topology_file, leader_args=leader_args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock_dir = Path(tempfile.mkdtemp(prefix="dcsim-"))  # short: socket paths are limited to ~100 bytes
    sock = sock_dir / "control.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            reply: dict[str, Any] = {"ok": True, "result": await dispatch(cluster, request, stop)}
        except ClusterError as e:
            reply = {"ok": False, "error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    try:
        await cluster.start()
        server = await asyncio.start_unix_server(handle, str(sock))
        state = {"pid": os.getpid(), "socket": str(sock), **cluster.status()}
        _state_path(run_dir).write_text(json.dumps(state, indent=2))
        await stop.wait()
        server.close()
        await server.wait_closed()
    finally:
        await cluster.stop()
        for path in (_state_path(run_dir), sock):
            path.unlink(missing_ok=True)
        os.rmdir(sock_dir)


async def dispatch(cluster: Cluster, request: dict[str, Any], stop: asyncio.Event) -> Any:
    command = request["command"]
    if command == "status":
        return cluster.status()
    if command == "partition":
        return cluster.partition(request["a"], request["b"], bool(request.get("one_way")))
    if command == "heal":
        return cluster.heal(request.get("a"), request.get("b"))
    if command == "latency":
        return cluster.latency(request["a"], request["b"], float(request["ms"]), float(request.get("jitter", 0)))
    if command == "bandwidth":
        return cluster.bandwidth(request["a"], request["b"], float(request["kbps"]))
    if command == "kill-storage":
        return cluster.kill_storage(request["region"])
    if command == "reset":
        return cluster.reset(request["a"], request["b"])
    if command == "add":
        return await cluster.add(request["region"])
    if command == "leave":
        return await cluster.leave(request["region"])
    if command == "kill":
        return cluster.kill(request["region"])
    if command == "restart":
        return await cluster.restart(request["region"])
    if command == "down":
        stop.set()
        return "stopping"
    raise ClusterError(f"unknown command {command!r}")


# The client side -------------------------------------------------------------------------------------


def control(run_dir: Path, request: dict[str, Any], timeout_s: float = 60.0) -> Any:
    """Send one command to the run's controller; raise SystemExit with a clear message on failure."""
    import socket

    state = _read_state(run_dir)
    if state is None or not _alive(state["pid"]):
        raise SystemExit(f"dcsim: no run is up in {run_dir}: start one with 'dcsim up'")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(state["socket"])
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(s.makefile().readline())
        except (OSError, ValueError) as e:
            raise SystemExit(f"dcsim: the controller of {run_dir} did not answer: {e}") from None
    if not reply["ok"]:
        raise SystemExit(f"dcsim: {reply['error']}")
    return reply["result"]


def up(run_dir: Path, regions: tuple[str, ...], topology_file: Path | None, base_port: int | None,
       mode: str = "async", sync_acks: str = "quorum", leader_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start a run in the background and return its status once every region serves."""
    state = _read_state(run_dir)
    if state is not None and _alive(state["pid"]):
        raise SystemExit(f"dcsim: a run is already up in {run_dir} (controller pid {state['pid']}): "
                         "'dcsim down' first")
    try:
        topology.load(regions, topology_file)  # fail here, with the reason, rather than in the background
    except topology.TopologyError as e:
        raise SystemExit(f"dcsim: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    _state_path(run_dir).unlink(missing_ok=True)
    args = [sys.executable, "-m", "dcsim.cli", "--run-dir", str(run_dir), "serve", "--regions", ",".join(regions)]
    if topology_file:
        args += ["--topology", str(topology_file)]
    if base_port:
        args += ["--base-port", str(base_port)]
    args += ["--mode", mode, "--sync", sync_acks, *(f"--leader-arg={a}" for a in leader_args)]
    log = open(run_dir / "controller.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + UP_TIMEOUT_S
    try:
        while (state := _read_state(run_dir)) is None:
            if proc.poll() is not None:
                tail = (run_dir / "controller.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise SystemExit(f"dcsim: the run did not start: {tail[0] if tail else 'no output'} "
                                 f"(see {run_dir / 'controller.log'})")
            if time.monotonic() > deadline:
                raise SystemExit(f"dcsim: the run did not start within {UP_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
    except BaseException:  # Ctrl-C or a failed start: leave nothing behind
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        raise
    _controllers[proc.pid] = proc
    return state


def down(run_dir: Path, timeout_s: float = 60.0) -> None:
    state = _read_state(run_dir)
    if state is None or not _alive(state["pid"]):
        raise SystemExit(f"dcsim: no run is up in {run_dir}")
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(state["pid"]):
        if time.monotonic() > deadline:
            os.kill(state["pid"], signal.SIGKILL)
            break
        time.sleep(0.05)
    if state["pid"] in _controllers:
        _controllers.pop(state["pid"]).wait()


def print_status(status: dict[str, Any]) -> None:
    for region, info in status["regions"].items():
        state = "running" if info["running"] else "DOWN"
        print(f"{region:<14} {state:<8} leader {info['leader']}, regions (mutual TLS) {info['peers_on']}, "
              f"metrics {info['metrics']}")
        print(f"{'':14} clients in {region} connect to {info['endpoints'][region]}")
        others = ", ".join(f"from {src}: {addr}" for src, addr in info["endpoints"].items() if src != region)
        if others:
            print(f"{'':14} {others}")
    for path, t in status["paths"].items():
        jitter = f" +/- {t['jitter_ms']:g}" if t["jitter_ms"] else ""
        cap = f", capped at {t['bandwidth_kbps']:g} KiB/s" if t["bandwidth_kbps"] else ""
        print(f"delay {path}: {t['latency_ms']:g}{jitter} ms{cap}")
    print("partitions: " + (", ".join(status["partitions"]) or "none"))


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("scenario", "compare", "chaos"):  # runs of their own, each on fresh clusters
        from dcsim import chaos, compare, scenarios

        {"scenario": scenarios.main, "compare": compare.main, "chaos": chaos.main}[words[0]](words[1:])
        return
    parser = argparse.ArgumentParser(
        prog="dcsim", description="Simulated multi-region mlchat cluster",
        epilog="Also: 'dcsim scenario NAME [--modes ...]' plays a conflict case in every mode, and 'dcsim compare' "
               "runs one workload under every mode and writes a report, and 'dcsim chaos' injects random faults "
               "under load and checks the history (each starts its own clusters; see --help).")
    parser.add_argument("--run-dir", type=Path, default=Path(os.environ.get("DCSIM_RUN_DIR", DEFAULT_RUN_DIR)))
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "serve"):
        p = sub.add_parser(name, help="start a run" if name == "up" else argparse.SUPPRESS)
        p.add_argument("--regions", default=",".join(topology.DEFAULT_REGIONS))
        p.add_argument("--topology", type=Path, help="CSV of region_a,region_b,rtt_ms overriding the default")
        p.add_argument("--base-port", type=int, help="use consecutive ports from here (default: any free)")
        p.add_argument("--mode", default="async", choices=[str(m) for m in Mode], help="replication mode")
        p.add_argument("--sync", default="quorum", choices=[str(a) for a in SyncAcks],
                       help="sync mode: writes wait for all regions or a majority")
        p.add_argument("--leader-arg", action="append", default=[], metavar="ARG",
                       help="passed on to every leader, e.g. --leader-arg=--user-rate=0 (repeat for each)")
    sub.add_parser("status", help="regions, endpoints, delays and partitions")
    p = sub.add_parser("partition", help="drop traffic between two regions")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--one-way", action="store_true", help="only traffic from A to B")
    p = sub.add_parser("heal", help="end a partition (all of them without arguments)")
    p.add_argument("a", nargs="?")
    p.add_argument("b", nargs="?")
    p = sub.add_parser("latency", help="set the one-way delay between two regions")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("ms", type=float)
    p.add_argument("--jitter", type=float, default=0.0)
    p = sub.add_parser("bandwidth", help="cap the traffic from A to B (0: no cap)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("kbps", type=float, help="KiB per second")
    p = sub.add_parser("reset", help="reset every connection between two regions")
    p.add_argument("a")
    p.add_argument("b")
    for name, text in (("kill", "SIGKILL a region's leader"), ("restart", "start a region's leader again"),
                       ("kill-storage", "SIGKILL a region's Valkey (its leader starts it again)"),
                       ("add", "start a new region that joins the cluster"),
                       ("leave", "take a region out of the cluster, then stop it")):
        sub.add_parser(name, help=text).add_argument("region")
    sub.add_parser("down", help="stop the run")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir.absolute()

    if args.command in ("up", "serve"):
        regions = tuple(r.strip() for r in args.regions.split(",") if r.strip())
        if args.command == "serve":
            asyncio.run(serve(run_dir, topology.load(regions, args.topology), args.base_port, args.topology,
                              # single-leader: the first region listed starts as the primary
                              ("--mode", args.mode, "--sync", args.sync, "--primary", regions[0],
                               *args.leader_arg)))
            return
        print_status(up(run_dir, regions, args.topology, args.base_port, args.mode, args.sync,
                        tuple(args.leader_arg)))
        print(f"run directory: {run_dir} ('dcsim down' stops it)")
    elif args.command == "down":
        down(run_dir)
        print("stopped")
    elif args.command == "status":
        print_status(control(run_dir, {"command": "status"}))
    elif args.command == "heal" and (args.a is None) != (args.b is None):
        raise SystemExit("dcsim: heal takes two regions, or none to heal everything")
    else:
        request = {k: v for k, v in vars(args).items() if k != "run_dir" and v is not None}
        print(control(run_dir, request))


if __name__ == "__main__":
    main()
