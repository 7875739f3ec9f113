"""Byzantine-robust aggregation: one enum, one config, one ``(init, apply)`` pair over all rules.

A strategy picks a rule by ``RobustAggregator`` and calls ``apply`` each round in place of the plain
weighted mean. The rules themselves live in three modules, each citing its paper:

* ``robust_coordinate``: coordinate-wise median and trimmed mean (Yin et al. 2018);
* ``robust_distance``: Krum and Multi-Krum (Blanchard et al. 2017), Bulyan (El Mhamdi et al. 2018);
* ``robust_iterative``: geometric median (Pillutla et al. 2022), centered clipping (Karimireddy et
  al. 2021) and norm bounding (Sun et al. 2019).

Any rule that compares individual updates can run on bucket means instead (``bucket_size``,
``robust_bucketing``: Karimireddy et al. 2022), the fix for non-IID clients whose honest updates
look like outliers to the rule.

``f`` is the number of Byzantine clients the rule must tolerate among the ``K`` updates of a round;
each rule refuses a ``(K, f)`` outside its guarantee with one sentence (``RobustnessError``).
Centered clipping carries state across rounds: its reference point is the previous aggregate, kept
in ``RobustState``; the other rules leave the state empty.

:func:`apply_selecting` also says which updates the rule left out (:class:`Selection`): Krum keeps
one update, Multi-Krum ``m`` and Bulyan's repeated Krum ``K - 2f``, the others take no part in
the aggregate; on bucket means, every update of a bucket left out is. The coordinate-wise rules
and the damping ones (geometric median, centered clipping, norm bounding) leave no whole update
out; the trimmed mean reports instead the share of each update's coordinates it cut.

Only norm bounding can run under secure aggregation: its clip is applied by each client to its own
update, and the server needs nothing but the sum. Every other rule compares individual updates.

The ``weights`` of :func:`apply` must be ones the server can vouch for: a Byzantine client's
claimed example count is no more trustworthy than its update, and with claimed weights one client
claiming 10^12 examples is the weighted majority (the weighted geometric median returns its
update). The strategy therefore passes equal weights (see :mod:`fedguard.protocol.strategy`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fedguard.algorithms import seeding
from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import bucketing as robust_bucketing
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.robust import iterative as robust_iterative

BUCKET_STREAM = 0xB0C7  # the seeding stream of the bucket shuffles


class RobustAggregator(enum.StrEnum):
    KRUM = "krum"
    MULTI_KRUM = "multi_krum"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    BULYAN = "bulyan"
    GEOMETRIC_MEDIAN = "geometric_median"
    CENTERED_CLIPPING = "centered_clipping"
    NORM_BOUNDING = "norm_bounding"


@dataclass(frozen=True)
class RobustConfig:
    """A robust rule and its hyperparameters; fields a rule does not use are ignored by it."""

    kind: RobustAggregator
    f: int = 0  # Byzantine clients tolerated per round
    multi_krum_m: int | None = None  # updates Multi-Krum averages; None: K - f
    nu: float = 1e-6  # geometric median: Weiszfeld smoothing
    max_iterations: int = 1000  # geometric median (each iteration is O(K^2))
    tolerance: float = 1e-6  # geometric median: step / median distance
    tau: float = 10.0  # centered clipping radius
    clipping_iterations: int = 1  # centered clipping L
    norm_bound: float | None = None  # norm bounding M (required for that rule)
    bucket_size: int = 1  # > 1: the rule sees means of random buckets of this many updates
    seed: int = 0  # the buckets' shuffles

    def __post_init__(self) -> None:
        robust_base.check_f(self.f)
        robust_bucketing.check_size(self.bucket_size)
        if self.bucket_size > 1 and not needs_individual_updates(self.kind):
            raise robust_base.RobustnessError(
                "Norm bounding clips each client's own update; bucketing would clip bucket means "
                "instead and lose that bound."
            )
        if self.multi_krum_m is not None and self.multi_krum_m < 1:
            raise robust_base.RobustnessError(
                f"multi_krum_m must be at least 1, got {self.multi_krum_m}."
            )
        if not self.nu > 0 or not self.tolerance > 0 or self.max_iterations < 1:
            raise robust_base.RobustnessError(
                "The geometric median needs nu > 0, tolerance > 0 and max_iterations >= 1, got "
                f"{self.nu}, {self.tolerance} and {self.max_iterations}."
            )
        if not self.tau > 0 or self.clipping_iterations < 1:
            raise robust_base.RobustnessError(
                "Centered clipping needs tau > 0 and clipping_iterations >= 1, got "
                f"{self.tau} and {self.clipping_iterations}."
            )
        if self.kind is RobustAggregator.NORM_BOUNDING and self.norm_bound is None:
            raise robust_base.RobustnessError("Norm bounding needs a norm_bound; none was given.")
        if self.norm_bound is not None and not self.norm_bound > 0:
            raise robust_base.RobustnessError(
                f"The norm bound must be positive, got {self.norm_bound}."
            )


@dataclass(frozen=True)
class RobustState:
    """Centered clipping's reference point ``[D]`` (an empty tensor for the stateless rules)."""

    reference: torch.Tensor


