"""Flag free riders and low-quality clients: a score that stays below a threshold for a while.

A free rider sends an update that contributes nothing (zero, stale or random) in the hope of a
share of the reward; a client with mislabelled or useless data sends one that hurts. Both show up
as a contribution score near or below zero round after round (Lin, Du and Liu, "Free-riders in
Federated Learning: Attacks and Defenses", arXiv 1911.12560, 2019, describe the attack). One low
score is not evidence: a good client's marginal value is small in a round where others already
carried the model. So a client is flagged only when its score stays below ``threshold`` for
``patience`` consecutive rounds in which it was scored:

* ``Signal.ROUND``: the client's score in each of those rounds is below the threshold;
* ``Signal.CUMULATIVE``: its cumulative score (see :mod:`ledger`) after each of them is.

Rounds a client did not take part in, or that were not scored, neither extend nor break its
streak; one scored round at or above the threshold resets it to 0 (and so lifts the flag). The
state is an immutable value with a JSON form, like the ledger's.

**The update test** (:func:`update_evidence`) flags from the updates themselves, not from a
score: a round's update is *suspect* when its norm is below ``min_norm_ratio`` times the round's
median update norm (a zero update always is), or, when ``min_cosine`` is set, when its cosine
with the example-weighted mean of the *other* clients' updates is below ``min_cosine``. The same
streak (:func:`record`) turns ``patience`` suspect rounds in a row into a flag. Why a norm test
and not the score: a utility-based score values what the server does with an update, and a zero
update with a real example count *shortens* the averaged step, which raises the validation
utility in rounds where the others overshoot (measured on the medical example: a free rider
scored +0.76 by GTG-Shapley while honest single-class hospitals scored below 0). A free rider
that returns the global model sends exactly zero, whatever the partition; an honest client that
trains at all does not (measured there: the smallest honest hospital, 24 images, 0.26 to 0.41 of
the median norm over 10 rounds of seed 0). The cosine test is off by default because on
non-IID data honest clients disagree with the rest: hospitals holding mostly one class had
cosines with the others' mean down to -0.92 (measured), as low as a label-flipping attacker's
would be on IID data.

What the test can see under privacy mechanisms: under secure aggregation nothing (the server
holds only the sum; per-client tests are refused before round 1). Under central DP the updates
are clipped, not noised, before they leave the client, so a zero update stays zero and the test
works as without DP. Under local DP each honest update carries its client's DP-SGD noise. A free
rider that skips training *and* noise still sends zero and is flagged. One that sends the noise
alone has a norm close to an honest client's whenever the noise dominates (the norm test cannot
see it), and its cosine with the others is of order ``1/sqrt(D)`` (the noise is independent of
them), which honest non-IID clients also reach; telling it apart needs the expected norm of the
noise itself, which this test does not model.
"""

from __future__ import annotations

import enum
import math
import statistics
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedguard.algorithms import finite
from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as contribution_utility

CHUNK = 1 << 16  # columns per float64 block in update_evidence: bounded extra memory


class Rule(enum.StrEnum):
    """Which evidence flags a client."""

    SCORE = "score"  # its contribution score (FlagConfig's threshold and signal)
    UPDATE = "update"  # its update (UpdateTest)
    EITHER = "either"  # whichever of the two reaches the patience first


class Signal(enum.StrEnum):
    ROUND = "round"  # the client's score in the round
    CUMULATIVE = "cumulative"  # the client's cumulative score after the round


@dataclass(frozen=True)
class FlagConfig:
    """Flag a client whose ``signal`` is below ``threshold`` for ``patience`` scored rounds in a row."""

    threshold: float
    patience: int
    signal: Signal = Signal.ROUND

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise contribution_utility.ContributionError(
                f"The free-rider threshold must be finite, got {self.threshold}."
            )
        if not contribution_ledger.is_count(self.patience) or self.patience < 1:
            raise contribution_utility.ContributionError(
                f"The free-rider patience must be an integer >= 1 rounds, got {self.patience!r}."
            )


@dataclass(frozen=True)
class FlagState:
    """Per client: how many of its latest scored rounds in a row were below the threshold."""

    streaks: Mapping[int, int]
    last_round: int | None


