"""`fedguard audit RUN_DIR`: every attack from the command line, its files and exit codes."""

from __future__ import annotations

import json

import fedguard
from conftest import tiny_config
from fedguard import cli


def _run(tmp_path, canaries: int, rounds: int = 2) -> str:
    cfg = tiny_config(
        experiment={"rounds": rounds, "seed": 5},
        data={"num_clients": 2, "synthetic_samples": 200, "synthetic_shape": [1, 8, 8]},
        server={"clients_per_round": 2},
        audit={"canaries": canaries},
    )
    out = tmp_path / f"run{canaries}"
    fedguard.run(cfg, out=out, progress=False)
    return str(out)


def test_audit_all_writes_one_row_and_one_line_per_attack(tmp_path, capsys):
    run = _run(tmp_path, canaries=40)
    code = cli.main(
        ["audit", run, "--reference-models", "1", "--iterations", "50", "--batch-size", "2"]
    )
    assert code == 0
    out = capsys.readouterr().out
    for start in ("canary: epsilon lower bound", "membership: loss attack AUC", "inversion: PSNR"):
        assert sum(line.startswith(start) for line in out.splitlines()) == 1
    rows = json.loads((tmp_path / "run40" / "audit" / "audit.json").read_text())["rows"]
    assert [r["attack"] for r in rows] == ["canary", "membership", "inversion"]
    assert rows[2]["batch_size"] == 2 and len(rows[2]["psnr_each"]) == 2
    pictures = {p.name for p in (tmp_path / "run40" / "audit").iterdir()}
    assert {"membership_roc.png", "inversion.png"} <= pictures


def test_all_skips_the_canary_audit_of_a_run_without_canaries_and_canary_refuses(tmp_path, capsys):
    run = _run(tmp_path, canaries=0, rounds=3)
    out_dir = tmp_path / "elsewhere"
    args = ["audit", run, "--attack", "membership", "--reference-models", "0"]
    assert cli.main([*args, "--out", str(out_dir)]) == 0
    rows = json.loads((out_dir / "audit.json").read_text())["rows"]
    assert [r["attack"] for r in rows] == ["membership"] and rows[0]["reference_models"] == 0
    capsys.readouterr()
    assert cli.main(["audit", run, "--attack", "canary"]) == cli.EXIT_CONFIG
    assert "--audit-canaries" in capsys.readouterr().err
    # checkpoint.keep = 2 keeps rounds 2 and 3: round 2 started from round 1's, which is gone
    inversion = ["audit", run, "--attack", "inversion", "--iterations", "5"]
    assert cli.main([*inversion, "--round", "2"]) == cli.EXIT_CONFIG
    assert "checkpoint of round 1" in capsys.readouterr().err
    assert cli.main([*inversion, "--round", "3"]) == 0
    assert cli.main([*inversion, "--batch-size", "0"]) == cli.EXIT_CONFIG
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err


def test_audit_of_a_folder_that_is_no_run_says_so(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path)]) == cli.EXIT_CONFIG
    assert "no config.toml" in capsys.readouterr().err


def test_run_audit_canaries_flag_sets_the_config_key(tmp_path):
    toml = tmp_path / "e.toml"
    toml.write_text(
        "[experiment]\nrounds = 1\n[data]\nnum_clients = 2\nsynthetic_samples = 100\n"
        'synthetic_shape = [1, 8, 8]\n[model]\nname = "logistic_regression"\n'
    )
    out = tmp_path / "r"
    assert cli.main(["run", str(toml), "--out", str(out), "--quiet", "--audit-canaries", "7"]) == 0
    assert json.loads((out / "canaries.json").read_text())["count"] == 7


def test_a_run_of_the_cohort_engine_is_rebuilt_in_process(tmp_path, capsys):
    cfg = tiny_config(
        experiment={"rounds": 1, "seed": 5},
        data={"num_clients": 2, "synthetic_samples": 100, "synthetic_shape": [1, 8, 8]},
        server={"clients_per_round": 2},
        runtime={"kind": "cohort", "cohort_size": 2},
    )
    out = tmp_path / "cohort"
    fedguard.run(cfg, out=out, progress=False)
    args = ["audit", str(out), "--attack", "membership", "--reference-models", "0"]
    assert cli.main(args) == 0
    assert "membership: loss attack AUC" in capsys.readouterr().out
