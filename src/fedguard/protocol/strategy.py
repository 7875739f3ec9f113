"""The public ``Strategy`` protocol: the server half of a federated optimizer, per round.

A strategy is configured once and then used per round (Flower's ``configure_fit`` /
``aggregate_fit`` granularity): :meth:`Strategy.fit_instructions` says what the sampled clients
run (the client half: FedProx's proximal term, SCAFFOLD's control variate), with
:meth:`Strategy.client_instructions` adding what one client is told of its own, and
:meth:`Strategy.aggregate` turns the accepted replies into the next global model. Under secure
aggregation the server never sees a reply, only the sum of the clipped, weighted updates;
:meth:`Strategy.aggregate_sum` takes that sum instead. Its state between rounds is a mapping of
named tensors, which the run checkpoints under ``server.<name>`` and gives back through
:meth:`Strategy.restore` on ``--resume``.

fedguard's own strategies implement the same protocol (:mod:`fedguard.protocol.fedopt`: FedAvg,
FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, SCAFFOLD, FedDyn, FedNova and the Newton step),
and user-level
central DP is a layer that wraps any strategy with a sum path
(:mod:`fedguard.protocol.central_dp`). A strategy combines updates with an
:class:`~fedguard.protocol.aggregator.Aggregator`: the weighted mean, or a Byzantine-robust rule
in its place.

Weights. A reply's ``num_examples`` is the client's own claim. The plain mean weighs by it, after
the round driver has rejected claims that are not finite and positive and cut each to the client's
registered size. A robust rule gives every update the same weight: a claimed size buys no
influence. That is how Krum, the median, the trimmed mean and Bulyan are defined, and for the
weighted rules (geometric median, centered clipping, norm bounding, Multi-Krum's average) it is
what keeps their guarantee, which counts clients: with claimed weights one liar holding most of
the weight is the weighted majority, and the geometric median then returns its update.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedguard.algorithms import seeding
from fedguard.algorithms.optimizers import server as server_optimizers
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.protocol import messages
from fedguard.protocol.aggregator import Aggregator, AggregatorState, LeftOut, label

CONTROL = "control"
FEDDYN_H = "feddyn.h"  # FedDyn's server state h
# FedDyn's h and SCAFFOLD's c: per client id, the last round whose update entered it
AGGREGATED = "aggregated"
_FEDDYN_AGGREGATED = "feddyn.aggregated"  # its name in FedDyn's checkpoints before SCAFFOLD's
CLIP_NORM = messages.DP_CLIP_NORM
AGGREGATOR_PREFIX = "robust."  # checkpoint names of the aggregator's state
ROBUST_REFERENCE = "robust.reference"

# A strategy's state between rounds: named tensors, checkpointed as "server.<name>".
StrategyState = Mapping[str, torch.Tensor]


class StrategyKind(enum.StrEnum):
    """The built-in strategies by their configuration names (``server.strategy``)."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    SCAFFOLD = "scaffold"
    FEDDYN = "feddyn"
    FEDNOVA = "fednova"