def empty() -> FlagState:
    """The state before any round was scored."""
    return FlagState(types.MappingProxyType({}), None)


def update(
    config: FlagConfig,
    state: FlagState,
    round_: int,
    scores: Mapping[int, float],
    cumulative: Mapping[int, float] | None = None,
) -> FlagState:
    """The state after round ``round_``, whose participants scored ``scores`` (client -> score).

    With ``Signal.CUMULATIVE``, ``cumulative`` holds each participant's cumulative score after
    this round (the ledger's ``cumulative`` once the round is recorded).
    """
    contribution_ledger.check_round(round_, state.last_round)
    if config.signal is Signal.CUMULATIVE and cumulative is None:
        raise contribution_utility.ContributionError(
            "Flagging on the cumulative score needs the cumulative scores after the round."
        )
    below: dict[int, bool] = {}
    for client, score in scores.items():
        contribution_ledger.check_client(client)
        value = score
        if cumulative is not None and config.signal is Signal.CUMULATIVE:
            if client not in cumulative:
                raise contribution_utility.ContributionError(
                    f"Client {client} was scored in round {round_} but has no cumulative score."
                )
            value = cumulative[client]
        if not math.isfinite(value):
            raise contribution_utility.ContributionError(
                f"Client {client}'s {config.signal} score in round {round_} is {value}."
            )
        below[client] = value < config.threshold
    return record(state, round_, below)


def record(state: FlagState, round_: int, suspect: Mapping[int, bool]) -> FlagState:
    """The state after round ``round_``, in which each client of ``suspect`` took part and was
    (True) or was not (False) suspect: a suspect round extends the client's streak by one, any
    other resets it to 0; clients not named keep theirs."""
    contribution_ledger.check_round(round_, state.last_round)
    streaks = dict(state.streaks)
    for client, bad in suspect.items():
        contribution_ledger.check_client(client)
        streaks[client] = streaks.get(client, 0) + 1 if bad else 0
    return FlagState(types.MappingProxyType(streaks), round_)


def flagged(config: FlagConfig, state: FlagState) -> frozenset[int]:
    """The clients whose streak has reached ``patience`` scored rounds."""
    return reached(config.patience, state)


def reached(patience: int, state: FlagState) -> frozenset[int]:
    """The clients whose streak has reached ``patience`` rounds."""
    return frozenset(c for c, streak in state.streaks.items() if streak >= patience)


@dataclass(frozen=True)
class UpdateTest:
    """When a round's update is suspect: its norm below ``min_norm_ratio`` times the round's
    median norm (a zero update always), or, with ``min_cosine`` set, its cosine with the
    weighted mean of the other clients' updates below ``min_cosine``."""

    min_norm_ratio: float = 0.01
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_norm_ratio) and 0.0 <= self.min_norm_ratio < 1.0):
            raise contribution_utility.ContributionError(
                "The update test's min_norm_ratio is a fraction of the round's median update "
                f"norm in [0, 1), got {self.min_norm_ratio}."
            )
        if self.min_cosine is not None and not (
            math.isfinite(self.min_cosine) and -1.0 <= self.min_cosine <= 1.0
        ):
            raise contribution_utility.ContributionError(
                f"The update test's min_cosine is a cosine in [-1, 1], got {self.min_cosine}."
            )


@dataclass(frozen=True)
class UpdateEvidence:
    """Per update of a round (in row order): what the update test measured and its verdict.

    ``norm_ratios[k] = ||u_k|| / median_j ||u_j||`` (None when the median is 0 and ``u_k`` is
    not zero: nothing to compare it with); ``cosines[k] = cos(u_k, sum_{j != k} w_j u_j)`` (0 for
    a zero ``u_k``; None when the others' weighted sum is zero or there are no others).
    """

    norms: tuple[float, ...]
    median_norm: float
    norm_ratios: tuple[float | None, ...]
    cosines: tuple[float | None, ...]
    suspect: tuple[bool, ...]


