"""Flower's SecAgg+ and plain rounds in Flower's own simulation: the reference for ``secagg.py``.

Not part of fedguard and not run by the tests: it needs Flower, best in its own environment
(it brings Ray and its own pins)::

    python3 -m venv /tmp/flwr && /tmp/flwr/bin/pip install "flwr[simulation]==1.42.0"
    /tmp/flwr/bin/python benchmarks/flower_secagg.py --n 100 --dim 100000

The setting is ``secagg.py``'s: ``n`` clients that do no training (each returns the same fixed
update of ``dim`` float32 values and 100 examples), every client in every round, FedAvg, no
evaluation. Flower's simulation runs the clients as Ray actors, one CPU each. For every
configuration (``plain``: the default fit workflow; an integer ``k``: ``SecAggPlusWorkflow`` with
``num_shares = k`` and ``reconstruction_threshold = k // 2 + 1``; ``all``: ``num_shares = n - 1``,
every client sharing with every other) a fresh process runs ``--rounds`` rounds; a round is timed
from the strategy's ``configure_fit`` to the end of its ``aggregate_fit``, and the first round
(Ray start-up, key caches) is left out of the median. Rows go to
``benchmarks/results/flower_secagg.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "flower_secagg.json"
EXAMPLES = 100


def run_one(n: int, dim: int, shares: str, rounds: int) -> None:
    """Run ``rounds`` Flower rounds in this process; print one JSON line per round."""
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    update = np.random.default_rng(0).normal(0, 0.01, dim).astype(np.float32)

    class FixedClient(NumPyClient):
        def fit(self, parameters, config):
            return [update], EXAMPLES, {}

    def client_fn(context: Context):
        return FixedClient().to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            row = {
                "round": server_round,
                "seconds": time.perf_counter() - self.started,
                "results": len(results),
                "failures": len(failures),
            }
            print("ROUND " + json.dumps(row), flush=True)
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:
        strategy = TimedFedAvg(
            fraction_fit=1.0,
            min_fit_clients=n,
            min_available_clients=n,
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        if shares == "plain":
            workflow = DefaultWorkflow()
        else:
            k = n - 1 if shares == "all" else int(shares)
            secure = SecAggPlusWorkflow(num_shares=k, reconstruction_threshold=k // 2 + 1)
            workflow = DefaultWorkflow(fit_workflow=secure)
        workflow(grid, legacy)

    mods = [] if shares == "plain" else [secaggplus_mod]
    run_simulation(
        server_app=server_app,
        client_app=ClientApp(client_fn=client_fn, mods=mods),
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1}},
    )


def measure(n: int, dim: int, shares: str, rounds: int, timeout_s: float) -> dict:
    """One configuration in a fresh process; the median round after the first."""
    command = [sys.executable, __file__, "--one", shares, "--n", str(n), "--dim", str(dim)]
    command += ["--rounds", str(rounds)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    lines = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("ROUND ")]
    if len(lines) < 2:
        raise RuntimeError(
            f"Flower ({shares}) completed {len(lines)} rounds:\n{done.stderr[-2000:]}"
        )
    seconds = [row["seconds"] for row in lines[1:]]
    row = {
        "n": n,
        "dim": dim,
        "shares": shares,
        "rounds_timed": len(seconds),
        "round_seconds": statistics.median(seconds),
        "min_round_seconds": min(seconds),
        "failures": sum(row["failures"] for row in lines),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--shares", nargs="+", default=["plain", "5", "7", "all"])
    parser.add_argument("--rounds", type=int, default=4, help="per configuration, first untimed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.one:
        run_one(args.n, args.dim, args.one, args.rounds)
        return
    import flwr

    rows = [measure(args.n, args.dim, s, args.rounds, args.timeout) for s in args.shares]
    plain = next((r["round_seconds"] for r in rows if r["shares"] == "plain"), None)
    for row in rows:
        row["plain_round_seconds"] = plain
        row["round_ratio"] = None if plain is None else row["round_seconds"] / plain
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
        "flower": flwr.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
