"""Membership inference on a run's final model: who was in the training data?

Members are the clients' training records (as the run dealt them, without canaries);
non-members are records of the run's evaluation split that no client trained on. Two attacks
score every record (higher: more likely a member):

* the loss-threshold attack (Yeom et al. 2018): minus the final model's loss on the record;
* offline LiRA (Carlini et al., S&P 2022, "Membership Inference Attacks From First
  Principles"): ``K`` reference models are trained by the run's own recipe (its config, the
  same clients, strategy and round driver, :func:`train_reference`) on random halves of
  a second, disjoint part of the evaluation split, so every reference model is OUT for every
  scored record. The score is the one-sided z-score of the target model's logit-scaled
  confidence ``phi = log p_y - log(1 - p_y)`` against the reference models' ``phi`` on the same
  record, with the variance pooled over all records (the paper's choice for few reference
  models).

Reported: ROC AUC and the TPR at 1% and 0.1% FPR overall and per client (each client's members
against all scored non-members), and the ROC curves in a PNG (log scale, as the paper plots
them). With an evaluation split too small to hold out a reference part, LiRA is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from fedguard.audit import canary
from fedguard.audit.target import AuditedRun
from fedguard.data.dataset import ArrayDataset, FederatedDataset
from fedguard.experiment import config as config_mod
from fedguard.experiment import federation
from fedguard.experiment.assembly import Experiment
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import secagg

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_REFERENCE_MODELS = 4
DEFAULT_MAX_MEMBERS = 2000
FPR_POINTS = (0.01, 0.001)
_SPLIT_STREAM = 0x4D49  # the seeded split of the evaluation data and member sample


def phi(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``log p_y - log(1 - p_y)`` of ``model`` on each record (LiRA's logit scaling; the canary
    audit scores its record canaries the same way), and ``log p_y`` is minus the record's loss."""
    return canary.record_scores(model, x, y)


