"""TLS for the leader's ports and the channels that reach them.

The client API serves one-way TLS (clients check the leader's certificate against a CA they trust).
Regions talk mutual TLS on a port of their own: each side presents a certificate signed by the
cluster CA (`mlchat certs`) and refuses a peer whose certificate is not.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a certificate (chain) and its key; with `ca`, the other side must present a
    certificate signed by that CA (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class TlsMaterial:
    cert: bytes
    key: bytes
    ca: bytes | None


def load(files: TlsFiles, now: datetime.datetime | None = None) -> TlsMaterial:
    """Read the files; ValueError, saying what is wrong, if one is missing, the key does not match the
    certificate, or the certificate has expired (better at start than at every peer's handshake)."""
    try:
        material = TlsMaterial(files.cert.read_bytes(), files.key.read_bytes(),
                               files.ca.read_bytes() if files.ca else None)
        cert = x509.load_pem_x509_certificate(material.cert)
        key = serialization.load_pem_private_key(material.key, password=None)
        if files.ca is not None:
            x509.load_pem_x509_certificates(material.ca or b"")
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{files.cert}, {files.key} or {files.ca}: not PEM as expected ({e})") from None
    if key.public_key() != cert.public_key():
        raise ValueError(f"{files.key} is not the key of the certificate {files.cert}")
    if cert.not_valid_after_utc < (now or datetime.datetime.now(datetime.UTC)):
        raise ValueError(f"certificate {files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return material


def server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """A port's credentials: TLS with this certificate; with a CA, callers must present one it signed."""
    return grpc.ssl_server_credentials([(material.key, material.cert)], root_certificates=material.ca,
                                       require_client_auth=material.ca is not None)


def listen(server: grpc.aio.Server, address: str, material: TlsMaterial | None) -> None:
    """Bind `server` to `address`, over TLS with `material` if given; an address that cannot be had stops the
    process, saying so."""
    try:
        if material is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, server_credentials(material))
    except RuntimeError:
        raise SystemExit(f"cannot listen on {address}: address in use or invalid") from None


def peer_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """A region's credentials when it dials a peer: its own certificate, and the CA the peer's must chain to."""
    return grpc.ssl_channel_credentials(root_certificates=material.ca, private_key=material.key,
                                        certificate_chain=material.cert)


def client_channel(address: str, ca: Path | bytes | None, **kwargs: Any) -> grpc.Channel:
    """A channel to a leader's client API: TLS checked against `ca` if given, else plaintext."""
    if ca is None:
        return grpc.insecure_channel(address, **kwargs)
    root = ca if isinstance(ca, bytes) else ca.read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root), **kwargs)
