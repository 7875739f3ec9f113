"""Contribution scores accumulated over rounds, per client, in a state that survives checkpoints.

A client takes part in some rounds and not others; in each round it took part in and that was
scored, its score (exact or GTG-Shapley, leave-one-out, cosine: whichever the run uses) is added
to its cumulative score. Song, Tong and Wei (IEEE Big Data 2019) and GTG-Shapley (Liu et al.,
ACM TIST 2022) value a participant over a whole training run as this sum of per-round values.

The ledger is an immutable value: :func:`record` returns a new one. It refuses to record a round
twice or out of order (a resumed run must not count a round again), and it converts to and from
a JSON-compatible object (:func:`to_json`, :func:`from_json`) with the exact floats.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

from fedguard.algorithms.contribution import utility as contribution_utility


@dataclass(frozen=True)
class Ledger:
    """Per client: the sum of its round scores and the number of scored rounds it took part in.

    ``last_round`` is the latest round recorded (None before the first).
    """

    cumulative: Mapping[int, float]
    rounds: Mapping[int, int]
    last_round: int | None


def empty() -> Ledger:
    """The ledger before any round was scored."""
    return Ledger(types.MappingProxyType({}), types.MappingProxyType({}), None)


def record(ledger: Ledger, round_: int, scores: Mapping[int, float]) -> Ledger:
    """The ledger after adding round ``round_``'s ``scores`` (client id -> score).

    Rounds must be recorded in increasing order, each at most once. A round that was not scored
    (for instance one GTG-Shapley skipped by between-round truncation) is best not recorded, so
    that ``rounds`` counts only rounds that measured something.
    """
    check_round(round_, ledger.last_round)
    cumulative = dict(ledger.cumulative)
    rounds = dict(ledger.rounds)
    for client, score in scores.items():
        check_client(client)
        if not math.isfinite(score):
            raise contribution_utility.ContributionError(
                f"Client {client}'s score in round {round_} is {score}; scores must be finite."
            )
        cumulative[client] = cumulative.get(client, 0.0) + float(score)
        rounds[client] = rounds.get(client, 0) + 1
    return Ledger(types.MappingProxyType(cumulative), types.MappingProxyType(rounds), round_)


def to_json(ledger: Ledger) -> dict[str, object]:
    """A JSON-compatible object that :func:`from_json` turns back into an equal ledger."""
    return {
        "last_round": ledger.last_round,
        "clients": [
            {"client": c, "cumulative": ledger.cumulative[c], "rounds": ledger.rounds[c]}
            for c in sorted(ledger.cumulative)
        ],
    }


def from_json(data: object) -> Ledger:
    """The ledger that :func:`to_json` wrote; ``ContributionError`` for anything else."""
    if not isinstance(data, dict) or set(data) != {"last_round", "clients"}:
        raise contribution_utility.ContributionError(
            "A contribution ledger is an object with exactly 'last_round' and 'clients'."
        )
    last_round, rows = data["last_round"], data["clients"]
    if last_round is not None and not is_count(last_round):
        raise contribution_utility.ContributionError(
            f"The ledger's last_round must be null or a round number, got {last_round!r}."
        )
    if not isinstance(rows, list):
        raise contribution_utility.ContributionError("The ledger's 'clients' must be a list.")
    cumulative: dict[int, float] = {}
    rounds: dict[int, int] = {}
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"client", "cumulative", "rounds"}:
            raise contribution_utility.ContributionError(
                f"A ledger row has exactly 'client', 'cumulative' and 'rounds', got {row!r}."
            )
        client, total, count = row["client"], row["cumulative"], row["rounds"]
        if (
            not is_count(client)
            or client in cumulative
            or isinstance(total, bool)
            or not isinstance(total, int | float)
            or not math.isfinite(total)
            or not is_count(count)
            or count < 1
        ):
            raise contribution_utility.ContributionError(f"Not a valid ledger row: {row!r}.")
        cumulative[client] = float(total)
        rounds[client] = count
    return Ledger(types.MappingProxyType(cumulative), types.MappingProxyType(rounds), last_round)


def check_round(round_: int, last_round: int | None) -> None:
    """Refuse a round number that is not an integer >= 0 or not after ``last_round``."""
    if not is_count(round_):
        raise contribution_utility.ContributionError(
            f"A round number is an integer >= 0, got {round_!r}."
        )
    if last_round is not None and round_ <= last_round:
        raise contribution_utility.ContributionError(
            f"Round {round_} cannot be recorded after round {last_round}: each round is "
            "recorded once, in increasing order."
        )


def check_client(client: int) -> None:
    """Refuse a client id that is not an integer >= 0."""
    if not is_count(client):
        raise contribution_utility.ContributionError(
            f"A client id is an integer >= 0, got {client!r}."
        )


def is_count(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer >= 0 (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
