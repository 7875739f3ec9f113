"""Overhead of fedguard's in-process simulator over a plain PyTorch loop (the floor).

Both sides train the seed image CNN (``image_cnn``, 1x28x28 input, 10 classes) on the same
synthetic client tensors with plain SGD (lr 0.05, no momentum), the same sampled clients, the same
``torch.randperm`` batch orders and the same example-weighted average of the client models:

* fedguard: ``Experiment.driver.fit_round`` (sampling, encode each task, the in-process
  transport, decode, train, encode the reply, decode and validate it, aggregate);
* floor: one ``nn.Module`` and one ``torch.optim.SGD``; per sampled client copy the global weights
  in, run the SGD steps, collect the flat parameters; then the weighted average over clients.

Timed rounds are interleaved (fedguard, floor, fedguard, floor, ...) after one warm-up round of
each, so machine noise hits both sides alike; the JSON holds medians and minima. Each workload is
timed in a fresh child process, so one workload's heap does not shape the next one's. Peak memory
is measured for each side in its own child process (``--only fedguard`` / ``--only floor``),
which builds the same experiment, runs the same rounds and reports its peak resident set size.

    python benchmarks/overhead.py --workload all --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.protocol.driver import client_seed, sample_clients

SEED = 0
LR = 0.05
WORKLOADS: dict[str, dict[str, int]] = {
    "W1": {"num_clients": 100, "samples": 600, "per_round": 10, "batch_size": 32},
    "W2": {"num_clients": 1000, "samples": 64, "per_round": 100, "batch_size": 16},
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "overhead.json"


def make_config(workload: str, rounds: int) -> config_mod.ExperimentConfig:
    w = WORKLOADS[workload]
    return config_mod.validate(
        {
            "experiment": {"name": f"overhead-{workload}", "seed": SEED, "rounds": rounds},
            "data": {
                "dataset": "synthetic",
                "partition": "iid",
                "num_clients": w["num_clients"],
                "synthetic_samples": w["num_clients"] * w["samples"],
                "synthetic_shape": [1, 28, 28],
                "synthetic_classes": 10,
                "test_fraction": 0.01,
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
    )


class FedguardSide:
    """fedguard's simulator: one ``fit_round`` per round, nothing else."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.params = exp.initial_params.clone()
        self.state = exp.strategy.init(self.params)

    def round(self, round_: int) -> None:
        result = self.exp.driver.fit_round(round_, self.params, self.state)
        self.params, self.state = result.params, result.state


