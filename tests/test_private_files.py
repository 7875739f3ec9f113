"""Private keys and tokens are created owner-only (mode 0600), never written open and narrowed
afterwards; the CA's private key lives apart from the files handed to clients."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedguard import cli
from fedguard.runtime import auth, certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def created_open(monkeypatch):
    """umask 0 (what is not restricted at creation comes out world-readable) and no chmod (a
    file cannot be narrowed after the fact); records the mode every os.open created with."""
    old = os.umask(0)

    def refuse(*args, **kwargs):
        raise AssertionError(f"chmod{args}: the file must be created restricted, not narrowed")

    monkeypatch.setattr(os, "chmod", refuse)
    created: dict[str, int] = {}
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created[os.fspath(path)] = mode
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    try:
        yield created
    finally:
        os.umask(old)


def test_dev_pki_keys_are_created_0600_and_the_ca_key_is_kept_apart(tmp_path, created_open):
    pki = certs.make_dev_pki(tmp_path, client_ids=[0, 1])
    keys = [pki.ca_key, pki.server_key, *(key for _, key in pki.client_certs.values())]
    for key in keys:
        assert _mode(key) == 0o600, key
    # each key was created (as a temporary beside it) with mode 0600, then renamed into place
    assert sorted(m for p, m in created_open.items() if ".key." in p) == [0o600] * 4
    assert pki.ca_key == tmp_path / certs.CA_PRIVATE / "ca.key"
    assert _mode(pki.ca_key.parent) == 0o700
    handed_out = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert "ca.key" not in handed_out and "ca.pem" in handed_out
    assert not any("PRIVATE KEY" in (tmp_path / n).read_text() for n in handed_out if "ca" in n)
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    assert ca_key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ) == ca_cert.public_key().public_bytes(serialization.Encoding.PEM, public)
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary left behind


def test_tokens_are_created_0600_also_when_rewritten(tmp_path, created_open) -> None:
    files = auth.make_tokens(tmp_path, [0, 1])
    server_file = tmp_path / "tokens.json"
    for path in [server_file, *files.values()]:
        assert _mode(path) == 0o600, path
    auth.revoke(server_file, 1)
    assert _mode(server_file) == 0o600
    assert auth.read_records(server_file)[1].revoked
    assert created_open and set(created_open.values()) == {0o600}


def test_an_existing_open_tokens_file_is_replaced_not_reused(tmp_path, monkeypatch) -> None:
    auth.make_tokens(tmp_path, [0])
    server_file = tmp_path / "tokens.json"
    server_file.chmod(0o644)  # as an older version left it, or a careless copy
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("narrowed after writing"))
    auth.make_tokens(tmp_path, [1])
    assert _mode(server_file) == 0o600
    assert set(auth.read_records(server_file)) == {0, 1}


def test_certs_command_says_the_ca_key_folder_stays_put(tmp_path, capsys) -> None:
    code = cli.main(["certs", str(tmp_path), "--clients", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert certs.CA_PRIVATE in out and "never copy" in out and "ca.pem" in out
