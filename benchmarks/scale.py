"""Throughput and memory of every simulation engine, the plain PyTorch loop and Flower, side by side.

Every row of one workload is measured in the same run of this script, each engine in a fresh
child process (so one engine's heap and threads never shape the next one's), on the same
synthetic client data of the seed image CNN (``image_cnn``, 1x28x28, 10 classes), plain SGD
(lr 0.05, no momentum, one local epoch) and FedAvg:

* ``inprocess``: fedguard's default engine, clients one after another in one process;
* ``ray``: fedguard on a local Ray instance with one single-thread actor per core;
* ``cohort``: fedguard's vectorised engine (``torch.func`` over a cohort of clients);
* ``ray+cohort``: Ray actors that each train a cohort;
* ``floor``: a plain PyTorch loop doing the same SGD steps and the same weighted average
  (``overhead.py``'s floor), the cost of the arithmetic alone;
* ``peak``: the machine's ceiling for this model: plain PyTorch with every core taking the round's
  examples through the same forward, backward and SGD step in large batches (the fastest of
  64, 256 and 1,024 examples, picked before timing). No engine that trains the same examples
  can beat it by much: it has no per-client work at all;
* ``flower``: Flower 1.42's simulation engine with one single-thread actor per core, Flower's
  best configuration on small clients; ``flower_1cpu``: one Flower actor holding every core.

Workloads (``WORKLOADS``): W1 100 clients x 600 examples, 10 a round, batch 32; W2 1,000 clients
x 64 examples, 100 a round, batch 16; W3 (cross-device) 10,000 clients x 32 examples, 1,000 a
round, batch 16. W3's fedguard rows make each client's images when it trains
(``data.synthetic_on_demand``, ``ON_DEMAND``): the driver holds their labels, not 1.0 GB of
images.

A row: ``s_per_round`` is the median of the timed rounds (``samples_s``, all of them) after one
untimed warm-up round; ``clients_per_s`` is the clients a round trains over that median;
``peak_mib`` is the peak of the summed resident memory (VmRSS) of the child and every process
below it (Ray's raylet, object store and workers included), sampled every 50 ms. That sum counts
a page shared by several processes once per process (libtorch's code in every Ray worker, Ray's
object store mapped by the raylet, the driver and the workers), so it overstates what a tree of
processes uses. ``peak_pss_mib`` is the peak of the summed proportional set size (``Pss:`` of
/proc/PID/smaps_rollup: each shared page divided among the processes mapping it), sampled every
500 ms (``PeakSampler``): what the tree really holds in memory. A process whose smaps_rollup
cannot be read counts with its RSS; where no process's can (no smaps_rollup), ``peak_pss_mib``
is null. Rows from before it existed have ``peak_mib`` alone. Flower needs its own environment,
because it pins its own Ray::

    python3 -m venv .venv-flower
    .venv-flower/bin/pip install "flwr[simulation]==1.42.0" "torch>=2.4,<2.14"
    python benchmarks/scale.py --flower-python .venv-flower/bin/python

Without ``--flower-python`` the Flower rows are not measured and the JSON says so. Results go to
``benchmarks/results/scale.json``: ``{"rows": [...], "machine": {...}}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "scale.json"
SEED = 0
LR = 0.05
SHAPE = (1, 28, 28)
CLASSES = 10
WORKLOADS: dict[str, dict[str, int]] = {
    "W1": {"num_clients": 100, "samples": 600, "per_round": 10, "batch_size": 32},
    "W2": {"num_clients": 1000, "samples": 64, "per_round": 100, "batch_size": 16},
    "W3": {"num_clients": 10_000, "samples": 32, "per_round": 1000, "batch_size": 16},
}
# workloads whose synthetic clients make their images on demand (data.synthetic_on_demand)
ON_DEMAND = frozenset({"W3"})
FEDGUARD_ENGINES = ("inprocess", "ray", "cohort", "ray+cohort")
ENGINES = (*FEDGUARD_ENGINES, "floor", "peak", "flower", "flower_1cpu")


# --------------------------------------------------------------------------- memory sampling


def _pss_kib(pid: int) -> int | None:
    """The proportional set size of ``pid`` (``Pss:`` of /proc/PID/smaps_rollup): its resident
    pages, each shared page divided by the number of processes mapping it; None where the file
    cannot be read (a kernel without it, a process not ours, one that just ended)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _tree_memory_kib(root: int, *, pss: bool = True) -> tuple[int, int | None]:
    """Summed VmRSS and summed PSS of ``root`` and all its descendants, read from /proc.

    The PSS sum is None when no process of the tree has a readable smaps_rollup; a process
    whose PSS cannot be read while others' can counts with its RSS (never less than its PSS)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        ppid, kib = 0, 0
        for line in text.splitlines():
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                kib = int(line.split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kib
    rss_total, pss_total, pss_read, stack = 0, 0, False, [root]
    while stack:
        pid = stack.pop()
        kib = rss.get(pid, 0)
        rss_total += kib
        proportional = _pss_kib(pid) if pss else None
        pss_read = pss_read or proportional is not None
        pss_total += kib if proportional is None else proportional
        stack.extend(children.get(pid, []))
    return rss_total, (pss_total if pss_read else None)


class PeakSampler:
    """Samples the process tree's summed RSS every ``interval_s`` and its summed PSS every
    ``pss_every``-th time in a thread; ``peak_mib`` and ``peak_pss_mib`` (None where /proc has no
    smaps_rollup) after ``stop``. PSS is read less often because reading smaps_rollup walks the
    page tables (some 6 ms per GiB): every 50 ms it took a tenth to a third of a core from the
    engines being timed."""

    def __init__(self, interval_s: float = 0.05, pss_every: int = 10) -> None:
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.peak_kib = 0
        self.peak_pss_kib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, *, pss: bool) -> None:
        rss, proportional = _tree_memory_kib(os.getpid(), pss=pss)
        self.peak_kib = max(self.peak_kib, rss)
        if proportional is not None:
            self.peak_pss_kib = max(self.peak_pss_kib or 0, proportional)

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            self._sample(pss=count % self.pss_every == 0)
            count += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(pss=True)

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def peak_pss_mib(self) -> float | None:
        return None if self.peak_pss_kib is None else self.peak_pss_kib / 1024


# --------------------------------------------------------------------------- fedguard engines


def runtime_table(engine: str, cores: int) -> dict[str, Any]:
    """The ``[runtime]`` table of a fedguard engine."""
    if engine == "inprocess":
        return {}
    if engine == "ray":
        return {"kind": "ray", "actors": cores, "cpus_per_actor": 1}
    if engine == "cohort":
        return {"kind": "cohort"}
    if engine == "ray+cohort":
        return {"kind": "ray", "actors": cores, "cpus_per_actor": 1, "actor_engine": "cohort"}
    raise ValueError(f"not a fedguard engine: {engine}")


def fedguard_config(workload: str, engine: str, rounds: int, cores: int) -> dict[str, Any]:
    w = WORKLOADS[workload]
    table: dict[str, Any] = {
        "experiment": {"name": f"scale-{workload}-{engine}", "seed": SEED, "rounds": rounds},
        "data": {
            "dataset": "synthetic",
            "partition": "iid",
            "num_clients": w["num_clients"],
            "synthetic_samples": w["num_clients"] * w["samples"],
            "synthetic_shape": list(SHAPE),
            "synthetic_classes": CLASSES,
            "test_fraction": 0.01,
            **({"synthetic_on_demand": True} if workload in ON_DEMAND else {}),
        },
        "model": {"name": "image_cnn", "framework": "torch"},
        "client": {
            "optimizer": "sgd",
            "lr": LR,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "epochs": 1,
            "batch_size": w["batch_size"],
        },
        "server": {"strategy": "fedavg", "clients_per_round": w["per_round"]},
        "evaluation": {"every": 0},
    }
    runtime = runtime_table(engine, cores)
    if runtime:
        table["runtime"] = runtime
    return table


def run_fedguard(workload: str, engine: str, rounds: int, cores: int) -> dict[str, Any]:
    """Time ``rounds`` fit rounds (after one warm-up) of ``engine`` in this process."""
    import torch

    from fedguard.experiment import config as config_mod
    from fedguard.experiment.assembly import Experiment

    if engine == "inprocess":
        torch.set_num_threads(cores)  # the default engine may use every core for its one client
    with PeakSampler() as peak:
        cfg = config_mod.validate(fedguard_config(workload, engine, rounds + 1, cores))
        exp = Experiment(cfg)
        params = exp.initial_params.clone()
        state = exp.strategy.init(params)
        samples = []
        try:
            for round_ in range(1, rounds + 2):
                start = time.perf_counter()
                result = exp.driver.fit_round(round_, params, state)
                seconds = time.perf_counter() - start
                params, state = result.params, result.state
                _progress(workload, engine, round_, seconds)
                if round_ > 1:
                    samples.append(seconds)
        finally:
            exp.transport.close()
    return {"samples_s": samples, "peak_mib": peak.peak_mib, "peak_pss_mib": peak.peak_pss_mib}


# --------------------------------------------------------------------------- the floor


def run_floor(workload: str, rounds: int, cores: int) -> dict[str, Any]:
    """``overhead.py``'s plain PyTorch loop over the same clients and the same sampling."""
    import torch

    sys.path.insert(0, str(HERE))
    import overhead  # noqa: PLC0415 - the floor lives beside this script

    from fedguard.experiment import config as config_mod
    from fedguard.experiment.assembly import Experiment

    torch.set_num_threads(cores)
    w = WORKLOADS[workload]
    overhead.WORKLOADS.setdefault(workload, w)
    with PeakSampler() as peak:
        exp = Experiment(config_mod.validate(fedguard_config(workload, "inprocess", rounds, cores)))
        floor = overhead.FloorSide(exp, workload)
        samples = []
        for round_ in range(1, rounds + 2):
            start = time.perf_counter()
            floor.round(round_)
            seconds = time.perf_counter() - start
            _progress(workload, "floor", round_, seconds)
            if round_ > 1:
                samples.append(seconds)
    return {"samples_s": samples, "peak_mib": peak.peak_mib, "peak_pss_mib": peak.peak_pss_mib}


