"""TLS for every gRPC connection, and the one exception: plain text on loopback with ``--insecure``.

Both ends refuse plain text unless the address is a loopback address (``localhost``,
``127.0.0.0/8``, ``::1``) and the user asked for it explicitly, so a deployment can never fall
back to an unencrypted connection across a network by accident.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedguard.runtime.grpc_chunks import MAX_MESSAGE_BYTES


class TlsConfigError(ValueError):
    """A TLS setting that cannot be honoured, in one sentence."""


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TlsConfigError(f"The address {address!r} is not HOST:PORT.")
    return host.strip("[]")


def is_loopback(address: str) -> bool:
    """True if ``address`` names this machine only (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_plaintext(address: str, insecure: bool) -> None:
    """Raise unless plain text on ``address`` is allowed (loopback and ``insecure``)."""
    if not insecure:
        raise TlsConfigError(
            "TLS certificates are required; plain text is allowed only on loopback with --insecure."
        )
    if not is_loopback(address):
        raise TlsConfigError(
            f"--insecure is allowed only on a loopback address, not {address!r}; use TLS."
        )


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA of client certificates for mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        root = None if self.client_ca is None else self.client_ca.read_bytes()
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """The CA that signed the server's certificate, and this client's certificate for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("A client certificate needs its key, and a key its certificate.")
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=None if self.key is None else self.key.read_bytes(),
            certificate_chain=None if self.cert is None else self.cert.read_bytes(),
        )


# Keepalive lets both ends notice a vanished peer; the reconnect backoff is kept short so a
# client finds a restarted server within seconds rather than gRPC's default two minutes.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def channel(address: str, tls: ClientTls | None, *, insecure: bool) -> grpc.Channel:
    """A channel to ``address``: TLS, or plain text where :func:`refuse_plaintext` allows it."""
    if tls is None:
        refuse_plaintext(address, insecure)
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS)
