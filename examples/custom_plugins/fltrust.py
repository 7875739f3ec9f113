"""FLTrust as a user-written fedguard aggregator (Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust
Federated Learning via Trust Bootstrapping", NDSS 2021, Algorithm 2).

The server holds a small clean root data set and, each round, computes its own update ``g0`` on it
from the global model, with the clients' training loop and settings. Each client update ``g_i``
gets the trust score ``TS_i = ReLU(cos(g_i, g0))`` and is rescaled to ``g0``'s norm; the round's
update is ``sum_i TS_i * (||g0|| / ||g_i||) g_i / sum_i TS_i`` (zero when no update is trusted).
An update pointing away from the server's loses all weight and none can be longer than ``g0``,
whatever fraction of the clients is Byzantine: the trust comes from the root data, not from an
honest majority. It compares individual updates, so fedguard refuses it under secure aggregation.

Configured as::

    [server]
    aggregator = "examples.custom_plugins.fltrust:FLTrust"
    byzantine_f = 3
    aggregator_options = { root = "examples.custom_plugins.digits:root_set", examples = 100 }

``root`` names a function ``(examples, seed) -> ArrayDataset`` that returns the server's root data.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import torch

import fedguard
from fedguard.data.dataset import ArrayDataset


def fltrust(updates: torch.Tensor, server_update: torch.Tensor) -> torch.Tensor:
    """FLTrust's aggregate ``[D]`` of ``updates [K, D]`` given the server's update ``[D]``."""
    u, g0 = updates.double(), server_update.double()
    reference = float(torch.linalg.vector_norm(g0))
    if reference == 0.0:
        return torch.zeros(updates.shape[1], dtype=torch.float32)
    norms = torch.linalg.vector_norm(u, dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    trust = torch.relu((u @ g0) / (safe * reference)) * (norms > 0)
    if float(trust.sum()) == 0.0:
        return torch.zeros(updates.shape[1], dtype=torch.float32)
    coefficients = trust * (reference / safe) / trust.sum()
    return (coefficients @ u).to(torch.float32)


class FLTrust(fedguard.Aggregator):
    """Trust scores against the server's own update on its root data."""

    name = "fltrust"
    needs_individual_updates = True

    def __init__(self, root: str, examples: int = 100, *, context: fedguard.PluginContext) -> None:
        module, _, function = root.partition(":")
        loader = getattr(importlib.import_module(module), function)
        data = loader(examples=examples, seed=context.seed)
        if not isinstance(data, ArrayDataset):
            raise ValueError(f"The root set {root!r} gave a {type(data).__name__}.")
        self.root = fedguard.ClientData(torch.from_numpy(data.x), torch.from_numpy(data.y))
        self.context = context
        self._model: fedguard.ModelAdapter | None = None

    def condition(self, n: int, f: int) -> fedguard.Condition:
        return fedguard.Condition(
            0 <= f < n, "K > f (one honest update; the root data is the trust)"
        )

    def server_update(self, round_: fedguard.RoundContext) -> torch.Tensor:
        """``g0``: the clients' trainer on the root data, from the round's global model."""
        trainer, build = self.context.trainer, self.context.build_model
        if trainer is None or build is None:
            raise RuntimeError(
                "FLTrust needs the run's trainer and model to train on its root data."
            )
        if self._model is None:
            self._model = build()
        self._model.set_flat(round_.params)
        task = fedguard.TrainTask(
            client_id=-1,
            round=round_.round,
            params=round_.params,
            config=self.context.client_config,
            tensors={},
            generator=round_.generator,
        )
        return trainer.train(self._model, self.root, task).update

    def aggregate(
        self,
        updates: torch.Tensor,
        weights: torch.Tensor,
        *,
        state: Mapping[str, torch.Tensor],
        context: fedguard.RoundContext,
    ) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        """Every update weighs by its trust alone (``weights`` are ones: FLTrust is robust)."""
        return state, fltrust(updates, self.server_update(context))
