"""Cost of secure aggregation (SecAgg, SecAgg+) over a plain round, through the same driver.

Clients do no training: each answers a fit task with a fixed update of ``dim`` floats and 100
examples, so what is timed is the protocol (keys, Shamir shares, AEAD, mask expansion, encoding)
and the transport, not SGD. For every cohort size ``n`` the plain round (``RoundDriver`` without
secure aggregation) and the secure rounds run through the same ``RoundDriver`` and
``InProcessTransport`` in this process, interleaved (plain, secagg, secagg+, plain, ...) after one
warm-up round each; the JSON holds medians over the repeats, the ratios of the minima
(``*_ratio_of_min``) and every sample. The plain round is bimodal here (about 34 ms or 80 ms at
``n = 100``: when glibc has handed the previous round's 40 MB of decoded updates back to the
kernel, the next round faults them in again; with ``MALLOC_TRIM_THRESHOLD_=2000000000
MALLOC_MMAP_THRESHOLD_=100000000`` every round after the first takes 34 ms), so compare the
minima as well as the medians. ``client_seconds`` is the time spent
inside the client handler (all phases, all clients, sequentially), ``server_seconds`` the rest
of the round. ``parallel_round_seconds`` is the round as a deployment runs it, every client on its
own device at the same time: the server's seconds plus, for each phase, the slowest client's
(network latency not included: secure aggregation adds three round trips to the plain round's
one). ``bytes_up_ratio`` is the secure round's upload (all phases) over the plain one's.

SecAgg+ runs twice: with the default degree, chosen to survive a dropout rate of 10% with a
round failure probability below 1e-6 (``secagg_graph.tolerant_degree``; ``k = 30, t = 16`` at
``n = 100``), and with ``k = ceil(log2 n)`` (``dropout_rate = 0``; ``k = 7, t = 5`` at
``n = 100``), so that the cost of the larger ``k`` is measured in the same run. Every row
records its ``neighbours`` and ``threshold``.

Every variant runs twice in the same process, interleaved: against a semi-honest server
(``"server": "semi-honest"``: no identities) and in verified rounds secure against a malicious
server (``"server": "malicious"``: Ed25519 identities, signed keys bound to the round's nonce,
committed graph randomness in SecAgg+, the consistency check, share commitments); each verified
row holds ``verified_ratio`` and ``verified_parallel_ratio``, its round time over the
semi-honest row's of the same run. The simulator serves every client from one object, which checks
each signature once (see :mod:`fedguard.protocol.secagg_client`); ``parallel_round_seconds``
counts the slowest client per phase, which verifies every signature it needs itself.

The dropout part runs ``--dropout-rounds`` rounds at ``n = 100`` in which 10% of the clients,
drawn afresh each round, vanish after sharing their keys (before the masked-input phase), and
reports the share of rounds that still complete.

Every row also holds the medians of the primitives no implementation of the protocol can skip
(``primitive_seconds``: an AES-CTR mask expansion, an X25519 agreement, a key pair, an Ed25519
signature and its check) and the round's minimum of them (``crypto_floor_seconds``: per client 2
key pairs, ``2k`` agreements and ``k + 1`` expansions, plus one expansion per client on the
server; in verified rounds also the signatures and the checks :func:`crypto_floor` lists), so
that ``floor_ratio``, the plain round plus that floor over the plain round, says how close any
ratio can come to 1 on this machine; ``parallel_floor_ratio`` is the same for
``parallel_round_seconds``. ``over_floor`` and ``parallel_over_floor`` are the round over its
floor (the plain round plus the cryptographic floor): 1 would be an implementation that spends
nothing beyond the plain round and the primitives.

The complete graph runs up to ``--complete-up-to`` clients (its ``n^2`` agreements and expansions
take minutes a round beyond); the dropout rows run at every ``--dropout-sizes`` cohort, at the
default degree of each mode (the one sized for 10% dropouts).

    python benchmarks/secagg.py --sizes 10 50 100 200 500 1000 --repeats 3 \
        --dropout-sizes 100 500 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.algorithms.secagg import crypto as secagg_crypto
from fedguard.protocol import fedopt, messages, secagg, secagg_client
from fedguard.protocol.driver import RoundDriver
from fedguard.protocol.secagg import Mode, Phase
from fedguard.protocol.strategy import StrategyKind
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "secagg.json"
EXAMPLES = 100


class FixedClients:
    """The client side: a fixed update per client, secure aggregation answered for real."""

    def __init__(self, n: int, dim: int) -> None:
        rng = np.random.default_rng(0)
        self.updates = {
            c: torch.from_numpy(rng.normal(0, 0.01, dim).astype(np.float32)) for c in range(n)
        }
        self.semi_honest = secagg_client.SecAggClient(self.fit)
        self.identities = secagg.Identities.simulated(0, range(n))
        self.verified = secagg_client.SecAggClient(self.fit, identities=self.identities)
        self.secagg = self.semi_honest  # the one the round being timed talks to
        self.seconds = 0.0
        self.slowest: dict[str, float] = {}  # request kind -> the slowest client's seconds

    def fit(self, task: messages.FitTask) -> messages.FitReply:
        update = self.updates[task.client_id]
        return messages.FitReply(task.round, task.client_id, update, EXAMPLES, {"train_loss": 0.0})

    def answer(self, request: messages.Message) -> messages.Message:
        """The reply to a decoded request: a fit task's update, or the secure-aggregation
        client's answer to a phase of the protocol."""
        if isinstance(request, messages.FitTask):
            return self.fit(request)
        return self.secagg.handle(request)  # type: ignore[arg-type]

    def handle(self, client_id: int, payload: bytes) -> bytes:
        """The transport's handler: decode, answer, encode, timed (all clients' seconds and
        the slowest client's per request kind)."""
        start = time.perf_counter()
        request = messages.decode(payload)
        reply = messages.encode(self.answer(request))
        seconds = time.perf_counter() - start
        self.seconds += seconds
        kind = type(request).__name__
        self.slowest[kind] = max(self.slowest.get(kind, 0.0), seconds)
        return reply


