"""The privacy plan of a run: checks before round 1, noise calibration, epsilon per round.

Built from the ``[privacy]`` table and the federation (client sizes and count), it says what the
clients and the server must do and what the accountant composes:

* ``local`` (record-level DP-SGD in each client): client ``i`` with ``n_i`` records takes
  ``s_i`` steps per round at sampling rate ``q_i = batch_size / n_i``; after the rounds it joined
  (``r_i``), its epsilon is that of ``r_i * s_i`` Poisson-sampled Gaussian steps. A client's
  steps count whenever it was asked to train, whether or not its reply was used (it may have
  left). The run reports the worst client's epsilon.
* ``central`` (user-level DP-FedAvg): one sampled Gaussian mechanism per round over clients.
* ``distributed`` (user-level, under secure aggregation): the clients' Skellam noise shares make
  one Skellam mechanism per round on the quantised sum (at least ``m`` shares in every released
  sum, ``m`` = clients per round minus the tolerated dropouts); epsilon composes its RDP bound
  over the rounds without claiming amplification by sampling (see
  :func:`fedguard.algorithms.accounting.skellam_epsilon`).

With ``target_epsilon`` the noise multiplier is calibrated before round 1 for the configured
rounds, assuming every client joins every round (exact with full participation, conservative
otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedguard.algorithms import accounting, distributed_dp
from fedguard.algorithms.accounting import Accountant, SampledGaussian, SkellamSum
from fedguard.client import dp_sgd
from fedguard.client.model import ModelAdapter
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.protocol import messages, secagg


@dataclass
class PrivacyPlan:
    """What a DP run does and how its epsilon is computed (one per run)."""

    mode: str
    accountant: Accountant
    delta: float
    noise_multiplier: float
    max_epsilon: float | None
    calibrated: bool
    # local: per client sampling rate and steps per round
    rates: dict[int, float] = field(default_factory=dict)
    steps_per_round: dict[int, int] = field(default_factory=dict)
    # central
    num_clients: int = 0
    clients_per_round: int = 0
    poisson: bool = False
    # distributed: the ring, the clip and the model size fix the quantisation and sensitivity
    bits: int = 32
    clip_norm: float = 1.0
    dim: int = 0
    noise_clients: int = 0
    _cache: dict[SampledGaussian | SkellamSum, float] = field(default_factory=dict, repr=False)

    @property
    def distributed(self) -> distributed_dp.Skellam | None:
        """The Skellam mechanism the clients share (distributed mode), else None."""
        if self.mode != "distributed":
            return None
        return distributed_dp.Skellam(self.noise_multiplier, self.noise_clients)

    def _skellam(self, rounds: int, z: float) -> SkellamSum:
        """``rounds`` Skellam rounds at multiplier ``z``, in the quantisation levels of the
        fixed-size cohort: ``Delta_2`` from conditional rounding, total ``mu = (z s C)^2 / 2``."""
        mechanism = distributed_dp.Skellam(z, self.noise_clients)
        fp = distributed_dp.fixed_point(
            bits=self.bits,
            clip_norm=self.clip_norm,
            num_clients=self.clients_per_round,
            mechanism=mechanism,
        )
        levels = fp.scale * fp.clip_norm
        l2 = distributed_dp.l2_sensitivity(levels, self.dim, mechanism.beta)
        mu = self.noise_clients * distributed_dp.client_rate(mechanism, levels)
        return SkellamSum(l2, distributed_dp.l1_sensitivity(l2, self.dim), mu, rounds)

    def client_config(self, cfg: ExperimentConfig) -> dict[str, messages.Scalar]:
        """Extra fit-task settings: DP-SGD for local mode, the noise shares for distributed mode
        (central clips are set per round)."""
        if self.distributed is not None:
            return secagg.distributed_config(self.distributed)
        if self.mode != "local":
            return {}
        return {
            messages.DP_SGD_NOISE: self.noise_multiplier,
            messages.DP_SGD_CLIP: cfg.privacy.max_grad_norm,
        }

    def _central(self, rounds: int) -> SampledGaussian:
        if self.poisson:
            return SampledGaussian(
                self.noise_multiplier, rounds, self.clients_per_round / self.num_clients
            )
        return SampledGaussian(
            self.noise_multiplier,
            rounds,
            population=self.num_clients,
            sample_size=self.clients_per_round,
        )

    def _local(self, cid: int, rounds_joined: int, noise: float) -> SampledGaussian:
        return SampledGaussian(noise, rounds_joined * self.steps_per_round[cid], self.rates[cid])

    def _epsilon(self, m: SampledGaussian | SkellamSum) -> float:
        """dp-accounting's epsilon for ``m``, computed once per distinct mechanism: the run asks
        for the same one again (budget check before a round, metrics after it, the summary)."""
        if m not in self._cache:
            if isinstance(m, SkellamSum):
                self._cache[m] = accounting.skellam_epsilon(m, self.delta)
            else:
                self._cache[m] = accounting.epsilon(m, self.delta, self.accountant)
        return self._cache[m]

    def epsilon(self, rounds_done: int, joined: Mapping[int, int]) -> float:
        """Epsilon after ``rounds_done`` rounds in which client ``c`` trained ``joined[c]`` times."""
        if self.mode == "central":
            return self._epsilon(self._central(rounds_done))
        if self.mode == "distributed":
            return self._epsilon(self._skellam(rounds_done, self.noise_multiplier))
        return max(
            (self._epsilon(self._local(c, t, self.noise_multiplier)) for c, t in joined.items()),
            default=0.0,
        )

    def mechanism(self, rounds_done: int, joined: Mapping[int, int]) -> dict[str, Any]:
        """The parameters anyone needs to recompute epsilon with dp-accounting."""
        common = {
            "mode": self.mode,
            "accountant": str(self.accountant),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "noise_calibrated_to_target": self.calibrated,
        }
        if self.mode == "central":
            m = self._central(rounds_done)
            sampling = (
                {"sampling": "poisson", "sampling_rate": m.sampling_rate}
                if self.poisson
                else {
                    "sampling": "fixed_size_without_replacement",
                    "population": m.population,
                    "sample_size": m.sample_size,
                    "neighboring_relation": "replace_one",
                }
            )
            return {**common, "mechanism": "dp_fedavg_gaussian", "rounds": rounds_done, **sampling}
        if self.mode == "distributed":
            k = self._skellam(rounds_done, self.noise_multiplier)
            return {
                **common,
                "mechanism": "distributed_skellam",
                "rounds": rounds_done,
                "neighboring_relation": "add_or_remove_one",
                "noise_clients": self.noise_clients,
                "l2_sensitivity": k.l2_sensitivity,
                "l1_sensitivity": k.l1_sensitivity,
                "skellam_mu": k.mu,
                "rdp_orders": [accounting.SKELLAM_ORDERS[0], accounting.SKELLAM_ORDERS[-1]],
                "sampling_amplification": False,
            }
        clients = {
            str(cid): {
                "sampling_rate": self.rates[cid],
                "steps": joined.get(cid, 0) * self.steps_per_round[cid],
                "rounds_joined": joined.get(cid, 0),
            }
            for cid in sorted(self.rates)
        }
        return {**common, "mechanism": "dp_sgd_poisson_gaussian", "clients": clients}


def build(
    cfg: ExperimentConfig, client_sizes: Mapping[int, int], model: ModelAdapter
) -> PrivacyPlan | None:
    """The run's privacy plan, or None with privacy off; every refusal is a ConfigError."""
    p = cfg.privacy
    if p.mode == "off":
        return None
    kind = Accountant(p.accountant)
    if p.mode == "local":
        try:
            dp_sgd.check_compatible(model)
        except ValueError as exc:
            raise ConfigError(f'privacy.mode = "local": {exc}') from None
        smallest = min(client_sizes.values())
        if p.delta >= 1.0 / smallest:
            raise ConfigError(
                f"privacy.delta={p.delta:g} must be below 1/n = {1.0 / smallest:.3g}, n = "
                f"{smallest} records of the smallest client (a delta this large allows "
                "releasing a record outright)"
            )
        c = cfg.client
        plan = PrivacyPlan(
            "local",
            kind,
            p.delta,
            p.noise_multiplier or 0.0,
            p.max_epsilon,
            p.target_epsilon is not None,
            rates={i: dp_sgd.sampling_rate(n, c.batch_size) for i, n in client_sizes.items()},
            steps_per_round={
                i: _local_steps(n, c.batch_size, c.epochs, c.max_steps)
                for i, n in client_sizes.items()
            },
        )
    elif p.mode == "distributed":
        n, per_round = len(client_sizes), cfg.clients_per_round
        _check_user_level_delta(p.delta, n)
        a = cfg.secure_aggregation
        plan = PrivacyPlan(
            "distributed",
            kind,
            p.delta,
            p.noise_multiplier or 1.0,
            p.max_epsilon,
            p.target_epsilon is not None,
            num_clients=n,
            clients_per_round=per_round,
            bits=a.bits,
            clip_norm=p.clip_norm,
            dim=model.spec.size,
            noise_clients=per_round - math.floor(a.dropout_rate * per_round),
        )
        try:
            plan._skellam(0, plan.noise_multiplier)
        except ValueError as exc:
            raise ConfigError(f"secure_aggregation.bits: {exc}") from None
    else:
        n = len(client_sizes)
        _check_user_level_delta(p.delta, n)
        plan = PrivacyPlan(
            "central",
            kind,
            p.delta,
            p.noise_multiplier or 0.0,
            p.max_epsilon,
            p.target_epsilon is not None,
            num_clients=n,
            clients_per_round=cfg.clients_per_round,
            poisson=cfg.server.sampling == "poisson",
        )
    if p.target_epsilon is not None:
        plan.noise_multiplier = _calibrate(plan, cfg.experiment.rounds, p.target_epsilon)
    return plan


