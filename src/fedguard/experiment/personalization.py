"""``[personalization]`` in a run: the task entries, the checks against the built model, the
server's body-only aggregation and the personal evaluation rows (see
:mod:`fedguard.client.personal` for the methods and :mod:`fedguard.protocol.shared_part` and
:mod:`fedguard.protocol.personal_eval` for the server halves)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedguard.client import personal
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import messages, personal_eval
from fedguard.protocol.shared_part import SharedPart
from fedguard.protocol.strategy import Strategy
from fedguard.protocol.transport import Transport


def settings(cfg: ExperimentConfig) -> personal.PersonalSettings | None:
    """The configured method and its settings (None: ``method = "none"``)."""
    p = cfg.personalization
    if p.method == "none":
        return None
    return personal.PersonalSettings(
        personal.Method(p.method),
        epochs=p.epochs,
        ditto_lambda=p.ditto_lambda,
        head=tuple(p.head),
        finetune_layers=tuple(p.finetune_layers),
    )


def task_config(cfg: ExperimentConfig) -> dict[str, messages.Scalar]:
    """The entries every fit and evaluation task carries ({} without personalisation)."""
    chosen = settings(cfg)
    return {} if chosen is None else chosen.config()


def check_model(cfg: ExperimentConfig, model: ModelAdapter) -> None:
    """Refuse a head or fine-tuned layers that name no tensor of ``model`` (or, for a head,
    every one), before round 1."""
    chosen = settings(cfg)
    if chosen is None:
        return
    try:
        personal.check_split(model, chosen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_simulation(cfg: ExperimentConfig) -> None:
    """A simulated run evaluates each personal model on its client's own held-out split, so
    ``data.client_eval_fraction`` must hold some of each partition out."""
    if cfg.personalization.method != "none" and cfg.data.client_eval_fraction == 0.0:
        raise ConfigError(
            f'personalization.method = "{cfg.personalization.method}" evaluates each client\'s '
            "personal model on its own held-out split: set data.client_eval_fraction (e.g. 0.2)"
        )


def shared_part(cfg: ExperimentConfig, strategy: Strategy, model: ModelAdapter) -> Strategy:
    """``strategy`` aggregating only the body under FedRep and FedPer, else itself."""
    chosen = settings(cfg)
    if chosen is None or chosen.method not in personal.BODY_ONLY:
        return strategy
    check_model(cfg, model)
    return SharedPart(strategy, personal.head_mask(model, chosen))


def evaluate(
    cfg: ExperimentConfig,
    transport: Transport,
    round_: int,
    params: torch.Tensor,
    clients: Sequence[int],
    client_config: dict[str, messages.Scalar],
    deadline_s: float | None,
) -> dict[str, Any]:
    """The personal evaluation of ``round_`` on ``clients`` ({} without personalisation): mean
    and worst-client accuracy of the personal and the global model, and each client's scores."""
    if settings(cfg) is None:
        return {}
    scores = personal_eval.evaluate_personal(
        transport,
        round_,
        params,
        clients,
        {**client_config, **task_config(cfg)},
        seed=cfg.experiment.seed,
        deadline_s=deadline_s,
    )
    return personal_eval.summarise(scores)
