"""Deployment credentials: a CA, the SuperLink's TLS certificate, and per-site auth and ledger keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError, FedfuseError

log = logging.getLogger(__name__)

# Site names become folder names and SuperNode names: keep them short and path-safe.
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_SITES = 1000
# flower-superlink starts its own SuperExec, which connects over TLS to `--host` (0.0.0.0 becomes
# 127.0.0.1): without this SAN no ServerApp can start ("IP address mismatch ... '127.0.0.1'").
LOOPBACK = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little before "now"

# Layout under the output folder (relative paths); one folder per destination machine.
CA_DIR = "ca"  # stays with whoever administers the federation; ca.key never leaves it
SUPERLINK_DIR = "superlink"
SITES_DIR = "sites"
MANIFEST = "README.txt"


class CredentialsError(FedfuseError):
    """Credential files cannot be written (they exist already, or the folder is unusable)."""


@dataclass(frozen=True)
class SiteCredentials:
    """The files of one site; everything in ``folder`` goes to that site's machine."""

    name: str
    folder: Path  # sites/<name>/: copy to the site
    ca_cert: Path  # sites/<name>/ca.crt: --root-certificates of flower-supernode
    auth_private_key: Path  # sites/<name>/auth.key: EC P-384, OpenSSH format, mode 0600
    ledger_key: Path  # sites/<name>/ledger_key.pem: Ed25519, PKCS8 PEM, mode 0600 (common.privacy.ledger.KEY_FILE)
    auth_public_key: Path  # superlink/supernode-keys/<name>.pub: `flwr supernode register`
    ledger_public_key: Path  # superlink/ledger-keys/<name>.pem: verifies the site's ledger


@dataclass(frozen=True)
class Credentials:
    """Paths of everything ``make_credentials`` wrote."""

    out_dir: Path
    ca_cert: Path  # ca/ca.crt
    ca_key: Path  # ca/ca.key: keep offline, goes to no machine
    server_folder: Path  # superlink/: copy to the SuperLink machine
    server_ca_cert: Path  # superlink/ca.crt: --ssl-ca-certfile, and root-certificates of `flwr`
    server_cert: Path  # superlink/server.pem: --ssl-certfile
    server_key: Path  # superlink/server.key: --ssl-keyfile, mode 0600
    sites: tuple[SiteCredentials, ...]
    manifest: Path  # README.txt

    def site(self, name: str) -> SiteCredentials:
        """Return the credentials of one site by name."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


def parse_sites(value: int | str | Sequence[str]) -> list[str]:
    """Turn ``3`` / ``"3"`` into ``site-1..site-3`` and ``"a,b"`` or ``["a", "b"]`` into names, validated."""
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isdigit() else [part.strip() for part in text.split(",")]
    if isinstance(value, bool):
        raise ConfigError(f"sites: expected a count or a list of names, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= MAX_SITES:
            raise ConfigError(f"sites: the number of sites must be between 1 and {MAX_SITES}, got {value}")
        return [f"site-{i}" for i in range(1, value + 1)]
    names = list(value)
    if not names:
        raise ConfigError("sites: give a count (e.g. 3) or comma-separated names (e.g. 'berlin,paris')")
    for name in names:
        if not isinstance(name, str) or not _SITE_NAME.match(name):
            raise ConfigError(
                f"sites: invalid site name {name!r}: use 1-63 lower-case letters, digits, '-' or '_', "
                "starting with a letter or digit (e.g. 'site-1', 'berlin')"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"sites: duplicate site names {duplicates}: each site needs its own name")
    if len(names) > MAX_SITES:
        raise ConfigError(f"sites: at most {MAX_SITES} sites, got {len(names)}")
    return names


def parse_server_names(value: str | Sequence[str]) -> list[x509.GeneralName]:
    """Turn ``"127.0.0.1,localhost"`` into SAN entries: IP addresses become IP SANs, others DNS SANs."""
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value)
    if not names or names == [""]:
        raise ConfigError(
            "server-names: give the addresses sites use to reach the SuperLink, comma-separated "
            "(e.g. '127.0.0.1,localhost' or 'superlink.example.org')"
        )
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        host = name[:-1] if name.endswith(".") else name
        labels = host.split(".")
        if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise ConfigError(
                f"server-names: {name!r} is neither an IP address nor a valid DNS name "
                "(letters, digits and '-' in dot-separated labels, e.g. 'superlink.example.org')"
            )
        sans.append(x509.DNSName(host.lower()))
    if len(set(sans)) != len(sans):
        raise ConfigError(f"server-names: duplicate names in {names}")
    return sans


def make_credentials(
    out_dir: str | os.PathLike[str],
    *,
    server_names: str | Sequence[str],
    sites: int | str | Sequence[str],
    days: int = 365,
    force: bool = False,
) -> Credentials:
    """Create the CA, the SuperLink certificate and every site's keys under ``out_dir``; return their paths."""
    # Validate everything before touching the disk
    sans = parse_server_names(server_names)
    if LOOPBACK not in sans:
        sans.append(LOOPBACK)
        log.info("added 127.0.0.1 to the SuperLink certificate: the SuperLink's own SuperExec connects there")
    site_names = parse_sites(sites)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
        raise ConfigError(f"days: certificate lifetime must be a whole number of days in 1..36500, got {days!r}")
    out = Path(out_dir).expanduser().resolve()
    creds = _layout(out, site_names)
    existing = [p for p in _all_files(creds) if p.exists() or p.is_symlink()]
    if existing and not force:
        shown = ", ".join(str(p.relative_to(out)) for p in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise CredentialsError(
            f"{out} already holds credentials ({shown}{more}); refusing to overwrite them. "
            "Choose another --out folder, or pass --force to replace every file (old keys stop working)."
        )
    for path in existing:
        path.unlink()

    # Folders: private-key folders readable by the owner only
    for folder in (out / CA_DIR, creds.server_folder, *(s.folder for s in creds.sites)):
        _make_dir(folder, private=True)
    _make_dir(out / SUPERLINK_DIR / "supernode-keys", private=False)
    _make_dir(out / SUPERLINK_DIR / "ledger-keys", private=False)

    # Certificate authority
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfuse federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(creds.ca_key, _pkcs8(ca_key))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_public(creds.ca_cert, ca_pem)
    _write_public(creds.server_ca_cert, ca_pem)

    # SuperLink TLS certificate, signed by the CA, valid for the given names
    server_key = ec.generate_private_key(ec.SECP384R1())
    first = sans[0].value
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(creds.server_key, _pkcs8(server_key))
    _write_public(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))

    # Per site: SuperNode auth key (EC P-384, OpenSSH format, as flower-supernode loads it) and ledger key
    for site in creds.sites:
        auth_key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            site.auth_private_key,
            auth_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        )
        auth_pub = auth_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write_public(site.auth_public_key, auth_pub + f" fedfuse-{site.name}\n".encode())
        ledger_key = ed25519.Ed25519PrivateKey.generate()
        _write_private(site.ledger_key, _pkcs8(ledger_key))
        _write_public(
            site.ledger_public_key,
            ledger_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        )
        _write_public(site.ca_cert, ca_pem)

    _write_public(creds.manifest, manifest_text(creds, sans=sans, not_after=not_after).encode())
    log.info("wrote credentials for %d site(s) under %s", len(creds.sites), out)
    return creds


