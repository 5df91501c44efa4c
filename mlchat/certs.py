"""Certificates for mutual TLS between regions: a cluster CA, and one certificate per region.

The CA signs every region's certificate. A leader given `--peer-ca` accepts a peer only if its
certificate chains to that CA, and checks the certificate of a peer it dials against the address it
dialed, so a region's certificate names the region, `localhost`, 127.0.0.1, ::1 and whatever hosts
the operator adds. Keys are EC P-256; every certificate serves both ends of a connection (serverAuth
and clientAuth), since a region both dials its peers and is dialed by them.

`ensure` is idempotent: it keeps an existing CA unless told to make a new one (a new CA invalidates
every certificate it signed), and keeps a region's certificate while the CA signed it and it names
the same hosts, so adding a region never disturbs the others.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397  # the longest any public CA issues for today; renew with `mlchat certs` again
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
# Certificates start a little in the past: regions' clocks differ, and a certificate "not yet
# valid" to a peer whose clock is behind would refuse it.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlchat"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """Subject alternative names: an IP address where the host is one, else a DNS name."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def new_ca(now: datetime.datetime, days: int = CA_DAYS, name: str = "mlchat cluster CA") -> Pem:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Pem, name: str, hosts: Iterable[str], now: datetime.datetime, days: int = LEAF_DAYS) -> Pem:
    """A certificate for `name` (a region), valid for `name` and `hosts`, signed by `ca`."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(_san([name, *hosts])), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _current(ca: Pem, leaf: Pem, name: str, hosts: Iterable[str], now: datetime.datetime) -> bool:
    """True if `leaf` is signed by `ca`, names exactly `name` and `hosts`, and has a third of its life left."""
    cert = x509.load_pem_x509_certificate(leaf.cert)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert))
    except (ValueError, TypeError, InvalidSignature):
        return False
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return set(names) == set(_san([name, *hosts])) and cert.not_valid_after_utc - now > lifetime / 3


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` whole or not at all, with `mode` from the start (a key is never readable
    by others, not even for a moment)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
    os.replace(tmp, path)


def _read(directory: Path, name: str) -> Pem | None:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    return Pem(cert.read_bytes(), key.read_bytes()) if cert.exists() and key.exists() else None


def ensure(directory: Path, names: Iterable[str], hosts: Mapping[str, Iterable[str]] | None = None,
           now: datetime.datetime | None = None, renew_ca: bool = False, days: int = LEAF_DAYS) -> list[str]:
    """Make `directory` hold a CA (`ca.pem`, `ca-key.pem`) and a certificate per name (`NAME.pem`,
    `NAME-key.pem`); keys are mode 600. `hosts` maps a name to the hosts its certificate adds to
    `DEFAULT_HOSTS` ("" for every name). Returns what it wrote, as lines for the operator."""
    now = now or datetime.datetime.now(datetime.UTC)
    hosts = hosts or {}
    directory.mkdir(parents=True, exist_ok=True)
    done = []
    ca = None if renew_ca else _read(directory, "ca")
    if ca is None:
        ca = new_ca(now)
        _write(directory / "ca-key.pem", ca.key, 0o600)
        _write(directory / "ca.pem", ca.cert, 0o644)
        done.append(f"new CA: {directory / 'ca.pem'}")
    for name in names:
        wanted = [*DEFAULT_HOSTS, *hosts.get("", ()), *hosts.get(name, ())]
        leaf = _read(directory, name)
        if leaf is not None and _current(ca, leaf, name, wanted, now):
            continue
        leaf = issue(ca, name, wanted, now, days)
        _write(directory / f"{name}-key.pem", leaf.key, 0o600)
        _write(directory / f"{name}.pem", leaf.cert, 0o644)
        done.append(f"certificate for {name} ({', '.join(dict.fromkeys([name, *wanted]))}): {directory / name}.pem")
    return done