def needs_individual_updates(kind: RobustAggregator) -> bool:
    """Whether the server must see each update (so the rule cannot run under secure aggregation)."""
    return kind is not RobustAggregator.NORM_BOUNDING


def max_byzantine(kind: RobustAggregator, k: int, bucket_size: int = 1) -> int:
    """The largest ``f`` the rule accepts with ``K`` updates (negative: not even ``f = 0``).

    With buckets the rule sees ``ceil(K / bucket_size)`` bucket means, each Byzantine client
    spoiling at most one of them.
    """
    k = robust_bucketing.bucket_count(k, bucket_size)
    if kind in (RobustAggregator.KRUM, RobustAggregator.MULTI_KRUM):
        return (k - 3) // 2  # K > 2f + 2
    if kind is RobustAggregator.BULYAN:
        return (k - 3) // 4  # K >= 4f + 3
    return (k - 1) // 2  # K > 2f


def init(config: RobustConfig, dim: int) -> RobustState:
    """The state before the first round, for updates of length ``dim``."""
    if config.kind is RobustAggregator.CENTERED_CLIPPING:
        return RobustState(torch.zeros(dim, dtype=torch.float32))
    return RobustState(torch.zeros(0, dtype=torch.float32))


@dataclass(frozen=True)
class Selection:
    """What a rule left out of one round's aggregate, by row of the ``[K, D]`` updates it got.

    ``selects``: whether the rule picks whole updates (Krum, Multi-Krum, Bulyan). When it does not,
    an empty ``excluded`` means "this rule leaves no whole update out", not "every update was
    chosen on its merits". ``excluded``: the rows that took no part in the aggregate, ascending.
    ``trimmed``: for the trimmed mean, each row's share of coordinates cut (with buckets, the
    share of its bucket mean's coordinates); None for the other rules.
    """

    selects: bool
    excluded: tuple[int, ...] = ()
    trimmed: tuple[float, ...] | None = None


# The rules that pick whole updates, so that the others are left out.
SELECTING = frozenset({RobustAggregator.KRUM, RobustAggregator.MULTI_KRUM, RobustAggregator.BULYAN})


def apply(
    config: RobustConfig,
    state: RobustState,
    updates: torch.Tensor,
    weights: torch.Tensor,
    *,
    round_: int = 0,
) -> tuple[RobustState, torch.Tensor]:
    """One round: the new state and the robust aggregate ``[D]`` of ``updates [K, D]``.

    ``round_`` picks the round's bucket shuffle (with ``bucket_size > 1``), so a resumed run
    aggregates as an uninterrupted one.
    """
    new, out, _ = apply_selecting(config, state, updates, weights, round_=round_)
    return new, out