# the mode, the dropout rate its default degree tolerates, and whether rounds are verified
Variant = tuple[Mode, float, bool]
VARIANTS: list[Variant] = [
    (mode, rate, verified)
    for mode, rate in [(Mode.SECAGG_PLUS, 0.1), (Mode.SECAGG_PLUS, 0.0), (Mode.SECAGG, 0.1)]
    for verified in (False, True)
]


def _variants(n: int, complete_up_to: int) -> list[Variant]:
    """The variants measured at ``n`` clients: the complete graph only up to ``complete_up_to``."""
    return [v for v in VARIANTS if v[0] is not Mode.SECAGG or n <= complete_up_to]


def _settings(variant: Variant) -> secagg.Settings:
    mode, rate, _ = variant
    return secagg.Settings(mode, clip_norm=1.0, max_weight=EXAMPLES, dropout_rate=rate)


def _driver(
    transport, n: int, dim: int, variant: Variant | None, clients: FixedClients
) -> RoundDriver:
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=n)
    verified = variant is not None and variant[2]
    return RoundDriver(
        transport,
        strategy,
        dim=dim,
        clients_per_round=n,
        min_clients=1,
        seed=0,
        secure_aggregation=None if variant is None else _settings(variant),
        identities=clients.identities if verified else None,
    )


def _graph(n: int, variant: Variant) -> dict[str, int]:
    setup = _settings(variant).setup(0, list(range(n)), graph_seed=0, dim=1)
    return {"neighbours": setup.neighbours, "threshold": setup.threshold}


