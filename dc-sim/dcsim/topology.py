"""The WAN matrix: which regions exist and the round-trip time between each pair.

Files are CSV with the header `region_a,region_b,rtt_ms` (lines starting with `#` are comments), as
in the default matrix shipped here (`inter-region-rtt-ms.csv`, published measurements between cloud
regions). The one-way delay between two regions is half their round-trip time.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_REGIONS = ("us-east", "eu-west", "ap-northeast")


class TopologyError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    regions: tuple[str, ...]
    rtt_ms: dict[frozenset[str], float]

    def one_way_ms(self, a: str, b: str) -> float:
        return 0.0 if a == b else self.rtt_ms[frozenset((a, b))] / 2


def read_matrix(text: str, source: str) -> dict[frozenset[str], float]:
    rows = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    matrix: dict[frozenset[str], float] = {}
    for row in rows:
        try:
            a, b, rtt = row["region_a"].strip(), row["region_b"].strip(), float(row["rtt_ms"])
        except (KeyError, TypeError, ValueError):
            raise TopologyError(f"{source}: expected rows of region_a,region_b,rtt_ms, got {row}") from None
        if rtt < 0 or a == b:
            raise TopologyError(f"{source}: bad row {a},{b},{rtt}")
        matrix[frozenset((a, b))] = rtt
    return matrix


def load(regions: tuple[str, ...], topology_file: Path | None = None) -> Topology:
    """The topology for `regions`: the default matrix, overridden by `topology_file` if given."""
    default = resources.files("dcsim").joinpath("inter-region-rtt-ms.csv").read_text()
    matrix = read_matrix(default, "default matrix")
    if topology_file is not None:
        try:
            matrix |= read_matrix(topology_file.read_text(), str(topology_file))
        except OSError as e:
            raise TopologyError(f"cannot read topology file {topology_file}: {e.strerror}") from None
    if len(set(regions)) != len(regions) or not regions:
        raise TopologyError(f"regions must be distinct and at least one: {','.join(regions)}")
    missing = [f"{a}-{b}" for i, a in enumerate(regions) for b in regions[i + 1:] if frozenset((a, b)) not in matrix]
    if missing:
        known = sorted({r for pair in matrix for r in pair})
        raise TopologyError(f"no round-trip time for {', '.join(missing)}; known regions: {', '.join(known)} "
                            "(give the missing pairs in a --topology file)")
    return Topology(regions, {k: v for k, v in matrix.items() if k <= set(regions)})