def run_peak(workload: str, rounds: int, cores: int) -> dict[str, Any]:
    """The round's examples (``per_round x samples``) through one model in large batches."""
    import torch

    from fedguard.models import torch_models

    torch.set_num_threads(cores)
    torch.manual_seed(SEED)
    w = WORKLOADS[workload]
    examples = w["per_round"] * w["samples"]
    with PeakSampler() as peak:
        module = torch_models.image_cnn(SHAPE, CLASSES)
        module.train()
        optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.0)
        x = torch.randn(examples, *SHAPE)
        y = torch.randint(0, CLASSES, (examples,))

        def sweep(n: int, batch: int) -> float:
            """Seconds to train on the first ``n`` examples in batches of ``batch``."""
            start = time.perf_counter()
            for xb, yb in zip(x[:n].split(batch), y[:n].split(batch), strict=True):
                optimizer.zero_grad()
                torch.nn.functional.nll_loss(torch.log_softmax(module(xb), -1), yb).backward()
                optimizer.step()
            return time.perf_counter() - start

        def rate(batch: int) -> float:
            n = min(examples, 4 * batch)
            return n / sweep(n, batch)

        rate(64)  # warm the kernels before choosing
        best = max((64, 256, 1024), key=rate)
        samples = []
        for round_ in range(1, rounds + 2):
            seconds = sweep(examples, best)
            _progress(workload, f"peak (batch {best})", round_, seconds)
            if round_ > 1:
                samples.append(seconds)
    return {
        "samples_s": samples,
        "peak_mib": peak.peak_mib,
        "peak_pss_mib": peak.peak_pss_mib,
        "batch_size": best,
    }


