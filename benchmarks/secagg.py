"""Cost of secure aggregation (SecAgg, SecAgg+) over a plain round, through the same driver.

Clients do no training: each answers a fit task with a fixed update of ``dim`` floats and 100
examples, so what is timed is the protocol (keys, Shamir shares, AEAD, mask expansion, encoding)
and the transport, not SGD. For every cohort size ``n`` the plain round (``RoundDriver`` without
secure aggregation) and the secure rounds run through the same ``RoundDriver`` and
``InProcessTransport`` in this process, interleaved (plain, secagg, secagg+, plain, ...) after one
warm-up round each; the JSON holds medians over the repeats. ``client_seconds`` is the time spent
inside the client handler (all phases, all clients, sequentially), ``server_seconds`` the rest
of the round. ``bytes_up_ratio`` is the secure round's upload (all phases) over the plain one's.

The dropout part runs ``--dropout-rounds`` rounds at ``n = 100`` in which 10% of the clients,
drawn afresh each round, vanish after sharing their keys (before the masked-input phase), and
reports the share of rounds that still complete.

    python benchmarks/secagg.py --sizes 10 50 100 200 --dim 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.protocol import messages, secagg, secagg_client
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.secagg import Mode, Phase
from fedguard.protocol.strategy import Strategy, StrategyKind
from fedguard.runtime.dropout import PhaseDropout
from fedguard.runtime.inprocess import InProcessTransport

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "secagg.json"
EXAMPLES = 100


class FixedClients:
    """The client side: a fixed update per client, secure aggregation answered for real."""

    def __init__(self, n: int, dim: int) -> None:
        rng = np.random.default_rng(0)
        self.updates = {
            c: torch.from_numpy(rng.normal(0, 0.01, dim).astype(np.float32)) for c in range(n)
        }
        self.secagg = secagg_client.SecAggClient(self.fit)
        self.seconds = 0.0

    def fit(self, task: messages.FitTask) -> messages.FitReply:
        update = self.updates[task.client_id]
        return messages.FitReply(task.round, task.client_id, update, EXAMPLES, {"train_loss": 0.0})

    def handle(self, client_id: int, payload: bytes) -> bytes:
        start = time.perf_counter()
        request = messages.decode(payload)
        if isinstance(request, messages.FitTask):
            reply = messages.encode(self.fit(request))
        else:
            reply = messages.encode(self.secagg.handle(request))
        self.seconds += time.perf_counter() - start
        return reply


def _driver(transport, n: int, dim: int, mode: Mode | None) -> RoundDriver:
    strategy = Strategy.create(StrategyKind.FEDAVG, client_config={}, num_clients=n)
    settings = None
    if mode is not None:
        settings = secagg.Settings(mode, clip_norm=1.0, max_weight=EXAMPLES)
    return RoundDriver(
        transport,
        strategy,
        dim=dim,
        clients_per_round=n,
        min_clients=1,
        seed=0,
        secure_aggregation=settings,
    )


def _time_round(driver: RoundDriver, clients: FixedClients, round_: int, params) -> dict:
    clients.seconds = 0.0
    start = time.perf_counter()
    result = driver.fit_round(round_, params, driver.strategy.init(params))
    seconds = time.perf_counter() - start
    return {
        "round_seconds": seconds,
        "client_seconds": clients.seconds,
        "server_seconds": seconds - clients.seconds,
        "bytes_up": result.metrics["bytes_up"],
        "bytes_down": result.metrics["bytes_down"],
    }


def bench_size(n: int, dim: int, repeats: int, modes: list[Mode]) -> list[dict[str, Any]]:
    clients = FixedClients(n, dim)
    transport = InProcessTransport(clients.handle, list(range(n)))
    drivers: dict[Mode | None, RoundDriver] = {None: _driver(transport, n, dim, None)}
    drivers.update({m: _driver(transport, n, dim, m) for m in modes})
    params = torch.zeros(dim)
    samples: dict[Mode | None, list[dict]] = {k: [] for k in drivers}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for key, driver in drivers.items():
            timing = _time_round(driver, clients, repeat + 1, params)
            if repeat > 0:
                samples[key].append(timing)

    def median(key: Mode | None, field: str) -> float:
        return statistics.median(s[field] for s in samples[key])

    rows = []
    for mode in modes:
        rows.append(
            {
                "n": n,
                "dim": dim,
                "mode": str(mode),
                "round_seconds": median(mode, "round_seconds"),
                "plain_round_seconds": median(None, "round_seconds"),
                "client_seconds": median(mode, "client_seconds"),
                "server_seconds": median(mode, "server_seconds"),
                "bytes_up_ratio": median(mode, "bytes_up") / median(None, "bytes_up"),
                "bytes_down_ratio": median(mode, "bytes_down") / median(None, "bytes_down"),
                "round_ratio": median(mode, "round_seconds") / median(None, "round_seconds"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_dropout(n: int, dim: int, rounds: int, fraction: float, mode: Mode) -> dict[str, Any]:
    clients = FixedClients(n, dim)
    transport = PhaseDropout(InProcessTransport(clients.handle, list(range(n))), {})
    driver = _driver(transport, n, dim, mode)
    params = torch.zeros(dim)
    rng = np.random.default_rng(1)
    completed = 0
    for r in range(1, rounds + 1):
        drop = rng.choice(n, size=round(fraction * n), replace=False)
        transport.drops = {Phase.MASK: frozenset(int(c) for c in drop)}
        try:
            driver.fit_round(r, params, driver.strategy.init(params))
            completed += 1
        except secagg.SecAggAbortedError:
            pass
    row = {
        "n": n,
        "dim": dim,
        "mode": str(mode),
        "drop_fraction": fraction,
        "dropped_before": "masked input",
        "rounds": rounds,
        "completed_share": completed / rounds,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    import logging

    logging.getLogger("fedguard").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dropout-rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args.dim, args.repeats, [Mode.SECAGG_PLUS, Mode.SECAGG])
    dropout = [
        bench_dropout(100, args.dim, args.dropout_rounds, 0.1, mode)
        for mode in (Mode.SECAGG_PLUS, Mode.SECAGG)
    ]
    result = {
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
        "repeats": args.repeats,
        "rows": rows,
        "dropout": dropout,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
