"""Speed of the robust aggregators at K = 100 updates of D = 1,000,000 float32 on CPU.

Each aggregator runs through ``robust.apply`` (input checks included) on the same Gaussian
updates, ``f = 10`` (Bulyan's limit at K = 100 is 24; Krum's 48), after one warm-up call. The
plain weighted mean (``aggregation.weighted_mean``, what FedAvg runs) is timed in the same process,
interleaved with the others, so ``ratio_to_mean`` compares numbers taken under the same load.

    python benchmarks/robust_speed.py --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedguard.algorithms import robust
from fedguard.algorithms.optimizers import aggregation

K, D, F = 100, 1_000_000, 10
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "robust_speed.json"


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    updates = torch.randn(K, D, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(K)
    runners: dict[str, Callable[[], object]] = {
        "mean": lambda: aggregation.weighted_mean(updates, weights)
    }
    for kind in robust.RobustAggregator:
        cfg = robust.RobustConfig(kind, f=F, norm_bound=1000.0)
        runners[kind.value] = functools.partial(
            robust.apply, cfg, robust.init(cfg, D), updates, weights
        )
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn))
    mean_median = statistics.median(times["mean"])
    results = {
        name: {
            "min_s": min(ts),
            "median_s": statistics.median(ts),
            "ratio_to_mean": statistics.median(ts) / mean_median,
            "times_s": ts,
        }
        for name, ts in times.items()
    }
    report = {
        "k": K,
        "d": D,
        "f": F,
        "dtype": "float32",
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(
            f"{name:18s} min {r['min_s']:.3f} s  median {r['median_s']:.3f} s  x{r['ratio_to_mean']:.1f}"
        )


if __name__ == "__main__":
    main()