# --------------------------------------------------------------------------- Flower


def _torch_models() -> Any:
    """fedguard's model file alone (it imports only torch), so Flower's environment needs no
    fedguard install: both sides train the very same architecture."""
    path = ROOT / "src" / "fedguard" / "models" / "torch_models.py"
    spec = importlib.util.spec_from_file_location("fedguard_torch_models", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_flower(workload: str, engine: str, rounds: int, cores: int) -> dict[str, Any]:
    """Flower's simulation engine on the same workload; a round is timed from the strategy's
    ``configure_fit`` to the end of its ``aggregate_fit``."""
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    w = WORKLOADS[workload]
    models = _torch_models()
    threads = 1 if engine == "flower" else cores
    actor_cpus = 1 if engine == "flower" else cores
    init = models.image_cnn(SHAPE, CLASSES)
    init_arrays = [p.detach().numpy().copy() for p in init.state_dict().values()]
    samples: list[float] = []

    class SgdClient(NumPyClient):
        def __init__(self, partition: int) -> None:
            torch.set_num_threads(threads)
            generator = torch.Generator().manual_seed(SEED * 1_000_003 + partition)
            # the same kind of data fedguard's synthetic set has: class prototypes plus noise
            prototypes = torch.randn((CLASSES, *SHAPE), generator=torch.Generator().manual_seed(7))
            self.y = torch.randint(0, CLASSES, (w["samples"],), generator=generator)
            noise = torch.randn((w["samples"], *SHAPE), generator=generator)
            self.x = prototypes[self.y] + noise
            self.partition = partition
            self.model = models.image_cnn(SHAPE, CLASSES)

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            keys = list(self.model.state_dict())
            self.model.load_state_dict(
                {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, parameters, strict=True)}
            )
            optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.0)
            generator = torch.Generator().manual_seed(
                int(config["round"]) * 100_003 + self.partition
            )
            for idx in torch.randperm(w["samples"], generator=generator).split(w["batch_size"]):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
                loss.backward()
                optimizer.step()
            arrays = [v.detach().numpy() for v in self.model.state_dict().values()]
            return arrays, w["samples"], {}

    def client_fn(context: Context) -> Any:
        return SgdClient(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self.started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            seconds = time.perf_counter() - self.started
            _progress(workload, engine, server_round, seconds)
            if failures:
                raise RuntimeError(f"Flower round {server_round}: {len(failures)} failures")
            if server_round > 1:
                samples.append(seconds)
            return out

    fraction = w["per_round"] / w["num_clients"]

    def server_fn(context: Context) -> Any:
        strategy = TimedFedAvg(
            fraction_fit=fraction,
            min_fit_clients=w["per_round"],
            min_available_clients=w["num_clients"],
            fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters(init_arrays),
            on_fit_config_fn=lambda round_: {"round": round_},
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds + 1))

    with PeakSampler() as peak:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=w["num_clients"],
            backend_config={"client_resources": {"num_cpus": actor_cpus, "num_gpus": 0.0}},
        )
    if len(samples) != rounds:
        raise RuntimeError(f"Flower timed {len(samples)} of {rounds} rounds")
    return {"samples_s": samples, "peak_mib": peak.peak_mib, "peak_pss_mib": peak.peak_pss_mib}


