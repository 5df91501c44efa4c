"""Version vectors: for each region, the largest hlc of its writes seen here.

They describe what a replica has (for delta extraction between regions) and what a client has seen
(the causal token: a read with a token waits until this region's vector covers it). The token is the
vector's text form, `region=hlc` pairs joined by `;`, opaque to clients and checked strictly here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mlchat.crdt.hlc import is_encoded_hlc

_REGION = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_TOKEN_REGIONS = 64


def merge(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    """The pointwise maximum of two vectors."""
    out = dict(a)
    for region, hlc in b.items():
        if hlc > out.get(region, ""):
            out[region] = hlc
    return out


def covers(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    """True when `have` has seen everything `want` has."""
    return all(have.get(region, "") >= hlc for region, hlc in want.items())


def missing(have: Mapping[str, str], want: Mapping[str, str]) -> dict[str, str]:
    """The entries of `want` that `have` does not cover."""
    return {r: h for r, h in want.items() if have.get(r, "") < h}


def encode_token(vector: Mapping[str, str]) -> bytes:
    return ";".join(f"{r}={vector[r]}" for r in sorted(vector)).encode()


def decode_token(token: bytes) -> dict[str, str]:
    """Parse a causal token; raise ValueError saying what is wrong with it."""
    if not token:
        return {}
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("causal token is not ASCII") from None
    pairs = text.split(";")
    if len(pairs) > MAX_TOKEN_REGIONS:
        raise ValueError(f"causal token names more than {MAX_TOKEN_REGIONS} regions")
    vector: dict[str, str] = {}
    for pair in pairs:
        region, sep, hlc = pair.partition("=")
        if not sep or not _REGION.match(region) or not is_encoded_hlc(hlc) or region in vector:
            raise ValueError(f"causal token has a malformed entry {pair[:80]!r}")
        vector[region] = hlc
    return vector
