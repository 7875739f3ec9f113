"""Cost and precision of aggregation under homomorphic encryption beside SecAgg+ and the plain round.

Clients do no training: every client answers with the same fixed update of ``dim`` floats and
100 examples as in ``benchmarks/secagg.py`` (whose ``FixedClients``, driver and round timer this
script reuses, so that the definitions match), and every mode runs through the same
``RoundDriver`` and ``InProcessTransport`` in this process, interleaved, after one warm-up round:

* ``"plain"``: FedAvg of the float32 updates;
* ``"secagg+"``: SecAgg+ with ``k = ceil(log2 n)`` neighbours (``dropout_rate = 0``), 32-bit ring;
* ``"ckks"`` (``[secure_aggregation] mode = "ckks"``) with ``"scheme": "bfv"`` (the default: the
  fixed-point encoding of 32 bits encrypted under BFV, N = 4096, q = 109 bits, t = 40-bit prime)
  and ``"scheme": "ckks"`` (the clipped, weighted floats under CKKS, N = 4096, scale 2^30), both
  with two decryptors.

All rounds run against a semi-honest server (no identities: no signatures), for every mode.
``client_seconds`` is the time spent inside the client handler (all clients and all phases,
sequentially: training is a table lookup, so this is encoding, encryption or masking, and the
decryptors' decryption), ``server_seconds`` the rest of the round (the server's checks, the
homomorphic additions or unmasking, and the in-process transport), ``round_seconds`` both.
``parallel_round_seconds`` counts, per request kind, only the slowest client (as a deployment with
every client on its own machine would). ``bytes_up_ratio`` and ``bytes_down_ratio`` are the round's
upload and download over the plain round's (whose upload is one float32 update per client).
``max_abs_error`` is the largest difference between the new global model and the float64 FedAvg
of the clipped updates computed here with NumPy (the error of the decrypted, decoded mean; for the
plain round, which does not clip, of the unclipped updates: float32's rounding);
``max_abs_error_sum`` is the same for the sum of the clipped updates (``n`` times it, with equal
weights). Medians over ``--repeats`` rounds. The round's upload includes the decryptors' plaintext
replies (``dim + 1`` int64 or float64 each); ``encrypt_per_client`` holds one client's encryption
alone: its seconds and its ciphertexts' bytes over the float32 update's.

With ``--medical ROUNDS`` it also runs the medical example (PneumoniaMNIST over 10 hospitals,
``examples/medical_imaging/experiment.toml``) plain and with ``mode = "ckks"`` (BFV, two
decryptors, the clip ``--medical-clip``) for ROUNDS rounds, and records the final test accuracy
and wall seconds of each.

    nice -n 5 python benchmarks/he.py --sizes 10 50 100 --dim 100000 --repeats 2 --medical 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import secagg as secagg_bench  # noqa: E402 - the secure-aggregation benchmark beside this script

from fedguard.algorithms.he import encryption  # noqa: E402
from fedguard.protocol import fedopt, he, he_client, messages  # noqa: E402
from fedguard.protocol.driver import RoundDriver  # noqa: E402
from fedguard.protocol.secagg import Mode  # noqa: E402
from fedguard.protocol.strategy import StrategyKind  # noqa: E402
from fedguard.simulation.inprocess import InProcessTransport  # noqa: E402

DEFAULT_OUT = HERE / "results" / "he.json"
CLIP = 1.0  # benchmarks/secagg.py's clip
SECAGG_PLUS: secagg_bench.Variant = (Mode.SECAGG_PLUS, 0.0, False)  # k = ceil(log2 n)


class HEFixedClients(secagg_bench.FixedClients):
    """``FixedClients`` that also answer HE requests, with one key per scheme."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__(n, dim)
        self.keys = {s: encryption.secret_context(p) for s, p in encryption.PARAMS.items()}
        self.he = {s: he_client.HEClient(self.fit, k) for s, k in self.keys.items()}

    def answer(self, request: messages.Message) -> messages.Message:
        if isinstance(request, messages.HeEncryptRequest | messages.HeDecryptRequest):
            return self.he[request.scheme].handle(request)
        return super().answer(request)

    def reference_mean(self, clip: float | None) -> np.ndarray:
        """The float64 FedAvg of the updates (equal weights) clipped to ``clip`` (None: not
        clipped, as the plain round does not clip), by NumPy."""
        total = np.zeros(len(self.updates[0]))
        for update in self.updates.values():
            x = update.numpy().astype(np.float64)
            norm = float(np.linalg.norm(x))
            total += x if clip is None else x * min(1.0, clip / norm)
        return total / len(self.updates)


