"""Long-term Ed25519 identities of deployed clients, for secure aggregation against a malicious
server.

``fedguard tokens DIR --clients N`` writes, beside each client's token, its identity key
``client-N.identity`` (PKCS#8 PEM, mode 0600, never leaves the client) and the public registry
``identities.json`` (``{"clients": {"N": hex public key}}``). The registry is public but must
reach the clients by a path the server does not control (with ``ca.pem`` and the tokens), since
a server that could hand out its own registry could impersonate every peer. The server gets the
same registry (``fedguard server --identities``) to run verified rounds and to exclude a client
whose signature fails before its peers have to refuse it; each client gets its key and the
registry (``fedguard client --identity ... --identities ...``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedguard.protocol.secagg import Identities
from fedguard.runtime.auth import make_tokens, write_private

REGISTRY_FILE = "identities.json"


def identity_file(directory: Path, client_id: int) -> Path:
    """Where :func:`make_identities` writes ``client_id``'s private identity key."""
    return directory / f"client-{client_id}.identity"


def _public_hex(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def make_identities(directory: Path, client_ids: Iterable[int]) -> Path:
    """A fresh identity key per client in ``directory`` and the registry of their public keys
    (an existing registry keeps its other entries); returns the registry's path."""
    directory.mkdir(parents=True, exist_ok=True)
    registry_path = directory / REGISTRY_FILE
    entries: dict[str, str] = {}
    if registry_path.exists():
        entries = {str(c): k for c, k in json.loads(registry_path.read_text())["clients"].items()}
    for cid in client_ids:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(identity_file(directory, cid), pem)
        entries[str(cid)] = _public_hex(key)
    body = {"clients": dict(sorted(entries.items(), key=lambda item: int(item[0])))}
    write_private(registry_path, (json.dumps(body, indent=1) + "\n").encode())
    return registry_path


def make_credentials(directory: Path, client_ids: Iterable[int]) -> dict[int, Path]:
    """What ``fedguard tokens`` writes: each client's token (:func:`.auth.make_tokens`) and,
    registered alongside it, its identity key (:func:`make_identities`); the token files."""
    ids = list(client_ids)
    make_identities(directory, ids)
    return make_tokens(directory, ids)


def load_registry(path: Path) -> Identities:
    """The public registry at ``path``; a malformed file is a :class:`ValueError` naming it."""
    try:
        entries = json.loads(path.read_text())["clients"]
        registry = {
            int(cid): ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(hexkey))
            for cid, hexkey in entries.items()
        }
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"The identities file {path} cannot be read: {exc}") from None
    return Identities(registry)


def load_client(key_path: Path, registry_path: Path, client_id: int) -> Identities:
    """Client ``client_id``'s private key at ``key_path`` with the registry at
    ``registry_path``; a :class:`ValueError` unless the key is the one registered for it."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"The identity key {key_path} cannot be read: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"The identity key {key_path} is not an Ed25519 key.")
    registry = load_registry(registry_path)
    if client_id not in registry.registry:
        raise ValueError(f"The identities file {registry_path} has no key of client {client_id}.")
    try:
        return Identities(registry.registry, {client_id: key})
    except ValueError:
        raise ValueError(
            f"The identity key {key_path} is not the one {registry_path} registers for client "
            f"{client_id}."
        ) from None
