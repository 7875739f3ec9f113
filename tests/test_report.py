"""``fedguard report``: one self-contained HTML file, opened offline in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fedguard
from browser import browser, full_page_screenshot, wait_for  # noqa: F401 (fixture)
from conftest import metric_rows, tiny_config
from fedguard import cli
from fedguard.observe import report

CENTRAL = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3}


def test_report_of_a_dp_run_opens_offline_in_chromium(tmp_path: Path, browser) -> None:  # noqa: F811
    cfg = tiny_config(
        experiment={"name": "reported", "rounds": 2},
        privacy=CENTRAL,
        contribution={"method": "cosine"},
    )
    run = tmp_path / "run"
    fedguard.run(cfg, out=run, progress=False)
    with open(run / "run.log", "a") as log:  # as the driver logs a refused client
        log.write(
            "2026-01-01 00:00:00 WARNING fedguard.round: round 2: client 5 rejected: "
            "Update norm 1e30 is absurd\n"
        )
    assert cli.main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    # self-contained: no script, style or image fetched from anywhere
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=", html)
    summary = json.loads((run / "summary.json").read_text())
    rows = metric_rows(run)
    browser.get((tmp_path / "r.html").as_uri())
    wait_for(browser, lambda d: d.execute_script("return window.fedguardReportReady"), "charts")
    charts = browser.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot')].map(e => "
        "[e.layout.title.text, e.data.map(t => [t.x, t.y, t.z || null])])"
    )
    by_title = {title: data for title, data in charts}
    accuracy = by_title["test accuracy"][0]
    assert accuracy[0] == [1, 2] and accuracy[1] == [r["test_accuracy"] for r in rows]
    epsilon = by_title["epsilon spent after each round"][0]
    assert epsilon[1] == [r["epsilon"] for r in rows]
    matrix = next(d for t, d in by_title.items() if t.startswith("confusion matrix"))[0][2]
    assert matrix == summary["confusion_matrix"]
    assert any(t.startswith("cumulative scores") for t in by_title)
    text = browser.execute_script("return document.body.innerText")
    for heading in ("Configuration", "Partition", "Privacy", "Secure aggregation", "Audit"):
        assert heading in text
    assert f"{summary['epsilon']:.6g}" in text
    assert "Inputs to recompute epsilon" in text and "noise_multiplier" in text
    assert "absurd" in text  # the failures-and-rejections table, from run.log
    shot = full_page_screenshot(browser, tmp_path / "report.png", width=1200)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err
    assert not (tmp_path / "report.html").exists()


def test_problems_by_client_reads_the_drivers_log_lines() -> None:
    log = (
        "x WARNING fedguard.round: round 1: client 3 failed (timeout): replied after 9.00 s\n"
        "x WARNING fedguard.round: round 2: client 3 rejected: Malformed message payload\n"
        "x INFO fedguard: resuming after round 2\n"
        "x WARNING fedguard.round: round 4: client 0 failed (error): ConnectionError: gone\n"
    )
    got = report.problems_by_client(log)
    assert got == {
        3: [
            {"round": 1, "kind": "failed (timeout)", "reason": "replied after 9.00 s"},
            {"round": 2, "kind": "rejected", "reason": "Malformed message payload"},
        ],
        0: [{"round": 4, "kind": "failed (error)", "reason": "ConnectionError: gone"}],
    }


def test_left_out_by_client_counts_the_rounds_and_averages_the_trim() -> None:
    rows = [
        {"round": 1, "robust_rule": "multi_krum", "left_out_clients": [5, 2]},
        {"round": 2, "robust_rule": "multi_krum", "left_out_clients": [5]},
        {"round": 3},  # a row without a rule (an older run, or an aborted round)
    ]
    assert report.left_out_by_client(rows) == {
        5: {"rule": "multi_krum", "rounds": [1, 2], "trimmed": None},
        2: {"rule": "multi_krum", "rounds": [1], "trimmed": None},
    }
    trimmed = [
        {"round": 1, "robust_rule": "trimmed_mean", "trimmed_share": {"0": 0.25, "1": 1.0}},
        {"round": 2, "robust_rule": "trimmed_mean", "trimmed_share": {"0": 0.75, "1": 1.0}},
    ]
    assert report.left_out_by_client(trimmed) == {
        0: {"rule": "trimmed_mean", "rounds": [], "trimmed": 0.5},
        1: {"rule": "trimmed_mean", "rounds": [], "trimmed": 1.0},
    }
