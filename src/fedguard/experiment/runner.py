"""Running an experiment: rounds with progress, metrics, checkpoints, resume and the summary.

``run`` is the safe entry point behind both the command line and ``fedguard.run``: it validates
everything before round 1, writes the run folder as it goes, checkpoints after every round,
resumes after the last finished round, and on Ctrl-C or a failed round stops after saving.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import fedguard
from fedguard.algorithms import attacks_data
from fedguard.client import evaluation
from fedguard.client.app import ClientApp
from fedguard.experiment import checkpoint, config_checks, federation, plots, privacy
from fedguard.experiment import config as config_mod
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.runfolder import RunFolder
from fedguard.models import registry as models
from fedguard.protocol import secagg
from fedguard.protocol.driver import RoundDriver, RoundFailedError
from fedguard.protocol.strategy import CentralDP, ServerState, Strategy, StrategyKind
from fedguard.protocol.transport import Transport
from fedguard.runtime import attack
from fedguard.runtime.inprocess import InProcessTransport

log = logging.getLogger("fedguard")

TIMING_FIELDS = ("seconds",)
# Builds the transport over the federation's client ids (default: the in-process simulator).
TransportFn = Callable[[list[int]], Transport]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the finished rounds are saved and ``--resume`` continues."""


def _auc(probabilities: torch.Tensor, y: torch.Tensor) -> float | None:
    from sklearn.metrics import roc_auc_score

    labels = y.numpy()
    present = np.unique(labels)
    if len(present) < 2:
        return None
    p = probabilities.double().numpy()
    if p.shape[1] == 2:
        return float(roc_auc_score(labels, p[:, 1]))
    if len(present) < p.shape[1]:
        return None
    p = p / p.sum(axis=1, keepdims=True)
    return float(roc_auc_score(labels, p, multi_class="ovr"))


