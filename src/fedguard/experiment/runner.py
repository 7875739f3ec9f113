"""Running an experiment: rounds with progress, metrics, checkpoints, resume and the summary.

``run`` is the safe entry point behind both the command line and ``fedguard.run``: it validates
everything before round 1, writes the run folder as it goes, checkpoints after every round,
resumes after the last finished round, and on Ctrl-C or a failed round stops after saving.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedguard.audit import canary
from fedguard.experiment import (
    checkpoint,
    config_checks,
    contribution,
    federation,
    plots,
    privacy,
)
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment, TransportFn
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.data_free import DataFreeExperiment
from fedguard.experiment.runfolder import RunFolder
from fedguard.observe import status as status_file
from fedguard.observe import tracking
from fedguard.protocol import async_driver, secagg
from fedguard.protocol.aggregator import LeftOut
from fedguard.protocol.driver import ReplyWatcher, RoundFailedError
from fedguard.protocol.strategy import StrategyState
from fedguard.protocol.transport import Failed, Outcome

log = logging.getLogger("fedguard")

TIMING_FIELDS = ("seconds",)
NOISE_MULTIPLIERS = "noise_multipliers"  # checkpoint info: the DP noise multiplier of each round
DP_SGD_REPORTS = "dp_sgd_reports"  # checkpoint info: what each local-DP client reported it ran
CONTRIBUTIONS = "contributions.json"  # the run folder's contribution scores


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the finished rounds are saved and ``--resume`` continues."""


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
    a.pop("tracking", None)  # where the rows also go may change between the parts of a run
    b.pop("tracking", None)
    for engine in (a, b):  # every engine (and thread count) gives the same results
        for key in ("kind", "threads", *config_checks.RAY_KEYS):
            engine.get("runtime", {}).pop(key, None)
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


def _versions() -> dict[str, str]:
    out = {
        "fedguard": importlib.metadata.version("fedguard"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        out["keras"] = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _progress(console: Console, show: bool) -> Progress:
    """The round bar; ``show=False`` (``--quiet``) draws nothing even on a console that prints."""
    return Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[stats]}"),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not show,
    )