def _he_driver(transport, n: int, dim: int, clients: HEFixedClients, scheme: str) -> RoundDriver:
    strategy = fedopt.create(StrategyKind.FEDAVG, client_config={}, num_clients=n)
    settings = he.Settings(scheme, clip_norm=CLIP, max_weight=secagg_bench.EXAMPLES, bits=32)
    key = clients.keys[scheme]
    server = encryption.context_from_bytes(encryption.server_bytes(key), secret=False)
    return RoundDriver(
        transport,
        strategy,
        dim=dim,
        clients_per_round=n,
        min_clients=1,
        seed=0,
        secure_aggregation=settings,
        he_context=server,
    )


def _capture(driver: RoundDriver) -> list[Any]:
    """The results of ``driver``'s fit rounds from now on (``secagg.py``'s timer drops them)."""
    results: list[Any] = []
    fit_round = driver.fit_round

    def capturing(*args: Any, **kwargs: Any) -> Any:
        results.append(fit_round(*args, **kwargs))
        return results[-1]

    driver.fit_round = capturing  # type: ignore[method-assign]
    return results


def bench_size(n: int, dim: int, repeats: int) -> list[dict[str, Any]]:
    clients = HEFixedClients(n, dim)
    transport = InProcessTransport(clients.handle, list(range(n)))
    drivers: dict[str, RoundDriver] = {
        "plain": secagg_bench._driver(transport, n, dim, None, clients),
        "secagg+": secagg_bench._driver(transport, n, dim, SECAGG_PLUS, clients),
        "bfv": _he_driver(transport, n, dim, clients, "bfv"),
        "ckks": _he_driver(transport, n, dim, clients, "ckks"),
    }
    clipped, unclipped = clients.reference_mean(CLIP), clients.reference_mean(None)
    params = torch.zeros(dim)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in drivers}
    for repeat in range(repeats + 1):  # repeat 0 warms up
        for name, driver in drivers.items():
            captured = _capture(driver)
            timing = secagg_bench._time_round(driver, clients, repeat + 1, params)
            new = captured[-1].params.double().numpy()
            reference = unclipped if name == "plain" else clipped
            error = float(np.abs(new - reference).max())
            if repeat > 0:
                samples[name].append({**timing, "max_abs_error": error})

    def median(name: str, field: str) -> float:
        return statistics.median(s[field] for s in samples[name])

    rows = []
    for name in drivers:
        mode = "ckks" if name in ("bfv", "ckks") else name
        row: dict[str, Any] = {"n": n, "dim": dim, "mode": mode}
        if mode == "ckks":
            row["scheme"] = name
        if name == "secagg+":
            row["neighbours"] = secagg_bench._graph(n, SECAGG_PLUS)["neighbours"]
        row.update(
            {
                "client_seconds": median(name, "client_seconds"),
                "server_seconds": median(name, "server_seconds"),
                "round_seconds": median(name, "round_seconds"),
                "parallel_round_seconds": median(name, "parallel_round_seconds"),
                "bytes_up_ratio": median(name, "bytes_up") / median("plain", "bytes_up"),
                "bytes_down_ratio": median(name, "bytes_down") / median("plain", "bytes_down"),
                "max_abs_error": median(name, "max_abs_error"),
                "max_abs_error_sum": median(name, "max_abs_error") * n,
                "samples": samples[name],
            }
        )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    return rows


