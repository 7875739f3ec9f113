"""Strategies: the server half of each federated optimizer, plus what it tells clients to do.

A strategy is configured once and then used per round: ``fit_instructions`` says what the
clients run (the client half: FedProx's proximal term, SCAFFOLD's control variate), ``aggregate``
turns the accepted replies into the next global model with a pure server optimizer from
:mod:`fedguard.algorithms.optimizers.server`. Under secure aggregation the server never sees a
reply, only the sum of the clipped, weighted updates; ``aggregate_sum`` takes that sum through
the same server optimizers (and the same central DP noise).

A Byzantine-robust rule (:mod:`fedguard.algorithms.robust`) wraps the aggregation step: where the
strategy would take the weighted mean of the updates it takes the robust aggregate instead, so
FedAvgM, FedAdam, FedYogi and FedAdagrad run unchanged on top of it. Centered clipping's reference
point is server state and is checkpointed with the rest.

Weights. A reply's ``num_examples`` is the client's own claim. The plain mean weighs by it, after
the round driver has rejected claims that are not finite and positive and cut each to the client's
registered size. A robust rule gives every update the same weight: a claimed size buys no
influence. That is how Krum, the median, the trimmed mean and Bulyan are defined, and for the
weighted rules (geometric median, centered clipping, norm bounding, Multi-Krum's average) it is
what keeps their guarantee, which counts clients: with claimed weights one liar holding most of
the weight is the weighted majority, and the geometric median then returns its update.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedguard.algorithms import robust, seeding
from fedguard.algorithms.optimizers import aggregation, newton, scaffold
from fedguard.algorithms.optimizers import server as server_optimizers
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.algorithms.robust import base as robust_base
from fedguard.protocol import messages

CONTROL = "control"
CLIP_NORM = messages.DP_CLIP_NORM
DP_UNCLIPPED = "dp_unclipped"  # central DP reply metric: the client's adaptive-clipping bit
ROBUST_REFERENCE = "robust.reference"


class StrategyKind(enum.StrEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"


# What secure aggregation cannot serve: it reveals only the sum of the model updates.
# SCAFFOLD also needs the sum of the control deltas, which have no norm bound to quantise them
# by; Newton needs the sums of per-client Hessians (D^2 numbers, unbounded). Robust aggregators
# (Krum, median, trimmed mean, ...) compare individual updates; only norm bounding, a clip each
# client can apply to its own update, survives summation.
NEEDS_INDIVIDUAL_UPDATES: frozenset[robust.RobustAggregator] = frozenset(
    k for k in robust.RobustAggregator if robust.needs_individual_updates(k)
)
NOT_SUMMABLE_UNDER_SECAGG: dict[StrategyKind, str] = {
    StrategyKind.SCAFFOLD: (
        "SCAFFOLD's control deltas have no norm bound, so they cannot be quantised for masking"
    ),
}


def secure_aggregation_refusal(
    kind: StrategyKind, *, newton: bool, aggregator: robust.RobustAggregator | None = None
) -> str | None:
    """Why ``kind`` (with the robust ``aggregator``, if any) cannot run under secure aggregation,
    or None if it can."""
    if aggregator in NEEDS_INDIVIDUAL_UPDATES:
        return (
            f'server.aggregator = "{aggregator}" compares individual updates, which secure '
            'aggregation hides; use "norm_bounding" (each client clips its own update) or turn '
            "secure aggregation off"
        )
    if kind in NOT_SUMMABLE_UNDER_SECAGG:
        return NOT_SUMMABLE_UNDER_SECAGG[kind]
    if newton:
        return (
            "the Newton step needs per-client gradient and Hessian sums, which are not clipped "
            "updates; use a first-order client optimizer"
        )
    return None


_SERVER_OPTIMIZER = {
    StrategyKind.FEDAVG: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDPROX: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.SCAFFOLD: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDAVGM: server_optimizers.ServerOptimizer.FEDAVGM,
    StrategyKind.FEDADAM: server_optimizers.ServerOptimizer.FEDADAM,
    StrategyKind.FEDYOGI: server_optimizers.ServerOptimizer.FEDYOGI,
    StrategyKind.FEDADAGRAD: server_optimizers.ServerOptimizer.FEDADAGRAD,
}


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries between rounds besides the global parameters."""

    optimizer: server_optimizers.ServerOptimizerState
    control: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    clip_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # central DP: [1]
    robust_reference: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # CC: [D]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for a checkpoint."""
        return {
            "optimizer.m": self.optimizer.m,
            "optimizer.v": self.optimizer.v,
            CONTROL: self.control,
            CLIP_NORM: self.clip_norm,
            ROBUST_REFERENCE: self.robust_reference,
        }

    @classmethod
    def from_tensors(cls, named: Mapping[str, torch.Tensor]) -> ServerState:
        """The state saved by :meth:`tensors`; checkpoints from before a key existed load with
        that part empty."""
        opt = server_optimizers.ServerOptimizerState(named["optimizer.m"], named["optimizer.v"])
        return cls(
            opt,
            named[CONTROL],
            named.get(CLIP_NORM, torch.zeros(0)),
            named.get(ROBUST_REFERENCE, torch.zeros(0)),
        )