def _attach_log(folder: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(folder.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedguard").addHandler(handler)
    logging.getLogger("fedguard").setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (``runtime.threads``; None: unchanged) for
    the run, and the caller's setting restored after it: a run inside a notebook or a sweep
    must not change the threads of what comes next."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    data_free: bool = False,
    registration_deadline_s: float | None = None,
    identities: secagg.Identities | None = None,
    he_context: Any = None,
) -> dict[str, Any]:
    """Run an experiment end to end and return its summary (also written to ``summary.json``).

    ``config`` is an :class:`ExperimentConfig`, a mapping of TOML tables, or a TOML file path.
    ``model_fn`` and ``data_fn`` plug in a user's own model builder and data function;
    ``transport_fn`` replaces the in-process simulator (the gRPC server passes its transport).
    ``data_free``: the server never loads the data set; the clients behind ``transport_fn``
    register their sizes, and evaluate (see :mod:`fedguard.experiment.data_free`; registration
    waits ``registration_deadline_s``, default ``server.deadline_s``). ``identities``: the
    registered public identity keys of the clients behind ``transport_fn`` (secure aggregation
    then runs verified rounds; a simulation derives its own). ``he_context``: under
    ``[secure_aggregation] mode = "ckks"``, the key-less HE parameters the clients behind
    ``transport_fn`` hold the key of (a simulation makes its own key).
    """
    cfg = _as_config(config, overrides or [])
    with torch_threads(cfg.runtime.threads):
        folder = RunFolder(out if out is not None else Path("runs") / cfg.experiment.name)
        console = console or Console(stderr=False, quiet=not progress)
        finished = checkpoint.resume_point(folder.checkpoints, max_round=cfg.experiment.rounds)
        if finished is not None and not resume:
            raise ConfigError(
                f"--out {folder.root}: this run folder already holds round {finished.round}; "
                "pass --resume to continue it or choose another folder"
            )
        if resume:
            _check_resume_config(folder.config, cfg)
        spent = _privacy_spent(finished) if resume else None
        exp: Experiment | DataFreeExperiment
        if data_free:
            if transport_fn is None or model_fn is not None or data_fn is not None:
                raise ValueError(
                    "A data-free run takes a transport_fn, and no model_fn or data_fn."
                )
            exp = DataFreeExperiment(
                cfg,
                transport_fn=transport_fn,
                privacy_spent=spent,
                recorded=finished.info if resume and finished is not None else None,
                registration_deadline_s=registration_deadline_s,
                identities=identities,
                he_context=he_context,
            )
        else:
            exp = Experiment(
                cfg,
                model_fn=model_fn,
                data_fn=data_fn,
                transport_fn=transport_fn,
                privacy_spent=spent,
                identities=identities,
                he_context=he_context,
            )
        try:
            tracker = contribution.Tracker(
                cfg.contribution, exp.strategy, exp.contribution_utility(), seed=cfg.experiment.seed
            )
            if tracker.enabled:
                exp.driver.before_aggregate = tracker.before_aggregate
            try:
                sinks = tracking.open_sinks(
                    cfg.tracking, folder.root, cfg.experiment.name, config_mod.to_toml_dict(cfg)
                )
            except tracking.TrackingError as exc:
                raise ConfigError(str(exc)) from None
            folder.create()
            handler = _attach_log(folder)
            try:
                return _run_rounds(
                    exp, folder, finished if resume else None, console, progress, tracker, sinks
                )
            finally:
                logging.getLogger("fedguard").removeHandler(handler)
                handler.close()
        finally:
            if isinstance(exp, Experiment):
                exp.close()  # the Ray pool it started


def _privacy_spent(finished: checkpoint.Checkpoint | None) -> privacy.Spent | None:
    """The finished rounds of the run being resumed, the noise multipliers they ran at and what
    the local-DP clients reported running in them."""
    if finished is None:
        return None
    recorded = finished.info.get(NOISE_MULTIPLIERS)
    reports = finished.info.get(DP_SGD_REPORTS)
    return privacy.Spent(
        finished.round,
        None if recorded is None else tuple(recorded),
        None if reports is None else privacy.reports_from(reports),
    )


def _run_rounds(
    exp: Experiment | DataFreeExperiment,
    folder: RunFolder,
    finished: checkpoint.Checkpoint | None,
    console: Console,
    show_progress: bool,
    tracker: contribution.Tracker,
    sinks: tracking.Sinks,
) -> dict[str, Any]:
    cfg = exp.cfg
    live = status_file.StatusWriter(
        folder.root,
        name=cfg.experiment.name,
        rounds_planned=cfg.experiment.rounds,
        max_epsilon=cfg.privacy.max_epsilon if exp.privacy is not None else None,
        delta=exp.privacy.delta if exp.privacy is not None else None,
        mode="async" if exp.async_driver is not None else "sync",
        min_interval_s=status_file.MIN_INTERVAL_S,
    )
    try:
        return _rounds_and_summary(
            exp, folder, finished, console, show_progress, tracker, sinks, live
        )
    except BaseException as exc:  # the page says how the run ended, whatever ended it
        if live.status["state"] in ("starting", "running"):
            state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            live.finished(state, str(exc) or type(exc).__name__, None)
        raise


def _rounds_and_summary(
    exp: Experiment | DataFreeExperiment,
    folder: RunFolder,
    finished: checkpoint.Checkpoint | None,
    console: Console,
    show_progress: bool,
    tracker: contribution.Tracker,
    sinks: tracking.Sinks,
    live: status_file.StatusWriter,
) -> dict[str, Any]:
    cfg = exp.cfg
    folder.write_config(config_mod.to_toml_dict(cfg))
    folder.write_json(folder.partition, exp.partition())
    canaries = getattr(exp, "canaries", None)
    if canaries is not None:  # audit.canaries: what `fedguard audit --attack canary` scores
        record = {**canaries.to_json(), "digest": getattr(exp, "canary_digest", None)}
        folder.write_json(folder.root / canary.FILE, record)
    plots.partition_plot(
        exp.partition_histogram(), exp.histogram_names, folder.plots / "partition.png"
    )
    if finished is None:
        params, state, start = exp.initial_params, exp.strategy.init(exp.initial_params), 1
        rows: list[dict[str, Any]] = []
        folder.rewrite_metrics(rows)
    else:
        params, state = exp.restore(finished)
        if tracker.enabled:
            saved = finished.info.get(contribution.CHECKPOINT_KEY)
            if saved is None:
                raise ConfigError(
                    f"--resume: the checkpoint of round {finished.round} holds no contribution "
                    "ledger; resume with the settings the run started with"
                )
            tracker.restore(saved, finished.round)
        start = finished.round + 1
        rows = [r for r in folder.read_metrics() if r["round"] <= finished.round]
        folder.rewrite_metrics(rows)
        log.info("resuming after round %d", finished.round)
        live.resumed(finished.round, rows[-1].get("epsilon") if rows else None)
    total = cfg.experiment.rounds
    # the rounds each client was asked to train in
    joined: dict[int, list[int]] = {cid: [] for cid in exp.client_ids}
    if exp.async_driver is None:
        for done in range(1, start):
            for cid in exp.driver.sample(done):
                joined[cid].append(done)
    status, error = "completed", None
    started = time.perf_counter()
    with _progress(console, show_progress) as bar:
        task = bar.add_task("rounds", total=total, completed=start - 1, stats=_stats(rows))
        try:
            if exp.async_driver is not None:
                applied = _async_rounds(exp, folder, finished, params, state, rows, joined, tracker)
                for latest in applied:
                    params, state, tasks = latest
                    live.round_finished(rows[-1]["round"], rows[-1], tasks, rows[-1]["seconds"])
                    sinks.log_row(rows[-1])
                    bar.update(task, advance=1, stats=_stats(rows))
            else:  # the page shows each reply of a round as it arrives
                exp.driver.watch(_reply_watcher(live))
            for round_ in range(start if exp.async_driver is None else total + 1, total + 1):
                if _budget_spent(exp, round_, joined):
                    status = "budget_spent"
                    break
                t0 = time.perf_counter()
                live.round_started(round_, exp.driver.sample(round_))
                try:
                    row, params, state, sampled, clients = _one_round(exp, round_, params, state)
                except secagg.SecAggAbortedError as exc:
                    log.warning("%s The model is unchanged; the run goes on.", exc)
                    row, sampled = _aborted_row(round_, exc), exp.driver.sample(round_)
                    row["seconds"] = time.perf_counter() - t0
                    aborted_as = [(c, "error: secure aggregation aborted") for c in sampled]
                    clients = status_file.client_statuses(sampled, aborted_as, {})
                for cid in sampled:
                    joined[cid].append(round_)
                if exp.latency is not None:  # a round lasts as long as its slowest client
                    before = rows[-1].get("simulated_seconds") if rows else None
                    row["simulated_seconds"] = (before or 0.0) + exp.latency.round_seconds(
                        round_, sampled
                    )
                if exp.privacy is not None:
                    row["epsilon"] = exp.privacy.epsilon(round_, joined)
                rows.append(row)
                folder.append_metrics(row)
                live.round_finished(round_, row, clients, row["seconds"])
                sinks.log_row(row)
                checkpoint.save(
                    folder.checkpoints,
                    checkpoint.Checkpoint(
                        round_,
                        exp.checkpoint_tensors(params, state),
                        _checkpoint_info(exp, round_, tracker),
                    ),
                    keep=cfg.checkpoint.keep,
                )
                if tracker.enabled:
                    folder.write_json(folder.root / CONTRIBUTIONS, tracker.contributions_json())
                bar.update(task, advance=1, stats=_stats(rows))
        except KeyboardInterrupt:
            status = "interrupted"
        except RoundFailedError as exc:
            status, error = "failed", str(exc)
            log.error("%s", exc)
        finally:
            exp.driver.watch(None)
    # Secure aggregation: a run in which every round aborted never changed the model.
    aborted = [r["round"] for r in rows if r.get("secure_aggregation_aborted")]
    if status == "completed" and rows and len(aborted) == len(rows):
        status = "failed"
        error = (
            f"Every round aborted its secure aggregation (rounds {aborted}): the model never "
            f"changed. The last: {rows[-1]['secure_aggregation_aborted']}"
        )
        log.error("%s", error)
    plots.write_run_plots(rows, folder.plots)
    summary = _summary(exp, rows, status, error, time.perf_counter() - started, folder)
    if tracker.enabled:
        folder.write_json(folder.root / CONTRIBUTIONS, tracker.contributions_json())
        plots.contributions_plot(
            tracker.contributions_json()["cumulative"], folder.plots / "contributions.png"
        )
        summary["contribution"] = tracker.summary()
    summary["rounds_aborted"] = len(aborted)
    if exp.privacy is not None:
        # asynchronous rounds: the clients still training count too (round done + 1)
        done = _rounds_joined(rows[-1]["round"] if rows else 0, joined)
        summary["epsilon"] = exp.privacy.epsilon(done, joined)
        summary["delta"] = exp.privacy.delta
        summary["privacy"] = exp.privacy.mechanism(done, joined)
    if rows:
        report = exp.final_report(params)
        if "confusion_matrix" in report:
            plots.confusion_plot(
                report["confusion_matrix"], exp.class_names, folder.plots / "confusion_matrix.png"
            )
        summary.update(report)
    folder.write_json(folder.summary, summary)
    live.finished(status, error, summary.get("epsilon"))
    sinks.finish(folder.root, summary)
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


def _reply_watcher(live: status_file.StatusWriter) -> ReplyWatcher:
    """The round driver's watcher that puts each reply or failure in the live status as it
    arrives (the round's checks and the rule's verdict come with its end)."""

    def arrived(round_: int, outcome: Outcome) -> None:
        if isinstance(outcome, Failed):
            live.client_arrived(
                round_, outcome.client_id, failed=f"{outcome.kind}: {outcome.reason}"
            )
        else:
            live.client_arrived(round_, outcome.client_id, seconds=outcome.seconds)

    return arrived


def _verdict(left_out: LeftOut | None) -> dict[str, Any]:
    """:func:`fedguard.observe.status.client_statuses`'s keyword arguments for what the robust
    rule did to each client (none: {})."""
    if left_out is None:
        return {}
    return {
        "rule": left_out.rule,
        "left_out": left_out.clients,
        "trimmed": left_out.trimmed_by_client(),
    }


def _task_verdicts(left_out: LeftOut | None) -> dict[str, Any]:
    """:func:`fedguard.observe.status.task_statuses`'s keyword arguments: the rule's verdict on
    each reply of the buffer, in order (none: {})."""
    if left_out is None:
        return {}
    return {"rule": left_out.rule, "verdicts": left_out.row_verdicts()}


def _rounds_joined(done: int, joined: Mapping[int, list[int]]) -> int:
    """The last round any client was asked to train for: ``done``, or in asynchronous rounds
    the next one, for which clients are training already."""
    return max([done, *(max(r) for r in joined.values() if r)])


def _async_rounds(
    exp: Experiment | DataFreeExperiment,
    folder: RunFolder,
    finished: checkpoint.Checkpoint | None,
    params: torch.Tensor,
    state: StrategyState,
    rows: list[dict[str, Any]],
    joined: dict[int, list[int]],
    tracker: contribution.Tracker,
) -> Iterator[tuple[torch.Tensor, StrategyState, list[dict[str, Any]]]]:
    """FedBuff's applied buffers as rounds: each evaluated, accounted, written to the metrics
    and checkpointed with the asynchronous state (:mod:`fedguard.protocol.async_driver`);
    yields the new model and server state, and the live status's entry of every task since the
    previous buffer (:func:`fedguard.observe.status.task_statuses`)."""
    driver = exp.async_driver
    if driver is None:
        raise ValueError("Asynchronous rounds need an asynchronous driver.")
    cfg = exp.cfg
    if finished is None:
        run = async_driver.AsyncState()
    else:
        saved = finished.info.get(async_driver.INFO_KEY)
        if saved is None:
            raise ConfigError(
                f"--resume: the checkpoint of round {finished.round} holds no asynchronous "
                'state; it was written by a server.mode = "sync" run'
            )
        run = async_driver.AsyncState.restore(saved, finished.tensors)
    for cid, r in run.dispatched:
        joined[cid].append(r)
    t0 = time.perf_counter()
    for result in driver.rounds(params, state, run, until=cfg.experiment.rounds):
        round_ = result.round
        if exp.privacy is not None:  # local DP: compose what each reply reports it ran
            for task_round, cid, reported in result.reported:
                exp.privacy.record(task_round, {cid: reported})
        for cid, r in result.dispatched:
            joined[cid].append(r)
        row = _metrics_row(exp, round_, result.params, result.metrics)
        if result.left_out is not None:
            row.update(result.left_out.metrics())
        if exp.privacy is not None:
            row["epsilon"] = exp.privacy.epsilon(_rounds_joined(round_, joined), joined)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        folder.append_metrics(row)
        tensors = exp.checkpoint_tensors(result.params, result.state)
        tensors.update(run.checkpoint_tensors())
        info = _checkpoint_info(exp, round_, tracker)
        info[async_driver.INFO_KEY] = run.checkpoint_info()
        checkpoint.save(
            folder.checkpoints,
            checkpoint.Checkpoint(round_, tensors, info),
            keep=cfg.checkpoint.keep,
        )
        tasks = [t.as_dict() for t in result.tasks]
        yield (
            result.params,
            result.state,
            status_file.task_statuses(tasks, **_task_verdicts(result.left_out)),
        )
        t0 = time.perf_counter()


def _checkpoint_info(
    exp: Experiment | DataFreeExperiment, round_: int, tracker: contribution.Tracker
) -> dict[str, Any]:
    """A checkpoint's JSON info: the model spec, what the experiment records (a data-free
    server's registrations), with DP every round's noise multiplier and the local-DP clients'
    reports (a resumed run composes the finished rounds as they ran), and with contribution
    scores the ledger, flags and round records."""
    info: dict[str, Any] = {"spec": exp.model.spec.to_json(), **exp.checkpoint_info()}
    if tracker.enabled:
        info[contribution.CHECKPOINT_KEY] = tracker.to_json()
    if exp.privacy is not None:
        info[NOISE_MULTIPLIERS] = exp.privacy.noise_multipliers(round_)
        if exp.privacy.mode == "local":
            info[DP_SGD_REPORTS] = exp.privacy.reports_json(round_)
    return info


def _budget_spent(
    exp: Experiment | DataFreeExperiment, round_: int, joined: Mapping[int, list[int]]
) -> bool:
    """True (and logged) if ``round_`` would take epsilon past ``privacy.max_epsilon`` (every
    round composed at the noise multiplier it ran at, as the reported epsilon is)."""
    plan = exp.privacy
    if plan is None or plan.max_epsilon is None:
        return False
    after = {cid: list(rounds) for cid, rounds in joined.items()}
    for cid in exp.driver.sample(round_):
        after[cid].append(round_)
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
    exp: Experiment | DataFreeExperiment,
    round_: int,
    params: torch.Tensor,
    state: StrategyState,
) -> tuple[dict[str, Any], torch.Tensor, StrategyState, list[int], list[dict[str, Any]]]:
    """One synchronous round: its metrics row, the new model and server state, the sampled
    clients and what became of each (:func:`fedguard.observe.status.client_statuses`)."""
    t0 = time.perf_counter()
    result = exp.driver.fit_round(round_, params, state)
    if exp.privacy is not None:  # local DP: compose what the clients report they ran
        exp.privacy.record(round_, result.reported)
    row = _metrics_row(exp, round_, result.params, result.metrics)
    if result.left_out is not None:
        row.update(result.left_out.metrics())
    row["seconds"] = time.perf_counter() - t0
    clients = status_file.client_statuses(
        result.sampled, result.problems, result.latencies, **_verdict(result.left_out)
    )
    return row, result.params, result.state, result.sampled, clients


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
    exp: Experiment | DataFreeExperiment,
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
        "evaluation_mode": exp.mode,
        "epsilon": None,
        "delta": None,
        "num_clients": len(exp.client_ids),
        "num_parameters": exp.model.spec.size,
        "seconds": seconds,
        "clients_failed": sum(int(r.get("clients_failed", 0)) for r in rows),
        "clients_rejected": sum(int(r.get("clients_rejected", 0)) for r in rows),
        "run_dir": str(folder.root),
        "versions": _versions(),
        **_personal_summary(exp, evaluated),
    }


