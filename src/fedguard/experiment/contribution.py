"""Contribution scores in a run: who contributed what to each scored round, flags and rewards.

The round driver hands every round's accepted replies to :meth:`Tracker.before_aggregate`
before it aggregates them. Every ``contribution.every`` rounds the tracker values them with the
configured method over the round's game (:mod:`fedguard.algorithms.contribution`):

* the players are the round's accepted clients; ``v(S)`` is the **negative validation loss**
  (mean cross-entropy on the validation set, larger is better) of the sub-model the server would
  have built from ``S`` alone (:func:`fedguard.protocol.coalitions.sub_model`: the configured
  aggregator and server optimizer step from the round's starting state, which is not advanced;
  under central DP before the noise, on the clipped updates; a robust rule's too-small
  coalitions get the mean of their updates); ``v(empty)`` is the previous global model's.
  Negative loss rather than accuracy: a free rider or a noisy client changes the loss of a
  coalition where it rarely flips a prediction, so accuracy ties where the loss separates;
* ``cosine`` needs no validation set: the cosine of each update to the step the server took.

The round's scores are added to a :class:`~fedguard.algorithms.contribution.ledger.Ledger`. A
client is flagged after ``flag_patience`` scored rounds in a row in which it took part and was
suspect (logged; with ``exclude_flagged`` its replies are left out of every later round's
aggregate and so are not tested again: the flag then stays for the run). ``flag_rule`` says what
makes a round suspect: ``"update"`` the update test of
:func:`~fedguard.algorithms.contribution.free_riders.update_evidence` on the round's accepted
updates and claimed example counts (a norm far below the round's median, or with
``flag_min_cosine`` a low cosine with the others' weighted mean; no evaluation, so it holds on
non-IID data where a free rider's zero update can *raise* the validation utility); ``"score"``
the round score below ``flag_threshold``; ``"either"`` keeps both streaks and flags on the first
to reach the patience. The update test's per-client norm ratios and cosines are recorded with
every scored round. The reward
split divides ``reward_total`` by cumulative score with the ``reward_floor`` share paid equally
to every scored client; a flagged client is paid the floor only (its score counts as 0). The
ledger, the flags and the per-round records travel in every checkpoint, so ``--resume``
continues them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedguard.algorithms import seeding
from fedguard.algorithms.contribution import cosine as contribution_cosine
from fedguard.algorithms.contribution import free_riders, gtg, rewards, shapley
from fedguard.algorithms.contribution import leave_one_out as contribution_loo
from fedguard.algorithms.contribution import ledger as contribution_ledger
from fedguard.algorithms.contribution import utility as contribution_utility
from fedguard.experiment.config import ContributionSection
from fedguard.protocol import coalitions, messages
from fedguard.protocol.strategy import Strategy, StrategyState

log = logging.getLogger("fedguard.contribution")

GTG_STREAM = 0xC0DE  # the seeding stream of GTG-Shapley's permutations
CHECKPOINT_KEY = "contribution"  # checkpoint info: the ledger, the flags and the round records


class Tracker:
    """Scores the rounds of one run and keeps the ledger, the flags and the round records.

    ``utility(params)`` is the validation utility of a model (None for ``cosine``, which needs
    none); ``seed`` seeds GTG-Shapley's permutations per round.
    """

    def __init__(
        self,
        section: ContributionSection,
        strategy: Strategy,
        utility: Callable[[torch.Tensor], float] | None,
        *,
        seed: int,
    ) -> None:
        if section.method not in ("none", "cosine") and utility is None:
            raise ValueError(f"contribution.method = {section.method!r} needs a utility.")
        self.section = section
        self.strategy = strategy
        self.utility = utility
        self.seed = seed
        self.flag_config = free_riders.FlagConfig(section.flag_threshold, section.flag_patience)
        self.flag_rule = free_riders.Rule(section.flag_rule)
        self.update_test = free_riders.UpdateTest(
            min_norm_ratio=section.flag_min_norm_ratio, min_cosine=section.flag_min_cosine
        )
        self.gtg_config = gtg.GtgConfig(
            round_tolerance=section.gtg_round_tolerance,
            walk_tolerance=section.gtg_walk_tolerance,
            convergence_tolerance=section.gtg_convergence_tolerance,
            max_cycles=section.gtg_max_cycles,
            max_evaluations=section.gtg_max_evaluations,
        )
        self.ledger = contribution_ledger.empty()
        self.flags = free_riders.empty()  # streaks of rounds with a score below the threshold
        self.update_flags = free_riders.empty()  # streaks of rounds with a suspect update
        self.rounds: list[dict[str, Any]] = []
        self.excluded: dict[int, list[int]] = {}  # client -> rounds it was left out of

    @property
    def enabled(self) -> bool:
        return self.section.method != "none"

    def flagged_by(self) -> dict[str, list[int]]:
        """The clients flagged so far by each rule the run uses (``"score"``, ``"update"``)."""
        by: dict[str, list[int]] = {}
        if self.flag_rule is not free_riders.Rule.UPDATE:
            by["score"] = sorted(free_riders.flagged(self.flag_config, self.flags))
        if self.flag_rule is not free_riders.Rule.SCORE:
            by["update"] = sorted(free_riders.reached(self.flag_config.patience, self.update_flags))
        return by

    def flagged(self) -> list[int]:
        """The clients flagged so far, sorted (by any rule the run uses)."""
        return sorted({c for ids in self.flagged_by().values() for c in ids})

    def before_aggregate(
        self,
        round_: int,
        params: torch.Tensor,
        state: StrategyState,
        replies: list[messages.FitReply],
    ) -> tuple[list[messages.FitReply], dict[str, float | int | str | None]]:
        """The replies to aggregate (without the flagged clients' under ``exclude_flagged``),
        after scoring them when ``round_`` is a scored round; the round's extra metrics."""
        metrics: dict[str, float | int | str | None] = {}
        if not self.enabled:
            return replies, metrics
        if self.section.exclude_flagged:
            flagged = set(self.flagged())
            left_out = sorted(r.client_id for r in replies if r.client_id in flagged)
            if left_out:
                log.warning(
                    "round %d: flagged clients %s left out of the aggregate "
                    "(contribution.exclude_flagged)",
                    round_,
                    left_out,
                )
                for cid in left_out:
                    self.excluded.setdefault(cid, []).append(round_)
                replies = [r for r in replies if r.client_id not in flagged]
            metrics["clients_excluded"] = len(left_out)
        if replies and round_ % self.section.every == 0:
            record = self._score(round_, params, state, replies)
            metrics["contribution_evaluations"] = record["evaluations"]
            metrics["contribution_seconds"] = record["seconds"]
        return replies, metrics

    def _score(
        self,
        round_: int,
        params: torch.Tensor,
        state: StrategyState,
        replies: list[messages.FitReply],
    ) -> dict[str, Any]:
        method = self.section.method
        ids = [r.client_id for r in replies]
        start = time.perf_counter()

        def model_of(members: frozenset[int]) -> torch.Tensor:
            chosen = [replies[i] for i in sorted(members)]
            return coalitions.sub_model(self.strategy, state, params, chosen, round_=round_)

        record: dict[str, Any] = {"round": round_, "method": method}
        if method == "cosine":
            step = model_of(frozenset(range(len(replies)))) - params
            values = contribution_cosine.cosine_to_aggregate(
                torch.stack([r.update for r in replies]), step
            ).tolist()
            evaluations, skipped = 0, False
        else:
            evaluate = self.utility
            if evaluate is None:  # __init__ refuses this
                raise ValueError(f"contribution.method = {method!r} needs a utility.")

            def value(members: frozenset[int]) -> float:
                return evaluate(params if not members else model_of(members))

            game = contribution_utility.Utility(value, len(replies))
            skipped = False
            if method == "exact_shapley":
                scores = shapley.exact(game)
            elif method == "leave_one_out":
                scores = contribution_loo.leave_one_out(game)
            else:
                estimate = gtg.shapley(
                    game,
                    generator=seeding.generator(self.seed, round_, GTG_STREAM),
                    config=self.gtg_config,
                )
                skipped = estimate.skipped
                record["permutations"] = estimate.permutations
                record["budget_exhausted"] = estimate.budget_exhausted
                scores = contribution_utility.Scores(
                    estimate.values, estimate.evaluations, estimate.seconds
                )
            values = list(scores.values)
            evaluations = game.cost().evaluations
            everyone = frozenset(range(len(replies)))
            record["utility_empty"] = game(frozenset())
            record["utility_all"] = game(everyone)
        by_client = {cid: float(v) for cid, v in zip(ids, values, strict=True)}
        record["scores"] = {str(c): v for c, v in by_client.items()}
        record["evaluations"] = evaluations
        record["seconds"] = time.perf_counter() - start
        record["skipped"] = skipped
        evidence = free_riders.update_evidence(
            torch.stack([r.update for r in replies]),
            torch.tensor([float(r.num_examples) for r in replies], dtype=torch.float64),
            self.update_test,
        )
        record["update_norm_ratio"] = dict(zip(map(str, ids), evidence.norm_ratios, strict=True))
        record["update_cosine"] = dict(zip(map(str, ids), evidence.cosines, strict=True))
        record["update_suspect"] = [c for c, bad in zip(ids, evidence.suspect, strict=True) if bad]
        before = self.flagged_by()
        if not skipped:  # a truncated round measured nothing (see gtg): not recorded
            self.ledger = contribution_ledger.record(self.ledger, round_, by_client)
            self.flags = free_riders.update(self.flag_config, self.flags, round_, by_client)
        # the update test measured the round even when GTG-Shapley skipped dividing it
        self.update_flags = free_riders.record(
            self.update_flags, round_, dict(zip(ids, evidence.suspect, strict=True))
        )
        why = {
            "score": f"its contribution score stayed below {self.flag_config.threshold:g}",
            "update": (
                f"its update's norm stayed below {self.update_test.min_norm_ratio:g} of the "
                "round's median"
                + (
                    f" or its cosine with the others' mean below {self.update_test.min_cosine:g}"
                    if self.update_test.min_cosine is not None
                    else ""
                )
            ),
        }
        for rule, ids_now in self.flagged_by().items():
            for cid in sorted(set(ids_now) - set(before.get(rule, []))):
                log.warning(
                    "round %d: client %d flagged (flag_rule %s): %s for %d scored rounds",
                    round_,
                    cid,
                    rule,
                    why[rule],
                    self.flag_config.patience,
                )
        self.rounds.append(record)
        return record

    # ---- reports ------------------------------------------------------------------------

    def evaluations(self) -> int:
        return sum(int(r["evaluations"]) for r in self.rounds)

    def seconds(self) -> float:
        return sum(float(r["seconds"]) for r in self.rounds)

    def rewards(self) -> dict[int, float]:
        """``reward_total`` split by cumulative score (flagged clients: the floor only)."""
        cumulative = dict(self.ledger.cumulative)
        if not cumulative:
            return {}
        flagged = set(self.flagged())
        scores = {c: 0.0 if c in flagged else s for c, s in cumulative.items()}
        return rewards.split(scores, self.section.reward_total, floor=self.section.reward_floor)

    def contributions_json(self) -> dict[str, Any]:
        """What ``contributions.json`` holds."""
        return {
            "method": self.section.method,
            "utility": "negative validation loss" if self.section.method != "cosine" else None,
            "cumulative": {str(c): v for c, v in sorted(self.ledger.cumulative.items())},
            "rounds": self.rounds,
        }

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` says under ``contribution``."""
        return {
            "method": self.section.method,
            "every": self.section.every,
            "rounds_scored": len(self.rounds),
            "evaluations": self.evaluations(),
            "seconds": self.seconds(),
            "flag_rule": self.flag_rule.value,
            "flagged": self.flagged(),
            "flagged_by": self.flagged_by(),
            "excluded": {str(c): r for c, r in sorted(self.excluded.items())},
            "rewards": {str(c): v for c, v in sorted(self.rewards().items())},
            "reward_total": self.section.reward_total,
            "reward_floor": self.section.reward_floor,
        }

    # ---- checkpoints --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The tracker's state for a checkpoint."""
        return {
            "ledger": contribution_ledger.to_json(self.ledger),
            "flags": free_riders.to_json(self.flags),
            "update_flags": free_riders.to_json(self.update_flags),
            "rounds": self.rounds,
            "excluded": {str(c): r for c, r in self.excluded.items()},
        }

    def restore(self, data: Mapping[str, Any], finished_round: int) -> None:
        """The state :meth:`to_json` saved (a resumed run continues after ``finished_round``)."""
        self.ledger = contribution_ledger.from_json(data["ledger"])
        self.flags = free_riders.from_json(data["flags"])
        # a checkpoint written before the update test existed holds no update streaks
        saved = data.get("update_flags")
        self.update_flags = free_riders.empty() if saved is None else free_riders.from_json(saved)
        self.rounds = [r for r in data["rounds"] if r["round"] <= finished_round]
        self.excluded = {int(c): list(r) for c, r in data["excluded"].items()}