class Strategy(abc.ABC):
    """What the server does each round: instruct the clients, aggregate their replies.

    Subclasses implement :meth:`init`, :meth:`fit_instructions` and :meth:`aggregate`; a strategy
    that can run under secure aggregation or central DP also implements :meth:`aggregate_sum`.
    ``aggregator`` is the rule it combines updates with (None: it combines them its own way, so
    ``server.aggregator`` cannot apply to it); the composition checks read it.
    """

    aggregator: Aggregator | None = None

    @abc.abstractmethod
    def init(self, params: torch.Tensor) -> StrategyState:
        """The state before the first round, for the global parameters ``params [D]``."""

    def restore(self, named: Mapping[str, torch.Tensor]) -> StrategyState:
        """The state a checkpoint saved (the tensors of :meth:`init`'s or :meth:`aggregate`'s
        state, by name)."""
        return dict(named)

    @abc.abstractmethod
    def fit_instructions(
        self, state: StrategyState
    ) -> tuple[dict[str, messages.Scalar], dict[str, torch.Tensor]]:
        """The config and tensors every sampled client receives this round (the config reaches
        the client's :class:`~fedguard.client.trainer.ClientTrainer` as its task's config)."""

    @abc.abstractmethod
    def aggregate(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        """The next state and global parameters from the round's accepted replies.

        The replies are checked (finite, the right size, with :meth:`required_tensors`) and
        their ``num_examples`` capped at the clients' registered sizes by the round driver.
        """

    def client_instructions(
        self, state: StrategyState, client_id: int
    ) -> dict[str, messages.Scalar]:
        """Config entries for one sampled client, beside :meth:`fit_instructions`' (none by
        default): what the server says to each client of its own (SCAFFOLD, FedDyn: the last round
        whose update of that client entered ``c`` or ``h``)."""
        return {}

    def aggregate_reporting(
        self,
        state: StrategyState,
        params: torch.Tensor,
        replies: Sequence[messages.FitReply],
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor, LeftOut | None]:
        """:meth:`aggregate`, and which clients' updates its aggregator left out (None: it does
        not say). The round driver calls this; a strategy whose aggregator selects overrides it
        (fedguard's own do) and has :meth:`aggregate` drop the report."""
        new_state, new_params = self.aggregate(state, params, replies, round_=round_)
        return new_state, new_params, None

    def aggregate_sum(
        self,
        state: StrategyState,
        params: torch.Tensor,
        total: torch.Tensor,
        weight: float,
        *,
        round_: int = 0,
    ) -> tuple[StrategyState, torch.Tensor]:
        """The next state and parameters from a sum: ``total = sum_u w_u x_u`` over the clients'
        clipped updates ``x_u`` and ``weight = sum_u w_u``. Secure aggregation hands over its
        unmasked sum; central DP its noised sum over a fixed denominator."""
        raise ValueError(f"Secure aggregation cannot serve this strategy: {self.sum_refusal()}.")

    def required_tensors(self, dim: int) -> dict[str, int]:
        """Tensors every fit reply must carry, with their lengths (none by default)."""
        return {}

    def client_features(self) -> frozenset[str]:
        """What the clients' trainer must apply (see :mod:`fedguard.client.trainer`)."""
        return frozenset()

    def sum_refusal(self) -> str | None:
        """Why this strategy cannot aggregate a sum of updates, or None if it can (by default:
        it can if it implements :meth:`aggregate_sum`)."""
        if type(self).aggregate_sum is Strategy.aggregate_sum:
            return f"{type(self).__name__} does not implement aggregate_sum, the path for a sum"
        return None

    def secure_aggregation_refusal(self) -> str | None:
        """Why this strategy (with its aggregator) cannot run under secure aggregation, or None."""
        aggregator = self.aggregator
        if aggregator is not None and aggregator.needs_individual_updates:
            return (
                f'server.aggregator = "{label(aggregator)}" compares individual updates, which '
                'secure aggregation hides; use "norm_bounding" (each client clips its own '
                "update) or turn secure aggregation off"
            )
        return self.sum_refusal()


def _empty() -> torch.Tensor:
    return torch.zeros(0)


@dataclass(frozen=True)
class ServerState(Mapping[str, torch.Tensor]):
    """The built-in strategies' state: the server optimizer's moments, SCAFFOLD's control variate,
    central DP's clip, the aggregator's state, FedDyn's ``h`` and, for SCAFFOLD's control variate
    or FedDyn's ``h``, the record of the last round whose update of each client entered it (see
    :mod:`fedguard.algorithms.optimizers.committed`); a mapping of named tensors like any
    strategy's state (empty tensors for the parts a strategy does not use)."""

    optimizer: server_optimizers.ServerOptimizerState
    control: torch.Tensor = field(default_factory=_empty)
    clip_norm: torch.Tensor = field(default_factory=_empty)  # central DP: [1]
    aggregator: AggregatorState = field(default_factory=dict)  # centered clipping: reference [D]
    h: torch.Tensor = field(default_factory=_empty)  # FedDyn: [D]
    # SCAFFOLD, FedDyn: per client id the last round whose update entered c or h, int64 (0: none)
    aggregated: torch.Tensor = field(default_factory=_empty)

    @property
    def robust_reference(self) -> torch.Tensor:
        """Centered clipping's reference point (empty for the other rules)."""
        return self.aggregator.get(ROBUST_REFERENCE.removeprefix(AGGREGATOR_PREFIX), _empty())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors for a checkpoint."""
        named = {
            "optimizer.m": self.optimizer.m,
            "optimizer.v": self.optimizer.v,
            CONTROL: self.control,
            CLIP_NORM: self.clip_norm,
            FEDDYN_H: self.h,
            AGGREGATED: self.aggregated,
        }
        named.update({AGGREGATOR_PREFIX + k: v for k, v in self.aggregator.items()})
        return named

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors())

    def __len__(self) -> int:
        return len(self.tensors())

    @classmethod
    def from_tensors(cls, named: Mapping[str, torch.Tensor]) -> ServerState:
        """The state saved by :meth:`tensors`; checkpoints from before a key existed load with
        that part empty (FedDyn's record under its earlier name)."""
        opt = server_optimizers.ServerOptimizerState(named["optimizer.m"], named["optimizer.v"])
        aggregator = {
            k.removeprefix(AGGREGATOR_PREFIX): v
            for k, v in named.items()
            if k.startswith(AGGREGATOR_PREFIX)
        }
        return cls(
            opt,
            named[CONTROL],
            named.get(CLIP_NORM, _empty()),
            aggregator,
            named.get(FEDDYN_H, _empty()),
            named.get(AGGREGATED, named.get(_FEDDYN_AGGREGATED, _empty())),
        )

    @classmethod
    def of(cls, state: StrategyState) -> ServerState:
        """``state`` as a :class:`ServerState` (a restored checkpoint is a plain mapping)."""
        return state if isinstance(state, ServerState) else cls.from_tensors(state)


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

    def noisy_sum(
        self, total: torch.Tensor, clip_norm: float, generator: torch.Generator
    ) -> torch.Tensor:
        """The sum of clipped updates with Gaussian noise of std ``update_noise_multiplier *
        clip_norm``, in float64 (the strategy divides it by the fixed ``expected_clients``)."""
        return dp_fedavg.noisy_sum(
            total.double(),
            clip_norm=clip_norm,
            noise_multiplier=self.update_noise_multiplier,
            generator=generator,
        )

    def generator(self, round_: int) -> torch.Generator:
        """The noise of one round: seeded, so a resumed run repeats an uninterrupted one."""
        return seeding.generator(self.seed, round_, 0xD9)
