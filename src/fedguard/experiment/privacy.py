"""The privacy plan of a run: checks before round 1, noise calibration, epsilon per round.

Built from the ``[privacy]`` table and the federation (client sizes and count), it says what the
clients and the server must do and what the accountant composes:

* ``local`` (record-level DP-SGD in each client): client ``i`` with ``n_i`` records takes
  ``s_i`` steps per round at sampling rate ``q_i = batch_size / n_i``; after the rounds it joined
  (``r_i``), its epsilon is that of ``r_i * s_i`` Poisson-sampled Gaussian steps. A client's
  steps count whenever it was asked to train, whether or not its reply was used (it may have
  left). The run reports the worst client's epsilon. What is composed is what ran: each fit
  reply reports its rate, steps, noise multiplier and clip (:meth:`PrivacyPlan.check_reply`
  refuses a reply below the plan's noise or above its clip, and in simulation one whose rate or
  steps are not the plan's); a deployed client's rate and steps follow its own data, which the
  server's copy of the partition does not know, so the plan composes the reported ones, round by
  round, and a round without an accepted report at the client's nearest report (the plan's
  expectation if it never reported). The reports are kept in the checkpoints for resume.
* ``central`` (user-level DP-FedAvg): one sampled Gaussian mechanism per round over clients.
  The noise std on the sum of clipped updates is ``z * clip_norm``; dp-accounting is given
  ``std / L2 sensitivity``, the sensitivity following from the neighbouring relation of the
  sampling: ``clip_norm`` under add-or-remove-one (Poisson), ``2 * clip_norm`` under
  replace-one (fixed-size sampling), so the multiplier it composes is ``z`` or ``z / 2``.
* ``distributed`` (user-level, under secure aggregation): the clients' Skellam noise shares make
  one Skellam mechanism per round on the quantised sum (at least ``m`` shares in every released
  sum, ``m`` = clients per round minus the tolerated dropouts); epsilon composes its RDP bound
  over the rounds without claiming amplification by sampling (see
  :func:`fedguard.algorithms.privacy.accounting.skellam_epsilon`). The cohorts are fixed-size, so
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

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedguard.algorithms.privacy import accounting, distributed_dp, dp_fedavg
from fedguard.algorithms.privacy.accounting import Accountant, SampledGaussian, SkellamSum
from fedguard.client import dp_sgd
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import messages, secagg


@dataclass(frozen=True)
class LocalRun:
    """What one client's DP-SGD ran in one round, as its fit reply reported it: ``steps``
    Poisson-sampled steps at rate ``sampling_rate`` and noise multiplier ``noise_multiplier``."""

    sampling_rate: float
    steps: int
    noise_multiplier: float


# Per client, the rounds whose fit reply reported what its DP-SGD ran (local mode).
Reports = Mapping[int, Mapping[int, LocalRun]]


@dataclass(frozen=True)
class Spent:
    """What the rounds before a resumed run's checkpoint spent: ``rounds`` finished rounds and
    the noise multiplier each ran at (None: a checkpoint written before they were recorded);
    under local DP the clients' reports of those rounds (None: not recorded)."""

    rounds: int
    noise_multipliers: tuple[float, ...] | None
    reports: Reports | None = None


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
    # local: per client the expected sampling rate and steps per round (the check of a reply
    # and the fallback for a round without one), the clip, whether the expected values are the
    # clients' real ones (simulation) or the server's copy of the partition (deployment), and
    # per client the rounds' reports of what ran (composed)
    rates: dict[int, float] = field(default_factory=dict)
    steps_per_round: dict[int, int] = field(default_factory=dict)
    max_grad_norm: float = 1.0
    sizes_known: bool = True
    reports: dict[int, dict[int, LocalRun]] = field(default_factory=dict)
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

    def _ran(self, cid: int, round_: int, z: float, order: Sequence[int]) -> LocalRun:
        """What client ``cid`` ran in ``round_`` (multiplier ``z`` asked): its report of that
        round; without one (no reply, or a rejected one: it may have trained) its nearest report
        (the last before, else the first after) at the smaller of its and the asked multiplier;
        the plan's expectation if it never reported. ``order``: its reported rounds, sorted."""
        reported = self.reports.get(cid, {})
        if round_ in reported:
            return reported[round_]
        if not order:
            return LocalRun(self.rates[cid], self.steps_per_round[cid], z)
        i = bisect.bisect_left(order, round_)
        near = reported[order[i - 1] if i > 0 else order[0]]
        return LocalRun(near.sampling_rate, near.steps, min(near.noise_multiplier, z))

    def _epsilon(self, m: accounting.Mechanism | tuple[SkellamSum, ...]) -> float:
        """dp-accounting's epsilon for ``m``, computed once per distinct mechanism: the run asks
        for the same one again (budget check before a round, metrics after it, the summary)."""
        if m not in self._cache:
            if isinstance(m, SampledGaussian):
                self._cache[m] = accounting.epsilon(m, self.delta, self.accountant)
                return self._cache[m]
            gaussian = tuple(p for p in m if isinstance(p, SampledGaussian))
            skellam = tuple(p for p in m if isinstance(p, SkellamSum))
            if skellam and not gaussian:
                self._cache[m] = accounting.skellam_epsilon(skellam, self.delta)
            elif len(gaussian) == len(m):  # the empty composition included
                self._cache[m] = accounting.epsilon(gaussian, self.delta, self.accountant)
            else:
                raise TypeError(f"A composition of mechanisms that are not all of one kind: {m!r}.")
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
        # every client's composition, once per distinct one (many clients share theirs)
        return max(
            (self._epsilon(self._local_rounds(c, r, multipliers)) for c, r in joined.items()),
            default=0.0,
        )

    def _local_rounds(
        self, cid: int, rounds: Iterable[int], multipliers: Sequence[float]
    ) -> tuple[SampledGaussian, ...]:
        """Client ``cid``'s DP-SGD steps in ``rounds`` as they ran (:meth:`_ran`), one part per
        distinct (noise multiplier, sampling rate, steps per round)."""
        order = sorted(self.reports.get(cid, {}))
        times = Counter(
            (run.noise_multiplier, run.sampling_rate, run.steps)
            for run in (self._ran(cid, r, multipliers[r - 1], order) for r in rounds)
        )
        return tuple(
            SampledGaussian(z, count * steps, q) for (z, q, steps), count in sorted(times.items())
        )

    def check_reply(self, reply: messages.FitReply) -> str | None:
        """Why a fit reply's report of its DP-SGD contradicts the plan (local mode), or None.

        The four values must be present and finite, the noise multiplier at least the round's,
        the clip at most the plan's, the rate in (0, 1] and the steps a count; in simulation
        (``sizes_known``) the rate and steps must be the plan's for that client. In deployment
        the plan's sizes are the server's copy of the partition, so the reported rate and steps
        are taken as they come and composed."""
        if self.mode != "local":
            return None
        raw = {k: reply.metrics.get(k) for k in messages.DP_SGD_REPORT}
        missing = [k for k, v in raw.items() if v is None or not math.isfinite(v)]
        if missing:
            return f"the reply does not report a finite {', '.join(missing)} of its DP-SGD"
        values = {k: float(v) for k, v in raw.items() if v is not None}
        q, steps = values[messages.DP_SGD_RAN_RATE], values[messages.DP_SGD_RAN_STEPS]
        z, clip = values[messages.DP_SGD_RAN_NOISE], values[messages.DP_SGD_RAN_CLIP]
        asked = self.noise_multipliers(reply.round)[reply.round - 1]
        if not z >= asked:
            return f"DP-SGD ran at noise multiplier {z:g}, the plan's is {asked:g}"
        if not 0 < clip <= self.max_grad_norm:
            return f"DP-SGD clipped at {clip:g}, the plan allows at most {self.max_grad_norm:g}"
        if not 0 < q <= 1 or steps < 0 or steps != int(steps):
            return f"DP-SGD reports sampling rate {q:g} and {steps:g} steps"
        cid = reply.client_id
        if cid not in self.rates:
            return f"client {cid} is not in the privacy plan"
        expected = (self.rates[cid], self.steps_per_round[cid])
        if self.sizes_known and (q, int(steps)) != expected:
            return (
                f"DP-SGD ran {int(steps)} steps at sampling rate {q:g}, the plan has "
                f"{expected[1]} at {expected[0]:g} for this client"
            )
        return None

    def record(self, round_: int, metrics: Mapping[int, Mapping[str, float]]) -> None:
        """Keep what each client's checked reply of ``round_`` reported (local mode)."""
        if self.mode != "local":
            return
        for cid, m in metrics.items():
            self.reports.setdefault(cid, {})[round_] = LocalRun(
                float(m[messages.DP_SGD_RAN_RATE]),
                int(m[messages.DP_SGD_RAN_STEPS]),
                float(m[messages.DP_SGD_RAN_NOISE]),
            )

    def reports_json(self, rounds_done: int) -> dict[str, list[list[float]]]:
        """The reports of the first ``rounds_done`` rounds for a checkpoint: per client id,
        ``[round, sampling rate, steps, noise multiplier]`` rows (see :func:`reports_from`)."""
        return {
            str(cid): [
                [r, run.sampling_rate, run.steps, run.noise_multiplier]
                for r, run in sorted(runs.items())
                if r <= rounds_done
            ]
            for cid, runs in sorted(self.reports.items())
        }

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
            parts = self._local_rounds(cid, rounds, multipliers)
            rates = {p.sampling_rate for p in parts}
            reported = self.reports.get(cid, {})
            clients[str(cid)] = {
                # what was composed: the reported runs (the nearest report, or the plan, for a
                # round without one), one part per (noise multiplier, rate, steps per round)
                "sampling_rate": rates.pop() if len(rates) == 1 else None,
                "steps": sum(p.count for p in parts),
                "rounds_joined": len(rounds),
                "rounds_reported": sum(1 for r in rounds if r in reported),
                "composed": [
                    {
                        "noise_multiplier": p.noise_multiplier,
                        "sampling_rate": p.sampling_rate,
                        "steps": p.count,
                    }
                    for p in parts
                ],
                "planned_sampling_rate": self.rates[cid],
                "planned_steps_per_round": self.steps_per_round[cid],
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
    *,
    sizes_known: bool = True,
    largest_sizes: Mapping[int, int] | None = None,
) -> PrivacyPlan | None:
    """The run's privacy plan, or None with privacy off; every refusal is a ConfigError.

    ``spent``: a resumed run's finished rounds and their noise multipliers, composed with the
    new rounds (and, under ``target_epsilon``, left out of the budget the new rounds may spend).
    ``sizes_known``: ``client_sizes`` are the clients' real data sizes (simulation), so a local-DP
    reply whose sampling rate or steps differ is refused; otherwise (deployment) they are the
    server's copy and the clients' reports are composed as they come.
    ``largest_sizes``: where a client's size is known only as a range (a registered count
    rounded up), ``client_sizes`` holds each range's low end and this its high end; local DP
    plans the rate of the low end and the steps of the high end, the most epsilon the client
    can spend in a round without a report (and checks ``delta`` against the low end).
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
                i: _local_steps(
                    n if largest_sizes is None else largest_sizes[i],
                    c.batch_size,
                    c.epochs,
                    c.max_steps,
                )
                for i, n in client_sizes.items()
            },
            max_grad_norm=p.max_grad_norm,
            sizes_known=sizes_known,
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
    if spent.reports is not None:
        plan.reports = {
            cid: {r: run for r, run in runs.items() if r <= spent.rounds}
            for cid, runs in spent.reports.items()
        }
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


def reports_from(
    recorded: Mapping[str, Sequence[Sequence[float]]],
) -> dict[int, dict[int, LocalRun]]:
    """The reports a checkpoint recorded (:meth:`PrivacyPlan.reports_json`)."""
    return {
        int(cid): {int(r): LocalRun(float(q), int(steps), float(z)) for r, q, steps, z in rows}
        for cid, rows in recorded.items()
    }


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
