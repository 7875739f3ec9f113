"""Make the README's pictures: the dashboard following a two-run sweep, and the top of a report.

Two tiny synthetic runs that differ in their DP noise (a sweep), with a privacy budget and
contribution scores, are run one after the other while ``fedguard dashboard`` follows both;
headless Chromium (the system's) takes the screenshots, which are then reduced to a palette of
256 colours to stay small.

    python docs/make_screenshots.py          # writes docs/dashboard.png and docs/report.png
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dashboard import browser, load_page  # noqa: E402

from fedguard.observe import report  # noqa: E402
from fedguard.runtime.grpc_launch import free_port  # noqa: E402

DOCS = Path(__file__).resolve().parent


def sweep_config(noise: float) -> dict:
    return {
        "experiment": {"name": f"noise-{noise:g}", "seed": 1, "rounds": 20},
        "data": {
            "dataset": "synthetic",
            "num_clients": 8,
            "synthetic_samples": 1600,
            "synthetic_shape": [1, 6, 6],
            "synthetic_classes": 3,
            "partition": "dirichlet",
            "alpha": 0.5,
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg", "clients_per_round": 6},
        "privacy": {
            "mode": "central",
            "noise_multiplier": noise,
            "clip_norm": 1.0,
            "delta": 1e-3,
            "max_epsilon": 40.0,
        },
        "contribution": {"method": "cosine"},
    }


def small_png(path: Path) -> None:
    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    python = [sys.executable, "-m", "fedguard.cli"]
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = []
        for noise in (2.0, 3.0):
            cfg = folder / f"noise-{noise:g}.toml"
            cfg.write_text(tomli_w.dumps(sweep_config(noise)))
            runs.append((cfg, Path("runs") / f"noise-{noise:g}"))  # shown relative
        port = free_port()
        dashboard = subprocess.Popen(
            [*python, "dashboard", *(str(r) for _, r in runs), "--address", f"127.0.0.1:{port}"],
            cwd=folder,
        )
        driver = browser(1400, 1000)
        try:
            for cfg, out in runs:
                subprocess.run(
                    [*python, "run", str(cfg), "--out", str(out), "--quiet"], check=True, cwd=folder
                )
            time.sleep(1.0)
            load_page(driver, f"http://127.0.0.1:{port}/", 1)
            time.sleep(1.0)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1400, int(height) + 120)
            time.sleep(0.5)
            driver.save_screenshot(str(DOCS / "dashboard.png"))
            os.chdir(folder)  # the report names its run folder as given: relative
            page = report.write_report(runs[0][1], folder / "report.html")
            driver.set_window_size(1200, 1500)
            driver.get(page.as_uri())
            time.sleep(2.0)
            driver.save_screenshot(str(DOCS / "report.png"))
        finally:
            os.chdir(here)
            driver.quit()
            dashboard.terminate()
            dashboard.wait(10)
    for name in ("dashboard.png", "report.png"):
        small_png(DOCS / name)
        print(DOCS / name, (DOCS / name).stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
