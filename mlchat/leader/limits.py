"""The client API's documented limits and input checks (pure).

Every check raises `InvalidArgument` naming the field, the rule and how to comply.
"""

from __future__ import annotations

import re

from mlchat.errors import InvalidArgument, ResourceExhausted

USERNAME_PATTERN = r"^[a-z][a-z0-9_]{2,31}$"
REGION_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"
CHANNEL_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
CLIENT_MSG_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
CLAIM_KEY_MIN, CLAIM_KEY_MAX = 16, 128
BODY_MAX_CHARS = 4000
BODY_MAX_BYTES = 8192
STATUS_TEXT_MAX_CHARS = 200
PAGE_DEFAULT, PAGE_MAX = 50, 500
MAX_REQUEST_BYTES = 64 * 1024  # client API requests; larger ones get RESOURCE_EXHAUSTED
MAX_PEER_STATE_BYTES = 16 * 1024 * 1024  # a peer's state (all its shards' state vectors), in one request
MAX_PEER_MESSAGE_BYTES = 256 * 1024 * 1024  # one replication message: at most one whole shard
MAX_CONCURRENT_RPCS = 1000
# Per private channel, checked in the region that adds (concurrent adds in other regions may pass it).
MAX_CHANNEL_MEMBERS = 1000
SUBSCRIBER_BUFFER = 1000  # messages a subscriber may fall behind before it is cut off
SUBSCRIBE_RETENTION = 10_000  # per channel: how far back a Subscribe can resume


def request_size(size: int) -> None:
    """Refuse a client request of `size` bytes if it is over the limit."""
    if size > MAX_REQUEST_BYTES:
        raise ResourceExhausted(f"request of {size} bytes is larger than the {MAX_REQUEST_BYTES} bytes a client "
                                "request may have")


def server_options(shared: bool) -> list[tuple[str, int]]:
    """A gRPC server's options: it reads messages up to MAX_PEER_STATE_BYTES (a peer's state comes in one;
    client requests are then held to their own limit, with a message that says so), and with `shared` binds
    its port beside the region's other processes (SO_REUSEPORT)."""
    return [("grpc.max_receive_message_length", MAX_PEER_STATE_BYTES), ("grpc.so_reuseport", int(shared))]

_USERNAME = re.compile(USERNAME_PATTERN)
_CHANNEL = re.compile(CHANNEL_PATTERN)
_CLIENT_MSG_ID = re.compile(CLIENT_MSG_ID_PATTERN)


# Unicode categories Cc (control characters) and Cs (lone surrogates).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_NEWLINE_TAB = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _has_control_chars(text: str, newlines_and_tabs: bool = False) -> bool:
    return bool((_CONTROL_BUT_NEWLINE_TAB if newlines_and_tabs else _CONTROL).search(text))


def _matching(pattern: re.Pattern[str], field: str, value: str, rule: str) -> str:
    if not pattern.match(value):
        raise InvalidArgument(f"{field} {value[:80]!r} is invalid: {rule} ({pattern.pattern})")
    return value


def username(name: str) -> str:
    return _matching(_USERNAME, "username", name, "use 3 to 32 characters, lowercase letters, digits and '_', "
                     "starting with a letter")


def channel(name: str) -> str:
    return _matching(_CHANNEL, "channel", name, "use 1 to 64 characters, lowercase letters, digits, '_', '.' "
                     "and '-', starting with a letter or digit")


def client_msg_id(value: str) -> str:
    return _matching(_CLIENT_MSG_ID, "client_msg_id", value, "use 1 to 64 characters of letters, digits and "
                     "'_.:-' (a UUID works); reuse it only to retry the same message")


def claim_key(value: str) -> str:
    if not CLAIM_KEY_MIN <= len(value) <= CLAIM_KEY_MAX or _has_control_chars(value):
        raise InvalidArgument(
            f"claim_key must be {CLAIM_KEY_MIN} to {CLAIM_KEY_MAX} printable characters (got {len(value)}); "
            "generate a random secret and keep it to reclaim your username"
        )
    return value


def body(text: str) -> str:
    if not text.strip():
        raise InvalidArgument("body is empty: a message needs at least one visible character")
    if len(text) > BODY_MAX_CHARS or len(text.encode()) > BODY_MAX_BYTES:
        raise InvalidArgument(
            f"body is too long ({len(text)} characters, {len(text.encode())} bytes): "
            f"the limit is {BODY_MAX_CHARS} characters and {BODY_MAX_BYTES} bytes"
        )
    if _has_control_chars(text, newlines_and_tabs=True):
        raise InvalidArgument("body contains control characters: only newlines and tabs are allowed")
    return text


def status_text(text: str) -> str:
    if len(text) > STATUS_TEXT_MAX_CHARS:
        raise InvalidArgument(f"status text is {len(text)} characters: the limit is {STATUS_TEXT_MAX_CHARS}")
    if _has_control_chars(text):
        raise InvalidArgument("status text contains control characters")
    return text


def page_size(limit: int) -> int:
    if limit == 0:
        return PAGE_DEFAULT
    if not 1 <= limit <= PAGE_MAX:
        raise InvalidArgument(f"limit {limit} is out of range: use 1 to {PAGE_MAX}, or 0 for {PAGE_DEFAULT}")
    return limit


USER_RATE = 200.0  # calls per second per user, on one leader (0: no limit)
USER_BURST = 400  # calls a user may make at once after a quiet spell
RATE_KEYS_MAX = 100_000  # users tracked at once; beyond, the full buckets are forgotten


class RateLimiter:
    """Token buckets, one per key (a user): `rate` tokens a second, up to `burst`. Pure: the caller
    passes the time."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at seconds)

    def wait_s(self, key: str, now_s: float) -> float:
        """Take one token for `key`: 0.0 if there was one, else how long until there will be."""
        if self.rate <= 0:
            return 0.0
        tokens, at = self._buckets.get(key, (float(self.burst), now_s))
        tokens = min(float(self.burst), tokens + (now_s - at) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now_s)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now_s)
        if len(self._buckets) > RATE_KEYS_MAX:  # a bucket that would be full again carries no state
            self._buckets = {k: (t, a) for k, (t, a) in self._buckets.items()
                             if t + (now_s - a) * self.rate < self.burst}
        return 0.0
