"""Cost of one DP-SGD step over one plain SGD step, for fedguard and for Opacus.

All sides train their own copy of the seed image CNN (``image_cnn((1, 28, 28), 2)``, same initial
weights) on the same fixed batch of random 28x28 inputs, on the CPU:

* plain: ``zero_grad``, mean NLL, ``backward``, ``SGD.step``;
* fedguard: ``dp_sgd.dp_step`` with the book-keeping hooks (per-example norms from layer inputs
  and output gradients, clip, sum, Gaussian noise, ``SGD.step``) on a fixed batch, i.e. without
  the Poisson sampling, so the batch is the same as the plain side's;
* fallback: the same step with per-example gradients from ``torch.func`` (vmap of grad);
* Opacus: ``GradSampleModule`` in hooks mode and in functorch mode (``force_functorch``), and
  ghost clipping (``GradSampleModuleFastGradientClipping``), each with its DP optimizer so that
  a step clips, adds noise and updates.

Opacus is optional: a side whose import or first step fails is reported as ``null``. Every side
is warmed up, then the steps are interleaved (plain, fedguard, fallback, opacus..., plain, ...),
so machine noise hits all sides alike; the JSON has min and median per side and the ratios of
medians (and of minima) to the plain step.

    python benchmarks/dp_cost.py --threads 2 --repeats 30
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedguard.client import dp_sgd, per_example_grads, training
from fedguard.models import torch_models
from fedguard.models.adapter import TorchModel

BATCH = 32
LR = 0.01
CLIP = 1.0
NOISE = 1.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dp_cost.json"

Step = Callable[[], None]


def plain_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, foreach=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(torch.log_softmax(module(x), dim=-1), y).backward()
        optimizer.step()

    return step


def fedguard_step(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    method: per_example_grads.GradientMethod,
    stack: contextlib.ExitStack,
) -> Step:
    """A fedguard DP-SGD step; its hooks stay until ``stack`` closes."""
    model = TorchModel(module)
    model.train_mode(True)
    cfg = training.LocalTraining(lr=LR, batch_size=BATCH)
    optimizer = training._make_optimizer(cfg, [s.param for s in model.trainable()])
    dp = dp_sgd.DPSGD(max_grad_norm=CLIP, noise_multiplier=NOISE)
    generator = torch.Generator().manual_seed(0)
    clip = stack.enter_context(per_example_grads.per_example_clipper(model, method))

    def step() -> None:
        dp_sgd.dp_step(clip, model, optimizer, x, y, dp, float(BATCH), generator)

    return step


def opacus_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> Step:
    """An Opacus DP-SGD step: per-sample gradients, clip, noise, SGD (mode: hooks/functorch)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(module, loss_reduction="mean", force_functorch=mode == "functorch")
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=LR),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
        loss_reduction="mean",
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.nll_loss(torch.log_softmax(gsm(x), dim=-1), y).backward()
        optimizer.step()

    return step


def opacus_ghost_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """Opacus ghost clipping (Li et al. 2022): norms in one backward, the clipped sum in another."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        module, loss_reduction="mean", max_grad_norm=CLIP, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=LR),
        noise_multiplier=NOISE,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(
        gsm, optimizer, nn.NLLLoss(reduction="mean"), loss_reduction="mean"
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(torch.log_softmax(gsm(x), dim=-1), y).backward()
        optimizer.step()

    return step


def build_sides(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, stack: contextlib.ExitStack
) -> dict[str, Step]:
    """Every side that can run here, by name, in timing order."""
    sides: dict[str, Step] = {"plain": plain_step(copy.deepcopy(module), x, y)}
    for name, method in (("fedguard", "hooks"), ("fallback_vmap", "vmap")):
        method = per_example_grads.GradientMethod(method)
        sides[name] = fedguard_step(copy.deepcopy(module), x, y, method, stack)
    optional: dict[str, Callable[[], Step]] = {
        "opacus_hooks": lambda: opacus_step(copy.deepcopy(module), x, y, "hooks"),
        "opacus_functorch": lambda: opacus_step(copy.deepcopy(module), x, y, "functorch"),
        "opacus_ghost": lambda: opacus_ghost_step(copy.deepcopy(module), x, y),
    }
    for name, make in optional.items():
        try:
            step = make()
            step()  # fail here, not in the timed loop
        except Exception as err:  # noqa: BLE001 - an optional comparison may fail in any way
            print(f"  {name}: skipped ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        sides[name] = step
    return sides


def time_sides(sides: dict[str, Step], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm-up steps of each side, then ``repeats`` rounds of one timed step per side."""
    for step in sides.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, step in sides.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict[str, list[float]], threads: int) -> dict[str, Any]:
    ms = {
        name: {"min": 1e3 * min(t), "median": 1e3 * statistics.median(t)}
        for name, t in times.items()
    }
    plain = ms["plain"]

    def ratio(name: str, stat: str = "median") -> float | None:
        return ms[name][stat] / plain[stat] if name in ms else None

    return {
        "model": "image_cnn",
        "batch_size": BATCH,
        "threads": threads,
        "repeats": len(times["plain"]),
        "plain_step_ms": plain,
        "fedguard_dp_step_ms": ms["fedguard"],
        "fallback_vmap_step_ms": ms["fallback_vmap"],
        "opacus_hooks_step_ms": ms.get("opacus_hooks"),
        "opacus_functorch_step_ms": ms.get("opacus_functorch"),
        "opacus_ghost_step_ms": ms.get("opacus_ghost"),
        "fedguard_ratio": ratio("fedguard"),
        "fallback_vmap_ratio": ratio("fallback_vmap"),
        "opacus_hooks_ratio": ratio("opacus_hooks"),
        "opacus_functorch_ratio": ratio("opacus_functorch"),
        "opacus_ghost_ratio": ratio("opacus_ghost"),
        "ratio_of_min": {name: ratio(name, "min") for name in ms if name != "plain"},
    }


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every side")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    # Opacus' full backward hooks warn on every step that the input needs no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    module = torch_models.image_cnn((1, 28, 28), 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (BATCH,), generator=g)

    with contextlib.ExitStack() as stack:
        sides = build_sides(module, x, y, stack)
        times = time_sides(sides, args.warmup, args.repeats)
    result = summarise(times, torch.get_num_threads())
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'side':18} {'min ms':>8} {'median ms':>10} {'x plain':>8}")
    for name, t in times.items():
        med = statistics.median(t)
        ratio = med / statistics.median(times["plain"])
        print(f"{name:18} {1e3 * min(t):8.2f} {1e3 * med:10.2f} {ratio:8.2f}")
    print(f"image_cnn, batch {BATCH}, {result['threads']} threads -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