class FloorSide:
    """The plain PyTorch loop: the same SGD steps and the same averaging, no framework."""

    def __init__(self, exp: Experiment, workload: str) -> None:
        w = WORKLOADS[workload]
        self.module = copy.deepcopy(exp.model.module)  # same architecture and initial weights
        self.module.train()
        self.weights = list(self.module.parameters())
        if len(self.module.state_dict()) != len(self.weights):
            raise RuntimeError("the floor assumes a model without buffers")
        self.optimizer = torch.optim.SGD(self.weights, lr=LR, momentum=0.0)
        self.clients = exp.fed.clients
        self.client_ids = list(exp.fed.clients)
        self.per_round = w["per_round"]
        self.batch_size = w["batch_size"]
        self.params = torch.cat([p.detach().reshape(-1) for p in self.weights])

    @torch.no_grad()
    def _load(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.weights:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def round(self, round_: int) -> None:
        sampled = sample_clients(self.client_ids, self.per_round, seed=SEED, round_=round_)
        flats, counts = [], []
        for cid in sampled:
            data = self.clients[cid]
            x, y = data.train_x, data.train_y
            n = int(y.shape[0])
            self._load(self.params)
            generator = torch.Generator().manual_seed(client_seed(SEED, round_, cid))
            for idx in torch.randperm(n, generator=generator).split(self.batch_size):
                self.optimizer.zero_grad()
                out = self.module(x[idx])
                loss = torch.nn.functional.nll_loss(torch.log_softmax(out, dim=-1), y[idx])
                loss.backward()
                self.optimizer.step()
            flats.append(torch.cat([p.detach().reshape(-1) for p in self.weights]))
            counts.append(float(n))
        w = torch.tensor(counts, dtype=torch.float64)
        self.params = ((w / w.sum()) @ torch.stack(flats).double()).float()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _warm_lazy_imports() -> None:
    """Load what both sides import lazily on first use (``torch.optim`` pulls in ~70 MiB of
    ``torch._dynamo``), so that it lands in the common baseline and not in one side's peak."""
    w = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([w], lr=0.1)
    torch.nn.functional.nll_loss(
        torch.log_softmax(w.view(1, 4), -1), torch.zeros(1).long()
    ).backward()
    optimizer.step()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so both sides start from the same RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so a later peak excludes the data build."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure_memory(workload: str, side: str, rounds: int) -> dict[str, Any]:
    """Run one side alone (in a child process) and return its peak RSS, raw and over baseline."""
    exp = Experiment(make_config(workload, rounds + 1))
    runner = FedguardSide(exp) if side == "fedguard" else FloorSide(exp, workload)
    _warm_lazy_imports()
    gc.collect()
    _trim_heap()
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    for round_ in range(1, rounds + 2):
        runner.round(round_)
    peak_kib = _status_kib("VmHWM") if reset else None
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak_kib is None:
        peak_kib = maxrss_kib
    return {
        "side": side,
        "baseline_mib": baseline_kib / 1024 if baseline_kib is not None else None,
        "peak_mib": peak_kib / 1024,
        "peak_over_baseline_mib": (peak_kib - baseline_kib) / 1024 if baseline_kib else None,
        "ru_maxrss_mib": maxrss_kib / 1024,
        "peak_reset": reset,
    }


def _child(workload: str, rounds: int, only: str) -> dict[str, Any]:
    """Run this script for one workload in a fresh process and return the JSON it prints."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--workload",
        workload,
        "--rounds",
        str(rounds),
        "--threads",
        str(torch.get_num_threads()),
        "--only",
        only,
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child process ({workload}, {only}) failed with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_workload(workload: str, rounds: int) -> dict[str, Any]:
    """Interleaved timing: warm-up round of each side, then ``rounds`` A/B pairs."""
    exp = Experiment(make_config(workload, rounds + 1))
    fg, floor = FedguardSide(exp), FloorSide(exp, workload)
    fg_times, floor_times = [], []
    for round_ in range(1, rounds + 2):
        t0 = time.perf_counter()
        fg.round(round_)
        t1 = time.perf_counter()
        floor.round(round_)
        t2 = time.perf_counter()
        if round_ > 1:  # round 1 is the warm-up
            fg_times.append(t1 - t0)
            floor_times.append(t2 - t1)
        print(
            f"  {workload} round {round_}{' (warm-up)' if round_ == 1 else ''}: "
            f"fedguard {t1 - t0:.3f} s  floor {t2 - t1:.3f} s",
            file=sys.stderr,
            flush=True,
        )
    fg_med, floor_med = statistics.median(fg_times), statistics.median(floor_times)
    return {
        "fedguard_s_per_round": fg_med,
        "floor_s_per_round": floor_med,
        "ratio": fg_med / floor_med,
        "fedguard_min_s": min(fg_times),
        "floor_min_s": min(floor_times),
        "ratio_of_min": min(fg_times) / min(floor_times),
        "pair_ratio_median": statistics.median(
            [a / b for a, b in zip(fg_times, floor_times, strict=True)]
        ),
        "fedguard_times_s": fg_times,
        "floor_times_s": floor_times,
        "rounds": rounds,
        # Same SGD steps on both sides: the global models should agree to float32 rounding.
        "max_abs_param_diff": float((fg.params - floor.params).abs().max()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for both sides (default: torch's own default, all cores)",
    )
    # Child processes: peak memory of one side, or the interleaved timing of one workload.
    parser.add_argument("--only", choices=["fedguard", "floor", "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    if args.only is not None:
        if len(names) != 1:
            parser.error("--only needs a single --workload")
        if args.only == "timing":
            print(json.dumps(time_workload(names[0], args.rounds)))
        else:
            print(json.dumps(measure_memory(names[0], args.only, args.rounds)))
        return 0

    results: dict[str, Any] = {}
    for name in names:
        print(f"{name}: memory (one child process per side)", file=sys.stderr, flush=True)
        mem = {side: _child(name, args.rounds, side) for side in ("fedguard", "floor")}
        print(f"{name}: timing (one child process, sides interleaved)", file=sys.stderr, flush=True)
        row = _child(name, args.rounds, "timing")
        fg_mem, floor_mem = mem["fedguard"], mem["floor"]
        row.update(
            {
                "fedguard_peak_mib": fg_mem["peak_over_baseline_mib"],
                "floor_peak_mib": floor_mem["peak_over_baseline_mib"],
                "peak_ratio": fg_mem["peak_over_baseline_mib"]
                / floor_mem["peak_over_baseline_mib"],
                "fedguard_peak_raw_mib": fg_mem["peak_mib"],
                "floor_peak_raw_mib": floor_mem["peak_mib"],
                "peak_raw_ratio": fg_mem["peak_mib"] / floor_mem["peak_mib"],
                "baseline_mib": {s: m["baseline_mib"] for s, m in mem.items()},
                "ru_maxrss_mib": {s: m["ru_maxrss_mib"] for s, m in mem.items()},
                "peak_reset": all(m["peak_reset"] for m in mem.values()),
            }
        )
        results[name] = row
    results["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and args.workload != "all":  # keep the other workload's numbers
        try:
            previous = json.loads(args.out.read_text())
        except (OSError, ValueError):
            previous = {}
        results = {**previous, **results}
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    targets = {"W1": 1.10, "W2": 1.20}
    header = (
        f"{'':4} {'fedguard s':>10} {'floor s':>8} {'ratio':>6} {'target':>6} "
        f"{'fg MiB':>7} {'floor MiB':>9} {'mem x':>6} {'raw x':>6}"
    )
    print(header)
    for name in names:
        r = results[name]
        print(
            f"{name:4} {r['fedguard_s_per_round']:10.3f} {r['floor_s_per_round']:8.3f} "
            f"{r['ratio']:6.3f} {targets[name]:6.2f} {r['fedguard_peak_mib']:7.1f} "
            f"{r['floor_peak_mib']:9.1f} {r['peak_ratio']:6.2f} {r['peak_raw_ratio']:6.2f}"
        )
    m = results["machine"]
    print(
        f"MiB: peak RSS over the common baseline (raw x: ratio of raw peaks); torch {m['torch']}, "
        f"{m['torch_threads']} threads, {m['cores']} cores -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
