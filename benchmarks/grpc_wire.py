"""Bytes on the wire and round latency of the gRPC deployment runtime, against the simulator.

One server and ``--clients`` client processes on loopback run the same experiment (logistic
regression on synthetic 1x256x256 inputs, 10 classes: D = 655,370 parameters, 2.6 MB of float32
per model, so every payload streams in three 1 MiB chunks) with TLS and tokens, exactly as
``fedguard server`` / ``fedguard client`` do. A counting TCP relay sits between the clients and
the server, so the byte counts are what crossed the socket: TLS records, HTTP/2 and gRPC
framing, protobuf envelopes, credentials, idle polls, handshakes, everything, over the whole run.

* wire ratio = bytes on the wire per round / (clients per round x 4 D) for each direction, and
  for both together against 2 x 4 D (a model down and an update up is the floor);
* latency = each round's ``seconds`` from ``metrics.jsonl`` (fit round plus central evaluation,
  as in the simulator), round 1 dropped as warm-up; min and median over the other rounds, and
  their ratio to the in-process simulator's on the same experiment.

Processes are forked from a forkserver that has imported torch once (start-up is not timed).

    python benchmarks/grpc_wire.py --clients 10 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import socket
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import tomli_w

HERE = Path(__file__).resolve().parent
SHAPE = [1, 256, 256]
CLASSES = 10


def _config(clients: int, rounds: int) -> dict[str, Any]:
    return {
        "experiment": {"name": "grpc_wire", "seed": 0, "rounds": rounds},
        "data": {
            "dataset": "synthetic",
            "num_clients": clients,
            "synthetic_samples": 20 * clients,
            "synthetic_shape": SHAPE,
            "synthetic_classes": CLASSES,
            "partition": "iid",
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg", "clients_per_round": clients, "deadline_s": 120.0},
    }


class CountingRelay:
    """A TCP relay from ``listen`` to ``target`` that counts the bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = 0  # client to server
        self.down = 0  # server to client
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is not listening yet: the client retries
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()


def _server(config: Path, out: Path, address: str, sec: Path) -> None:
    import torch

    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.runtime import grpc_tls

    torch.set_num_threads(1)
    tls = grpc_tls.ServerTls(sec / "server.pem", sec / "server.key")
    grpc_deploy.serve(config, grpc_deploy.ServerOptions(address, tls, sec / "tokens.json"), out=out)


def _client(config: Path, address: str, cid: int, sec: Path) -> None:
    import torch

    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.runtime import grpc_client, grpc_tls

    torch.set_num_threads(1)
    app = grpc_deploy.demo_app(config, cid)
    token = (sec / f"client-{cid}.token").read_text().strip().encode()
    settings = grpc_client.ClientSettings(address, cid, token, grpc_tls.ClientTls(sec / "ca.pem"))
    grpc_client.serve(settings, app.handle)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latency(rows: list[dict[str, Any]]) -> dict[str, float]:
    seconds = [r["seconds"] for r in rows[1:]]
    return {"min_s": min(seconds), "median_s": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "grpc_wire.json")
    args = parser.parse_args()

    import fedguard
    from fedguard.runtime import auth, certs

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "torch._dynamo", "sklearn.metrics", "fedguard.experiment.deployment"]
    )
    with tempfile.TemporaryDirectory(prefix="grpc-wire-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "exp.toml"
        config.write_text(tomli_w.dumps(_config(args.clients, args.rounds)))
        sec = tmp / "sec"
        auth.make_tokens(sec, range(args.clients))
        certs.make_dev_pki(sec, client_ids=[])
        server_port = _free_port()
        relay = CountingRelay(server_port)
        deployed = tmp / "deployed"
        procs = [
            ctx.Process(target=_server, args=(config, deployed, f"127.0.0.1:{server_port}", sec))
        ]
        procs += [
            ctx.Process(target=_client, args=(config, f"127.0.0.1:{relay.port}", c, sec))
            for c in range(args.clients)
        ]
        try:
            for p in procs:
                p.start()
            procs[0].join(1800)
            if procs[0].exitcode != 0:
                raise RuntimeError(f"The server exited with {procs[0].exitcode}.")
            for p in procs[1:]:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            relay.close()
        rows = [json.loads(x) for x in (deployed / "metrics.jsonl").read_text().splitlines()]
        simulated = tmp / "simulated"
        import torch

        torch.set_num_threads(1)  # as in every deployed process: one thread each
        fedguard.run(config, out=simulated, progress=False)
        sim_rows = [json.loads(x) for x in (simulated / "metrics.jsonl").read_text().splitlines()]
    dim = CLASSES * SHAPE[0] * SHAPE[1] * SHAPE[2] + CLASSES
    model_bytes = 4 * dim
    floor = args.rounds * args.clients * model_bytes
    grpc_latency, sim_latency = _latency(rows), _latency(sim_rows)
    result = {
        "clients": args.clients,
        "rounds": args.rounds,
        "parameters": dim,
        "model_bytes": model_bytes,
        "wire_bytes_down_per_round": relay.down / args.rounds,
        "wire_bytes_up_per_round": relay.up / args.rounds,
        "payload_bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rows),
        "payload_bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rows),
        "wire_ratio_down": relay.down / floor,
        "wire_ratio_up": relay.up / floor,
        "wire_ratio": (relay.down + relay.up) / (2 * floor),
        "grpc_round": grpc_latency,
        "simulator_round": sim_latency,
        "latency_ratio_min": grpc_latency["min_s"] / sim_latency["min_s"],
        "latency_ratio_median": grpc_latency["median_s"] / sim_latency["median_s"],
        "same_test_loss_as_simulator": [r["test_loss"] for r in rows]
        == [r["test_loss"] for r in sim_rows],
        "machine": {"cpus": multiprocessing.cpu_count(), "platform": platform.platform()},
        "transport": "TLS on loopback through a counting TCP relay; token auth",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