@dataclass(frozen=True)
class CentralDP:
    """User-level DP-FedAvg settings: the clip (fixed or adaptive) and the server's noise.

    ``noise_multiplier`` ``z`` is relative to the clip, as in McMahan et al. (2018): the sum of
    clipped updates gets noise of std ``z * clip_norm``. The accountant composes ``z * clip_norm``
    over the sum's L2 sensitivity under its neighbouring relation (``clip_norm`` under
    add-or-remove-one, ``2 * clip_norm`` under replace-one; see
    :mod:`fedguard.algorithms.privacy.accounting`). With adaptive clipping part of ``z`` pays for the
    privatised clip count (see :mod:`dp_fedavg`). ``expected_clients`` is the fixed denominator
    of the noisy mean.
    """

    clip_norm: float
    noise_multiplier: float
    expected_clients: float
    seed: int
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        self.update_noise_multiplier  # noqa: B018 (refuses a count noise too small for z)

    @property
    def update_noise_multiplier(self) -> float:
        if not self.adaptive:
            return self.noise_multiplier
        return dp_fedavg.update_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def noisy_mean(
        self, total: torch.Tensor, clip_norm: float, generator: torch.Generator
    ) -> torch.Tensor:
        """The round's delta from the sum of clipped updates: Gaussian noise of std
        ``update_noise_multiplier * clip_norm``, divided by the fixed ``expected_clients``."""
        return dp_fedavg.noisy_mean(
            total.double(),
            clip_norm=clip_norm,
            noise_multiplier=self.update_noise_multiplier,
            denominator=self.expected_clients,
            generator=generator,
        )

    def generator(self, round_: int) -> torch.Generator:
        """The noise of one round: seeded, so a resumed run repeats an uninterrupted one."""
        return seeding.generator(self.seed, round_, 0xD9)


