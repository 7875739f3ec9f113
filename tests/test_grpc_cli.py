"""The deployment commands refuse plain text off loopback, or without --insecure, in one line."""

from __future__ import annotations

from fedguard import cli
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
