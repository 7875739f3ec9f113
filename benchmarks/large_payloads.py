"""Wall-clock times that the tests check by what was done instead: a 200 MB model's gRPC round
trip, and the FSDD feature cache's first (featurise) and second (read) load.

* ``grpc``: one server transport and one client thread in this process, over TLS with a token,
  exactly as ``tests/test_grpc_large.py`` sets them up: a FitTask carrying 50M float32
  parameters (200 MB) goes down and the client's 200 MB update comes back, in 1 MiB chunks.
  Each repeat is one ``transport.exchange``; the first is also timed (no warm-up is dropped).
* ``fsdd``: ``fsdd.load_fsdd`` on the 3,000 recordings in ``../shared/data/fsdd`` into a fresh
  temporary cache (a miss: decode and featurise everything), then the same call again (a hit:
  one ``.npz`` read), ``--repeats`` times each with a new cache folder.

    python benchmarks/large_payloads.py                    # both, 3 repeats
    python benchmarks/large_payloads.py --only grpc --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from fedguard.protocol import messages
from fedguard.protocol.transport import Delivered
from fedguard.runtime import auth, certs, grpc_client, grpc_launch, grpc_server, grpc_tls

PARAMETERS = 50_000_000  # 200 MB of float32
FSDD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fsdd"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "large_payloads.json"


def _answer(client_id: int, payload: bytes) -> bytes:
    task = messages.decode(payload, messages.FitTask)
    update = torch.neg(task.parameters)
    return messages.encode(messages.FitReply(task.round, client_id, update, num_examples=1))


def grpc_round_trips(repeats: int) -> dict[str, object]:
    """Seconds per 2 x 200 MB round trip over TLS, one per repeat."""
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        auth.make_tokens(directory, [0])
        certs.make_dev_pki(directory, client_ids=[])
        address = f"127.0.0.1:{grpc_launch.free_port()}"
        transport = grpc_server.GrpcServerTransport(
            [0],
            address,
            authenticator=auth.Authenticator(directory / "tokens.json"),
            tls=grpc_tls.ServerTls(directory / "server.pem", directory / "server.key", None),
            poll_s=1.0,
            max_payload_bytes=256 << 20,
        )
        transport.start()
        token = (directory / "client-0.token").read_text().strip().encode()
        settings = grpc_client.ClientSettings(
            address, 0, token, grpc_tls.ClientTls(directory / "ca.pem"), give_up_after_s=30.0
        )
        stop = threading.Event()
        client = threading.Thread(
            target=lambda: grpc_client.serve(settings, _answer, stop=stop), daemon=True
        )
        client.start()
        seconds = []
        try:
            params = torch.linspace(-1.0, 1.0, PARAMETERS)
            for round_ in range(1, repeats + 1):
                task = messages.encode(messages.FitTask(round_, 0, params))
                started = time.perf_counter()
                [outcome] = transport.exchange({0: task}, deadline_s=600.0)
                seconds.append(time.perf_counter() - started)
                if not isinstance(outcome, Delivered):
                    raise RuntimeError(f"round trip {round_} failed: {outcome}")
                del task, outcome
            transport.finish(grace_s=0.5)
        finally:
            stop.set()
            transport.close()
            client.join(5)
    return {"payload_bytes_each_way": 4 * PARAMETERS, "seconds": seconds,
            "median_s": statistics.median(seconds)}  # fmt: skip


def fsdd_loads(repeats: int) -> dict[str, object]:
    """Seconds of a first (featurising) and a second (cached) FSDD load, per repeat."""
    from fedguard.data import fsdd

    if not (FSDD / "recordings").is_dir():
        raise SystemExit(f"The FSDD recordings are not in {FSDD / 'recordings'}.")
    first: list[float] = []
    second: list[float] = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            for times, state in ((first, "miss"), (second, "hit")):
                started = time.perf_counter()
                data = fsdd.load_fsdd(path=FSDD, seed=0, cache_dir=cache)
                times.append(time.perf_counter() - started)
                if data.info["cache"] != state:
                    raise RuntimeError(f"expected a cache {state}, got {data.info['cache']}")
    return {
        "first_load_s": first,
        "cached_load_s": second,
        "first_median_s": statistics.median(first),
        "cached_median_s": statistics.median(second),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("grpc", "fsdd"), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "repeats": args.repeats,
    }
    if args.only in (None, "grpc"):
        results["grpc"] = grpc_round_trips(args.repeats)
    if args.only in (None, "fsdd"):
        results["fsdd"] = fsdd_loads(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