def apply_selecting(
    config: RobustConfig,
    state: RobustState,
    updates: torch.Tensor,
    weights: torch.Tensor,
    *,
    round_: int = 0,
) -> tuple[RobustState, torch.Tensor, Selection]:
    """:func:`apply`, and which of the ``K`` updates the rule left out (:class:`Selection`)."""
    robust_base.check_updates(updates)
    robust_base.normalised_weights(weights, updates.shape[0])
    k = updates.shape[0]
    members = [[row] for row in range(k)]
    if config.bucket_size > 1:
        shuffle = seeding.generator(config.seed, round_, BUCKET_STREAM)
        updates, weights = robust_bucketing.bucket_means(
            updates, weights, config.bucket_size, shuffle
        )
        again = seeding.generator(config.seed, round_, BUCKET_STREAM)  # the same shuffle
        members = robust_bucketing.bucket_members(k, config.bucket_size, again)
    if config.kind is RobustAggregator.CENTERED_CLIPPING:
        out = robust_iterative.centered_clipping(
            updates,
            weights,
            f=config.f,
            reference=state.reference,
            tau=config.tau,
            iterations=config.clipping_iterations,
        )
        return RobustState(out), out, Selection(selects=False)
    out, kept, trimmed = _stateless(config, updates, weights)
    return state, out, _by_row(config.kind, k, members, kept, trimmed)


def _by_row(
    kind: RobustAggregator,
    k: int,
    members: list[list[int]],
    kept: list[int] | None,
    trimmed: torch.Tensor | None,
) -> Selection:
    """A rule's choice among its inputs (updates or bucket means) as a :class:`Selection` of
    the ``k`` updates, each bucket's verdict going to every row in it."""
    excluded: tuple[int, ...] = ()
    if kept is not None:
        chosen = set(kept)
        left = [row for b, rows in enumerate(members) if b not in chosen for row in rows]
        excluded = tuple(sorted(left))
    shares = None
    if trimmed is not None:
        by_row = [0.0] * k
        for b, rows in enumerate(members):
            for row in rows:
                by_row[row] = float(trimmed[b])
        shares = tuple(by_row)
    return Selection(selects=kind in SELECTING, excluded=excluded, trimmed=shares)


def _stateless(
    config: RobustConfig, updates: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
    """The aggregate, the input rows a selecting rule kept (None for the others) and the
    trimmed mean's cut share per input row (None for the others)."""
    kind, f = config.kind, config.f
    if kind is RobustAggregator.KRUM:
        out, kept = robust_distance.krum_selecting(updates, f=f)
        return out, kept, None
    if kind is RobustAggregator.MULTI_KRUM:
        m = config.multi_krum_m if config.multi_krum_m is not None else updates.shape[0] - f
        out, kept = robust_distance.multi_krum_selecting(updates, weights, f=f, m=m)
        return out, kept, None
    if kind is RobustAggregator.BULYAN:
        out, kept = robust_distance.bulyan_selecting(updates, f=f)
        return out, kept, None
    if kind is RobustAggregator.TRIMMED_MEAN:
        out, shares = robust_coordinate.trimmed_mean_reporting(updates, f=f)
        return out, None, shares
    return _damping(config, updates, weights), None, None


def _damping(config: RobustConfig, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The rules that leave no update out: the median, the geometric median, norm bounding."""
    kind, f = config.kind, config.f
    if kind is RobustAggregator.MEDIAN:
        return robust_coordinate.coordinate_median(updates, f=f)
    if kind is RobustAggregator.GEOMETRIC_MEDIAN:
        return robust_iterative.geometric_median(
            updates,
            weights,
            f=f,
            nu=config.nu,
            max_iterations=config.max_iterations,
            tolerance=config.tolerance,
        ).aggregate
    if kind is RobustAggregator.NORM_BOUNDING:
        if config.norm_bound is None:  # RobustConfig refuses this
            raise robust_base.RobustnessError("Norm bounding needs a norm_bound; none was given.")
        return robust_iterative.norm_bounding(updates, weights, f=f, bound=config.norm_bound)
    raise robust_base.RobustnessError(f"Unknown robust aggregator {kind!r}.")