def central_metrics(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Accuracy, loss and ROC AUC of the global model on the central evaluation set."""
    result = evaluation.evaluate(model, x, y, batch_size=batch_size, keep_probabilities=True)
    assert result.probabilities is not None
    return {
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "test_auc": _auc(result.probabilities, y),
    }


def _as_config(
    config: ExperimentConfig | Mapping[str, Any] | str | Path, overrides: list[str]
) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        config = config_mod.to_toml_dict(config)
    if isinstance(config, str | Path):
        return config_mod.load(config, overrides)
    return config_mod.validate(config_mod.apply_overrides(dict(config), overrides))


def _check_resume_config(saved: Path, cfg: ExperimentConfig) -> None:
    if not saved.exists():
        return
    old = config_mod.load(saved)
    a = config_mod.to_toml_dict(old)
    b = config_mod.to_toml_dict(cfg)
    a["experiment"].pop("rounds", None)
    b["experiment"].pop("rounds", None)
    if a != b:
        diffs = [
            f"{section}.{key}"
            for section in sorted(set(a) | set(b))
            for key in sorted(set(a.get(section, {})) | set(b.get(section, {})))
            if a.get(section, {}).get(key) != b.get(section, {}).get(key)
        ]
        raise ConfigError(
            f"--resume: the config differs from the run's config.toml at {', '.join(diffs)}; "
            "resume with the same settings (only experiment.rounds may grow)"
        )


class Experiment:
    """One configured experiment, set up and ready to run rounds."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        model_fn: Callable[..., Any] | None = None,
        data_fn: federation.DataFn | None = None,
        transport_fn: TransportFn | None = None,
    ) -> None:
        self.cfg = cfg
        self.fed = federation.build_federation(cfg, data_fn)
        self.attack = federation.attack_plan(cfg, self.fed)
        if self.attack is not None and self.attack.poisons_data:
            self.fed = federation.poison_clients(self.fed, self.attack.malicious, self._poison)
        try:
            self.model = models.build(
                cfg.model.name,
                framework=cfg.model.framework,
                input_shape=self.fed.input_shape,
                num_classes=self.fed.num_classes,
                seed=cfg.experiment.seed,
                builder=model_fn,
            )
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"model.name: {exc}") from None
        c = cfg.client
        client_config = {
            "optimizer": c.optimizer,
            "lr": c.lr,
            "momentum": c.momentum,
            "weight_decay": c.weight_decay,
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "proximal_mu": c.proximal_mu,
            "max_steps": c.max_steps,
            "augment": c.augment,
        }
        sizes = {i: d.num_train for i, d in self.fed.clients.items()}
        self.privacy = privacy.build(cfg, sizes, self.model)
        central_dp = None
        if self.privacy is not None:
            client_config.update(self.privacy.client_config(cfg))
            if self.privacy.mode == "central":
                p = cfg.privacy
                try:
                    central_dp = CentralDP(
                        clip_norm=p.clip_norm,
                        noise_multiplier=self.privacy.noise_multiplier,
                        expected_clients=float(cfg.clients_per_round),
                        seed=cfg.experiment.seed,
                        adaptive=p.adaptive_clip,
                        target_quantile=p.target_quantile,
                        clip_learning_rate=p.clip_learning_rate,
                        count_stddev=p.clip_count_stddev or cfg.clients_per_round / 20.0,
                    )
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        s = cfg.server
        rule = config_checks.robust_rule(s, cfg.experiment.seed)
        self.strategy = Strategy.create(
            StrategyKind(s.strategy),
            client_config=client_config,
            num_clients=len(self.fed.clients),
            server_lr=s.server_lr,
            server_momentum=s.server_momentum,
            beta1=s.beta1,
            beta2=s.beta2,
            tau=s.tau,
            central_dp=central_dp,
            robust_rule=rule,
        )
        self.client_state: dict[int, dict[str, torch.Tensor]] = {}
        self.app = ClientApp(self.model, self.fed.clients, self.client_state)
        # Deployment passes its own transport (gRPC); the round code is the same either way.
        self.transport: Transport = (
            InProcessTransport(self.app.handle, list(self.fed.clients))
            if transport_fn is None
            else transport_fn(list(self.fed.clients))
        )
        if self.attack is not None and not self.attack.poisons_data:
            self.transport = attack.ModelPoisoning(
                self.transport,
                self.attack.malicious,
                attack.model_poison(self.attack.config),
                seed=self.attack.seed,
            )
        # A robust rule tolerates f Byzantine updates only among enough of them: fewer usable
        # replies fail the round as too few replies do.
        min_clients = cfg.min_clients
        if rule is not None:
            min_clients = max(
                min_clients, config_checks.min_updates(rule.kind, rule.f, rule.bucket_size)
            )
        self.driver = RoundDriver(
            self.transport,
            self.strategy,
            dim=self.model.spec.size,
            clients_per_round=cfg.clients_per_round,
            min_clients=min_clients,
            seed=cfg.experiment.seed,
            deadline_s=s.deadline_s,
            poisson=s.sampling == "poisson",
            secure_aggregation=self._secure_aggregation(sizes, central_dp),
        )
        self.initial_params = self.model.get_flat()
        self.backdoor_test = self._backdoor_test()

    def _poison(
        self, client_id: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.attack is not None
        return attack.poison_training_data(
            x,
            y,
            kind=self.attack.config.kind,
            num_classes=self.fed.num_classes,
            backdoor=self.attack.backdoor,
            generator=self.attack.client_generator(client_id),
        )

    def _backdoor_test(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The central test images whose label is not the target, with the trigger stamped in."""
        if self.attack is None or self.attack.backdoor is None:
            return None
        b = self.attack.backdoor
        keep = self.fed.eval_y != b.target
        if not bool(keep.any()):
            raise ConfigError(
                f"attack.target_label={b.target}: every test label is the target, so the "
                "backdoor's success rate is undefined"
            )
        x = attacks_data.stamp_trigger(self.fed.eval_x[keep], b.trigger)
        return x, self.fed.eval_y[keep]

    def _secure_aggregation(
        self, sizes: Mapping[int, int], central_dp: CentralDP | None
    ) -> secagg.Settings | None:
        """The ``[secure_aggregation]`` settings; the fixed-point range is checked here."""
        a, cfg = self.cfg.secure_aggregation, self.cfg
        if not a.enabled:
            return None
        distributed = self.privacy.distributed if self.privacy is not None else None
        user_dp = central_dp is not None or distributed is not None
        clip = cfg.privacy.clip_norm if user_dp else a.clip_norm
        assert clip is not None  # the config refuses secure aggregation without a clip
        if cfg.server.norm_bound is not None:  # norm bounding: each client clips its own update
            clip = min(clip, cfg.server.norm_bound)
        settings = secagg.Settings(
            mode=secagg.Mode(a.mode),
            clip_norm=clip,
            max_weight=a.max_examples or max(sizes.values()),
            bits=a.bits,
            weighted=not user_dp,
            threshold=a.threshold,
            neighbours=a.neighbours,
            distributed=distributed,
            dropout_rate=a.dropout_rate,
        )
        poisson = cfg.server.sampling == "poisson"
        largest = len(sizes) if poisson else cfg.clients_per_round
        try:  # the largest cohort a round can have must fit the ring
            settings.fixed_point(largest)
        except ValueError as exc:
            raise ConfigError(f"secure_aggregation.bits: {exc}") from None
        return settings

    def evaluate(self, params: torch.Tensor) -> dict[str, Any]:
        """Central test metrics, and the backdoor's success rate (None without a backdoor)."""
        self.model.set_flat(params)
        out = central_metrics(
            self.model, self.fed.eval_x, self.fed.eval_y, self.cfg.evaluation.batch_size
        )
        out["backdoor_success"] = None
        if self.backdoor_test is not None:
            assert self.attack is not None and self.attack.backdoor is not None
            x, y = self.backdoor_test
            result = evaluation.evaluate(
                self.model, x, y, batch_size=self.cfg.evaluation.batch_size, keep_probabilities=True
            )
            assert result.probabilities is not None
            out["backdoor_success"] = attacks_data.attack_success_rate(
                result.probabilities.argmax(dim=1), y, target=self.attack.backdoor.target
            )
        return out

    def attack_summary(self) -> dict[str, Any] | None:
        """What ``summary.json`` says about the simulated attack (None without one)."""
        if self.attack is None:
            return None
        a = self.cfg.attack
        return {
            "kind": a.kind,
            "fraction": a.fraction,
            "seed": self.attack.seed,
            "malicious": list(self.attack.malicious),
        }

    def final_report(self, params: torch.Tensor) -> dict[str, Any]:
        """Confusion matrix and, where the test set names its owners, accuracy per owner."""
        self.model.set_flat(params)
        result = evaluation.evaluate(
            self.model,
            self.fed.eval_x,
            self.fed.eval_y,
            batch_size=self.cfg.evaluation.batch_size,
            keep_probabilities=True,
        )
        assert result.probabilities is not None
        predicted = result.probabilities.argmax(dim=1).numpy()
        truth = self.fed.eval_y.numpy()
        k = self.fed.num_classes
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (truth, predicted), 1)
        report: dict[str, Any] = {"confusion_matrix": matrix.tolist()}
        if self.fed.eval_groups is not None:
            groups = np.asarray(self.fed.eval_groups)
            report["accuracy_by_group"] = {
                str(g): float((predicted[groups == g] == truth[groups == g]).mean())
                for g in sorted(set(self.fed.eval_groups))
            }
        return report

    def should_evaluate(self, round_: int) -> bool:
        every = self.cfg.evaluation.every
        return round_ == self.cfg.experiment.rounds or (every > 0 and round_ % every == 0)

    def checkpoint_tensors(
        self, params: torch.Tensor, state: ServerState
    ) -> dict[str, torch.Tensor]:
        tensors = {"params": params}
        tensors.update({f"server.{k}": v for k, v in state.tensors().items()})
        for cid, named in self.client_state.items():
            tensors.update({f"client.{cid}.{k}": v for k, v in named.items()})
        return tensors

    def restore(self, ck: checkpoint.Checkpoint) -> tuple[torch.Tensor, ServerState]:
        params = ck.tensors["params"]
        self.model.spec.check_vector(params)
        server = {
            k.removeprefix("server."): v for k, v in ck.tensors.items() if k.startswith("server.")
        }
        self.client_state.clear()
        for key, value in ck.tensors.items():
            if key.startswith("client."):
                _, cid, name = key.split(".", 2)
                self.client_state.setdefault(int(cid), {})[name] = value
        return params, ServerState.from_tensors(server)


def _versions() -> dict[str, str]:
    out = {
        "fedguard": fedguard.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        out["keras"] = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _attach_log(folder: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(folder.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedguard").addHandler(handler)
    logging.getLogger("fedguard").setLevel(logging.INFO)
    return handler


def run(
    config: ExperimentConfig | Mapping[str, Any] | str | Path,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    model_fn: Callable[..., Any] | None = None,
    data_fn: federation.DataFn | None = None,
    progress: bool = True,
    console: Console | None = None,
    transport_fn: TransportFn | None = None,
) -> dict[str, Any]:
    """Run an experiment end to end and return its summary (also written to ``summary.json``).

    ``config`` is an :class:`ExperimentConfig`, a mapping of TOML tables, or a TOML file path.
    ``model_fn`` and ``data_fn`` plug in a user's own model builder and data function;
    ``transport_fn`` replaces the in-process simulator (the gRPC server passes its transport).
    """
    cfg = _as_config(config, overrides or [])
    folder = RunFolder(out if out is not None else Path("runs") / cfg.experiment.name)
    console = console or Console(stderr=False, quiet=not progress)
    finished = checkpoint.latest(folder.checkpoints)
    if finished is not None and not resume:
        raise ConfigError(
            f"--out {folder.root}: this run folder already holds round {finished.round}; "
            "pass --resume to continue it or choose another folder"
        )
    if resume:
        _check_resume_config(folder.config, cfg)
    exp = Experiment(cfg, model_fn=model_fn, data_fn=data_fn, transport_fn=transport_fn)
    folder.create()
    handler = _attach_log(folder)
    try:
        return _run_rounds(exp, folder, finished if resume else None, console, progress)
    finally:
        logging.getLogger("fedguard").removeHandler(handler)
        handler.close()


def _run_rounds(
    exp: Experiment,
    folder: RunFolder,
    finished: checkpoint.Checkpoint | None,
    console: Console,
    show_progress: bool,
) -> dict[str, Any]:
    cfg = exp.cfg
    folder.write_config(config_mod.to_toml_dict(cfg))
    partition = federation.describe(exp.fed)
    folder.write_json(folder.partition, partition)
    plots.partition_plot(exp.fed.histogram, exp.fed.class_names, folder.plots / "partition.png")
    if finished is None:
        params, state, start = exp.initial_params, exp.strategy.init(exp.initial_params), 1
        rows: list[dict[str, Any]] = []
        folder.rewrite_metrics(rows)
    else:
        params, state = exp.restore(finished)
        start = finished.round + 1
        rows = [r for r in folder.read_metrics() if r["round"] <= finished.round]
        folder.rewrite_metrics(rows)
        log.info("resuming after round %d", finished.round)
    total = cfg.experiment.rounds
    joined = dict.fromkeys(exp.fed.clients, 0)  # rounds each client was asked to train
    for done in range(1, start):
        for cid in exp.driver.sample(done):
            joined[cid] += 1
    status, error = "completed", None
    started = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task("rounds", total=total, completed=start - 1, stats=_stats(rows))
        try:
            for round_ in range(start, total + 1):
                if _budget_spent(exp, round_, joined):
                    status = "budget_spent"
                    break
                t0 = time.perf_counter()
                try:
                    row, params, state, sampled = _one_round(exp, round_, params, state)
                except secagg.SecAggAbortedError as exc:
                    log.warning("%s The model is unchanged; the run goes on.", exc)
                    row, sampled = _aborted_row(round_, exc), exp.driver.sample(round_)
                    row["seconds"] = time.perf_counter() - t0
                for cid in sampled:
                    joined[cid] += 1
                if exp.privacy is not None:
                    row["epsilon"] = exp.privacy.epsilon(round_, joined)
                rows.append(row)
                folder.append_metrics(row)
                checkpoint.save(
                    folder.checkpoints,
                    checkpoint.Checkpoint(
                        round_,
                        exp.checkpoint_tensors(params, state),
                        {"spec": exp.model.spec.to_json()},
                    ),
                    keep=cfg.checkpoint.keep,
                )
                bar.update(task, advance=1, stats=_stats(rows))
        except KeyboardInterrupt:
            status = "interrupted"
        except RoundFailedError as exc:
            status, error = "failed", str(exc)
            log.error("%s", exc)
    plots.write_run_plots(rows, folder.plots)
    summary = _summary(exp, rows, status, error, time.perf_counter() - started, folder)
    if exp.privacy is not None:
        done = rows[-1]["round"] if rows else 0
        summary["epsilon"] = exp.privacy.epsilon(done, joined)
        summary["delta"] = exp.privacy.delta
        summary["privacy"] = exp.privacy.mechanism(done, joined)
    if rows:
        report = exp.final_report(params)
        plots.confusion_plot(
            report["confusion_matrix"], exp.fed.class_names, folder.plots / "confusion_matrix.png"
        )
        summary.update(report)
    folder.write_json(folder.summary, summary)
    if show_progress:
        if status == "budget_spent":
            console.print(
                f"Privacy budget spent: stopped after round {summary['rounds_completed']} at "
                f"epsilon {summary['epsilon']:.3g} (max_epsilon {cfg.privacy.max_epsilon:g})."
            )
        console.print(
            f"Results in [bold]{folder.root}[/bold] (summary.json, metrics.jsonl, plots/)"
        )
    if status == "interrupted":
        raise RunInterrupted(
            f"Stopped after round {rows[-1]['round'] if rows else 0}; continue with --resume."
        )
    if status == "failed":
        raise RoundFailedError(
            f"{error} The finished rounds are saved; fix the cause and --resume."
        )
    return summary


def _budget_spent(exp: Experiment, round_: int, joined: Mapping[int, int]) -> bool:
    """True (and logged) if ``round_`` would take epsilon past ``privacy.max_epsilon``."""
    plan = exp.privacy
    if plan is None or plan.max_epsilon is None:
        return False
    after = dict(joined)
    for cid in exp.driver.sample(round_):
        after[cid] += 1
    projected = plan.epsilon(round_, after)
    if projected <= plan.max_epsilon:
        return False
    log.warning(
        "privacy budget: round %d would bring epsilon to %.4g > privacy.max_epsilon = %g; "
        "stopping after round %d",
        round_,
        projected,
        plan.max_epsilon,
        round_ - 1,
    )
    return True


def _one_round(
    exp: Experiment, round_: int, params: torch.Tensor, state: ServerState
) -> tuple[dict[str, Any], torch.Tensor, ServerState, list[int]]:
    t0 = time.perf_counter()
    result = exp.driver.fit_round(round_, params, state)
    row: dict[str, Any] = {"round": round_}
    if exp.should_evaluate(round_):
        row.update(exp.evaluate(result.params))
    else:
        row.update({"test_accuracy": None, "test_loss": None, "test_auc": None})
        row["backdoor_success"] = None
    row.update(result.metrics)
    if exp.cfg.evaluation.federated and exp.should_evaluate(round_):
        fed = exp.driver.evaluate_round(round_, result.params)
        row.update(fed or {"federated_loss": None, "federated_accuracy": None})
    row["epsilon"] = None
    row["seconds"] = time.perf_counter() - t0
    return row, result.params, result.state, result.sampled


def _aborted_row(round_: int, exc: secagg.SecAggAbortedError) -> dict[str, Any]:
    """The metrics row of a round whose secure aggregation was aborted (no model change)."""
    row: dict[str, Any] = {"round": round_, "test_accuracy": None, "test_loss": None}
    row.update({"test_auc": None, "train_loss": None, "epsilon": None, "seconds": None})
    row["backdoor_success"] = None
    row.update(exc.metrics)
    row["secure_aggregation_aborted"] = str(exc)
    return row


def _stats(rows: list[dict[str, Any]]) -> str:
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    if not evaluated:
        return "acc  -     loss  -    "
    r = evaluated[-1]
    return f"acc {r['test_accuracy']:.4f}  loss {r['test_loss']:.4f}"


def _summary(
    exp: Experiment,
    rows: list[dict[str, Any]],
    status: str,
    error: str | None,
    seconds: float,
    folder: RunFolder,
) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    final = evaluated[-1] if evaluated else {}
    return {
        "name": exp.cfg.experiment.name,
        "status": status,
        "error": error,
        "rounds_completed": rows[-1]["round"] if rows else 0,
        "rounds_planned": exp.cfg.experiment.rounds,
        "final_round_evaluated": final.get("round"),
        "test_accuracy": final.get("test_accuracy"),
        "test_loss": final.get("test_loss"),
        "test_auc": final.get("test_auc"),
        "backdoor_success": final.get("backdoor_success"),
        "aggregator": exp.cfg.server.aggregator,
        "byzantine_f": exp.cfg.server.byzantine_f,
        "attack": exp.attack_summary(),
        "evaluation_split": exp.cfg.evaluation.split,
        "epsilon": None,
        "delta": None,
        "num_clients": len(exp.fed.clients),
        "num_parameters": exp.model.spec.size,
        "seconds": seconds,
        "clients_failed": sum(int(r.get("clients_failed", 0)) for r in rows),
        "clients_rejected": sum(int(r.get("clients_rejected", 0)) for r in rows),
        "run_dir": str(folder.root),
        "versions": _versions(),
    }