@dataclass(frozen=True)
class Strategy:
    """A federated optimizer: server optimizer settings, client instructions, and its extras."""

    kind: StrategyKind
    server: server_optimizers.ServerOptimizerConfig
    client_config: Mapping[str, messages.Scalar]
    num_clients: int
    central_dp: CentralDP | None = None
    robust_rule: robust.RobustConfig | None = None  # None: the weighted mean

    def __post_init__(self) -> None:
        if self.robust_rule is None:
            return
        if self.newton:
            raise ValueError(
                "The Newton step pools gradient and Hessian sums; a robust aggregator cannot "
                "apply to it."
            )
        if self.central_dp is not None and self.robust_rule.kind in NEEDS_INDIVIDUAL_UPDATES:
            raise ValueError(
                f"Central DP noise is calibrated for the mean's sensitivity, not for "
                f"{self.robust_rule.kind}; use norm bounding or the mean with central DP."
            )

    @property
    def aggregator(self) -> robust.RobustAggregator | None:
        return None if self.robust_rule is None else self.robust_rule.kind

    @classmethod
    def create(
        cls,
        kind: StrategyKind,
        *,
        client_config: Mapping[str, messages.Scalar],
        num_clients: int,
        server_lr: float = 1.0,
        server_momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        central_dp: CentralDP | None = None,
        robust_rule: robust.RobustConfig | None = None,
    ) -> Strategy:
        server = server_optimizers.ServerOptimizerConfig(
            kind=_SERVER_OPTIMIZER[kind],
            lr=server_lr,
            momentum=server_momentum,
            beta1=beta1,
            beta2=beta2,
            tau=tau,
        )
        config = dict(client_config)
        if kind is not StrategyKind.FEDPROX:
            config["proximal_mu"] = 0.0
        return cls(kind, server, config, num_clients, central_dp, robust_rule)

    @property
    def newton(self) -> bool:
        return self.client_config.get("optimizer") == "newton"

    def required_tensors(self, dim: int) -> dict[str, int]:
        """Tensors every fit reply must carry, with their lengths."""
        if self.kind is StrategyKind.SCAFFOLD:
            return {"control_delta": dim}
        if self.newton:
            return {"gradient_sum": dim, "hessian_sum": dim * dim}
        return {}

    def init(self, params: torch.Tensor) -> ServerState:
        control = torch.zeros_like(params) if self.kind is StrategyKind.SCAFFOLD else torch.zeros(0)
        clip = torch.zeros(0)
        if self.central_dp is not None:
            clip = torch.tensor([self.central_dp.clip_norm], dtype=torch.float64)
        reference = torch.zeros(0)
        if self.robust_rule is not None:
            reference = robust.init(self.robust_rule, params.shape[0]).reference
        return ServerState(server_optimizers.init(self.server, params), control, clip, reference)

    def fit_instructions(
        self, state: ServerState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        """The config and tensors every sampled client receives this round."""
        tensors = {CONTROL: state.control} if self.kind is StrategyKind.SCAFFOLD else {}
        config = dict(self.client_config)
        if self.central_dp is not None:
            config[CLIP_NORM] = float(state.clip_norm[0])
        return config, tensors

    def aggregate(
        self,
        state: ServerState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        """The next server state and global parameters from the accepted replies.

        The mean weighs each update by its reply's ``num_examples``, which must already be
        checked and capped (the round driver does both); a robust rule ignores them and weighs
        every update equally (see the module docstring).
        """
        weights = torch.tensor([float(r.num_examples) for r in replies])
        if self.central_dp is not None:
            state, delta = self._private_mean(self.central_dp, state, replies, round_)
            opt_state, new_params = server_optimizers.apply(
                self.server, state.optimizer, params, delta
            )
            return replace(state, optimizer=opt_state), new_params
        if self.newton:
            gradient = torch.stack([r.tensors["gradient_sum"] for r in replies]).double().sum(0)
            hessian = torch.stack([r.tensors["hessian_sum"] for r in replies]).double().sum(0)
            delta = newton.newton_direction(
                gradient, hessian.view(params.shape[0], -1), float(weights.sum()), damping=1e-8
            )
        else:
            state, delta = self._mean_or_robust(state, [r.update for r in replies], weights, round_)
        opt_state, new_params = server_optimizers.apply(self.server, state.optimizer, params, delta)
        control = state.control
        if self.kind is StrategyKind.SCAFFOLD:
            deltas = torch.stack([r.tensors["control_delta"] for r in replies])
            control = scaffold.server_control_update(control, deltas, num_clients=self.num_clients)
        return replace(state, optimizer=opt_state, control=control), new_params

    def _mean_or_robust(
        self,
        state: ServerState,
        updates: Sequence[torch.Tensor],
        weights: torch.Tensor,
        round_: int,
    ) -> tuple[ServerState, torch.Tensor]:
        """The mean of the ``K`` updates weighted by ``weights``, or the configured robust rule's
        aggregate with equal weights (the mean streams over the updates; a robust rule needs them
        stacked as ``[K, D]``)."""
        if self.robust_rule is None:
            return state, aggregation.weighted_mean(updates, weights)
        robust_state, delta = robust.apply(
            self.robust_rule,
            robust.RobustState(state.robust_reference),
            torch.stack(list(updates)),
            torch.ones(len(updates), dtype=torch.float64),  # claimed sizes buy no influence
            round_=round_,
        )
        return replace(state, robust_reference=robust_state.reference), delta

    def aggregate_sum(
        self,
        state: ServerState,
        params: torch.Tensor,
        total: torch.Tensor,
        weight: float,
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        """The next state and parameters from a securely aggregated sum.

        ``total`` is ``sum_u w_u x_u`` over the surviving clients of their client-clipped updates
        ``x_u`` (weights ``w_u``: example counts, or 1 with central DP) and ``weight`` is
        ``sum_u w_u``. Without DP the delta is the weighted mean, as in :meth:`aggregate`. With
        central DP the server cannot re-clip (it never sees an update), so the guarantee rests on
        the clients' clip; the sum gets the same noise and fixed denominator as in
        :meth:`_private_mean`. Adaptive clipping is not available here: it needs each client's
        clipped bit.
        """
        refusal = secure_aggregation_refusal(
            self.kind, newton=self.newton, aggregator=self.aggregator
        )
        if refusal is not None:
            raise ValueError(f"Secure aggregation cannot serve this strategy: {refusal}.")
        if self.central_dp is not None:
            dp = self.central_dp
            if dp.adaptive:
                raise ValueError(
                    "Adaptive clipping needs each client's clipped bit, which secure aggregation hides."
                )
            delta = dp.noisy_mean(total, float(state.clip_norm[0]), dp.generator(round_))
        else:
            if not weight > 0:
                raise ValueError(f"The securely aggregated weight must be positive, got {weight}.")
            delta = (total.double() / weight).to(torch.float32)
        opt_state, new_params = server_optimizers.apply(self.server, state.optimizer, params, delta)
        return replace(state, optimizer=opt_state), new_params

    def _private_mean(
        self,
        dp: CentralDP,
        state: ServerState,
        replies: Sequence[messages.FitReply],
        round_: int,
    ) -> tuple[ServerState, torch.Tensor]:
        """DP-FedAvg: re-clip every update (a client may lie), noisy sum over a fixed denominator.

        Clients clip already; the server clips again so that the guarantee does not rest on
        them while it can see the updates (under secure aggregation it rests on the clients).
        """
        clip = float(state.clip_norm[0])
        bound = clip  # norm bounding with central DP: one clip, at the smaller of the two norms
        if (
            self.robust_rule is not None
            and self.robust_rule.kind is robust.RobustAggregator.NORM_BOUNDING
        ):
            if self.robust_rule.norm_bound is None:  # RobustConfig refuses this
                raise robust_base.RobustnessError(
                    "Norm bounding needs a norm_bound; none was given."
                )
            bound = min(clip, self.robust_rule.norm_bound)
        clipped = [dp_fedavg.clip_update(r.update, bound) for r in replies]
        total = torch.stack([c.update for c in clipped]).double().sum(0)
        generator = dp.generator(round_)
        delta = dp.noisy_mean(total, clip, generator)
        if dp.adaptive:
            # The bit is whether the client's update was at most the clip *before* the client
            # clipped it: only the client knows (the server sees the clipped update, never
            # longer than the clip). A reply the server had to re-clip counts as clipped; any
            # report is mapped to one bit, which is all the count's sensitivity assumes.
            bits = [
                c.unclipped and r.metrics.get(DP_UNCLIPPED, 1.0) >= 0.5
                for c, r in zip(clipped, replies, strict=True)
            ]
            clip, _ = dp_fedavg.next_clip_norm(
                clip,
                float(sum(bits)),
                len(clipped),
                target_quantile=dp.target_quantile,
                denominator=dp.expected_clients,
                learning_rate=dp.clip_learning_rate,
                count_stddev=dp.count_stddev,
                generator=generator,
            )
        return replace(state, clip_norm=torch.tensor([clip], dtype=torch.float64)), delta