# A metrics row's personalisation entries (fedguard.protocol.personal_eval.summarise).
_PERSONAL_KEYS = ("personal_", "global_accuracy_")


def _personal_summary(
    exp: Experiment | DataFreeExperiment, evaluated: list[dict[str, Any]]
) -> dict[str, Any]:
    """The personalisation method and the last personal evaluation's entries ({} without)."""
    method = exp.cfg.personalization.method
    if method == "none":
        return {}
    last: dict[str, Any] = next((r for r in reversed(evaluated) if "personal_clients" in r), {})
    return {
        "personalization": method,
        **{k: v for k, v in last.items() if k.startswith(_PERSONAL_KEYS)},
    }


def _metrics_row(
    exp: Experiment | DataFreeExperiment,
    round_: int,
    params: torch.Tensor,
    metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """One metrics.jsonl row of a round (sync or async) before its epsilon and seconds: the
    round, its evaluation (when this round evaluates), then the driver's metrics."""
    row: dict[str, Any] = {"round": round_}
    row.update({"test_accuracy": None, "test_loss": None, "test_auc": None})
    row["backdoor_success"] = None
    evaluated = exp.evaluate_round(round_, params) if exp.should_evaluate(round_) else {}
    row.update(
        {k: v for k, v in evaluated.items() if k.startswith("test_") or k == "backdoor_success"}
    )
    row.update(metrics)
    row.update({k: v for k, v in evaluated.items() if k.startswith("federated_")})
    row.update({k: v for k, v in evaluated.items() if k.startswith(_PERSONAL_KEYS)})
    row["epsilon"] = None
    return row
