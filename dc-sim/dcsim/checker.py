"""Checks a recorded client history of a multi-region chat cluster, in the spirit of Jepsen's set checker.

Input is what the clients saw (one `Op` per call, with its start and end time and whether the server
acknowledged it) plus what every region holds once traffic has stopped (`FinalState`). Safety anomalies,
which must not happen in any replication mode, are counted in `Report.violations()`: an acknowledged
message missing from some region, a message listed twice or stored twice for one client retry key, and a
username held by two users. Session anomalies (read-your-writes, monotonic reads, status going back in
time) are counted separately for calls made with and without the client's causal token: without it a
client that moves to another region may legitimately see an older state, with it it must not.

An earlier op is one that ended before the later one started; overlapping ops are concurrent and never
constrain each other. Session checks walk each client's ops on one channel (or one user's status) in
time order, so the cost is linear in the size of the history apart from one sort per client and key.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

KINDS = frozenset({"post", "read", "set_status", "get_status", "claim"})
WRITE_KINDS = frozenset({"post", "set_status", "claim"})
EXAMPLES_PER_KIND = 3
MAX_EXAMPLES = 10


@dataclass(frozen=True, slots=True)
class Op:
    client: str  # which client (one user's session; it may move between regions)
    region: str  # region the call went to
    kind: str  # "post" | "read" | "set_status" | "get_status" | "claim"
    start_ms: float
    end_ms: float
    ok: bool  # True: acknowledged by the server; False: failed or outcome unknown
    with_token: bool = False  # the client sent its causal token with this call (reads)
    channel: str = ""
    message_id: str = ""  # post: the id the server returned (empty if not ok)
    client_msg_id: str = ""
    user_id: str = ""  # post/set_status: the author; get_status: whose status was read; claim: the claimant
    seen: tuple[str, ...] = ()  # read: ids of ALL messages of the channel the read returned
    hlc: str = ""  # set_status: hlc written; get_status: hlc read ("" = none). Fixed width: compare as strings.
    username: str = ""  # claim
    claim_state: str = ""  # claim: "PROVISIONAL" | "CONFIRMED" | "LOST" as answered, or "TAKEN" (ALREADY_EXISTS)


@dataclass(frozen=True, slots=True)
class FinalState:
    """What every region holds after the run, once traffic stopped and (maybe) converged."""

    messages: Mapping[str, Mapping[str, Sequence[tuple[str, str, str]]]]  # region -> channel -> [(id, user, cmid)]
    owners: Mapping[str, Mapping[str, str]]  # region -> username -> owner user_id as that region reports it
    claim_states: Mapping[str, Mapping[str, str]]  # region -> user_id -> final claim state of every claimant
    digests: Mapping[str, str]  # region -> state digest


@dataclass(frozen=True, slots=True)
class Report:
    lost_writes: int = 0  # acknowledged messages missing from at least one region
    duplicates: int = 0  # message ids listed twice, or (user, channel, client_msg_id) stored under two ids
    duplicate_usernames: int = 0  # names confirmed to two users, or whose owner differs between regions
    claims_lost: int = 0  # claimants answered PROVISIONAL who finally LOST everywhere (informational)
    claims_refused: int = 0  # claims refused as TAKEN (informational)
    ryw_violations_with_token: int = 0
    ryw_violations_without_token: int = 0
    monotonic_violations_with_token: int = 0
    monotonic_violations_without_token: int = 0
    status_regressions_with_token: int = 0
    status_regressions_without_token: int = 0
    converged: bool = True  # every region reports the same digest
    divergent_regions: tuple[str, ...] = ()  # regions whose digest differs from the most common one
    examples: tuple[str, ...] = ()  # a few violations, described for people

    def violations(self) -> int:
        """Safety anomalies: these must be 0 in every replication mode."""
        return self.lost_writes + self.duplicates + self.duplicate_usernames


class _Examples:
    """Up to EXAMPLES_PER_KIND descriptions per kind of anomaly, safety anomalies first."""

    KINDS = ("lost", "dup", "name", "diverged", "ryw-with", "ryw-without", "mono-with", "mono-without",
             "status-with", "status-without")

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = {kind: [] for kind in self.KINDS}

    def add(self, kind: str, text: str) -> None:
        if len(self.by_kind[kind]) < EXAMPLES_PER_KIND:
            self.by_kind[kind].append(text)

    def all(self) -> tuple[str, ...]:
        return tuple(text for texts in self.by_kind.values() for text in texts)[:MAX_EXAMPLES]


def _token(op: Op) -> str:
    return "with token" if op.with_token else "without token"


def _some(ids: set[str]) -> str:
    first = min(ids)
    return first if len(ids) == 1 else f"{first} (+{len(ids) - 1} more)"


def _lost_writes(history: Sequence[Op], final: FinalState, examples: _Examples) -> int:
    listed = {(region, channel): {m[0] for m in msgs}
              for region, channels in final.messages.items() for channel, msgs in channels.items()}
    lost: set[str] = set()
    for op in history:
        if op.kind != "post" or not op.ok or op.message_id in lost:
            continue
        missing = [r for r in final.messages if op.message_id not in listed.get((r, op.channel), ())]
        if missing:
            lost.add(op.message_id)
            examples.add("lost", f"message {op.message_id} by client {op.client} in {op.channel}, acknowledged by "
                                 f"{op.region} at {op.end_ms:.0f} ms, is missing in {', '.join(missing)}")
    return len(lost)


def _duplicates(final: FinalState, examples: _Examples) -> int:
    offending: set[tuple[str, ...]] = set()
    for region, channels in final.messages.items():
        for channel, msgs in channels.items():
            for message_id, n in Counter(m[0] for m in msgs).items():
                if n > 1 and ("id", message_id) not in offending:
                    offending.add(("id", message_id))
                    examples.add("dup", f"message {message_id} is listed {n} times in {channel} in {region}")
            ids_by_key: dict[tuple[str, str], set[str]] = defaultdict(set)
            for message_id, user_id, cmid in msgs:
                if cmid:
                    ids_by_key[user_id, cmid].add(message_id)
            for (user_id, cmid), ids in ids_by_key.items():
                key = ("cmid", user_id, channel, cmid)
                if len(ids) > 1 and key not in offending:
                    offending.add(key)
                    examples.add("dup", f"client_msg_id {cmid} of user {user_id} in {channel} is stored as "
                                        f"{len(ids)} messages in {region}: {', '.join(sorted(ids))}")
    return len(offending)


def _duplicate_usernames(history: Sequence[Op], final: FinalState, examples: _Examples) -> int:
    confirmed: dict[str, set[str]] = defaultdict(set)
    for op in history:
        if op.kind == "claim" and op.ok and op.claim_state == "CONFIRMED":
            confirmed[op.username].add(op.user_id)
    bad: set[str] = set()
    for name, users in confirmed.items():
        if len(users) > 1:
            bad.add(name)
            examples.add("name", f"username {name} was confirmed to {len(users)} users: {', '.join(sorted(users))}")
    names = {name for owners in final.owners.values() for name in owners}
    for name in sorted(names - bad):
        owner_in = {region: owners.get(name, "") for region, owners in final.owners.items()}
        if len(set(owner_in.values())) > 1:
            bad.add(name)
            examples.add("name", f"regions disagree on the owner of username {name}: "
                                 + ", ".join(f"{r}: {u or 'none'}" for r, u in owner_in.items()))
            continue
        # A user told CONFIRMED must be the owner wherever an owner is reported.
        owner = next(iter(owner_in.values()), "")
        if owner and confirmed.get(name, {owner}) != {owner}:
            bad.add(name)
            examples.add("name", f"username {name} was confirmed to {', '.join(sorted(confirmed[name]))} "
                                 f"but every region reports {owner} as its owner")
    return len(bad)


def _claims_lost(history: Sequence[Op], final: FinalState) -> int:
    provisional = {op.user_id for op in history if op.kind == "claim" and op.ok and op.claim_state == "PROVISIONAL"}
    if not final.claim_states:
        return 0
    return sum(all(states.get(user) == "LOST" for states in final.claim_states.values()) for user in provisional)


def _in_time_order(observations: Iterable[Op], checks: Iterable[Op]) -> list[tuple[bool, Op]]:
    """(is_check, op): each check at its start, each observation at its end; a check comes before an
    observation that ends at the very moment it starts, as the two overlap."""
    events = [(op.start_ms, 0, True, op) for op in checks] + [(op.end_ms, 1, False, op) for op in observations]
    events.sort(key=lambda e: (e[0], e[1]))
    return [(is_check, op) for _, _, is_check, op in events]


def _session_reads(history: Sequence[Op], examples: _Examples) -> tuple[Counter[str], Counter[str]]:
    """Read-your-writes and monotonic-read violations, as counters keyed by "with"/"without" token."""
    posts: dict[tuple[str, str], list[Op]] = defaultdict(list)
    reads: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in history:
        if op.ok and op.kind == "post" and op.message_id:
            posts[op.client, op.channel].append(op)
        elif op.ok and op.kind == "read":
            reads[op.client, op.channel].append(op)
    ryw: Counter[str] = Counter()
    monotonic: Counter[str] = Counter()
    for key, key_reads in reads.items():
        written: set[str] = set()  # own acknowledged posts that ended so far
        observed: set[str] = set()  # ids returned by reads that ended so far
        for is_check, op in _in_time_order([*posts.get(key, ()), *key_reads], key_reads):
            if not is_check:
                if op.kind == "post":
                    written.add(op.message_id)
                else:
                    observed.update(op.seen)
                continue
            seen = set(op.seen)
            token = "with" if op.with_token else "without"
            if not written <= seen:
                ryw[token] += 1
                examples.add(f"ryw-{token}", f"client {op.client} read {op.channel} in {op.region} {_token(op)} "
                                             f"at {op.start_ms:.0f} ms and missed its own message "
                                             f"{_some(written - seen)}")
            if not observed <= seen:
                monotonic[token] += 1
                examples.add(f"mono-{token}", f"client {op.client} read {op.channel} in {op.region} {_token(op)} "
                                              f"at {op.start_ms:.0f} ms and no longer saw {_some(observed - seen)}, "
                                              "which an earlier read of its returned")
    return ryw, monotonic


def _status_regressions(history: Sequence[Op], examples: _Examples) -> Counter[str]:
    """Status reads older than what the client already saw, as a counter keyed by "with"/"without" token."""
    writes: dict[tuple[str, str], list[Op]] = defaultdict(list)
    reads: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in history:
        if op.ok and op.kind == "set_status":
            writes[op.client, op.user_id].append(op)
        elif op.ok and op.kind == "get_status":
            reads[op.client, op.user_id].append(op)
    regressions: Counter[str] = Counter()
    for key, key_reads in reads.items():
        highest = ""
        for is_check, op in _in_time_order([*writes.get(key, ()), *key_reads], key_reads):
            if not is_check:
                highest = max(highest, op.hlc)
            elif op.hlc < highest:
                token = "with" if op.with_token else "without"
                regressions[token] += 1
                examples.add(f"status-{token}", f"client {op.client} read the status of {op.user_id} in {op.region} "
                                                f"{_token(op)} at {op.start_ms:.0f} ms: hlc {op.hlc or 'none'}, "
                                                f"older than {highest} it had already seen")
    return regressions


def _divergent(digests: Mapping[str, str], examples: _Examples) -> tuple[str, ...]:
    if not digests:
        return ()
    counts = Counter(digests.values())
    # Ties go to the digest of the alphabetically first region, so the answer does not depend on order.
    first_region = {d: min(r for r, x in digests.items() if x == d) for d in counts}
    majority = min(counts, key=lambda d: (-counts[d], first_region[d]))
    divergent = tuple(sorted(r for r, d in digests.items() if d != majority))
    if divergent:
        examples.add("diverged", f"regions {', '.join(divergent)} differ from the digest {majority[:12]} of "
                                 f"{', '.join(sorted(r for r, d in digests.items() if d == majority))}")
    return divergent


def check(history: Sequence[Op], final: FinalState) -> Report:
    """The anomalies in `history` and `final`; raises ValueError on an op of unknown kind."""
    for op in history:
        if op.kind not in KINDS:
            raise ValueError(f"op of client {op.client} has kind {op.kind!r}; "
                             f"expected one of {', '.join(sorted(KINDS))}")
    examples = _Examples()
    lost = _lost_writes(history, final, examples)
    duplicates = _duplicates(final, examples)
    names = _duplicate_usernames(history, final, examples)
    divergent = _divergent(final.digests, examples)
    ryw, monotonic = _session_reads(history, examples)
    status = _status_regressions(history, examples)
    return Report(
        lost_writes=lost,
        duplicates=duplicates,
        duplicate_usernames=names,
        claims_lost=_claims_lost(history, final),
        claims_refused=sum(op.kind == "claim" and op.claim_state == "TAKEN" for op in history),
        ryw_violations_with_token=ryw["with"],
        ryw_violations_without_token=ryw["without"],
        monotonic_violations_with_token=monotonic["with"],
        monotonic_violations_without_token=monotonic["without"],
        status_regressions_with_token=status["with"],
        status_regressions_without_token=status["without"],
        converged=not divergent,
        divergent_regions=divergent,
        examples=examples.all(),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 <= q <= 1) of `values`; nan if there are none."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be between 0 and 1, got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def write_latencies(history: Iterable[Op], region: str | None = None) -> list[float]:
    """Latencies (end - start, ms) of acknowledged writes (post, set_status, claim), of one region if given."""
    return [op.end_ms - op.start_ms for op in history
            if op.ok and op.kind in WRITE_KINDS and (region is None or op.region == region)]


def writes_within(history: Iterable[Op], regions: Collection[str], start_ms: float, end_ms: float) -> list[Op]:
    """The writes sent to `regions` at or after `start_ms` and answered by `end_ms`. A write answered after
    the window tells nothing of it: in sync modes, one sent as a region was cut off may wait out the cut and
    be acknowledged once every region holds it, after the heal."""
    return [op for op in history
            if op.kind in WRITE_KINDS and op.region in regions and start_ms <= op.start_ms and op.end_ms <= end_ms]


def availability(history: Iterable[Op], regions: Collection[str], start_ms: float, end_ms: float) -> float:
    """The fraction of `writes_within` the window that were acknowledged; nan if there were none."""
    writes = writes_within(history, regions, start_ms, end_ms)
    return sum(op.ok for op in writes) / len(writes) if writes else math.nan
