"""Bearer tokens, signed with the cluster secret so that any region verifies them without a lookup.

A token is `v1.<payload>.<signature>`: the payload (base64url JSON) names the user and the expiry, the
signature is HMAC-SHA256 over it. Callers pass `now_ms`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

from mlchat.errors import Unauthenticated

DEFAULT_TTL_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    username: str
    expires_at_ms: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret: bytes, ttl_ms: int = DEFAULT_TTL_MS) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_ms = ttl_ms

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    def issue(self, user_id: str, username: str, now_ms: int) -> tuple[str, Principal]:
        principal = Principal(user_id, username, now_ms + self.ttl_ms)
        payload = _b64(json.dumps({"u": user_id, "n": username, "e": principal.expires_at_ms}).encode())
        return f"v1.{payload}.{self._sign(payload)}", principal

    def verify(self, token: str, now_ms: int) -> Principal:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1":
            raise Unauthenticated("malformed token: expected the token returned by ClaimUsername")
        _, payload, signature = parts
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise Unauthenticated("invalid token signature: the token was not issued by this cluster")
        try:
            claims = json.loads(_unb64(payload))
            principal = Principal(str(claims["u"]), str(claims["n"]), int(claims["e"]))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthenticated("malformed token payload") from None
        if principal.expires_at_ms <= now_ms:
            raise Unauthenticated(
                f"token expired at {principal.expires_at_ms} ms since the epoch: call ClaimUsername again "
                "with your username and claim_key for a fresh one"
            )
        return principal


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The token from `authorization: Bearer <token>` metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    raise Unauthenticated("missing 'authorization: Bearer <token>' metadata: call ClaimUsername for a token")
