"""Federated Newton against FedAvg with local SGD, measured against the centralized optimum.

Both runs train the same model on the same 5-client partition of the breast cancer data for the
same number of rounds. After every round the global model's training loss is computed on the pooled
training data of all clients with the objective every client optimizes,

    F(w) = (1/n) sum_i CE(w; x_i, y_i) + weight_decay / 2 * ||w||^2     (bias included),

and compared with ``F(w*)``, the optimum found by full-batch Newton with a backtracking line search
in float64 on the pooled data. The table goes into this folder's README.md (between the result
markers, so a rerun replaces it) and the numbers into results.json.

Run from the project root::

    python examples/logistic_newton/compare.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import fedguard
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "experiment.toml"
README = HERE / "README.md"
RESULTS = HERE / "results.json"
START = "<!-- results:start -->"
END = "<!-- results:end -->"

# FedAvg with local SGD, tuned by hand on this problem: over lr in {0.1, 0.3, 0.5, 1, 2}, local
# epochs in {1, 2, 5, 10, 20} and batch sizes 16 and 32, the good settings all end 10 rounds at a
# gap of 4.5e-3 to 7.6e-3 (client drift and SGD noise); this one descends smoothly to 5.0e-3.
SGD_OVERRIDES = [
    'client.optimizer="sgd"',
    "client.lr=0.3",
    "client.epochs=20",
    "client.batch_size=16",
]
TARGET_GAP = 1e-4


def pooled_training_data(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    """Every client's training examples in one float64 batch (the data the clients optimize on)."""
    x = torch.cat([c.train_x for c in exp.fed.clients.values()]).to(torch.float64)
    y = torch.cat([c.train_y for c in exp.fed.clients.values()])
    return x, y