def _check_user_level_delta(delta: float, n: int) -> None:
    """User-level DP over ``n`` clients needs ``delta < 1/n``."""
    if delta >= 1.0 / n:
        raise ConfigError(
            f"privacy.delta={delta:g} must be below 1/n = {1.0 / n:.3g} for user-level DP "
            f"over n = {n} clients; use more clients or a smaller delta"
        )


def _local_steps(n: int, batch_size: int, epochs: int, max_steps: int | None) -> int:
    steps = epochs * dp_sgd.steps_per_epoch(n, batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def _calibrate(plan: PrivacyPlan, rounds: int, target: float) -> float:
    """The noise multiplier that spends ``target`` in ``rounds`` (every client every round)."""
    every_round = dict.fromkeys(plan.rates, rounds)

    def epsilon_of(z: float) -> float:
        if plan.mode == "central":
            return accounting.epsilon(
                plan._central(rounds).with_noise(z), plan.delta, plan.accountant
            )
        if plan.mode == "distributed":
            return accounting.skellam_epsilon(plan._skellam(rounds, z), plan.delta)
        return accounting.worst_epsilon(
            (plan._local(cid, times, z) for cid, times in every_round.items()),
            plan.delta,
            plan.accountant,
        )

    try:
        z = accounting.calibrate_noise(epsilon_of, target)
    except accounting.PrivacyError as exc:
        raise ConfigError(str(exc)) from None
    if not math.isfinite(z):
        raise ConfigError(f"privacy.target_epsilon={target}: no finite noise multiplier found")
    return z
