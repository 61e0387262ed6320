"""Tests for deployment credentials (common/certs.py) and `fedfuse certs`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from common.certs import Credentials, CredentialsError, make_credentials, parse_server_names, parse_sites
from common.errors import ConfigError
from fedfuse.cli import main


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    """One set of credentials for three sites, shared by the read-only tests."""
    return make_credentials(tmp_path_factory.mktemp("creds"), server_names="127.0.0.1,localhost", sites=3, days=30)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _private_files(c: Credentials) -> list[Path]:
    return [c.ca_key, c.server_key] + [p for s in c.sites for p in (s.auth_private_key, s.ledger_key)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_layout_has_one_folder_per_destination(creds: Credentials) -> None:
    # Prepare / Execute: done by the fixture
    out = creds.out_dir

    # Assert
    assert [s.name for s in creds.sites] == ["site-1", "site-2", "site-3"]
    assert creds.server_cert == out / "superlink" / "server.pem"
    assert creds.site("site-2").auth_private_key == out / "sites" / "site-2" / "auth.key"
    assert creds.site("site-2").auth_public_key == out / "superlink" / "supernode-keys" / "site-2.pub"
    for site in creds.sites:
        assert site.ca_cert.read_bytes() == creds.ca_cert.read_bytes()
        assert {p.name for p in site.folder.iterdir()} == {"ca.crt", "auth.key", "ledger_key.pem"}
    assert "sites/site-3/auth.key" in creds.manifest.read_text()


def test_server_certificate_has_exactly_the_requested_sans(creds: Credentials) -> None:
    # Execute
    cert = _cert(creds.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # Assert
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert cert.issuer == _cert(creds.ca_cert).subject
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=30, minutes=5)


def test_loopback_san_is_added_for_the_superlinks_own_superexec(tmp_path: Path) -> None:
    # Execute
    c = make_credentials(tmp_path, server_names="superlink.example.org", sites=1)
    san = _cert(c.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    # Assert
    assert list(san) == [x509.DNSName("superlink.example.org"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@pytest.mark.parametrize("name", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
def test_chain_verifies_against_the_ca_for_each_name(creds: Credentials, name: x509.GeneralName) -> None:
    # Prepare
    verifier = PolicyBuilder().store(Store([_cert(creds.ca_cert)])).build_server_verifier(name)

    # Execute
    chain = verifier.verify(_cert(creds.server_cert), [])

    # Assert
    assert chain[-1] == _cert(creds.ca_cert)


def test_chain_rejects_a_name_not_in_the_certificate(creds: Credentials) -> None:
    verifier = PolicyBuilder().store(Store([_cert(creds.ca_cert)])).build_server_verifier(x509.DNSName("example.org"))
    with pytest.raises(VerificationError):
        verifier.verify(_cert(creds.server_cert), [])


def test_tls_handshake_with_python_ssl(creds: Credentials) -> None:
    # Prepare: a TLS server and client over a socket pair, the client trusting only our CA
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    client_ctx = ssl.create_default_context(cafile=str(creds.site("site-1").ca_cert))
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.do_handshake()
            server.sendall(server.recv(5))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()

    # Execute
    with client_ctx.wrap_socket(b, server_hostname="127.0.0.1") as client:
        client.sendall(b"hello")
        echoed = client.recv(5)
    thread.join(timeout=10)
    server.close()

    # Assert
    assert echoed == b"hello"
    assert errors == []


def test_private_keys_are_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    # Prepare
    old = os.umask(0)
    try:
        # Execute
        c = make_credentials(tmp_path, server_names="localhost", sites=1)
    finally:
        os.umask(old)

    # Assert
    assert {_mode(p) for p in _private_files(c)} == {0o600}
    assert _mode(c.server_cert) == 0o644
    assert _mode(c.site("site-1").folder) == 0o700


def test_refuses_to_overwrite_and_leaves_files_unchanged(tmp_path: Path) -> None:
    # Prepare
    first = make_credentials(tmp_path, server_names="localhost", sites=2)
    before = first.site("site-1").auth_private_key.read_bytes()

    # Execute
    with pytest.raises(CredentialsError, match="refusing to overwrite.*--force"):
        make_credentials(tmp_path, server_names="localhost", sites=2)

    # Assert
    assert first.site("site-1").auth_private_key.read_bytes() == before


def test_refuses_when_only_one_key_exists(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "sites" / "site-1").mkdir(parents=True)
    (tmp_path / "sites" / "site-1" / "ledger_key.pem").write_text("keep me")

    # Execute / Assert
    with pytest.raises(CredentialsError, match="sites/site-1/ledger_key.pem"):
        make_credentials(tmp_path, server_names="localhost", sites=1)
    assert (tmp_path / "sites" / "site-1" / "ledger_key.pem").read_text() == "keep me"
    assert not (tmp_path / "ca" / "ca.key").exists()


def test_force_replaces_keys_and_restores_mode_0600(tmp_path: Path) -> None:
    # Prepare: an existing key that someone made world-readable
    first = make_credentials(tmp_path, server_names="localhost", sites=1)
    old_key = first.site("site-1").auth_private_key.read_bytes()
    first.site("site-1").auth_private_key.chmod(0o644)

    # Execute
    second = make_credentials(tmp_path, server_names="localhost", sites=1, force=True)

    # Assert
    assert second.site("site-1").auth_private_key.read_bytes() != old_key
    assert {_mode(p) for p in _private_files(second)} == {0o600}


def test_site_auth_keys_are_p384_openssh_and_accepted_by_flower(creds: Credentials) -> None:
    # Prepare: Flower's own loaders (SuperNode private key, `flwr supernode register` public key)
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    site = creds.site("site-1")

    # Execute
    private = serialization.load_ssh_private_key(site.auth_private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(site.auth_public_key.read_bytes())
    registered = try_load_public_key(site.auth_public_key)

    # Assert
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    assert site.auth_private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public == private.public_key()
    assert registered == public_key_to_bytes(private.public_key())
    assert site.auth_public_key.read_text().endswith(" fedfuse-site-1\n")


def test_site_keys_are_distinct(creds: Credentials) -> None:
    auth = {s.auth_public_key.read_bytes().split()[1] for s in creds.sites}
    ledger = {s.ledger_public_key.read_bytes() for s in creds.sites}
    assert len(auth) == 3 and len(ledger) == 3


def test_ledger_key_is_ed25519_pkcs8_and_matches_its_public_key(creds: Credentials) -> None:
    # Prepare
    site = creds.site("site-2")
    key = serialization.load_pem_private_key(site.ledger_key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(site.ledger_public_key.read_bytes())

    # Execute
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    signature = key.sign(b"ledger entry")

    # Assert
    public.verify(signature, b"ledger entry")  # raises if the pair does not match
    assert site.ledger_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, ["site-1", "site-2", "site-3"]),
        ("2", ["site-1", "site-2"]),
        ("berlin, paris", ["berlin", "paris"]),
        (["a_1"], ["a_1"]),
    ],
)
def test_parse_sites(value: object, expected: list[str]) -> None:
    assert parse_sites(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "between 1 and 1000"),
        ("1001", "between 1 and 1000"),
        ("", "invalid site name ''"),
        ("Berlin", "invalid site name 'Berlin'"),
        ("../x", "invalid site name '../x'"),
        ("a/b", "invalid site name"),
        ("a,a", "duplicate site names \\['a'\\]"),
        ([], "give a count"),
        (True, "expected a count"),
    ],
)
def test_parse_sites_rejects_bad_values(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sites(value)  # type: ignore[arg-type]


def test_parse_server_names_splits_ips_and_dns_names() -> None:
    assert parse_server_names("10.0.0.5, ::1,SuperLink.Example.org") == [
        x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("superlink.example.org"),
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "give the addresses"),
        ("bad name", "'bad name' is neither"),
        ("a..b", "'a..b' is neither"),
        ("-x.org", "'-x.org' is neither"),
        ("https://host", "neither"),
        ("localhost,localhost", "duplicate"),
    ],
)
def test_parse_server_names_rejects_bad_values(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_server_names(value)


@pytest.mark.parametrize("days", [0, -1, 36501, 1.5])
def test_days_must_be_a_positive_whole_number(tmp_path: Path, days: object) -> None:
    with pytest.raises(ConfigError, match="days"):
        make_credentials(tmp_path, server_names="localhost", sites=1, days=days)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv = ["certs", "--out", str(tmp_path / "c"), "--server-names", "127.0.0.1,localhost", "--sites", "a,b"]

    # Execute
    created = main(argv)
    created_out = capsys.readouterr().out
    refused = main(argv)
    refused_err = capsys.readouterr().err
    forced = main([*argv, "--force"])
    bad = main(["certs", "--out", str(tmp_path / "d"), "--server-names", "bad name", "--sites", "2"])
    bad_err = capsys.readouterr().err

    # Assert
    assert (created, refused, forced, bad) == (0, 2, 0, 2)
    assert "sites/a/auth.key" in created_out and "superlink/server.key" in created_out
    assert "refusing to overwrite" in refused_err
    assert "'bad name' is neither an IP address nor a valid DNS name" in bad_err
    assert not (tmp_path / "d").exists()