def update_evidence(
    updates: torch.Tensor, weights: torch.Tensor, test: UpdateTest
) -> UpdateEvidence:
    """The update test on one round's updates ``[K, D]`` with their claimed example counts
    ``weights [K]`` (the weights of the others' mean; the norm test ignores them).

    Norms, dot products and the others' sums are accumulated in float64, block by block over the
    columns; the others' sum is formed per coordinate (the total minus the client's own term),
    so that it is exactly zero when every other update is.
    """
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise contribution_utility.ContributionError(
            f"Updates must be a non-empty [K, D] matrix, got shape {tuple(updates.shape)}."
        )
    k = updates.shape[0]
    if weights.shape != (k,):
        raise contribution_utility.ContributionError(
            f"Expected {k} weights, one per update, got shape {tuple(weights.shape)}."
        )
    if not finite.all_finite(updates):
        raise contribution_utility.ContributionError("The updates contain NaN or infinite values.")
    w = weights.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise contribution_utility.ContributionError(
            f"The weights must be finite and >= 0, got {weights.tolist()}."
        )
    row_sq = torch.zeros(k, dtype=torch.float64)
    dots = torch.zeros(k, dtype=torch.float64)
    others_sq = torch.zeros(k, dtype=torch.float64)
    for start in range(0, updates.shape[1], CHUNK):
        block = updates[:, start : start + CHUNK].to(torch.float64)
        own = w[:, None] * block
        others = own.sum(dim=0, keepdim=True) - own  # row k: sum over j != k of w_j u_j
        row_sq += (block * block).sum(dim=1)
        dots += (block * others).sum(dim=1)
        others_sq += (others * others).sum(dim=1)
    norms = row_sq.sqrt().tolist()
    median = statistics.median(norms)
    ratios: list[float | None] = []
    cosines: list[float | None] = []
    suspect: list[bool] = []
    for i in range(k):
        norm = norms[i]
        ratio = norm / median if median > 0 else (0.0 if norm == 0 else None)
        if norm == 0:
            cos: float | None = 0.0
        elif others_sq[i] > 0:
            value = float(dots[i] / (row_sq[i].sqrt() * others_sq[i].sqrt()))
            cos = min(1.0, max(-1.0, value))  # rounding can carry a parallel pair past 1
        else:
            cos = None
        low_norm = norm == 0 or (ratio is not None and ratio < test.min_norm_ratio)
        misaligned = test.min_cosine is not None and cos is not None and cos < test.min_cosine
        ratios.append(ratio)
        cosines.append(cos)
        suspect.append(low_norm or misaligned)
    return UpdateEvidence(tuple(norms), median, tuple(ratios), tuple(cosines), tuple(suspect))


def to_json(state: FlagState) -> dict[str, object]:
    """A JSON-compatible object that :func:`from_json` turns back into an equal state."""
    return {
        "last_round": state.last_round,
        "streaks": [{"client": c, "streak": state.streaks[c]} for c in sorted(state.streaks)],
    }


def from_json(data: object) -> FlagState:
    """The state that :func:`to_json` wrote; ``ContributionError`` for anything else."""
    if not isinstance(data, dict) or set(data) != {"last_round", "streaks"}:
        raise contribution_utility.ContributionError(
            "A free-rider state is an object with exactly 'last_round' and 'streaks'."
        )
    last_round, rows = data["last_round"], data["streaks"]
    if last_round is not None and not contribution_ledger.is_count(last_round):
        raise contribution_utility.ContributionError(
            f"The free-rider state's last_round must be null or a round number, got {last_round!r}."
        )
    if not isinstance(rows, list):
        raise contribution_utility.ContributionError("The free-rider 'streaks' must be a list.")
    streaks: dict[int, int] = {}
    for row in rows:
        if (
            not isinstance(row, dict)
            or set(row) != {"client", "streak"}
            or not contribution_ledger.is_count(row["client"])
            or row["client"] in streaks
            or not contribution_ledger.is_count(row["streak"])
        ):
            raise contribution_utility.ContributionError(f"Not a valid free-rider row: {row!r}.")
        streaks[row["client"]] = row["streak"]
    return FlagState(types.MappingProxyType(streaks), last_round)
