"""Who may watch: loopback without a token, any other address with a viewer token.

A viewer token is made like a client token (:mod:`fedguard.runtime.auth`: 256 random bits, the
server keeps only a salted SHA-256) by ``fedguard tokens DIR --viewer NAME``, into
``DIR/viewers.json`` (the hashes) and ``DIR/viewer-NAME.token`` (the secret, owner-readable).
It is a separate file from the clients' ``tokens.json``: a viewer token is read-only (it opens
the dashboard, whose pages only read run folders) and never authenticates a client to the gRPC
server, and a client token never opens the dashboard. Revoked viewers are refused; the file is
read again when it changes, so revoking needs no restart.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from pathlib import Path

from fedguard.runtime import auth

VIEWERS_FILE = "viewers.json"
ROLE = "viewer"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8050`` for IPv6) as its host and port; ValueError naming it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"--dashboard/--address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8050"
        )
    return host.strip("[]"), int(port)


def make_viewer(directory: Path, name: str) -> Path:
    """Add viewer ``name`` to ``directory/viewers.json`` (a fresh token, replacing an older one
    of that name) and write its token to ``directory/viewer-NAME.token``; returns that path."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"--viewer {name!r}: a name of letters, digits, '-', '_' or '.'")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / VIEWERS_FILE
    entries = read_viewers(path) if path.exists() else {}
    token, record = auth.new_record(0)
    entries[name] = {"role": ROLE, "salt": record.salt.hex(), "sha256": record.sha256.hex()}
    auth.write_private(path, (json.dumps({"viewers": entries}, indent=1) + "\n").encode())
    token_path = directory / f"viewer-{name}.token"
    auth.write_private(token_path, (token + "\n").encode())
    return token_path


def revoke_viewer(path: Path, name: str) -> None:
    """Mark viewer ``name`` revoked in the viewers file at ``path``."""
    entries = read_viewers(path)
    if name not in entries:
        raise ValueError(f"Viewer {name!r} has no entry in the viewers file {path}.")
    entries[name]["revoked"] = True
    auth.write_private(path, (json.dumps({"viewers": entries}, indent=1) + "\n").encode())


def read_viewers(path: Path) -> dict[str, dict[str, object]]:
    """The viewers file's entries by name; ValueError naming the file when malformed."""
    try:
        entries = json.loads(path.read_text())["viewers"]
        for e in entries.values():
            bytes.fromhex(e["salt"]), bytes.fromhex(e["sha256"])
        return {str(k): dict(v) for k, v in entries.items()}
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"The viewers file {path} cannot be read: {exc}") from None


class ViewerCheck:
    """Accepts a presented viewer token or not (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._entries: dict[str, dict[str, object]] = {}
        self._reload()

    def _reload(self) -> None:
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._entries = read_viewers(self._path)
            self._mtime = mtime

    def accepts(self, token: str | None) -> bool:
        """True if ``token`` is a viewer's, not revoked."""
        if not token:
            return False
        with self._lock:
            try:
                self._reload()
            except (OSError, ValueError):
                return False  # a broken file opens nothing
            ok = False
            for entry in self._entries.values():
                salt = bytes.fromhex(str(entry["salt"]))
                digest = auth.token_hash(token.encode(), salt)
                match = hmac.compare_digest(digest, bytes.fromhex(str(entry["sha256"])))
                ok |= match and not entry.get("revoked") and entry.get("role") == ROLE
            return ok
