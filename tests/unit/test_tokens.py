import pytest

from mlchat.errors import Unauthenticated
from mlchat.leader.tokens import TokenSigner, bearer

SECRET = b"0123456789abcdef0123"


def test_issued_token_verifies_until_it_expires():
    signer = TokenSigner(SECRET, ttl_ms=1000)
    token, principal = signer.issue("u1", "ann", now_ms=5000)
    assert principal.expires_at_ms == 6000
    assert signer.verify(token, now_ms=5999) == principal
    with pytest.raises(Unauthenticated, match="expired"):
        signer.verify(token, now_ms=6000)


def test_another_clusters_token_and_tampering_are_rejected():
    token, _ = TokenSigner(b"another-secret-0000").issue("u1", "ann", now_ms=0)
    with pytest.raises(Unauthenticated, match="signature"):
        TokenSigner(SECRET).verify(token, now_ms=0)
    good, _ = TokenSigner(SECRET).issue("u1", "ann", now_ms=0)
    version, payload, signature = good.split(".")
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    with pytest.raises(Unauthenticated):
        TokenSigner(SECRET).verify(f"{version}.{forged_payload}.{signature}", now_ms=0)
    for junk in ["", "v1", "v2.a.b", "v1.a.b.c"]:
        with pytest.raises(Unauthenticated, match="malformed|signature"):
            TokenSigner(SECRET).verify(junk, now_ms=0)


def test_short_secret_is_refused():
    with pytest.raises(ValueError):
        TokenSigner(b"short")


def test_bearer_metadata():
    assert bearer((("x", "y"), ("authorization", "Bearer abc"))) == "abc"
    with pytest.raises(Unauthenticated, match="missing"):
        bearer(())
    with pytest.raises(Unauthenticated, match="Bearer"):
        bearer((("authorization", "Basic abc"),))
