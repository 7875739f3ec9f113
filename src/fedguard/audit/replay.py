"""A past round's fit replies, re-created with the run's own client code.

The attacks on individual updates (gradient inversion, the update-level canary audit) need what
the server observed in one round. Run folders keep the model after every round, not the
updates, so the round is replayed: its fit task as the driver builds it (from the checkpoint the
round started from, with the run's strategy state, its entries for each client and each
client's seed), answered by a :class:`~fedguard.client.app.ClientApp` holding the client's own
state from that checkpoint (SCAFFOLD's control variate, FedDyn's gradient state) with the
run's trainer (or a wrapper of it), so that
DP-SGD's clipping and noise and central DP's update clip are the run's. Under secure
aggregation the server observes only the sum of the round's updates: :meth:`RoundReplay.observed`
adds the other sampled clients' re-created updates (the masks cancel in the sum; the
fixed-point rounding and distributed DP's noise shares are left out, which favours the
attacker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedguard.audit.target import AuditedRun, AuditError
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer
from fedguard.experiment import checkpoint
from fedguard.protocol import messages
from fedguard.protocol.driver import client_seed
from fedguard.protocol.strategy import StrategyState


@dataclass(frozen=True)
class RoundReplay:
    """Round ``round`` of ``run``: its starting ``params``, the fit ``config`` and ``tensors``
    every client received, the ``sampled`` clients, and the server's ``state`` and the clients'
    ``client_state`` the round started from."""

    run: AuditedRun
    round: int
    params: torch.Tensor
    config: dict[str, messages.Scalar]
    tensors: dict[str, torch.Tensor]
    sampled: list[int]
    state: StrategyState = field(default_factory=dict)
    client_state: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def load(cls, run: AuditedRun, round_: int) -> RoundReplay:
        """Round ``round_`` (1: from the initial model) rebuilt from the run folder; an
        :class:`AuditError` when the checkpoint it starts from is not kept."""
        exp = run.exp
        if round_ < 1 or round_ > run.final_round + 1:
            raise AuditError(f"{run.name}: no round {round_} to attack (1..{run.final_round + 1}).")
        clients: dict[int, dict[str, torch.Tensor]] = {}
        if round_ == 1:
            params, state = exp.initial_params.clone(), exp.strategy.init(exp.initial_params)
        else:
            try:
                ck = checkpoint.load(run.folder.checkpoints, round_ - 1)
            except (OSError, ValueError) as exc:
                raise AuditError(
                    f"{run.name}: round {round_} starts from the checkpoint of round "
                    f"{round_ - 1}, which is not kept ({exc}); attack round 1 or the round "
                    "after a kept checkpoint"
                ) from None
            params, state = exp.restore(ck)
            clients = {cid: dict(named) for cid, named in exp.client_state.items()}
        config, tensors = exp.driver.strategy.fit_instructions(state)
        sampled = exp.driver.sample(round_)
        return cls(run, round_, params, dict(config), dict(tensors), sampled, state, clients)

    def client(self, requested: int | None) -> int:
        """The attacked client: ``requested``, or the lowest id sampled in the round."""
        cid = requested if requested is not None else min(self.sampled)
        if cid not in self.run.exp.fed.clients:
            raise AuditError(f"{self.run.name}: no client {cid}.")
        return cid

    def fit(
        self,
        client: int,
        data: ClientData,
        extra: dict[str, messages.Scalar] | None = None,
        trainer: ClientTrainer | None = None,
    ) -> messages.FitReply:
        """Client ``client``'s reply to the round's fit task, trained on ``data`` with the
        run's trainer (or ``trainer``), a copy of the client's state and the task's config
        updated by ``extra``."""
        exp = self.run.exp
        own = {client: dict(self.client_state[client])} if client in self.client_state else {}
        app = ClientApp(exp.model, {client: data}, own, trainer=trainer or exp.trainer)
        seed = client_seed(self.run.cfg.experiment.seed, self.round, client)
        entries = exp.driver.strategy.client_instructions(self.state, client)
        config = {**self.config, **entries, **(extra or {}), "seed": seed}
        return app.fit(
            messages.FitTask(self.round, client, self.params.clone(), config, self.tensors)
        )

    def observed(
        self,
        client: int,
        reply: messages.FitReply,
        extra: dict[str, messages.Scalar] | None = None,
    ) -> tuple[torch.Tensor, str]:
        """What the server observes of ``client``'s ``reply``, and its description: the update
        itself, or under secure aggregation the round's (weighted) sum with the other sampled
        clients' updates re-created on their own data (their task's config updated by
        ``extra``)."""
        if not self.run.cfg.secure_aggregation.enabled:
            seen = "the clipped update" if messages.DP_CLIP_NORM in self.config else "the update"
            return reply.update, seen
        settings = self.run.exp.driver.secure_aggregation
        weighted = settings is not None and settings.weighted
        total = reply.update * (reply.num_examples if weighted else 1)
        for other in self.sampled:
            if other == client:
                continue
            r = self.fit(other, self.run.exp.fed.clients[other], extra)
            total = total + r.update * (r.num_examples if weighted else 1)
        return total, f"the sum of {len(self.sampled)} updates"
