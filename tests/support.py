"""Helpers shared by the test tiers: waiting on conditions, and looking at processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from mlchat.leader.process import free_port


def wait_until(condition: Callable[[], bool], deadline_s: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test if it does not within `deadline_s`."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} not met within {deadline_s}s")
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> set[int]:
    """Every process below `pid`."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out |= {int(child), *descendants(int(child))}
    return out


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample a Prometheus endpoint serves: (name, labels) -> value."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample's value, 0 if it is absent (a counter not yet touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def cluster_ports(primaries: int = 3) -> list[tuple[int, int]]:
    """(client port, cluster bus port) for each primary of a local Redis Cluster."""
    return [(free_port(), free_port()) for _ in range(primaries)]