def manifest_text(creds: Credentials, *, sans: Sequence[x509.GeneralName], not_after: dt.datetime) -> str:
    """Describe which file goes to which machine, and the commands that use them."""
    out = creds.out_dir

    def rel(path: Path) -> str:
        return str(path.relative_to(out))

    names = ", ".join(str(s.value) for s in sans)
    lines = [
        "fedfuse deployment credentials",
        f"SuperLink certificate valid for: {names}; certificates expire {not_after:%Y-%m-%d}.",
        "",
        f"Keep offline (goes to no machine): {rel(creds.ca_key)}  (re-run `fedfuse certs` to issue new files)",
        "",
        f"SuperLink machine: copy the folder {rel(creds.server_folder)}/",
        f"  {rel(creds.server_ca_cert)}   --ssl-ca-certfile (and root-certificates of the `flwr` connection)",
        f"  {rel(creds.server_cert)}   --ssl-certfile",
        f"  {rel(creds.server_key)}   --ssl-keyfile (secret)",
        f"  {SUPERLINK_DIR}/supernode-keys/<site>.pub   flwr supernode register <file> <connection> --name <site>",
        f"  {SUPERLINK_DIR}/ledger-keys/<site>.pem   verifies the site's privacy ledger (public)",
        "",
    ]
    for site in creds.sites:
        lines += [
            f"Site {site.name}: copy the folder {rel(site.folder)}/",
            f"  {rel(site.ca_cert)}   --root-certificates",
            f"  {rel(site.auth_private_key)}   --auth-supernode-private-key (secret)",
            f"  {rel(site.ledger_key)}   signs the site's privacy ledger (secret)",
        ]
    lines += [
        "",
        "SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem "
        "--ssl-keyfile server.key --enable-supernode-auth ...",
        "SuperNode:  flower-supernode --superlink <host>:9093 --root-certificates ca.crt "
        "--auth-supernode-private-key auth.key ...",
        "",
    ]
    return "\n".join(lines)


def _layout(out: Path, site_names: Sequence[str]) -> Credentials:
    """Return where every file goes, without writing anything."""
    server = out / SUPERLINK_DIR
    sites = tuple(
        SiteCredentials(
            name=name,
            folder=out / SITES_DIR / name,
            ca_cert=out / SITES_DIR / name / "ca.crt",
            auth_private_key=out / SITES_DIR / name / "auth.key",
            ledger_key=out / SITES_DIR / name / "ledger_key.pem",
            auth_public_key=server / "supernode-keys" / f"{name}.pub",
            ledger_public_key=server / "ledger-keys" / f"{name}.pem",
        )
        for name in site_names
    )
    return Credentials(
        out_dir=out,
        ca_cert=out / CA_DIR / "ca.crt",
        ca_key=out / CA_DIR / "ca.key",
        server_folder=server,
        server_ca_cert=server / "ca.crt",
        server_cert=server / "server.pem",
        server_key=server / "server.key",
        sites=sites,
        manifest=out / MANIFEST,
    )


def _all_files(creds: Credentials) -> list[Path]:
    """Every file ``make_credentials`` writes."""
    files = [creds.ca_cert, creds.ca_key, creds.server_ca_cert, creds.server_cert, creds.server_key, creds.manifest]
    for s in creds.sites:
        files += [s.ca_cert, s.auth_private_key, s.ledger_key, s.auth_public_key, s.ledger_public_key]
    return files


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Key usage of a CA (signs certificates) or of a TLS server (signs handshakes)."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _make_dir(path: Path, *, private: bool) -> None:
    """Create a folder (0700 when it holds private keys)."""
    try:
        path.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise CredentialsError(f"cannot create folder {path}: {exc.strerror}; choose a writable --out folder") from exc
    if not path.is_dir():
        raise CredentialsError(f"{path} exists and is not a folder; choose another --out folder")


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file that is created with mode 0600 (never readable by others, not even briefly)."""
    _write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Write a non-secret file (certificates, public keys, manifest)."""
    _write(path, data, 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` and write ``data``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError as exc:
        raise CredentialsError(f"{path} appeared while writing credentials; re-run with a fresh --out folder") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
