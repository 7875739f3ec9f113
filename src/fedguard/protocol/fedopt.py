"""fedguard's own strategies, implementations of :class:`~fedguard.protocol.strategy.Strategy`.

* :class:`FedOpt`: an aggregator (the weighted mean, or a robust rule in its place), then a
  server optimizer from :mod:`fedguard.algorithms.optimizers.server`: FedAvg (McMahan et al.
  2017), FedAvgM (Hsu et al. 2019), FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021) and FedProx
  (Li et al. 2020: FedAvg whose clients add a proximal term, ``proximal_mu`` in their config).
* :class:`Scaffold`: a FedAvg whose clients correct their gradients by control variates, and
  whose server moves its own (Karimireddy et al. 2020; :mod:`fedguard.algorithms.optimizers.scaffold`).
* :class:`FedDyn`: clients minimise a dynamically regularised objective and keep their gradient
  state; the server keeps ``h`` and sets the model to the mean of the clients' models minus
  ``h / alpha`` (Acar et al. 2021; :mod:`fedguard.algorithms.optimizers.feddyn`).
* :class:`FedNova`: clients send their update normalised by their local steps, the server
  rescales the mean by the effective step count (Wang et al. 2020;
  :mod:`fedguard.algorithms.optimizers.fednova`), then steps the server optimizer (FedAvg).
* :class:`Newton`: the exact Newton step of the pooled objective from the clients' gradient and
  Hessian sums (convex models; :mod:`fedguard.algorithms.optimizers.newton`).

User-level central DP wraps any of them that aggregates a sum (:mod:`.central_dp`);
:func:`create` builds the strategy a configuration names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedguard.algorithms import robust, seeding
from fedguard.algorithms.optimizers import aggregation, committed, feddyn, fednova, newton, scaffold
from fedguard.algorithms.optimizers import server as server_optimizers
from fedguard.protocol import features, messages, robust_rules
from fedguard.protocol.aggregator import Aggregator, LeftOut, Mean, RoundContext
from fedguard.protocol.central_dp import CentralPrivacy
from fedguard.protocol.strategy import (
    CONTROL,
    CentralDP,
    ServerState,
    Strategy,
    StrategyKind,
    StrategyState,
)

AGGREGATOR_STREAM = 0xA66  # the seeding stream of the aggregator's round generator

# What secure aggregation (which reveals only the sum of the model updates) cannot serve.
SCAFFOLD_REFUSAL = (
    "SCAFFOLD's control deltas have no norm bound, so they cannot be quantised for masking"
)
FEDDYN_REFUSAL = (
    "FedDyn's server state h must stay the mean of the clients' gradient states, which each "
    "client moves by its exact, unweighted update; a sum of clipped (and example-weighted) "
    "updates would make h drift from them"
)
FEDNOVA_REFUSAL = (
    "FedNova rescales the mean of the normalised updates by tau_eff, the example-weighted mean "
    "of each client's local step norm, which travels beside each update and not in the sum; "
    "use fedavg or fedprox"
)
NEWTON_REFUSAL = (
    "the Newton step needs per-client gradient and Hessian sums, which are not clipped "
    "updates; use a first-order client optimizer"
)

_SERVER_OPTIMIZER = {
    StrategyKind.FEDAVG: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDPROX: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.SCAFFOLD: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDDYN: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDNOVA: server_optimizers.ServerOptimizer.FEDAVG,
    StrategyKind.FEDAVGM: server_optimizers.ServerOptimizer.FEDAVGM,
    StrategyKind.FEDADAM: server_optimizers.ServerOptimizer.FEDADAM,
    StrategyKind.FEDYOGI: server_optimizers.ServerOptimizer.FEDYOGI,
    StrategyKind.FEDADAGRAD: server_optimizers.ServerOptimizer.FEDADAGRAD,
}


@dataclass(frozen=True)
class FedOpt(Strategy):
    """Aggregate the updates with ``aggregator``, then step the server optimizer ``server`` with
    the aggregate as its pseudo-gradient. ``client_config`` is what every client is told to run."""

    server: server_optimizers.ServerOptimizerConfig
    client_config: Mapping[str, messages.Scalar]
    aggregator: Aggregator = field(default_factory=Mean)
    seed: int = 0  # the aggregator's round generator

    def init(self, params: torch.Tensor) -> ServerState:
        return ServerState(
            server_optimizers.init(self.server, params),
            aggregator=self.aggregator.init(params.shape[0]),
        )

    def restore(self, named: Mapping[str, torch.Tensor]) -> ServerState:
        return ServerState.from_tensors(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        return dict(self.client_config), {}

    def client_features(self) -> frozenset[str]:
        mu = self.client_config.get("proximal_mu")
        proximal = isinstance(mu, int | float) and mu > 0
        return frozenset({features.PROXIMAL_TERM}) if proximal else frozenset()

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        """Aggregate with the rule, weighing each update by its reply's ``num_examples`` if the
        rule weighs by examples (the mean), else equally (see the strategy module's docstring)."""
        new_state, new_params, _ = self.aggregate_reporting(state, params, replies, round_=round_)
        return new_state, new_params

    def aggregate_reporting(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor, LeftOut | None]:
        """:meth:`aggregate` and what the rule left out, by client id."""
        current = ServerState.of(state)
        rule = self.aggregator
        if rule.weighs_by_examples:
            weights = torch.tensor([float(r.num_examples) for r in replies])
        else:  # claimed sizes buy no influence
            weights = torch.ones(len(replies), dtype=torch.float64)
        context = RoundContext(
            round_, params, seeding.generator(self.seed, round_, AGGREGATOR_STREAM)
        )
        updates = [r.update for r in replies]
        if type(rule) is Mean:
            # The built-in mean adds the updates one by one, as Mean.aggregate does with their
            # [K, D] stack, without making it: 0.5 GB for 1,000 clients of a 0.5 MB model.
            # Any other rule gets the stack its API promises.
            rule_state, delta = current.aggregator, aggregation.weighted_mean(updates, weights)
            report = None
        else:
            rule_state, delta, report = rule.aggregate_reporting(
                torch.stack(updates), weights, state=current.aggregator, context=context
            )
        new_state, new_params = self.step(replace(current, aggregator=rule_state), params, delta)
        left_out = None if report is None else report.by_client([r.client_id for r in replies])
        return new_state, new_params, left_out

    def aggregate_sum(
        self,
        state: StrategyState,
        params: torch.Tensor,
        total: torch.Tensor,
        weight: float,
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        """The weighted mean ``total / weight`` through the server optimizer. Only a rule that
        needs no individual update runs here: the mean, or norm bounding, whose bound each client
        applied to its own update before the sum."""
        refusal = self.secure_aggregation_refusal()
        if refusal is not None:
            raise ValueError(f"Secure aggregation cannot serve this strategy: {refusal}.")
        if not weight > 0:
            raise ValueError(f"The securely aggregated weight must be positive, got {weight}.")
        delta = (total.double() / weight).to(torch.float32)
        return self.step(ServerState.of(state), params, delta)

    def step(
        self, state: ServerState, params: torch.Tensor, delta: torch.Tensor
    ) -> tuple[ServerState, torch.Tensor]:
        """The server optimizer's step with the aggregate ``delta``."""
        opt_state, new_params = server_optimizers.apply(self.server, state.optimizer, params, delta)
        return replace(state, optimizer=opt_state), new_params


def _told(
    state: StrategyState, names: features.CommittedState, client_id: int
) -> dict[str, messages.Scalar]:
    """The fit config entry that tells ``client_id`` the last round whose update of it entered
    the server's part (the state's record; see
    :mod:`fedguard.algorithms.optimizers.committed`)."""
    record = ServerState.of(state).aggregated
    return {names.told: committed.last_aggregated(record, client_id)}


def _recorded(state: ServerState, replies: Sequence[messages.FitReply], round_: int) -> ServerState:
    """``state`` with ``replies``' clients recorded as aggregated in ``round_``."""
    ids = [r.client_id for r in replies]
    return replace(state, aggregated=committed.record_aggregated(state.aggregated, ids, round_))


@dataclass(frozen=True)
class Scaffold(Strategy):
    """SCAFFOLD on top of ``inner`` (FedAvg): the server control variate goes to every client,
    and moves by ``(|S| / N) * mean(control deltas)`` after each round.

    ``S`` is the clients whose replies are aggregated (every reply given to :meth:`aggregate`,
    also one its rule leaves out of the model's update: its control delta enters ``c``). The
    state records, per client id, the last round whose control delta entered ``c``, and each
    client's fit task carries its own (``scaffold_aggregated``), so that a client commits the
    ``c_i`` of a round only when its delta of that round entered ``c``: a reply lost or rejected
    leaves the client's ``c_i`` as it was, as if it had not trained, and ``c = (1/N) sum_i c_i``
    over the committed ``c_i`` after every round (see
    :mod:`fedguard.algorithms.optimizers.committed`)."""

    inner: FedOpt
    num_clients: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregator", self.inner.aggregator)

    @property
    def client_config(self) -> Mapping[str, messages.Scalar]:
        return self.inner.client_config

    def init(self, params: torch.Tensor) -> ServerState:
        return replace(self.inner.init(params), control=torch.zeros_like(params))

    def restore(self, named: Mapping[str, torch.Tensor]) -> ServerState:
        return ServerState.from_tensors(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        config, _ = self.inner.fit_instructions(state)
        return config, {CONTROL: ServerState.of(state).control}

    def client_instructions(
        self, state: StrategyState, client_id: int
    ) -> dict[str, messages.Scalar]:
        return _told(state, features.SCAFFOLD_STATE, client_id)

    def required_tensors(self, dim: int) -> dict[str, int]:
        return {"control_delta": dim}

    def client_features(self) -> frozenset[str]:
        return self.inner.client_features() | {features.CONTROL_VARIATE}

    def sum_refusal(self) -> str | None:
        return SCAFFOLD_REFUSAL

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        new_state, new_params, _ = self.aggregate_reporting(state, params, replies, round_=round_)
        return new_state, new_params

    def aggregate_reporting(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor, LeftOut | None]:
        """FedAvg's aggregate (with what its rule left out), then the control variate's move."""
        new_state, new_params, left_out = self.inner.aggregate_reporting(
            state, params, replies, round_=round_
        )
        deltas = torch.stack([r.tensors["control_delta"] for r in replies])
        control = scaffold.server_control_update(
            new_state.control, deltas, num_clients=self.num_clients
        )
        new_state = _recorded(replace(new_state, control=control), replies, round_)
        return new_state, new_params, left_out


@dataclass(frozen=True)
class FedDyn(Strategy):
    """FedDyn (Acar et al. 2021, Algorithm 1): every client is told ``alpha`` (its fit config's
    ``feddyn_alpha``) and adds the dynamic regulariser; the server moves ``h`` by the
    participants' updates over the population of ``num_clients`` and sets the model to the mean
    of the participants' models minus ``h / alpha``. The means are unweighted, as in the paper,
    and the model is set, not stepped: no server optimizer or aggregator applies.

    The participants are the clients whose replies are aggregated: the state records, per client
    id, the last round whose update entered ``h``, and each client's fit task carries its own
    (``feddyn_aggregated``), so that a client commits the ``g_k`` of a round only when its update
    of that round was aggregated (a reply lost, rejected or left out does not move ``g_k``; see
    :mod:`fedguard.algorithms.optimizers.committed`, shared with SCAFFOLD)."""

    client_config: Mapping[str, messages.Scalar]
    alpha: float
    num_clients: int

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ValueError(f"FedDyn's alpha must be positive, got {self.alpha}.")
        if self.num_clients < 1:
            raise ValueError(f"FedDyn needs at least one client, got {self.num_clients}.")

    def init(self, params: torch.Tensor) -> ServerState:
        empty = torch.zeros(0, dtype=torch.float32)
        return ServerState(
            server_optimizers.ServerOptimizerState(empty, empty), h=torch.zeros_like(params)
        )

    def restore(self, named: Mapping[str, torch.Tensor]) -> ServerState:
        return ServerState.from_tensors(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        return {**self.client_config, features.FEDDYN_ALPHA: self.alpha}, {}

    def client_instructions(
        self, state: StrategyState, client_id: int
    ) -> dict[str, messages.Scalar]:
        return _told(state, features.FEDDYN_STATE, client_id)

    def client_features(self) -> frozenset[str]:
        return frozenset({features.DYNAMIC_REGULARIZER})

    def sum_refusal(self) -> str | None:
        return FEDDYN_REFUSAL

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        current = ServerState.of(state)
        h, new_params = feddyn.server_update(
            params,
            current.h,
            torch.stack([r.update for r in replies]),
            alpha=self.alpha,
            num_clients=self.num_clients,
        )
        return _recorded(replace(current, h=h), replies, round_), new_params


@dataclass(frozen=True)
class FedNova(Strategy):
    """FedNova (Wang et al. 2020): every client is told to normalise (its fit config's
    ``fednova``) and sends ``d_i = delta_i / ||a_i||_1`` with ``||a_i||_1`` as its ``step_norm``
    tensor; the server takes ``tau_eff sum_i p_i d_i`` (``p_i`` by example counts) through the
    server optimizer ``server``. Only the weighted mean is FedNova's average: no robust rule."""

    server: server_optimizers.ServerOptimizerConfig
    client_config: Mapping[str, messages.Scalar]

    def init(self, params: torch.Tensor) -> ServerState:
        return ServerState(server_optimizers.init(self.server, params))

    def restore(self, named: Mapping[str, torch.Tensor]) -> ServerState:
        return ServerState.from_tensors(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        return {**self.client_config, features.FEDNOVA: True}, {}

    def required_tensors(self, dim: int) -> dict[str, int]:
        return {features.STEP_NORM: 1}

    def client_features(self) -> frozenset[str]:
        return frozenset({features.NORMALIZED_UPDATE})

    def sum_refusal(self) -> str | None:
        return FEDNOVA_REFUSAL

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        current = ServerState.of(state)
        delta = fednova.aggregate(
            torch.stack([r.update for r in replies]),
            torch.cat([r.tensors[features.STEP_NORM].reshape(1) for r in replies]),
            torch.tensor([float(r.num_examples) for r in replies], dtype=torch.float64),
        )
        opt_state, new_params = server_optimizers.apply(
            self.server, current.optimizer, params, delta
        )
        return replace(current, optimizer=opt_state), new_params


@dataclass(frozen=True)
class Newton(Strategy):
    """The pooled Newton step: ``-H^-1 g`` of the sums of the clients' gradients and Hessians
    over their examples, through the server optimizer (FedAvg or FedAvgM)."""

    server: server_optimizers.ServerOptimizerConfig
    client_config: Mapping[str, messages.Scalar]

    def init(self, params: torch.Tensor) -> ServerState:
        return ServerState(server_optimizers.init(self.server, params))

    def restore(self, named: Mapping[str, torch.Tensor]) -> ServerState:
        return ServerState.from_tensors(named)

    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        return dict(self.client_config), {}

    def required_tensors(self, dim: int) -> dict[str, int]:
        return {"gradient_sum": dim, "hessian_sum": dim * dim}

    def client_features(self) -> frozenset[str]:
        return frozenset({features.NEWTON_STATISTICS})

    def sum_refusal(self) -> str | None:
        return NEWTON_REFUSAL

    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[ServerState, torch.Tensor]:
        current = ServerState.of(state)
        weights = torch.tensor([float(r.num_examples) for r in replies])
        gradient = torch.stack([r.tensors["gradient_sum"] for r in replies]).double().sum(0)
        hessian = torch.stack([r.tensors["hessian_sum"] for r in replies]).double().sum(0)
        delta = newton.newton_direction(
            gradient, hessian.view(params.shape[0], -1), float(weights.sum()), damping=1e-8
        )
        opt_state, new_params = server_optimizers.apply(
            self.server, current.optimizer, params, delta
        )
        return replace(current, optimizer=opt_state), new_params


BuiltinStrategy = FedOpt | Scaffold | FedDyn | FedNova | Newton | CentralPrivacy


def create(
    kind: StrategyKind,
    *,
    client_config: Mapping[str, messages.Scalar],
    num_clients: int,
    server_lr: float = 1.0,
    server_momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    feddyn_alpha: float = 0.01,
    central_dp: CentralDP | None = None,
    robust_rule: robust.RobustConfig | None = None,
    aggregator: Aggregator | None = None,
    seed: int = 0,
) -> BuiltinStrategy:
    """The built-in strategy ``kind`` with these settings.

    ``client_config`` with ``optimizer = "newton"`` makes it the Newton step. The updates are
    combined by ``aggregator``, else the robust rule ``robust_rule``, else the weighted mean
    (FedDyn and FedNova combine them their own way and take only the mean);
    ``feddyn_alpha`` is FedDyn's ``alpha``; ``central_dp`` wraps the result in user-level
    DP-FedAvg.
    """
    if robust_rule is not None and aggregator is not None:
        raise ValueError("Give a robust_rule or an aggregator, not both.")
    rule = aggregator
    if rule is None:
        rule = Mean() if robust_rule is None else robust_rules.RobustRule(robust_rule)
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
    base: FedOpt | Scaffold | FedDyn | FedNova | Newton
    if kind in (StrategyKind.FEDDYN, StrategyKind.FEDNOVA) and not isinstance(rule, Mean):
        raise ValueError(
            f'server.strategy = "{kind}" averages the updates its own way (its defining '
            'step); a robust server.aggregator cannot replace it: use "mean"'
        )
    if config.get("optimizer") == "newton":
        if not isinstance(rule, Mean):
            raise ValueError(
                "The Newton step pools gradient and Hessian sums; a robust aggregator cannot "
                "apply to it."
            )
        base = Newton(server, config)
    elif kind is StrategyKind.SCAFFOLD:
        base = Scaffold(FedOpt(server, config, rule, seed), num_clients)
    elif kind is StrategyKind.FEDDYN:
        base = FedDyn(config, feddyn_alpha, num_clients)
    elif kind is StrategyKind.FEDNOVA:
        base = FedNova(server, config)
    else:
        base = FedOpt(server, config, rule, seed)
    return base if central_dp is None else CentralPrivacy(base, central_dp)
