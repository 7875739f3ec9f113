"""Provisioning of the federation's HE key for ``[secure_aggregation] mode = "ckks"``.

``fedguard he-keys DIR --scheme bfv`` makes one secret key for the whole federation (as NVIDIA
FLARE's provisioning does) and writes two files:

* :data:`CLIENT_KEY_FILE`: the TenSEAL context with the secret key, for every client (copied to
  each client like its token, over a channel the server does not control, and readable by its
  owner only: anyone holding it decrypts every update);
* :data:`SERVER_PARAMS_FILE`: the same parameters without any key, for the server, which can
  then load and add ciphertexts and decrypt nothing.

Each file is one JSON header line (format, scheme, parameters, which half) and the serialised
context. The key is made once per federation, not per round: the same key encrypts every round's
updates, which is safe because fresh randomness encrypts each ciphertext (semantic security under
chosen plaintexts), and replacing it would mean provisioning every client again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedguard.algorithms.he import encryption

CLIENT_KEY_FILE = "he-client.key"
SERVER_PARAMS_FILE = "he-server.params"
_FORMAT = "fedguard-he/v1"


def _write(path: Path, scheme: str, secret: bool, body: bytes) -> None:
    header = {
        "format": _FORMAT,
        "scheme": scheme,
        "params": encryption.PARAMS[scheme].describe(),
        "secret_key": secret,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + body)


def make_keys(directory: Path, scheme: str) -> tuple[Path, Path]:
    """A fresh key of ``scheme``: the clients' key file and the server's parameter file."""
    if scheme not in encryption.SCHEMES:
        raise ValueError(f"Unknown HE scheme {scheme!r}; use one of {encryption.SCHEMES}.")
    directory.mkdir(parents=True, exist_ok=True)
    ctx = encryption.secret_context(encryption.PARAMS[scheme])
    client, server = directory / CLIENT_KEY_FILE, directory / SERVER_PARAMS_FILE
    _write(client, scheme, True, encryption.key_bytes(ctx))
    _write(server, scheme, False, encryption.server_bytes(ctx))
    return client, server


def load(path: Path, *, secret: bool, scheme: str | None = None) -> Any:
    """The context in ``path`` (a client's key file when ``secret``, else the server's parameter
    file), checked to be of ``scheme`` when given; raises ValueError otherwise."""
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n")
    try:
        header = json.loads(head) if sep else {}
    except ValueError:
        header = {}
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an HE file made by fedguard he-keys.")
    if header.get("secret_key") is not secret:
        wanted = "the clients' key file" if secret else "the server's parameter file"
        raise ValueError(
            f"{path} is not {wanted} ({CLIENT_KEY_FILE if secret else SERVER_PARAMS_FILE})."
        )
    if scheme is not None and header.get("scheme") != scheme:
        raise ValueError(
            f"{path} holds a {header.get('scheme')} key; the experiment's "
            f"secure_aggregation.he_scheme is {scheme}."
        )
    try:
        return encryption.context_from_bytes(body, secret=secret)
    except encryption.HEError as exc:
        raise ValueError(f"{path}: {exc}") from None