# --------------------------------------------------------------------------- orchestration


def _progress(workload: str, engine: str, round_: int, seconds: float) -> None:
    warm = " (warm-up)" if round_ == 1 else ""
    print(
        f"  {workload} {engine} round {round_}{warm}: {seconds:.2f} s", file=sys.stderr, flush=True
    )


def measure(
    workload: str, engine: str, rounds: int, cores: int, python: str, timeout_s: float
) -> dict[str, Any]:
    """One engine on one workload in a fresh child process; its row."""
    command = [python, str(Path(__file__).resolve()), "--child", engine, "--workload", workload]
    command += ["--rounds", str(rounds), "--cores", str(cores)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    # Ray (fedguard's engine and Flower's) starts its own local instance rather than joining a
    # cluster some other job on this machine started
    env["RAY_ADDRESS"] = "local"
    done = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, timeout=timeout_s, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} on {workload} failed (exit {done.returncode})")
    raw = json.loads(lines[-1][4:])
    per_round = WORKLOADS[workload]["per_round"]
    median = statistics.median(raw["samples_s"])
    row = {
        "workload": workload,
        "engine": engine,
        "s_per_round": median,
        "clients_per_s": per_round / median,
        "peak_mib": raw["peak_mib"],
        "peak_pss_mib": raw.get("peak_pss_mib"),
        "samples_s": raw["samples_s"],
    }
    if "batch_size" in raw:
        row["batch_size"] = raw["batch_size"]
    return row


