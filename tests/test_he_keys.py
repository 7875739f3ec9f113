"""``fedguard he-keys``: one key for the clients, a key-less parameter file for the server."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from conftest import tiny_config
from fedguard import cli
from fedguard.algorithms.he import encryption
from fedguard.experiment import config as config_mod
from fedguard.experiment import deployment
from fedguard.runtime import he_keys


def test_he_keys_writes_a_client_key_and_a_server_file_that_cannot_decrypt(tmp_path) -> None:
    assert cli.main(["he-keys", str(tmp_path), "--scheme", "bfv"]) == 0
    client_path, server_path = (
        tmp_path / he_keys.CLIENT_KEY_FILE,
        tmp_path / he_keys.SERVER_PARAMS_FILE,
    )
    assert stat.S_IMODE(client_path.stat().st_mode) == 0o600  # the key: its owner only
    key = he_keys.load(client_path, secret=True, scheme="bfv")
    server = he_keys.load(server_path, secret=False, scheme="bfv")
    assert server_path.stat().st_size < 1000 < client_path.stat().st_size
    blobs = encryption.encrypt(key, encryption.BFV, np.arange(-300, 300))
    total = encryption.add(None, encryption.load(server, encryption.BFV, blobs, 600))
    total = encryption.add(total, encryption.load(server, encryption.BFV, blobs, 600))
    summed = encryption.serialize(total)
    with pytest.raises(ValueError, match="secret key"):
        encryption.decrypt(server, encryption.BFV, summed, 600)
    assert np.array_equal(
        encryption.decrypt(key, encryption.BFV, summed, 600), 2 * np.arange(-300, 300)
    )
    with pytest.raises(ValueError, match="not the server's parameter file"):
        he_keys.load(client_path, secret=False)
    with pytest.raises(ValueError, match="holds a bfv key"):
        he_keys.load(client_path, secret=True, scheme="ckks")
    (tmp_path / "junk").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not an HE file"):
        he_keys.load(tmp_path / "junk", secret=True)


def test_a_deployed_server_needs_the_parameter_file_exactly_under_he(tmp_path) -> None:
    he_keys.make_keys(tmp_path, "ckks")
    he = config_mod.validate(
        tiny_config(
            secure_aggregation={
                "enabled": True,
                "mode": "ckks",
                "he_scheme": "ckks",
                "clip_norm": 1.0,
            }
        )
    )
    plain = config_mod.validate(tiny_config())
    with pytest.raises(config_mod.ConfigError, match="needs --he-params"):
        deployment.server_he_context(he, None)
    with pytest.raises(config_mod.ConfigError, match="does not use"):
        deployment.server_he_context(plain, tmp_path / he_keys.SERVER_PARAMS_FILE)
    ctx = deployment.server_he_context(he, tmp_path / he_keys.SERVER_PARAMS_FILE)
    assert not encryption.can_decrypt(ctx)
    assert deployment.server_he_context(plain, None) is None
