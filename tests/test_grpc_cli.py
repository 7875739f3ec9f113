"""The deployment commands refuse plain text off loopback, or without --insecure, in one line;
a deployed round always has a stated deadline (--round-deadline, server.deadline_s or 120 s)."""

from __future__ import annotations

import tomli_w

from conftest import tiny_config
from fedguard import cli
from fedguard.experiment import config as config_mod
from fedguard.experiment import deployment as grpc_deploy
from fedguard.runtime import auth


def _fedguard(*args: str, capsys) -> tuple[int, str]:
    """Run the command line in this process (no interpreter start-up); exit code and stderr."""
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def test_plaintext_is_refused_off_loopback_and_without_the_flag(tmp_path, capsys) -> None:
    auth.make_tokens(tmp_path, [0])
    tokens = str(tmp_path / "tokens.json")
    token = str(tmp_path / "client-0.token")
    cases = [
        (
            ["server", "x.toml", "--address", "0.0.0.0:8443", "--tokens", tokens, "--insecure"],
            "only on a loopback address",
        ),
        (
            ["server", "x.toml", "--address", "127.0.0.1:8443", "--tokens", tokens],
            "TLS certificates are required",
        ),
        (
            [
                "client",
                "x.toml",
                "--server",
                "10.1.2.3:8443",
                "--client-id",
                "0",
                "--token-file",
                token,
                "--insecure",
            ],
            "only on a loopback address",
        ),
    ]
    for args, message in cases:
        code, err = _fedguard(*args, capsys=capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_certs_and_tokens_commands_write_their_files(tmp_path, capsys) -> None:
    code, err = _fedguard(
        "certs",
        str(tmp_path),
        "--clients",
        "2",
        "--host",
        "fl.example.org",
        "--tokens",
        capsys=capsys,
    )
    assert code == 0, err
    names = {p.name for p in tmp_path.iterdir()}
    assert {"ca.pem", "server.pem", "server.key", "client-1.pem", "client-1.key"} <= names
    assert {"tokens.json", "client-0.token", "client-1.token"} <= names
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    code, err = _fedguard("tokens", str(tmp_path), "--revoke", "1", capsys=capsys)
    assert code == 0, err
    records = auth.read_records(tmp_path / "tokens.json")
    assert records[1].revoked and not records[0].revoked


def test_a_deployed_round_always_has_a_stated_deadline(tmp_path, capsys) -> None:
    def options(round_deadline_s: float | None) -> grpc_deploy.ServerOptions:
        return grpc_deploy.ServerOptions(
            "127.0.0.1:1", None, None, insecure=True, round_deadline_s=round_deadline_s
        )

    def deadline(config, round_deadline_s: float | None) -> float | None:
        overrides = grpc_deploy.deadline_overrides(config, options(round_deadline_s), [])
        return config_mod.load(config, overrides).server.deadline_s

    unset = tmp_path / "unset.toml"
    unset.write_text(tomli_w.dumps(tiny_config()))
    stated = tmp_path / "stated.toml"
    stated.write_text(tomli_w.dumps(tiny_config(server={"deadline_s": 30.0})))
    assert config_mod.load(unset).server.deadline_s is None  # the simulator needs none
    assert deadline(unset, None) == grpc_deploy.DEFAULT_ROUND_DEADLINE_S == 120.0
    assert deadline(stated, None) == 30.0
    assert deadline(stated, 5.0) == deadline(unset, 5.0) == 5.0  # the flag wins
    auth.make_tokens(tmp_path, [0])
    code, err = _fedguard(
        "server",
        str(unset),
        "--address",
        "127.0.0.1:1",
        "--tokens",
        str(tmp_path / "tokens.json"),
        "--insecure",
        "--round-deadline",
        "0",
        capsys=capsys,
    )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--round-deadline must be positive, got 0" in err
