"""Client authentication for the deployment runtime: hashed tokens, replay refusal, mTLS names.

Every request a deployed client sends carries its ``client_id``, its token, a millisecond
timestamp and a fresh 16-byte nonce (inside TLS, so the token is never seen on the wire). The
server keeps only a salted SHA-256 of each token (a token is 256 random bits, so a slow password
hash adds nothing), compares in constant time, refuses revoked entries, refuses timestamps
further than ``window_s`` from its clock, and accepts each ``(client_id, nonce)`` once within
that window: a captured request sent again is refused. Under mutual TLS the client certificate's
common name (``fedguard-client-N``) must also name the claimed ``client_id``.

The tokens file is JSON, ``{"clients": {"N": {"salt": hex, "sha256": hex, "revoked": bool}}}``;
the server re-reads it when it changes on disk, so revoking a client needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

NONCE_BYTES = 16
DEFAULT_WINDOW_S = 300.0
_DOMAIN = b"fedguard-token-v1"
CLIENT_CN_PREFIX = "fedguard-client-"


class AuthError(Exception):
    """A request whose credentials are refused; the message is logged, never sent back."""


@dataclass(frozen=True)
class TokenRecord:
    """What the server stores for one client: a salt, the token's salted hash, revocation."""

    client_id: int
    salt: bytes
    sha256: bytes
    revoked: bool = False


@dataclass(frozen=True)
class Credentials:
    """What a request claims: who it is, its secret, when it was made, and a one-time nonce."""

    client_id: int
    token: bytes
    timestamp_ms: int
    nonce: bytes


def token_hash(token: bytes, salt: bytes) -> bytes:
    """``SHA-256(domain || salt || token)``, the stored form of a token."""
    return hashlib.sha256(_DOMAIN + salt + token).digest()


def new_record(client_id: int) -> tuple[str, TokenRecord]:
    """A fresh token (URL-safe text, 256 bits) and the record the server keeps of it."""
    token = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return token, TokenRecord(client_id, salt, token_hash(token.encode(), salt))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, readable and writable by its owner only.

    The file is created with mode 0600 (never world-readable, not even for an instant) as a
    temporary file beside ``path``, then renamed over it, so readers never see half a file and
    an existing file of wider mode is replaced, not reused.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash of this process id
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_records(path: Path, records: Iterable[TokenRecord]) -> None:
    """Write the server's tokens file (owner-readable only, see :func:`write_private`)."""
    body = {
        "clients": {
            str(r.client_id): {"salt": r.salt.hex(), "sha256": r.sha256.hex(), "revoked": r.revoked}
            for r in sorted(records, key=lambda r: r.client_id)
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, (json.dumps(body, indent=1) + "\n").encode())


def read_records(path: Path) -> dict[int, TokenRecord]:
    """Parse a tokens file; a malformed file is a :class:`ValueError` naming it."""
    try:
        entries = json.loads(path.read_text())["clients"]
        return {
            int(cid): TokenRecord(
                int(cid),
                bytes.fromhex(e["salt"]),
                bytes.fromhex(e["sha256"]),
                bool(e.get("revoked", False)),
            )
            for cid, e in entries.items()
        }
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"The tokens file {path} cannot be read: {exc}") from None


def make_tokens(directory: Path, client_ids: Iterable[int]) -> dict[int, Path]:
    """Write ``tokens.json`` (server side) and ``client-N.token`` (one per client) in ``directory``.

    Returns the token file of each client. An existing ``tokens.json`` keeps its other entries.
    (:func:`fedguard.runtime.identities.make_credentials` also writes identity keys.)
    """
    directory.mkdir(parents=True, exist_ok=True)
    server_file = directory / "tokens.json"
    records = read_records(server_file) if server_file.exists() else {}
    out: dict[int, Path] = {}
    for cid in client_ids:
        token, record = new_record(cid)
        records[cid] = record
        path = directory / f"client-{cid}.token"
        write_private(path, (token + "\n").encode())
        out[cid] = path
    write_records(server_file, records.values())
    return out


def revoke(path: Path, client_id: int) -> None:
    """Mark ``client_id`` revoked in the tokens file at ``path``."""
    records = read_records(path)
    if client_id not in records:
        raise ValueError(f"Client {client_id} has no entry in the tokens file {path}.")
    old = records[client_id]
    records[client_id] = TokenRecord(client_id, old.salt, old.sha256, revoked=True)
    write_records(path, records.values())


def client_common_name(client_id: int) -> str:
    """The certificate common name that identifies ``client_id`` under mutual TLS."""
    return f"{CLIENT_CN_PREFIX}{client_id}"


class Authenticator:
    """Checks :class:`Credentials`; thread-safe; raises :class:`AuthError` with the reason."""

    def __init__(
        self,
        tokens_path: Path | None,
        *,
        mutual_tls: bool = False,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if tokens_path is None and not mutual_tls:
            raise ValueError(
                "The server needs client authentication: a tokens file or a client CA."
            )
        self._path = tokens_path
        self._mutual_tls = mutual_tls
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[int, TokenRecord] = {}
        self._mtime: float | None = None
        self._seen: dict[tuple[int, bytes], float] = {}
        self._pruned = 0.0
        if tokens_path is not None:
            self._reload(tokens_path)

    def _reload(self, path: Path) -> None:
        """Read the tokens file at ``path`` again if it changed since the last read."""
        mtime = path.stat().st_mtime
        if mtime != self._mtime:
            self._records = read_records(path)
            self._mtime = mtime

    def check(self, creds: Credentials, peer_common_name: str | None) -> None:
        """Accept ``creds`` once, or raise :class:`AuthError`."""
        now = self._clock()
        with self._lock:
            if self._path is not None:
                self._reload(self._path)
                record = self._records.get(creds.client_id)
                if record is None:
                    raise AuthError(f"client {creds.client_id} is unknown")
                if record.revoked:
                    raise AuthError(f"client {creds.client_id} is revoked")
                if not hmac.compare_digest(token_hash(creds.token, record.salt), record.sha256):
                    raise AuthError(f"client {creds.client_id} sent a wrong token")
            if self._mutual_tls and peer_common_name != client_common_name(creds.client_id):
                raise AuthError(
                    f"certificate {peer_common_name!r} does not belong to client {creds.client_id}"
                )
            if abs(now - creds.timestamp_ms / 1000.0) > self._window_s:
                raise AuthError(
                    f"client {creds.client_id} sent a timestamp outside the {self._window_s:g} s window"
                )
            if len(creds.nonce) != NONCE_BYTES:
                raise AuthError(
                    f"client {creds.client_id} sent a nonce of {len(creds.nonce)} bytes"
                )
            key = (creds.client_id, creds.nonce)
            if key in self._seen:
                raise AuthError(f"client {creds.client_id} replayed a request (nonce seen before)")
            self._seen[key] = now + 2 * self._window_s
            if now - self._pruned > 10.0:
                self._seen = {k: t for k, t in self._seen.items() if t > now}
                self._pruned = now


def fresh_credentials(client_id: int, token: bytes, *, clock: Callable[[], float] = time.time):
    """Credentials for one request: the token, the time now and a random nonce."""
    return Credentials(client_id, token, int(clock() * 1000), secrets.token_bytes(NONCE_BYTES))