def losses(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The model's loss (negative log-likelihood) on each record."""
    model.train_mode(False)
    out = []
    with torch.no_grad():
        for xb, yb in zip(torch.split(x, 512), torch.split(y, 512), strict=True):
            logp = model.log_probabilities(xb, training=False).double()
            out.append((-logp.gather(1, yb[:, None]).squeeze(1)).numpy())
    return np.concatenate(out)


def tpr_at(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    """The highest true-positive rate at a false-positive rate of at most ``fpr_target``."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= fpr_target].max())


def roc_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC and TPR at 1% and 0.1% FPR of ``scores`` for ``labels`` (1: member)."""
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": tpr_at(labels, scores, FPR_POINTS[0]),
        "tpr_at_0_1pct_fpr": tpr_at(labels, scores, FPR_POINTS[1]),
    }


def lira_scores(target: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Offline LiRA: the z-score of the target's ``phi`` [N] against the OUT reference models'
    ``phi`` [K, N] per record, with the variance pooled over records."""
    mean = references.mean(axis=0)
    std = float(np.sqrt(references.var(axis=0, ddof=1).mean())) if references.shape[0] > 1 else 0.0
    if not std > 0:
        std = float(references.std()) or 1.0
    return (target - mean) / std


def _members(run: AuditedRun, rng: np.random.Generator, most: int) -> list[tuple[int, Any]]:
    """Per client, the indices of its training records scored (at most ``most`` in all, an equal
    share of each client's, seeded), with the clean federation's data."""
    fed = federation.build_federation(run.cfg)
    total = sum(d.num_train for d in fed.clients.values())
    share = min(1.0, most / total)
    out = []
    for cid, d in fed.clients.items():
        k = max(1, round(share * d.num_train))
        out.append((cid, (d, np.sort(rng.choice(d.num_train, size=k, replace=False)))))
    return out


def _reference_phi(
    run: AuditedRun,
    pool_x: torch.Tensor,
    pool_y: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    count: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """``phi`` on ``x, y`` of ``count`` reference models, each trained by the run's recipe on a
    random half of the pool split over the run's number of clients (None: too small a pool)."""
    n_clients = run.cfg.data.num_clients  # the run's own clients, without canary clients
    half = len(pool_y) // 2
    if count == 0 or half < 2 * n_clients:
        return None
    toml = config_mod.to_toml_dict(run.cfg)
    toml["audit"] = {"canaries": 0}
    toml["evaluation"] = {**toml.get("evaluation", {}), "every": 0}
    server = {k: v for k, v in toml["server"].items() if k != "fraction"}
    # the run's cohort, less the canary clients that joined it
    server["clients_per_round"] = min(run.cfg.clients_per_round, n_clients)
    toml["server"] = server
    model = run.exp.model
    rows = []
    for k in range(count):
        chosen = rng.choice(len(pool_y), size=half, replace=False)
        parts = np.array_split(chosen, n_clients)
        xs, ys = pool_x.numpy(), pool_y.numpy()
        data = FederatedDataset(
            {f"reference_{i}": ArrayDataset(xs[p], ys[p]) for i, p in enumerate(parts)},
            ArrayDataset(xs[chosen[:1]], ys[chosen[:1]]),
            num_classes=run.exp.fed.num_classes,
        )
        toml["experiment"] = {**toml["experiment"], "seed": run.cfg.experiment.seed + 1 + k}
        model.set_flat(train_reference(config_mod.validate(toml), data))
        rows.append(phi(model, x, y))
    return np.stack(rows)


def train_reference(cfg: config_mod.ExperimentConfig, data: FederatedDataset) -> torch.Tensor:
    """The final parameters of ``cfg``'s federated training on ``data``: the run's recipe
    (its clients' trainer, privacy, secure aggregation, strategy and round driver), without a
    run folder, evaluation or accounting; a round whose secure aggregation aborts leaves the
    model as it was, as in a run."""
    exp = Experiment(cfg, data_fn=lambda: data)
    try:
        params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
        for round_ in range(1, cfg.experiment.rounds + 1):
            try:
                result = exp.driver.fit_round(round_, params, state)
            except secagg.SecAggAbortedError:
                continue
            params, state = result.params, result.state
    finally:
        exp.close()
    return params


def _roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """The ROC curves on log-log axes with the chance line."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (labels, scores) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.3f})")
    grid = np.logspace(-4, 0, 50)
    ax.plot(grid, grid, "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference on the final model")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def audit(
    run: AuditedRun,
    png: Path,
    *,
    reference_models: int = DEFAULT_REFERENCE_MODELS,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> dict[str, Any]:
    """The membership row: overall and per-client AUC and TPRs of both attacks (``auc`` and
    ``tpr_at_1pct_fpr`` are LiRA's where it ran, else the loss attack's), and the ROC PNG."""
    rng = np.random.default_rng([run.cfg.experiment.seed, _SPLIT_STREAM])
    eval_x, eval_y = run.exp.eval_x, run.exp.eval_y
    order = torch.from_numpy(rng.permutation(len(eval_y)))
    scored_part = order[: (len(order) + 1) // 2] if reference_models else order
    pool = order[(len(order) + 1) // 2 :]
    members = _members(run, rng, max_members)
    member_x = torch.cat([d.train_x[torch.from_numpy(idx)] for _, (d, idx) in members])
    member_y = torch.cat([d.train_y[torch.from_numpy(idx)] for _, (d, idx) in members])
    owner = np.concatenate([np.full(len(idx), cid) for cid, (_, idx) in members])
    x = torch.cat([member_x, eval_x[scored_part]])
    y = torch.cat([member_y, eval_y[scored_part]])
    labels = np.concatenate([np.ones(len(member_y)), np.zeros(len(scored_part))])
    model = run.exp.model
    model.set_flat(run.final)
    target_phi = phi(model, x, y)
    loss_scores = -losses(model, x, y)
    reference = (
        _reference_phi(run, eval_x[pool], eval_y[pool], x, y, reference_models, rng)
        if reference_models
        else None
    )
    attacks = {"loss": loss_scores}
    if reference is not None:
        attacks["lira"] = lira_scores(target_phi, reference)
    result: dict[str, Any] = {"attack": "membership"}
    non = labels == 0
    for name, s in attacks.items():
        per_client = []
        for cid, (_, idx) in members:
            keep = np.concatenate([owner == cid, np.ones(int(non.sum()), bool)])
            per_client.append(
                {"client": int(cid), "members": len(idx), **roc_metrics(labels[keep], s[keep])}
            )
        result[name] = {**roc_metrics(labels, s), "per_client": per_client}
    best = result["lira"] if "lira" in result else result["loss"]
    result.update(
        {
            "auc": best["auc"],
            "tpr_at_1pct_fpr": best["tpr_at_1pct_fpr"],
            "tpr_at_0_1pct_fpr": best["tpr_at_0_1pct_fpr"],
            "scored_by": "lira" if "lira" in result else "loss",
            "members": int(labels.sum()),
            "non_members": int(non.sum()),
            "reference_models": 0 if reference is None else int(reference.shape[0]),
        }
    )
    if "lira" not in result:
        result["lira"] = None
    _roc_plot({name: (labels, s) for name, s in attacks.items()}, png)
    return result
