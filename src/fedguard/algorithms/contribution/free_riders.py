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
"""

from __future__ import annotations

import enum
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass

from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as contribution_utility


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
    streaks = dict(state.streaks)
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
        streaks[client] = streaks.get(client, 0) + 1 if value < config.threshold else 0
    return FlagState(types.MappingProxyType(streaks), round_)


def flagged(config: FlagConfig, state: FlagState) -> frozenset[int]:
    """The clients whose streak has reached ``patience`` scored rounds."""
    return frozenset(c for c, streak in state.streaks.items() if streak >= config.patience)


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
