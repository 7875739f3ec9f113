"""The privacy plan of a run: checks before round 1, noise calibration, epsilon per round.

Built from the ``[privacy]`` table and the federation (client sizes and count), it says what the
clients and the server must do and what the accountant composes:

* ``local`` (record-level DP-SGD in each client): client ``i`` with ``n_i`` records takes
  ``s_i`` steps per round at sampling rate ``q_i = batch_size / n_i``; after the rounds it joined
  (``r_i``), its epsilon is that of ``r_i * s_i`` Poisson-sampled Gaussian steps. A client's
  steps count whenever it was asked to train, whether or not its reply was used (it may have
  left). The run reports the worst client's epsilon.
* ``central`` (user-level DP-FedAvg): one sampled Gaussian mechanism per round over clients.
  The noise std on the sum of clipped updates is ``z * clip_norm``; dp-accounting is given
  ``std / L2 sensitivity``, the sensitivity following from the neighbouring relation of the
  sampling: ``clip_norm`` under add-or-remove-one (Poisson), ``2 * clip_norm`` under
  replace-one (fixed-size sampling), so the multiplier it composes is ``z`` or ``z / 2``.
* ``distributed`` (user-level, under secure aggregation): the clients' Skellam noise shares make
  one Skellam mechanism per round on the quantised sum (at least ``m`` shares in every released
  sum, ``m`` = clients per round minus the tolerated dropouts); epsilon composes its RDP bound
  over the rounds without claiming amplification by sampling (see
  :func:`fedguard.algorithms.accounting.skellam_epsilon`). The cohorts are fixed-size, so
  neighbouring populations give cohorts that differ by one replacement (adding a client can push
  another out): the sum's sensitivities are twice one client's, ``2 Delta_2`` and ``2 Delta_1``.

With ``target_epsilon`` the noise multiplier is calibrated before round 1 for the configured
rounds, assuming every client joins every round (exact with full participation, conservative
otherwise).

Epsilon composes what ran: the noise multiplier of every round is kept (the runner stores them in
each checkpoint), and a resumed run composes the rounds before the checkpoint at their own
multipliers with the new rounds at the current one (``ComposedDpEvent``). Resuming with more
rounds under ``target_epsilon`` calibrates the multiplier of the new rounds for the budget that
the finished ones left, and refuses (before the first new round) when none is left.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedguard.algorithms import accounting, distributed_dp, dp_fedavg
from fedguard.algorithms.accounting import Accountant, SampledGaussian, SkellamSum
from fedguard.client import dp_sgd
from fedguard.client.model import ModelAdapter
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.protocol import messages, secagg


@dataclass(frozen=True)
class Spent:
    """What the rounds before a resumed run's checkpoint spent: ``rounds`` finished rounds and
    the noise multiplier each ran at (None: a checkpoint written before they were recorded)."""

    rounds: int
    noise_multipliers: tuple[float, ...] | None


# Distributed DP's sensitivities in units of one client's: the fixed-size cohorts of neighbouring
# populations differ by one replacement.
SKELLAM_SENSITIVITY_FACTOR = 2.0

# A client's participation: the rounds (1-based) in which it was asked to train.
Joined = Mapping[int, Sequence[int]]


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
    adaptive_clip: bool = False
    count_stddev: float = 0.0  # adaptive clipping: the std of the noise on the centred count
    # distributed: the ring, the clip and the model size fix the quantisation and sensitivity
    bits: int = 32
    clip_norm: float = 1.0
    dim: int = 0
    noise_clients: int = 0
    # the noise multipliers of the rounds before a resumed run's checkpoint (round 1 first)
    history: tuple[float, ...] = ()
    _cache: dict[Any, float] = field(default_factory=dict, repr=False)

    def noise_multipliers(self, rounds_done: int) -> list[float]:
        """The noise multiplier of each of the first ``rounds_done`` rounds: the recorded ones
        before the checkpoint, the current one after it."""
        past = list(self.history[:rounds_done])
        return past + [self.noise_multiplier] * (rounds_done - len(past))

    @property
    def sensitivity_factor(self) -> float:
        """The central sum's L2 sensitivity in units of the clip, from the neighbouring relation
        of the client sampling (2 under replace-one, 1 under add-or-remove-one)."""
        return accounting.SENSITIVITY_FACTOR[accounting.relation(not self.poisson)]

    @property
    def distributed(self) -> distributed_dp.Skellam | None:
        """The Skellam mechanism the clients share (distributed mode), else None."""
        if self.mode != "distributed":
            return None
        return distributed_dp.Skellam(self.noise_multiplier, self.noise_clients)

    def _skellam(self, rounds: int, z: float) -> SkellamSum:
        """``rounds`` Skellam rounds at multiplier ``z``, in the quantisation levels of the
        fixed-size cohort: one client's ``Delta_2`` from conditional rounding (and ``Delta_1``),
        doubled under replace-one, total ``mu = (z s C)^2 / 2``."""
        mechanism = distributed_dp.Skellam(z, self.noise_clients)
        fp = distributed_dp.fixed_point(
            bits=self.bits,
            clip_norm=self.clip_norm,
            num_clients=self.clients_per_round,
            mechanism=mechanism,
        )
        levels = fp.scale * fp.clip_norm
        l2 = distributed_dp.l2_sensitivity(levels, self.dim, mechanism.beta)
        l1 = distributed_dp.l1_sensitivity(l2, self.dim)
        mu = self.noise_clients * distributed_dp.client_rate(mechanism, levels)
        # Fixed-size cohorts of neighbouring populations differ by one replacement: the sum
        # moves by the difference of two clients' rounded vectors, twice each one's bounds.
        factor = SKELLAM_SENSITIVITY_FACTOR
        return SkellamSum(factor * l2, factor * l1, mu, rounds)

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

    def _central(self, rounds: int, z: float) -> SampledGaussian:
        """``rounds`` DP-FedAvg rounds at noise multiplier ``z`` (relative to the clip), as
        dp-accounting composes them: multiplier ``z C / (L2 sensitivity) = z / factor``."""
        multiplier = accounting.accounted_multiplier(z, self.sensitivity_factor)
        if self.poisson:
            return SampledGaussian(multiplier, rounds, self.clients_per_round / self.num_clients)
        return SampledGaussian(
            multiplier,
            rounds,
            population=self.num_clients,
            sample_size=self.clients_per_round,
        )

    def _local(self, cid: int, rounds_joined: int, noise: float) -> SampledGaussian:
        return SampledGaussian(noise, rounds_joined * self.steps_per_round[cid], self.rates[cid])

    def _epsilon(self, m: accounting.Mechanism | tuple[SkellamSum, ...]) -> float:
        """dp-accounting's epsilon for ``m``, computed once per distinct mechanism: the run asks
        for the same one again (budget check before a round, metrics after it, the summary)."""
        if m not in self._cache:
            if isinstance(m, tuple) and m and isinstance(m[0], SkellamSum):
                self._cache[m] = accounting.skellam_epsilon(m, self.delta)  # type: ignore[arg-type]
            else:
                self._cache[m] = accounting.epsilon(m, self.delta, self.accountant)  # type: ignore[arg-type]
        return self._cache[m]

    def epsilon_of(self, multipliers: Sequence[float], joined: Joined | None = None) -> float:
        """Epsilon after rounds that ran at ``multipliers`` (round 1 first), client ``c`` having
        trained in rounds ``joined[c]`` (local mode; None: every client in every round)."""
        groups = _runs(multipliers)
        if self.mode == "central":
            return self._epsilon(tuple(self._central(n, z) for z, n in groups))
        if self.mode == "distributed":
            return self._epsilon(tuple(self._skellam(n, z) for z, n in groups))
        if joined is None:
            joined = dict.fromkeys(self.rates, range(1, len(multipliers) + 1))
        return max(
            (self._epsilon(self._local_rounds(c, r, multipliers)) for c, r in joined.items()),
            default=0.0,
        )

    def _local_rounds(
        self, cid: int, rounds: Iterable[int], multipliers: Sequence[float]
    ) -> tuple[SampledGaussian, ...]:
        """Client ``cid``'s DP-SGD steps in ``rounds``, one part per noise multiplier."""
        times = Counter(multipliers[r - 1] for r in rounds)
        return tuple(self._local(cid, times[z], z) for z in sorted(times))

    def epsilon(self, rounds_done: int, joined: Joined) -> float:
        """Epsilon after ``rounds_done`` rounds, client ``c`` having trained in rounds
        ``joined[c]``; every round at the noise multiplier it ran at."""
        return self.epsilon_of(self.noise_multipliers(rounds_done), joined)

    def mechanism(self, rounds_done: int, joined: Joined) -> dict[str, Any]:
        """The parameters anyone needs to recompute epsilon with dp-accounting."""
        multipliers = self.noise_multipliers(rounds_done)
        common = {
            "mode": self.mode,
            "accountant": str(self.accountant),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "noise_calibrated_to_target": self.calibrated,
            # every round's multiplier: they differ after a resume that re-calibrated
            "noise_multipliers": multipliers,
        }
        if self.mode == "central":
            return {**common, **self._central_parameters(rounds_done)}
        if self.mode == "distributed":
            k = self._skellam(rounds_done, self.noise_multiplier)
            return {
                **common,
                "mechanism": "distributed_skellam",
                "rounds": rounds_done,
                "neighboring_relation": "replace_one",
                "noise_clients": self.noise_clients,
                "l2_sensitivity": k.l2_sensitivity,
                "l1_sensitivity": k.l1_sensitivity,
                "skellam_mu": k.mu,
                "rdp_orders": [accounting.SKELLAM_ORDERS[0], accounting.SKELLAM_ORDERS[-1]],
                "sampling_amplification": False,
            }
        varied = len(set(multipliers)) > 1
        clients: dict[str, dict[str, Any]] = {}
        for cid in sorted(self.rates):
            rounds = list(joined.get(cid, ()))
            clients[str(cid)] = {
                "sampling_rate": self.rates[cid],
                "steps": len(rounds) * self.steps_per_round[cid],
                "rounds_joined": len(rounds),
            }
            if varied:  # which multipliers a client's steps ran at
                clients[str(cid)]["rounds"] = rounds
        return {**common, "mechanism": "dp_sgd_poisson_gaussian", "clients": clients}

    def _central_parameters(self, rounds_done: int) -> dict[str, Any]:
        """DP-FedAvg's parameters in ``summary.json``: the noise actually added and the
        sensitivity it is measured against, so that ``noise_stddev / l2_sensitivity`` (or, with
        adaptive clipping, the pair's combination) is the multiplier dp-accounting composes.

        Values are at the configured ``clip_norm``; with adaptive clipping the clip moves every
        round and the update noise and both sensitivities move with it, so the ratios hold in
        every round."""
        z = self.noise_multiplier
        factor = self.sensitivity_factor
        m = self._central(rounds_done, z)
        update_z = (
            dp_fedavg.update_noise_multiplier(z, self.count_stddev) if self.adaptive_clip else z
        )
        out: dict[str, Any] = {
            "mechanism": "dp_fedavg_gaussian",
            "rounds": rounds_done,
            "clip_norm": self.clip_norm,
            "adaptive_clip": self.adaptive_clip,
            "noise_stddev": update_z * self.clip_norm,
            "l2_sensitivity": factor * self.clip_norm,
            "accounted_noise_multiplier": m.noise_multiplier,
        }
        if self.adaptive_clip:
            out["clip_count_noise_stddev"] = self.count_stddev
            out["clip_count_sensitivity"] = factor / 2.0  # bits centred at +-1/2
        if self.poisson:
            out |= {
                "sampling": "poisson",
                "sampling_rate": m.sampling_rate,
                "neighboring_relation": "add_or_remove_one",
            }
        else:
            out |= {
                "sampling": "fixed_size_without_replacement",
                "population": m.population,
                "sample_size": m.sample_size,
                "neighboring_relation": "replace_one",
            }
        return out