def objective(
    exp: Experiment, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """``F(w)`` in float64 for a flat parameter vector, through the experiment's own model."""
    flat = flat.to(torch.float64)
    params = {
        t.name: flat[t.offset : t.offset + t.numel].view(t.shape) for t in exp.model.spec.tensors
    }
    logits = torch.func.functional_call(exp.model.module, params, (x,))
    loss = torch.nn.functional.cross_entropy(logits, y)
    return loss + 0.5 * weight_decay * (flat * flat).sum()


def centralized_optimum(
    exp: Experiment, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> tuple[torch.Tensor, float, float]:
    """Full-batch Newton with an Armijo backtracking line search in float64.

    Returns ``w*``, ``F(w*)`` and the final gradient norm; ``F`` is ``weight_decay``-strongly
    convex, so ``F(w) - F(w*) <= |grad F(w)|^2 / (2 weight_decay)`` certifies the result.
    """

    def f(w: torch.Tensor) -> torch.Tensor:
        return objective(exp, w, x, y, weight_decay)

    w = torch.zeros(exp.model.spec.size, dtype=torch.float64)
    grad_norm = float("inf")
    for _ in range(100):
        value = f(w)
        grad = torch.func.grad(f)(w)
        grad_norm = float(grad.norm())
        if grad_norm < 1e-12:
            break
        step = torch.linalg.solve(torch.func.jacrev(torch.func.jacrev(f))(w), -grad)
        t = 1.0
        while f(w + t * step) > value + 1e-4 * t * (grad @ step) and t > 1e-10:
            t *= 0.5
        w = w + t * step
    return w, float(f(w)), grad_norm


def round_params(run_dir: Path, rounds: int) -> list[torch.Tensor]:
    """The global model after each round, from the run folder's checkpoints."""
    return [
        load_file(str(run_dir / "checkpoints" / f"round_{r:05d}" / "tensors.safetensors"))["params"]
        for r in range(1, rounds + 1)
    ]


def federated_losses(
    cfg: config_mod.ExperimentConfig, out: Path, x: torch.Tensor, y: torch.Tensor, exp: Experiment
) -> list[float]:
    """``F`` of the global model before round 1 and after each round of ``fedguard.run``."""
    rounds = cfg.experiment.rounds
    summary = fedguard.run(cfg, out=out, progress=False, overrides=[f"checkpoint.keep={rounds}"])
    if summary["status"] != "completed":
        raise RuntimeError(f"The run in {out} did not complete: {summary['error']}")
    params = [exp.initial_params, *round_params(out, rounds)]
    wd = cfg.client.weight_decay
    return [float(objective(exp, p, x, y, wd)) for p in params]


def compare(work_dir: Path, config_path: Path = CONFIG) -> dict[str, Any]:
    """Run both federated optimizers and the centralized solve; return every number."""
    newton_cfg = config_mod.load(config_path)
    sgd_cfg = config_mod.load(config_path, SGD_OVERRIDES)
    wd = newton_cfg.client.weight_decay
    # The same seed gives the same partition and initial model as inside fedguard.run.
    exp = Experiment(newton_cfg)
    x, y = pooled_training_data(exp)
    _, optimum, grad_norm = centralized_optimum(exp, x, y, wd)
    newton_loss = federated_losses(newton_cfg, work_dir / "newton", x, y, exp)
    sgd_loss = federated_losses(sgd_cfg, work_dir / "fedavg_sgd", x, y, exp)
    c = sgd_cfg.client
    return {
        "dataset": newton_cfg.data.dataset,
        "num_clients": newton_cfg.data.num_clients,
        "partition": f"{newton_cfg.data.partition} (alpha={newton_cfg.data.alpha})",
        "client_sizes": [c.num_train for c in exp.fed.clients.values()],
        "num_train": int(y.shape[0]),
        "num_parameters": exp.model.spec.size,
        "weight_decay": wd,
        "rounds": list(range(newton_cfg.experiment.rounds + 1)),
        "optimum_loss": optimum,
        "optimum_grad_norm": grad_norm,
        "newton": {"loss": newton_loss, "gap": [v - optimum for v in newton_loss]},
        "fedavg_sgd": {
            "settings": {"lr": c.lr, "epochs": c.epochs, "batch_size": c.batch_size},
            "loss": sgd_loss,
            "gap": [v - optimum for v in sgd_loss],
        },
        "newton_rounds_to_target": rounds_to_gap(newton_loss, optimum, TARGET_GAP),
        "fedavg_sgd_rounds_to_target": rounds_to_gap(sgd_loss, optimum, TARGET_GAP),
        "target_gap": TARGET_GAP,
    }


def rounds_to_gap(losses: list[float], optimum: float, gap: float) -> int | None:
    """The first round after which the loss is within ``gap`` of the optimum (0: the start)."""
    return next((r for r, v in enumerate(losses) if v - optimum <= gap), None)


def markdown_table(results: dict[str, Any]) -> str:
    s = results["fedavg_sgd"]["settings"]
    lines = [
        f"Centralized optimum `F(w*) = {results['optimum_loss']:.10f}` "
        f"(full-batch Newton in float64, gradient norm {results['optimum_grad_norm']:.1e}); "
        f"{results['num_train']} training examples over {results['num_clients']} clients "
        f"({', '.join(str(n) for n in results['client_sizes'])}), "
        f"{results['num_parameters']} parameters, weight decay {results['weight_decay']:g}.",
        "",
        "| round | Newton loss | Newton gap | FedAvg-SGD loss | FedAvg-SGD gap |",
        "|---:|---:|---:|---:|---:|",
    ]
    n, f = results["newton"], results["fedavg_sgd"]
    for r in results["rounds"]:
        lines.append(
            f"| {r} | {n['loss'][r]:.8f} | {n['gap'][r]:.2e} | {f['loss'][r]:.8f} | "
            f"{f['gap'][r]:.2e} |"
        )
    reached = results["newton_rounds_to_target"]
    fedavg = results["fedavg_sgd_rounds_to_target"]
    lines += [
        "",
        f"Round 0 is the initial model. FedAvg-SGD: lr {s['lr']:g}, {s['epochs']} local epoch(s), "
        f"batch size {s['batch_size']}. Federated Newton is within {results['target_gap']:g} "
        f"of the optimum after round {reached}; FedAvg-SGD "
        + (f"after round {fedavg}." if fedavg is not None else "not within 10 rounds."),
    ]
    return "\n".join(lines)


def write_readme(results: dict[str, Any], readme: Path = README) -> None:
    """Replace the text between the result markers of ``readme`` with the table."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} lacks the markers {START} and {END}.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{markdown_table(results)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the files")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 62-parameter model gains nothing from intra-op threads
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(Path(tmp), args.config)
    print(markdown_table(results))
    if not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        write_readme(results)


if __name__ == "__main__":
    main()