def encrypt_seconds(dim: int, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Per scheme: the median seconds for one client to encode and encrypt ``dim`` values, and
    its ciphertexts' bytes over the float32 update's (``4 dim``)."""
    rng = np.random.default_rng(1)
    update = rng.normal(0, 0.01, dim)
    out = {}
    for scheme, params in encryption.PARAMS.items():
        key = encryption.secret_context(params)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            if scheme == "bfv":
                fp = he.encoding(32, CLIP, 10, 100, None)
                values = he.encode_bfv(update, 100, fp, None, np.random.default_rng(0))
            else:
                values = he.encode_ckks(update, 100, CLIP, 100)
            blobs = encryption.encrypt(key, params, values)
            times.append(time.perf_counter() - start)
        out[scheme] = {
            "seconds": statistics.median(times),
            "ciphertext_bytes_ratio": sum(map(len, blobs)) / (4 * dim),
        }
    return out


def medical(rounds: int, clip: float, repeats: int = 1) -> dict[str, Any]:
    """The medical example for ``rounds`` rounds, plain and under HE (BFV), ``repeats`` times in
    alternation (plain, HE, plain, HE, ...) so that a drift in the machine's speed falls on both:
    accuracy (of the first pair: the runs are seeded and repeat it), each run's seconds, and the
    median of the pairs' time ratios."""
    import statistics

    import fedguard
    from fedguard.experiment import config as config_mod

    root = HERE.parent
    base = config_mod.load(root / "examples" / "medical_imaging" / "experiment.toml")
    out: dict[str, Any] = {"rounds": rounds, "clip_norm": clip, "accuracy": {}, "wall_seconds": {}}
    os.chdir(root)  # the example's data path is relative to the project root
    sections = {
        "plain": {},
        "ckks": {"secure_aggregation": {"enabled": True, "mode": "ckks", "clip_norm": clip}},
    }
    samples: dict[str, list[float]] = {name: [] for name in sections}
    for _ in range(repeats):
        for name, extra in sections.items():
            data = base.model_dump()
            data["experiment"]["rounds"] = rounds
            for table, values in extra.items():
                data.setdefault(table, {}).update(values)
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                summary = fedguard.run(data, out=Path(folder) / name, progress=False)
                seconds = time.perf_counter() - start
            out["accuracy"].setdefault(name, summary["test_accuracy"])
            samples[name].append(seconds)
            print(name, summary["test_accuracy"], seconds, flush=True)
    out["wall_seconds"] = {name: statistics.median(v) for name, v in samples.items()}
    out["wall_seconds_samples"] = samples
    ratios = [h / p for p, h in zip(samples["plain"], samples["ckks"], strict=True)]
    out["wall_ratio_median_of_pairs"] = statistics.median(ratios)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--dim", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--medical", type=int, default=0, metavar="ROUNDS")
    p.add_argument("--medical-clip", type=float, default=5.0)
    p.add_argument("--medical-repeats", type=int, default=1, help="alternating plain/HE pairs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args.dim, args.repeats)
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after_rounds": os.getloadavg(),
            "tenseal": __import__("tenseal").__version__,
        },
        "repeats": args.repeats,
        "encrypt_per_client": encrypt_seconds(args.dim),
        "parameters": {s: p.describe() for s, p in encryption.PARAMS.items()},
        "rows": rows,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    if not args.medical and "medical" in previous:  # keep the last medical run's figures
        for key in ("accuracy", "wall_seconds", "medical"):
            result[key] = previous[key]
        result["medical"]["from_an_earlier_run_of_this_script"] = True
    if args.medical:
        med = medical(args.medical, args.medical_clip, args.medical_repeats)
        result["accuracy"] = med["accuracy"]
        result["wall_seconds"] = med["wall_seconds"]
        result["medical"] = {
            "repeats": args.medical_repeats,
            "wall_seconds_samples": med["wall_seconds_samples"],
            "wall_ratio_median_of_pairs": med["wall_ratio_median_of_pairs"],
            "rounds": med["rounds"],
            "clip_norm": med["clip_norm"],
            "scheme": "bfv",
            "note": 'the example\'s config with [secure_aggregation] enabled, mode = "ckks" '
            "(he_scheme bfv, 2 decryptors) and the clip; the plain run does not clip",
            "load_average_after": os.getloadavg(),
        }
    result["notes"] = (
        "Semi-honest server in every mode. bytes ratios over the plain round's; max_abs_error: "
        "the new global model against NumPy's float64 FedAvg of the clipped updates (plain: "
        "of the unclipped ones, as it does not clip)."
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
