"""`mlchat certs`: a cluster CA and per-region certificates that verify as TLS servers and clients."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from mlchat import certs
from mlchat.cli import main
from mlchat.tls import TlsFiles, load

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _policy(ca: Path) -> PolicyBuilder:
    return PolicyBuilder().store(Store([_cert(ca)])).time(NOW + datetime.timedelta(days=1))


def test_region_certificates_chain_to_the_ca_as_servers_and_clients(tmp_path):
    certs.ensure(tmp_path, ["us-east", "eu-west"], {"": ["chat.example.com"], "us-east": ["10.0.0.5"]}, now=NOW)
    ca = _cert(tmp_path / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    east = _cert(tmp_path / "us-east.pem")
    for name in [x509.DNSName("us-east"), x509.DNSName("localhost"), x509.DNSName("chat.example.com"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]:
        _policy(tmp_path / "ca.pem").build_server_verifier(name).verify(east, [])
    _policy(tmp_path / "ca.pem").build_client_verifier().verify(east, [])
    eku = east.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    west_names = _cert(tmp_path / "eu-west.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert x509.IPAddress(ipaddress.ip_address("10.0.0.5")) not in west_names  # a host given for us-east only
    assert east.not_valid_after_utc - NOW == datetime.timedelta(days=certs.LEAF_DAYS)


def test_keys_are_readable_by_their_owner_only(tmp_path):
    certs.ensure(tmp_path, ["us-east"], now=NOW)
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "us-east-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "us-east.pem").stat().st_mode) == 0o644


def test_a_certificate_from_another_ca_does_not_verify(tmp_path):
    certs.ensure(tmp_path / "a", ["us-east"], now=NOW)
    certs.ensure(tmp_path / "b", ["us-east"], now=NOW)
    with pytest.raises(VerificationError):
        _policy(tmp_path / "a" / "ca.pem").build_client_verifier().verify(_cert(tmp_path / "b" / "us-east.pem"), [])


def _issued(lines: list[str]) -> list[str]:
    """The names whose certificates `certs.ensure` wrote."""
    return [line.removeprefix("certificate for ").split(" (")[0] for line in lines if line.startswith("certificate")]


def test_running_it_again_keeps_the_ca_and_what_is_still_right(tmp_path):
    certs.ensure(tmp_path, ["us-east"], now=NOW)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert certs.ensure(tmp_path, ["us-east"], now=NOW) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # A new region is signed by the same CA; a region asked for another host is issued again.
    hosts = {"us-east": ["db.example.com"]}
    assert _issued(certs.ensure(tmp_path, ["us-east", "eu-west"], hosts, now=NOW)) == ["us-east", "eu-west"]
    assert (tmp_path / "ca.pem").read_bytes() == before["ca.pem"]
    _policy(tmp_path / "ca.pem").build_server_verifier(x509.DNSName("db.example.com")).verify(
        _cert(tmp_path / "us-east.pem"), [])
    # One in the last third of its validity is issued again.
    late = NOW + datetime.timedelta(days=certs.LEAF_DAYS * 0.7)
    assert _issued(certs.ensure(tmp_path, ["us-east", "eu-west"], hosts, now=late)) == ["us-east", "eu-west"]
    # A new CA, asked for, issues every certificate again under it.
    certs.ensure(tmp_path, ["us-east", "eu-west"], now=NOW, renew_ca=True)
    assert (tmp_path / "ca.pem").read_bytes() != before["ca.pem"]
    for region in ("us-east", "eu-west"):
        _policy(tmp_path / "ca.pem").build_client_verifier().verify(_cert(tmp_path / f"{region}.pem"), [])


def test_the_command_writes_the_files_and_checks_its_arguments(tmp_path, capsys):
    main(["certs", "--out", str(tmp_path), "--regions", "us-east,eu-west", "--host", "eu-west=chat.example.com"])
    assert {p.name for p in tmp_path.iterdir()} == {"ca.pem", "ca-key.pem", "us-east.pem", "us-east-key.pem",
                                                    "eu-west.pem", "eu-west-key.pem"}
    assert "chat.example.com" in capsys.readouterr().out
    main(["certs", "--out", str(tmp_path), "--regions", "us-east,eu-west", "--host", "eu-west=chat.example.com"])
    assert capsys.readouterr().out == "up to date\n"
    with pytest.raises(SystemExit):
        main(["certs", "--out", str(tmp_path), "--regions", "Not A Region"])


def test_tls_material_is_checked_when_loaded(tmp_path):
    certs.ensure(tmp_path, ["us-east", "eu-west"], now=NOW)
    files = TlsFiles(tmp_path / "us-east.pem", tmp_path / "us-east-key.pem", tmp_path / "ca.pem")
    assert load(files, NOW).ca == (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(ValueError, match="is not the key of"):
        load(TlsFiles(files.cert, tmp_path / "eu-west-key.pem"), NOW)
    with pytest.raises(ValueError, match="expired"):
        load(files, NOW + datetime.timedelta(days=certs.LEAF_DAYS + 1))
    with pytest.raises(ValueError, match="cannot read"):
        load(TlsFiles(tmp_path / "missing.pem", files.key), NOW)