def build(
    cfg: ExperimentConfig,
    client_sizes: Mapping[int, int],
    model: ModelAdapter,
    spent: Spent | None = None,
) -> PrivacyPlan | None:
    """The run's privacy plan, or None with privacy off; every refusal is a ConfigError.

    ``spent``: a resumed run's finished rounds and their noise multipliers, composed with the
    new rounds (and, under ``target_epsilon``, left out of the budget the new rounds may spend).
    """
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
            clip_norm=p.clip_norm,
            adaptive_clip=p.adaptive_clip,
            # as the server's CentralDP takes it (the paper's default: expected clients / 20)
            count_stddev=(p.clip_count_stddev or cfg.clients_per_round / 20.0)
            if p.adaptive_clip
            else 0.0,
        )
    if p.target_epsilon is not None:
        plan.noise_multiplier = _calibrate(plan, cfg.experiment.rounds, p.target_epsilon)
    if spent is not None and spent.rounds > 0:
        _resume(plan, spent, cfg.experiment.rounds, p.target_epsilon)
    return plan


def _resume(plan: PrivacyPlan, spent: Spent, rounds: int, target: float | None) -> None:
    """Take the finished rounds' multipliers into ``plan``; under ``target`` the new rounds run
    at the multiplier that keeps the composition of all rounds within it.

    The multiplier calibrated for the whole run from scratch is kept when the composition stays
    within the target with it (an interrupted run resumed with the same rounds repeats the
    uninterrupted one); otherwise the new rounds get the smallest multiplier that fits."""
    multipliers = spent.noise_multipliers
    if multipliers is None:
        if plan.calibrated:
            raise ConfigError(
                f"--resume: the checkpoint of round {spent.rounds} does not record the noise "
                "multipliers its rounds ran at (it predates them), so the epsilon they spent "
                "under privacy.target_epsilon is unknown; start a new run"
            )
        multipliers = (plan.noise_multiplier,) * spent.rounds  # the config cannot change
    if len(multipliers) != spent.rounds or not all(z > 0 for z in multipliers):
        raise ConfigError(
            f"--resume: the checkpoint of round {spent.rounds} records {len(multipliers)} noise "
            "multipliers, not one positive multiplier per finished round"
        )
    plan.history = tuple(float(z) for z in multipliers)
    new = rounds - spent.rounds
    if target is None or new <= 0:
        return

    def epsilon_of(z: float) -> float:
        return plan.epsilon_of([*plan.history, *[z] * new])

    if epsilon_of(plan.noise_multiplier) <= target:
        return
    try:
        plan.noise_multiplier = accounting.calibrate_noise(epsilon_of, target)
    except accounting.PrivacyError:
        spent_eps = plan.epsilon_of(plan.history)
        raise ConfigError(
            f"--resume: rounds 1-{spent.rounds} already spent epsilon {spent_eps:.4g} of "
            f"privacy.target_epsilon={target:g}; rounds {spent.rounds + 1}-{rounds} cannot stay "
            "within it at any noise multiplier up to "
            f"{accounting.MAX_NOISE_MULTIPLIER:g}; resume with fewer rounds"
        ) from None


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

    def epsilon_of(z: float) -> float:
        return plan.epsilon_of([z] * rounds)

    try:
        z = accounting.calibrate_noise(epsilon_of, target)
    except accounting.PrivacyError as exc:
        raise ConfigError(str(exc)) from None
    if not math.isfinite(z):
        raise ConfigError(f"privacy.target_epsilon={target}: no finite noise multiplier found")
    return z


def _runs(multipliers: Sequence[float]) -> list[tuple[float, int]]:
    """``multipliers`` as (multiplier, consecutive rounds at it) pairs, in order."""
    out: list[tuple[float, int]] = []
    for z in multipliers:
        if out and out[-1][0] == z:
            out[-1] = (z, out[-1][1] + 1)
        else:
            out.append((z, 1))
    return out