def _quorum(n: int, variant: Variant) -> int:
    """The consistency signatures a client of a verified round checks before it unmasks."""
    threshold = _graph(n, variant)["threshold"]
    return max(threshold, n // 2 + 1)


def _time_round(driver: RoundDriver, clients: FixedClients, round_: int, params) -> dict:
    clients.seconds = 0.0
    clients.slowest = {}
    clients.secagg = clients.semi_honest if driver.identities is None else clients.verified
    start = time.perf_counter()
    result = driver.fit_round(round_, params, driver.strategy.init(params))
    seconds = time.perf_counter() - start
    return {
        "round_seconds": seconds,
        "client_seconds": clients.seconds,
        "server_seconds": seconds - clients.seconds,
        "parallel_round_seconds": seconds - clients.seconds + sum(clients.slowest.values()),
        "bytes_up": result.metrics["bytes_up"],
        "bytes_down": result.metrics["bytes_down"],
    }


def primitive_seconds(dim: int, repeats: int = 50) -> dict[str, float]:
    """Median seconds of the primitives every client and the server cannot avoid: one AES-CTR
    mask expansion added into a ``dim + 1`` vector, one X25519 agreement with its HKDF, one
    key pair and, for verified rounds, one Ed25519 signature and one verification."""
    out = np.zeros(dim + 1, dtype=np.uint32)
    pair, peer = secagg_crypto.key_pair(os.urandom), secagg_crypto.key_pair(os.urandom)
    seed = os.urandom(secagg_crypto.KEY_BYTES)
    identity = secagg_crypto.simulated_identity(0, 0)
    public = secagg_crypto.public_identity(identity)
    signed = secagg_crypto.sign(identity, bytes(200))
    work = {
        "expand": lambda: secagg_crypto.add_mask(out, seed),
        "agree": lambda: secagg_crypto.mask_seed(pair.private, peer.public, 1, 0, 1),
        "key_pair": lambda: secagg_crypto.key_pair(os.urandom),
        "sign": lambda: secagg_crypto.sign(identity, bytes(200)),
        "verify": lambda: secagg_crypto.verify(public, signed, bytes(200), client_id=0),
    }
    seconds: dict[str, float] = {}
    for name, fn in work.items():
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        seconds[name] = statistics.median(samples)
    return seconds


def crypto_floor(
    n: int,
    neighbours: int,
    primitives: dict[str, float],
    *,
    verified: bool = False,
    quorum: int = 0,
) -> dict[str, float]:
    """The protocol's unavoidable cryptographic work in a round without dropouts.

    Each client: 2 key pairs, ``k`` agreements for the share keys and ``k`` for the mask seeds,
    ``k + 1`` mask expansions (pairwise and self); the server: one self-mask expansion per
    client. A verified round adds, per client, 2 signatures (its keys, the survivor set) and the
    checks of the signatures it relies on: the advertisements it uses (every client's in SecAgg+,
    whose graph comes from all of their committed randomness; its ``k`` neighbours' in the
    complete graph) and the ``quorum`` survivor signatures before it unmasks; the server checks
    every advertisement and every survivor signature once (``2n``), which is how it names a
    client whose signature its peers would refuse. ``sequential``: all of it one after another
    in one process that checks each signature once (the simulator); ``parallel``: the server's
    part plus one client's (every client on its own device).
    """
    k = neighbours
    client = (
        2 * primitives["key_pair"] + 2 * k * primitives["agree"] + (k + 1) * primitives["expand"]
    )
    server = n * primitives["expand"]
    node_checks = client_checks = 0  # signature checks: once for all clients / by one client
    if verified:
        client += 2 * primitives["sign"]
        server += 2 * n * primitives["verify"]
        node_checks = 2 * n
        client_checks = (n if k < n - 1 else k) + quorum  # SecAgg+: every commitment
    return {
        "sequential": n * client + server + node_checks * primitives["verify"],
        "parallel": client + client_checks * primitives["verify"] + server,
    }


def bench_size(n: int, dim: int, repeats: int, variants: list[Variant]) -> list[dict[str, Any]]:
    clients = FixedClients(n, dim)
    transport = InProcessTransport(clients.handle, list(range(n)))
    drivers: dict[Variant | None, RoundDriver] = {None: _driver(transport, n, dim, None, clients)}
    drivers.update({v: _driver(transport, n, dim, v, clients) for v in variants})
    params = torch.zeros(dim)
    samples: dict[Variant | None, list[dict]] = {k: [] for k in drivers}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for key, driver in drivers.items():
            timing = _time_round(driver, clients, repeat + 1, params)
            if repeat > 0:
                samples[key].append(timing)

    def median(key: Variant | None, field: str) -> float:
        return statistics.median(s[field] for s in samples[key])

    def minimum(key: Variant | None, field: str) -> float:
        return min(s[field] for s in samples[key])

    primitives = primitive_seconds(dim)
    rows = []
    for variant in variants:
        graph = _graph(n, variant)
        floor = crypto_floor(
            n,
            graph["neighbours"],
            primitives,
            verified=variant[2],
            quorum=_quorum(n, variant) if variant[2] else 0,
        )
        plain, plain_parallel = (
            median(None, "round_seconds"),
            median(None, "parallel_round_seconds"),
        )
        rows.append(
            {
                "n": n,
                "dim": dim,
                "mode": str(variant[0]),
                **graph,
                "dropout_rate": variant[1],
                "server": "malicious" if variant[2] else "semi-honest",
                "round_seconds": median(variant, "round_seconds"),
                "plain_round_seconds": median(None, "round_seconds"),
                "client_seconds": median(variant, "client_seconds"),
                "server_seconds": median(variant, "server_seconds"),
                "bytes_up_ratio": median(variant, "bytes_up") / median(None, "bytes_up"),
                "bytes_down_ratio": median(variant, "bytes_down") / median(None, "bytes_down"),
                "round_ratio": median(variant, "round_seconds") / median(None, "round_seconds"),
                "parallel_round_seconds": median(variant, "parallel_round_seconds"),
                "plain_parallel_round_seconds": median(None, "parallel_round_seconds"),
                "parallel_ratio": median(variant, "parallel_round_seconds")
                / median(None, "parallel_round_seconds"),
                "round_ratio_of_min": minimum(variant, "round_seconds")
                / minimum(None, "round_seconds"),
                "parallel_ratio_of_min": minimum(variant, "parallel_round_seconds")
                / minimum(None, "parallel_round_seconds"),
                "samples": samples[variant],
                "plain_samples": samples[None],
                "primitive_seconds": primitives,
                "crypto_floor_seconds": floor["sequential"],
                "floor_ratio": (plain + floor["sequential"]) / plain,
                "over_floor": median(variant, "round_seconds") / (plain + floor["sequential"]),
                "parallel_over_floor": median(variant, "parallel_round_seconds")
                / (plain_parallel + floor["parallel"]),
                "parallel_crypto_floor_seconds": floor["parallel"],
                "parallel_floor_ratio": (plain_parallel + floor["parallel"]) / plain_parallel,
            }
        )
        if variant[2]:  # against the semi-honest row of the same mode, in the same run
            honest = (variant[0], variant[1], False)
            if honest in samples:
                rows[-1]["verified_ratio"] = median(variant, "round_seconds") / median(
                    honest, "round_seconds"
                )
                rows[-1]["verified_parallel_ratio"] = median(
                    variant, "parallel_round_seconds"
                ) / median(honest, "parallel_round_seconds")
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_dropout(
    n: int, dim: int, rounds: int, fraction: float, variant: Variant
) -> dict[str, Any]:
    clients = FixedClients(n, dim)
    transport = PhaseDropout(InProcessTransport(clients.handle, list(range(n))), {})
    driver = _driver(transport, n, dim, variant, clients)
    clients.secagg = clients.semi_honest if driver.identities is None else clients.verified
    params = torch.zeros(dim)
    rng = np.random.default_rng(1)
    completed = 0
    seconds = []
    for r in range(1, rounds + 1):
        drop = rng.choice(n, size=round(fraction * n), replace=False)
        transport.drops = {Phase.MASK: frozenset(int(c) for c in drop)}
        start = time.perf_counter()
        try:
            driver.fit_round(r, params, driver.strategy.init(params))
            completed += 1
            seconds.append(time.perf_counter() - start)
        except secagg.SecAggAbortedError:
            pass
    row = {
        "n": n,
        "dim": dim,
        "mode": str(variant[0]),
        **_graph(n, variant),
        "dropout_rate": variant[1],
        "server": "malicious" if variant[2] else "semi-honest",
        "drop_fraction": fraction,
        "dropped_before": "masked input",
        "rounds": rounds,
        "completed_share": completed / rounds,
        "completed_round_seconds": statistics.median(seconds) if seconds else None,
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
    parser.add_argument(
        "--complete-up-to",
        type=int,
        default=200,
        help="run the complete graph (SecAgg) only up to this many clients: its n^2 agreements "
        "and expansions take minutes a round beyond",
    )
    parser.add_argument("--dropout-sizes", type=int, nargs="*", default=[100])
    parser.add_argument("--dropout-rounds", type=int, default=20)
    parser.add_argument(
        "--dropout-rounds-large",
        type=int,
        default=5,
        help="dropout rounds at 500 clients or more",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args.dim, args.repeats, _variants(n, args.complete_up_to))
    dropout = [
        bench_dropout(
            n,
            args.dim,
            args.dropout_rounds if n < 500 else args.dropout_rounds_large,
            0.1,
            v,
        )
        for n in args.dropout_sizes
        for v in _variants(n, args.complete_up_to)
        if v[1] > 0  # the default degree, the one chosen to survive 10% dropouts
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
