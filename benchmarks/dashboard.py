"""The dashboard while it follows a 200-round run: page load time, redraw time, and the
dashboard server's memory.

A real setup, each piece in its own process: ``fedguard run`` of a tiny synthetic experiment
(logistic regression on 1x6x6 inputs in 3 classes, 6 clients, 4 per round, central DP so the
epsilon chart has data, evaluated every round) for ``--rounds`` rounds; ``fedguard dashboard``
following its folder (polled by the page every second); headless Chromium (the system's, through
Selenium) showing the page. While the run goes, every ``--sample-s`` seconds the benchmark reads
the dashboard server's ``VmRSS`` from ``/proc/PID/status``, times one ``GET /api/runs`` (what the
page fetches each poll) and reads from the page which round it shows and how long its last
redraw took. After the run it loads the page ``--loads`` times more (the full 200 rounds) and
reads the server's peak RSS (``VmHWM``).

Rows (benchmarks/results/dashboard.json):

* ``samples``: per sample: seconds since the run started, the round the page shows, the rounds
  in metrics.jsonl, server RSS (MiB), /api/runs time (ms) and size (KiB), the page's last redraw
  time (ms);
* ``page_load``: for the first load (run just started) and each load after the run: ms from
  navigation start to DOMContentLoaded, to the load event, and to the first redraw with the
  run's data (``window.fedguardDashboard.firstRenderMs``), with the rounds drawn;
* ``server_memory``: RSS before the page was opened, at the end, peak (VmHWM), in MiB;
* ``run``: rounds, seconds, and the machine (CPUs, load average at start and end: the numbers
  are wall times on a shared machine).

    python benchmarks/dashboard.py                       # 200 rounds; about a minute
    python benchmarks/dashboard.py --rounds 50 --out /some/where.json --screenshot page.png

Linux only (``/proc``); needs chromium and chromedriver (``apt-get install -y chromium
chromium-driver``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

from fedguard.runtime.grpc_launch import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "dashboard.json"


def config(rounds: int) -> dict[str, Any]:
    return {
        "experiment": {"name": f"dashboard-{rounds}", "seed": 1, "rounds": rounds},
        "data": {
            "dataset": "synthetic",
            "num_clients": 6,
            "synthetic_samples": 600,
            "synthetic_shape": [1, 6, 6],
            "synthetic_classes": 3,
            "partition": "dirichlet",
            "alpha": 1.0,
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg", "clients_per_round": 4},
        "privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-3},
    }


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for process {pid}")


def api_call(url: str) -> tuple[float, float, int]:
    """(ms, KiB, rounds) of one GET /api/runs."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    ms = (time.perf_counter() - t0) * 1000.0
    runs = json.loads(body)["runs"]
    return ms, len(body) / 1024.0, len(runs[0]["metrics"])


def browser(width: int = 1400, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def load_page(driver: Any, url: str, min_rounds: int = 0) -> dict[str, Any]:
    """Open ``url`` and wait for the first redraw with at least ``min_rounds`` rounds."""
    driver.get(url)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        state = driver.execute_script(
            "const d = window.fedguardDashboard; if (!d) return null;"
            "return [d.firstRenderMs, d.data.runs[0].metrics.length];"
        )
        if state is not None and state[1] >= min_rounds:
            break
        time.sleep(0.02)
    else:
        raise RuntimeError("the page never drew the run")
    timing = driver.execute_script(
        "const t = performance.getEntriesByType('navigation')[0];"
        "return [t.domContentLoadedEventEnd, t.loadEventEnd];"
    )
    return {
        "dom_content_loaded_ms": round(timing[0], 1),
        "load_event_ms": round(timing[1], 1),
        "first_render_ms": round(state[0], 1),
        "rounds_drawn": state[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--loads", type=int, default=5, help="page loads after the run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    python = [sys.executable, "-m", "fedguard.cli"]
    with tempfile.TemporaryDirectory(prefix="fedguard-dashboard-bench-") as tmp:
        folder = Path(tmp)
        cfg = folder / "run.toml"
        cfg.write_text(tomli_w.dumps(config(args.rounds)))
        run_dir = folder / "run"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        dashboard = subprocess.Popen(
            [*python, "dashboard", str(run_dir), "--address", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        driver = None
        run = None
        try:
            for _ in range(600):  # the server listens
                try:
                    api_call(f"{base}/api/runs")
                    break
                except OSError:
                    time.sleep(0.1)
            rss_idle = rss_mib(dashboard.pid)
            load_start = os.getloadavg()
            started = time.perf_counter()
            run = subprocess.Popen(
                [*python, "run", str(cfg), "--out", str(run_dir), "--quiet"], env=env
            )
            driver = browser()
            loads = [{"when": "run starting", **load_page(driver, base + "/")}]
            samples = []
            while True:
                done = run.poll() is not None
                ms, kib, rows = api_call(f"{base}/api/runs")
                page = driver.execute_script(
                    "const d = window.fedguardDashboard; const e = document.getElementById("
                    "'round-0'); return [e ? Number(e.textContent) : 0, d ? d.lastRenderMs : null];"
                )
                samples.append(
                    {
                        "seconds": round(time.perf_counter() - started, 2),
                        "round_shown": page[0],
                        "rounds_written": rows,
                        "server_rss_mib": round(rss_mib(dashboard.pid), 1),
                        "api_ms": round(ms, 1),
                        "api_kib": round(kib, 1),
                        "redraw_ms": None if page[1] is None else round(page[1], 1),
                    }
                )
                if done:
                    break
                time.sleep(args.sample_s)
            run_seconds = time.perf_counter() - started
            if run.returncode != 0:
                raise RuntimeError(f"the run failed ({run.returncode})")
            time.sleep(1.5)  # one more poll draws the finished run
            for i in range(args.loads):
                loads.append(
                    {
                        "when": f"after the run, load {i + 1}",
                        **load_page(driver, base + "/", args.rounds),
                    }
                )
            if args.screenshot is not None:
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1400, int(height) + 20)
                driver.save_screenshot(str(args.screenshot))
            api_after = [api_call(f"{base}/api/runs") for _ in range(20)]
            memory = {
                "idle_before_page_mib": round(rss_idle, 1),
                "end_mib": round(rss_mib(dashboard.pid), 1),
                "peak_mib": round(rss_mib(dashboard.pid, "VmHWM"), 1),
            }
        finally:
            if driver is not None:
                driver.quit()
            for p in (run, dashboard):
                if p is not None and p.poll() is None:
                    p.terminate()
                    p.wait(10)
    after = [x for x in loads if x["when"].startswith("after")]
    result = {
        "benchmark": "dashboard following a run",
        "run": {
            "rounds": args.rounds,
            "seconds": round(run_seconds, 1),
            "config": "tiny synthetic: logistic regression, 6 clients, 4 per round, central DP",
        },
        "page_load": loads,
        "page_load_after_run_median_ms": {
            k: statistics.median(x[k] for x in after)
            for k in ("dom_content_loaded_ms", "load_event_ms", "first_render_ms")
        },
        "api_after_run": {
            "median_ms": round(statistics.median(a[0] for a in api_after), 2),
            "kib": round(api_after[0][1], 1),
            "rounds": api_after[0][2],
        },
        "redraw_ms_max": max((s["redraw_ms"] or 0.0) for s in samples),
        "server_memory": memory,
        "samples": samples,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
            "chromium": subprocess.run(
                [shutil.which("chromium") or "/usr/bin/chromium", "--version"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "run",
                    "page_load_after_run_median_ms",
                    "api_after_run",
                    "redraw_ms_max",
                    "server_memory",
                )
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
