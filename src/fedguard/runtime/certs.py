"""A development certificate authority: CA, server and client certificates for TLS and mTLS.

``fedguard certs DIR`` calls :func:`make_dev_pki`. The keys are ECDSA P-256, written with mode
0600 from creation on. The CA's private key goes into its own folder ``DIR/ca-private/`` (mode
0700), which must stay with whoever issues certificates: clients need ``ca.pem`` (and their own
``client-N.pem``/``.key``), never that folder. The server
certificate names ``localhost``, ``127.0.0.1``, ``::1`` and any given hosts; each client
certificate's common name is ``fedguard-client-N`` (see :func:`fedguard.runtime.auth.client_common_name`),
which is how the server maps a mutual-TLS peer to a client id. These certificates are for
development and demos; production deployments bring certificates from their own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedguard.runtime.auth import client_common_name, write_private

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# The folder of the CA's private key, apart from the files handed to clients and the server.
CA_PRIVATE = "ca-private"


@dataclass(frozen=True)
class Pki:
    """Paths of the files :func:`make_dev_pki` wrote."""

    ca_cert: Path
    ca_key: Path  # in CA_PRIVATE: never copied to clients or the server
    server_cert: Path
    server_key: Path
    client_certs: dict[int, tuple[Path, Path]]  # client id to (certificate, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedguard development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)  # mode 0600 from creation on
    return path


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(directory / f"{stem}.key", key)


def _private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (created with mode 0700)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o700)  # an older folder: close it before the key goes in
    return path


def _issue(
    subject: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    days: int,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,  # an ExtendedKeyUsageOID member
    hosts: Iterable[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names = [_san(h) for h in hosts]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_pki(
    directory: Path, *, client_ids: Iterable[int], hosts: Iterable[str] = (), days: int = 30
) -> Pki:
    """Write ``ca.pem``, ``server.pem``/``.key`` and ``client-N.pem``/``.key`` into ``directory``,
    and the CA's private key into ``directory/ca-private/ca.key`` (keep it; never hand it out)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue(
        "fedguard development CA",
        _name("fedguard development CA"),
        ca_key,
        ca_key,
        days=days,
        ca=True,
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_key_path = _write_key(_private_folder(directory / CA_PRIVATE) / "ca.key", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    all_hosts = list(dict.fromkeys([*LOOPBACK_NAMES, *hosts]))
    server = _issue(
        "fedguard server",
        ca.subject,
        ca_key,
        server_key,
        days=days,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        hosts=all_hosts,
    )
    server_cert, server_key_path = _write(directory, "server", server, server_key)
    clients: dict[int, tuple[Path, Path]] = {}
    for cid in client_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            client_common_name(cid),
            ca.subject,
            ca_key,
            key,
            days=days,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        clients[cid] = _write(directory, f"client-{cid}", cert, key)
    return Pki(ca_path, ca_key_path, server_cert, server_key_path, clients)