def machine(cores: int) -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cores_used": cores,
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_end": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d"),
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per workload: each engine's throughput over the in-process engine's and over Flower's
    best row, from the rows above (anyone can recompute them)."""
    out: dict[str, dict[str, float]] = {}
    for workload in WORKLOADS:
        mine = {r["engine"]: r["clients_per_s"] for r in rows if r["workload"] == workload}
        if not mine:
            continue
        base = mine.get("inprocess")
        flower = max((v for k, v in mine.items() if k.startswith("flower")), default=None)
        table: dict[str, float] = {}
        for engine, value in mine.items():
            if base:
                table[f"{engine}/inprocess"] = value / base
            if flower:
                table[f"{engine}/flower_best"] = value / flower
        out[workload] = table
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=["W1", "W2"])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--flower-python", help="the python of an environment with flwr 1.42")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per row")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    if args.child is not None:
        workload = args.workload[0]
        if args.child in FEDGUARD_ENGINES:
            raw = run_fedguard(workload, args.child, args.rounds, args.cores)
        elif args.child == "floor":
            raw = run_floor(workload, args.rounds, args.cores)
        elif args.child == "peak":
            raw = run_peak(workload, args.rounds, args.cores)
        else:
            raw = run_flower(workload, args.child, args.rounds, args.cores)
        print("ROW " + json.dumps(raw), flush=True)
        return 0

    rows: list[dict[str, Any]] = []
    missing: list[dict[str, str]] = []
    for workload in args.workload:
        for engine in args.engines:
            python = sys.executable
            if engine.startswith("flower"):
                if not args.flower_python:
                    missing.append(
                        {"workload": workload, "engine": engine, "why": "no --flower-python"}
                    )
                    continue
                python = args.flower_python
            print(f"{workload} {engine}", file=sys.stderr, flush=True)
            try:
                rows.append(
                    measure(workload, engine, args.rounds, args.cores, python, args.timeout)
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # the reason without the command line (it names this machine's paths)
                why = (
                    f"timed out after {exc.timeout:g} s"
                    if isinstance(exc, subprocess.TimeoutExpired)
                    else str(exc)
                )
                missing.append({"workload": workload, "engine": engine, "why": why})
                print(f"  not measured: {why}", file=sys.stderr, flush=True)
    result = {
        "rows": rows,
        "not_measured": missing,
        "ratios": ratios(rows),
        "machine": machine(args.cores),
        "workloads": WORKLOADS,
        "rounds_timed": args.rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'workload':8} {'engine':12} {'s/round':>8} {'clients/s':>10} {'peak MiB':>9} "
        f"{'PSS MiB':>8}"
    )
    for r in rows:
        pss = "-" if r["peak_pss_mib"] is None else f"{r['peak_pss_mib']:.0f}"
        print(
            f"{r['workload']:8} {r['engine']:12} {r['s_per_round']:8.2f} "
            f"{r['clients_per_s']:10.1f} {r['peak_mib']:9.0f} {pss:>8}"
        )
    for workload, table in result["ratios"].items():
        print(workload, {k: round(v, 2) for k, v in table.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
