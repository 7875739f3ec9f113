"""The round driver: sample, send, gather, check, aggregate; written once against a transport.

The driver never learns whether a client is a Python object, a Ray actor or a process behind
gRPC. Every reply is checked before it can touch the model: a client that raises, times out, or
sends a malformed, wrongly sized or non-finite update is rejected and logged with its id and the
reason, and the round goes on while ``min_clients`` replies remain.

A reply's ``num_examples`` is the client's claim, and it weighs that client's update in the mean.
A claim that is not a finite positive number is rejected; a larger claim than the client's
registered size (``registered_examples``: what the server knows of that client, its partition's
size in simulation, its registered count in deployment, see :mod:`.registration`) is cut down to
that size and logged, so a client cannot buy more weight than its data. Federated evaluation
(:meth:`RoundDriver.evaluate_round`) cuts an evaluation reply's weight the same way. (Robust
rules ignore the claims altogether: see :mod:`fedguard.protocol.strategy`.) An update whose norm is more than ``max_norm_ratio`` times the
round's median norm is rejected as absurd: a sanity bound against overflow-sized updates
(a finite ``3e38`` moves a plain mean to the edge of float32), not a robust rule; boosted or
sign-flipped updates of a few times the honest norm pass it and are the robust rule's business.
A round whose aggregate (or new server state) is not finite leaves the model unchanged, says so in
its metrics (``aggregate_rejected``) and lets the run go on.

With secure aggregation a training round is four exchanges (see :mod:`.secagg`); the driver only
builds the round's setup and fit instructions, and hands the unmasked sum to the strategy.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedguard.algorithms import binned_auc, finite
from fedguard.algorithms.he import encryption
from fedguard.algorithms.secagg.crypto import ROUND_NONCE_BYTES
from fedguard.protocol import he, he_server, messages, secagg, secagg_server
from fedguard.protocol.aggregator import LeftOut
from fedguard.protocol.strategy import Strategy, StrategyState
from fedguard.protocol.transport import Delivered, Failed, Outcome, Transport

log = logging.getLogger("fedguard.round")

# Called with (round, params, state, accepted replies) once a round's replies are checked and
# before they are aggregated; returns the replies to aggregate (all, or fewer: those of clients
# the run excludes) and metrics for the round's row. Contribution scores hook in here.
BeforeAggregate = Callable[
    [int, torch.Tensor, StrategyState, list[messages.FitReply]],
    tuple[list[messages.FitReply], dict[str, float | int | str | None]],
]


# Called with (round, outcome) as each fit reply or failure of a round arrives, before the round's
# checks: what a live view shows while the round runs (see RoundDriver.watch).
ReplyWatcher = Callable[[int, Outcome], None]

# An update more than this many times the round's median update norm is rejected as absurd. The
# robustness benchmark's Gaussian attack (N(0, 1) per coordinate) on its 121k-parameter X-ray CNN
# has a norm near 350, 500 times the median honest norm of 0.7, and honest norms shrink as training
# converges: 1e4 leaves that simulated attack to the rule under test while still catching
# overflow-sized updates, which are 1e30 times the honest ones and more.
MAX_NORM_RATIO = 1e4
# Bins of the score histograms an evaluation task asks for (see binned_auc: the AUC's error is
# at most the share of positive-negative pairs in one bin).
SCORE_BINS = 1000


class RoundFailedError(RuntimeError):
    """Fewer than ``min_clients`` usable replies arrived; the round cannot be aggregated."""


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one training round."""

    params: torch.Tensor
    state: StrategyState
    metrics: dict[str, float | int | str | None]
    problems: list[tuple[int, str]] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    # the metrics of each reply that passed the checks (what a DP client reports it ran)
    reported: dict[int, dict[str, float]] = field(default_factory=dict)
    # the seconds each delivered reply took (what a live view shows per client)
    latencies: dict[int, float] = field(default_factory=dict)
    # which clients' updates the robust rule left out (None: the aggregator does not say)
    left_out: LeftOut | None = None


def client_seed(seed: int, round_: int, client_id: int) -> int:
    """A 31-bit seed for one client in one round, independent of which others were sampled."""
    return int(np.random.SeedSequence([seed, round_, client_id]).generate_state(1)[0] >> 1)


def graph_seed(seed: int, round_: int) -> int:
    """The public seed of a round's SecAgg+ masking graph in the semi-honest protocol, derived
    from the run's seed. A verified round (clients with identities) ignores it: its graph comes
    from randomness the clients commit to and then reveal (see :mod:`fedguard.protocol.secagg`).
    """
    return int(np.random.SeedSequence([seed, round_, 0x6A5]).generate_state(1)[0] >> 1)


def poisson_sample(client_ids: Sequence[int], rate: float, *, seed: int, round_: int) -> list[int]:
    """Each client independently with probability ``rate`` (seeded), in ascending order."""
    rng = np.random.default_rng([seed, round_, 0x5A4D])
    ids = sorted(client_ids)
    return [c for c, u in zip(ids, rng.random(len(ids)), strict=True) if u < rate]


def sample_clients(client_ids: Sequence[int], count: int, *, seed: int, round_: int) -> list[int]:
    """A seeded uniform sample of ``count`` clients without replacement, in ascending order."""
    if count > len(client_ids):
        raise ValueError(f"Cannot sample {count} clients from {len(client_ids)}.")
    rng = np.random.default_rng([seed, round_, 0x5A])
    picked = rng.choice(np.asarray(client_ids), size=count, replace=False)
    return sorted(int(c) for c in picked)


class _Requests(Mapping[int, bytes]):
    """A round's fit tasks, each encoded only when the transport reads it.

    Encoding every task up front would hold one encoded model per sampled client for the whole
    round (49 MiB for 100 clients of a 120k-parameter model), and in the in-process simulator
    that memory sits beside the training step's buffers. A transport that sends as it reads
    (the simulator does) keeps just the one payload in flight; one that reads all first gets
    them all, as before. Reading a task twice encodes it twice; the bytes are the same.
    """

    def __init__(self, client_ids: Sequence[int], encode: Callable[[int], bytes]) -> None:
        self._ids = {cid: None for cid in client_ids}
        self._encode = encode
        self._sizes: dict[int, int] = {}

    def __getitem__(self, client_id: int) -> bytes:
        if client_id not in self._ids:
            raise KeyError(client_id)
        payload = self._encode(client_id)
        self._sizes[client_id] = len(payload)
        return payload

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def bytes_sent(self) -> int:
        """Total size of the tasks read so far (each client counted once)."""
        return sum(self._sizes.values())


class RoundDriver:
    """Runs fit and evaluation rounds over any :class:`Transport`."""

    def __init__(
        self,
        transport: Transport,
        strategy: Strategy,
        *,
        dim: int,
        clients_per_round: int,
        min_clients: int,
        seed: int,
        deadline_s: float | None = None,
        poisson: bool = False,
        secure_aggregation: secagg.Settings | he.Settings | None = None,
        registered_examples: Mapping[int, int] | None = None,
        max_norm_ratio: float = MAX_NORM_RATIO,
        reply_check: Callable[[messages.FitReply], str | None] | None = None,
        before_aggregate: BeforeAggregate | None = None,
        identities: secagg.Identities | None = None,
        he_context: Any = None,
    ) -> None:
        """``identities``: the federation's registered public identity keys; with them every
        secure-aggregation round is a verified one, secure against a malicious server (a fresh
        random nonce per round; see :mod:`fedguard.protocol.secagg_server`).
        ``secure_aggregation`` as :class:`.he.Settings` aggregates under homomorphic encryption
        (:mod:`fedguard.protocol.he_server`) with ``he_context``, the scheme's parameters
        without any key (ValueError if it holds the secret key: the server must not decrypt).
        ``registered_examples`` maps each client id to the most examples its reply may claim
        (None: claims are taken as they come, which lets one client outweigh all others in the
        mean); ``max_norm_ratio`` is the sanity bound on an update's norm against the round's
        median (``math.inf``: no bound); ``reply_check`` says why a decoded fit reply must be
        rejected beyond the driver's own checks (the privacy plan's: what DP-SGD ran), or None;
        ``before_aggregate`` sees the accepted replies of every round (not under secure
        aggregation, where there are none) and says which to aggregate."""
        if not 1 <= min_clients <= clients_per_round <= len(transport.client_ids):
            raise ValueError(
                f"Need 1 <= min_clients ({min_clients}) <= clients_per_round ({clients_per_round}) "
                f"<= clients ({len(transport.client_ids)})."
            )
        if not max_norm_ratio > 1:
            raise ValueError(f"max_norm_ratio must be above 1, got {max_norm_ratio}.")
        if registered_examples is not None:
            bad = {c: n for c, n in registered_examples.items() if claim_problem(n) is not None}
            if bad:
                raise ValueError(f"Registered example counts must be positive numbers, got {bad}.")
            registered_examples = dict(registered_examples)
        self.registered_examples = registered_examples
        self.max_norm_ratio = max_norm_ratio
        self.reply_check = reply_check
        self.before_aggregate = before_aggregate
        self.transport = transport
        self.strategy = strategy
        self.dim = dim
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.deadline_s = deadline_s
        self.poisson = poisson
        self.secure_aggregation = secure_aggregation
        self.identities = None if identities is None else identities.public()
        if isinstance(secure_aggregation, he.Settings):
            if he_context is None:
                raise ValueError("HE aggregation needs the server's (key-less) HE context.")
            if encryption.can_decrypt(he_context):
                raise ValueError("The server's HE context holds the secret key; it must hold none.")
        self.he_context = he_context
        self._reply_watcher: ReplyWatcher | None = None
        if secure_aggregation is not None:
            refusal = strategy.secure_aggregation_refusal()
            if refusal is not None:
                raise ValueError(f"Secure aggregation cannot serve this strategy: {refusal}.")

    def watch(self, watcher: ReplyWatcher | None) -> None:
        """Call ``watcher(round, outcome)`` as each fit outcome of a (not secure-aggregation)
        round arrives, where the transport can tell (:meth:`Transport.watch`); None: stop."""
        self._reply_watcher = watcher

    def _exchange_fit(self, round_: int, requests: _Requests) -> list[Outcome]:
        """The fit exchange, the watcher (if any) told of each outcome as it arrives."""
        watcher = self._reply_watcher
        if watcher is None:
            return self.transport.exchange(requests, deadline_s=self.deadline_s)
        self.transport.watch(lambda outcome: watcher(round_, outcome))
        try:
            return self.transport.exchange(requests, deadline_s=self.deadline_s)
        finally:
            self.transport.watch(None)

    def _client_config(
        self,
        config: Mapping[str, messages.Scalar],
        state: StrategyState,
        round_: int,
        cid: int,
    ) -> dict[str, messages.Scalar]:
        """Client ``cid``'s fit config in ``round_``: the round's ``config``, the strategy's
        entries for this client (:meth:`Strategy.client_instructions`) and its seed."""
        own = self.strategy.client_instructions(state, cid)
        return {**config, **own, "seed": client_seed(self.seed, round_, cid)}

    def sample(self, round_: int) -> list[int]:
        """The clients asked to train in ``round_``: a fixed-size sample, or Poisson with rate
        ``clients_per_round / clients`` (then ``clients_per_round`` is the expected count)."""
        ids = self.transport.client_ids
        if self.poisson:
            rate = self.clients_per_round / len(ids)
            return poisson_sample(ids, rate, seed=self.seed, round_=round_)
        return sample_clients(ids, self.clients_per_round, seed=self.seed, round_=round_)

    def fit_round(self, round_: int, params: torch.Tensor, state: StrategyState) -> RoundResult:
        """One round of training; raises :class:`RoundFailedError` with too few good replies."""
        sampled = self.sample(round_)
        if isinstance(self.secure_aggregation, he.Settings):
            return self._he_fit_round(round_, params, state, sampled, self.secure_aggregation)
        if self.secure_aggregation is not None:
            return self._secure_fit_round(round_, params, state, sampled, self.secure_aggregation)
        config, tensors = self.strategy.fit_instructions(state)

        def task(cid: int) -> bytes:
            seeded = self._client_config(config, state, round_, cid)
            return messages.encode(messages.FitTask(round_, cid, params, seeded, tensors))

        requests = _Requests(sampled, task)
        # a list of our own, which _drained empties (a transport may keep the one it returned)
        outcomes = list(self._exchange_fit(round_, requests))
        bytes_down = requests.bytes_sent
        accepted: list[messages.FitReply] = []
        reported: dict[int, dict[str, float]] = {}
        problems: list[tuple[int, str]] = []
        latencies: dict[int, float] = {}
        failed = rejected = capped = bytes_up = 0
        for outcome in _drained(outcomes):
            if isinstance(outcome, Failed):
                failed += 1
                problems.append((outcome.client_id, f"{outcome.kind}: {outcome.reason}"))
                log.warning(
                    "round %d: client %d failed (%s): %s",
                    round_,
                    outcome.client_id,
                    outcome.kind,
                    outcome.reason,
                )
                continue
            bytes_up += len(outcome.payload)
            latencies[outcome.client_id] = outcome.seconds
            reply, reason = self._check_fit_reply(outcome, round_)
            if reply is None:
                rejected += 1
                problems.append((outcome.client_id, f"rejected: {reason}"))
                log.warning("round %d: client %d rejected: %s", round_, outcome.client_id, reason)
                continue
            reported[reply.client_id] = dict(reply.metrics)
            reply, was_capped = self._capped(reply, round_)
            capped += was_capped
            accepted.append(reply)
        accepted, absurd = self._drop_absurd_norms(accepted)
        for cid, reason in absurd:
            rejected += 1
            problems.append((cid, f"rejected: {reason}"))
            log.warning("round %d: client %d rejected: %s", round_, cid, reason)
        metrics: dict[str, float | int | str | None] = {
            "clients_sampled": len(sampled),
            "clients_completed": len(accepted),
            "clients_failed": failed,
            "clients_rejected": rejected,
            "weights_capped": capped,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "aggregate_rejected": None,
        }
        if self.before_aggregate is not None and accepted:
            accepted, extra = self.before_aggregate(round_, params, state, accepted)
            metrics.update(extra)
            metrics["clients_completed"] = len(accepted)
        if len(accepted) < self.min_clients:
            raise RoundFailedError(
                f"Round {round_}: only {len(accepted)} usable replies of {len(sampled)} sampled, "
                f"min_clients is {self.min_clients}. Problems: "
                + "; ".join(f"client {c}: {r}" for c, r in problems)
            )
        new_state, new_params, left_out = self.strategy.aggregate_reporting(
            state, params, accepted, round_=round_
        )
        refusal = _unusable(new_params, new_state)
        if refusal is not None:
            log.warning("round %d: %s; the model is unchanged, the run goes on", round_, refusal)
            metrics["aggregate_rejected"] = refusal
            new_state, new_params = state, params
        # A DP-SGD client whose Poisson batches were all empty has no loss to report (NaN).
        losses = [
            (r.metrics["train_loss"], r.num_examples)
            for r in accepted
            if math.isfinite(r.metrics.get("train_loss", math.nan))
        ]
        n = sum(k for _, k in losses)
        metrics["train_loss"] = sum(v * k for v, k in losses) / n if n else None
        return RoundResult(
            new_params, new_state, metrics, problems, sampled, reported, latencies, left_out
        )

    def _secure_fit_round(
        self,
        round_: int,
        params: torch.Tensor,
        state: StrategyState,
        sampled: list[int],
        settings: secagg.Settings,
    ) -> RoundResult:
        """A training round under secure aggregation; raises :class:`secagg.SecAggAbortedError`."""
        if len(sampled) < 2:
            raise secagg.SecAggAbortedError(
                f"Round {round_}: secure aggregation needs at least 2 sampled clients, "
                f"got {len(sampled)}.",
                {
                    "clients_sampled": len(sampled),
                    "clients_completed": 0,
                    "bytes_up": 0,
                    "bytes_down": 0,
                },
            )
        config, tensors = self.strategy.fit_instructions(state)
        try:
            settings.fixed_point(len(sampled))
            setup = settings.setup(
                round_,
                sampled,
                graph_seed=graph_seed(self.seed, round_),
                dim=self.dim,
                nonce=b"" if self.identities is None else os.urandom(ROUND_NONCE_BYTES),
            )
        except ValueError as exc:
            raise secagg.SecAggAbortedError(
                f"Round {round_}: secure aggregation cannot run with {len(sampled)} clients: {exc}",
                {"clients_sampled": len(sampled), "clients_completed": 0},
            ) from None

        def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
            seeded = self._client_config(config, state, round_, cid)
            return messages.SecAggMaskRequest(round_, cid, params, ciphertexts, seeded, tensors)

        result = secagg_server.secure_sum(
            self.transport,
            setup,
            mask_request,
            deadline_s=self.deadline_s,
            min_survivors=self.min_clients,
            identities=self.identities,
        )
        return self._apply_sum(
            round_, params, state, sampled, result, setup.max_weight, setup.weighted
        )

    def _he_fit_round(
        self,
        round_: int,
        params: torch.Tensor,
        state: StrategyState,
        sampled: list[int],
        settings: he.Settings,
    ) -> RoundResult:
        """A training round under homomorphic encryption; raises
        :class:`secagg.SecAggAbortedError` as a masked round does."""
        try:
            settings.check_cohort(len(sampled))
        except ValueError as exc:
            raise secagg.SecAggAbortedError(
                f"Round {round_}: HE aggregation cannot run with {len(sampled)} clients: {exc}",
                {"clients_sampled": len(sampled), "clients_completed": 0},
            ) from None
        config, tensors = self.strategy.fit_instructions(state)
        nonce = b"" if self.identities is None else os.urandom(ROUND_NONCE_BYTES)

        def request(cid: int) -> messages.HeEncryptRequest:
            seeded = self._client_config(config, state, round_, cid)
            return settings.request(round_, cid, len(sampled), params, seeded, tensors, nonce)

        result = he_server.homomorphic_sum(
            self.transport,
            settings,
            self.he_context,
            round_=round_,
            sampled=sampled,
            dim=self.dim,
            encrypt_request=request,
            deadline_s=self.deadline_s,
            min_survivors=self.min_clients,
            identities=self.identities,
            nonce=nonce,
            choice_seed=graph_seed(self.seed, round_),
        )
        return self._apply_sum(
            round_, params, state, sampled, result, settings.max_weight, settings.weighted
        )

    def _apply_sum(
        self,
        round_: int,
        params: torch.Tensor,
        state: StrategyState,
        sampled: list[int],
        result: secagg_server.SecureSum,
        max_weight: int,
        weighted: bool,
    ) -> RoundResult:
        """Hand a securely aggregated sum to the strategy, after checking its weight."""
        # Each honest client encodes a weight in [1, max_weight] (1 when unweighted), so the sum
        # of n is in [n, n * max_weight]; outside it a client encoded a weight it cannot have
        # (negative, say). The sum hides who: the round is aborted and the model is unchanged.
        low = len(result.survivors)
        high = low * (max_weight if weighted else 1)
        if not low <= result.weight <= high:
            raise secagg.SecAggAbortedError(
                f"Round {round_}: the securely aggregated weight {result.weight} is outside "
                f"[{low}, {high}], the range of {low} honest clients' weights.",
                result.metrics,
            )
        new_state, new_params = self.strategy.aggregate_sum(
            state, params, torch.from_numpy(result.total), float(result.weight), round_=round_
        )
        metrics: dict[str, float | int | str | None] = {
            **result.metrics,
            "aggregate_rejected": None,
        }
        refusal = _unusable(new_params, new_state)
        if refusal is not None:
            log.warning("round %d: %s; the model is unchanged, the run goes on", round_, refusal)
            metrics["aggregate_rejected"] = refusal
            new_state, new_params = state, params
        return RoundResult(new_params, new_state, metrics, result.problems, sampled)

    def _check_fit_reply(
        self, outcome: Delivered, round_: int
    ) -> tuple[messages.FitReply | None, str]:
        try:
            reply = messages.decode(outcome.payload, messages.FitReply)
        except messages.MessageError as exc:
            return None, str(exc)
        wrong_address = messages.addressing_problem(reply, outcome.client_id, round_)
        if wrong_address is not None:
            return None, wrong_address
        if tuple(reply.update.shape) != (self.dim,):
            return None, f"update has shape {tuple(reply.update.shape)}, expected ({self.dim},)"
        if not finite.all_finite(reply.update):
            return None, "update contains NaN or infinite values"
        weight_problem = claim_problem(reply.num_examples)
        if weight_problem is not None:
            return None, weight_problem
        if self.registered_examples is not None and reply.client_id not in self.registered_examples:
            return None, f"client {reply.client_id} has no registered example count"
        for name, length in self.strategy.required_tensors(self.dim).items():
            t = reply.tensors.get(name)
            if t is None:
                return None, f"reply lacks the {name!r} tensor"
            if tuple(t.shape) != (length,):
                return None, f"{name!r} has shape {tuple(t.shape)}, expected ({length},)"
            if not finite.all_finite(t):
                return None, f"{name!r} contains NaN or infinite values"
        if self.reply_check is not None:
            refusal = self.reply_check(reply)
            if refusal is not None:
                return None, refusal
        return reply, ""

    def _capped(self, reply: messages.FitReply, round_: int) -> tuple[messages.FitReply, bool]:
        """The reply with its claimed example count cut to the client's registered size, and
        whether it was cut."""
        if self.registered_examples is None:
            return reply, False
        cap = self.registered_examples[reply.client_id]
        if reply.num_examples <= cap:
            return reply, False
        log.warning(
            "round %d: client %d claims %s examples, more than its registered %s; weighted as %s",
            round_,
            reply.client_id,
            reply.num_examples,
            cap,
            cap,
        )
        return replace(reply, num_examples=cap), True

    def _drop_absurd_norms(
        self, replies: list[messages.FitReply]
    ) -> tuple[list[messages.FitReply], list[tuple[int, str]]]:
        """The replies whose update norm is within ``max_norm_ratio`` of the round's median norm,
        and ``(client id, reason)`` for the others.

        The median is the lower one (with an even count), so that it lies within the honest
        norms whenever fewer than half the replies are an attacker's: attackers can neither
        raise the bound by sending huge updates nor lower it under the honest ones by sending
        tiny ones. A median of zero (most clients did not move) bounds nothing.
        """
        if len(replies) < 2 or math.isinf(self.max_norm_ratio):
            return replies, []
        # float64: the norm of a finite float32 update can overflow float32 (entries near 3e38).
        norms = [float(torch.linalg.vector_norm(r.update.double())) for r in replies]
        median = sorted(norms)[(len(norms) - 1) // 2]
        if not median > 0:
            return replies, []
        bound = self.max_norm_ratio * median
        kept = [r for r, n in zip(replies, norms, strict=True) if n <= bound]
        dropped = [
            (
                r.client_id,
                f"update norm {n:.3g} is more than {self.max_norm_ratio:g} times the round's "
                f"median update norm {median:.3g}",
            )
            for r, n in zip(replies, norms, strict=True)
            if not n <= bound
        ]
        return kept, dropped

    def evaluate_round(
        self,
        round_: int,
        params: torch.Tensor,
        *,
        clients: Sequence[int] | None = None,
        registered: Mapping[int, int] | None = None,
        num_classes: int | None = None,
        score_bins: int = SCORE_BINS,
    ) -> FederatedEvaluation | None:
        """Federated evaluation: ``clients`` (default: every client of the transport) evaluate
        ``params`` on their own held-out data; None when no usable reply arrives.

        Each reply weighs by its example count, cut to the client's ``registered`` held-out
        count where one is given (as a fit reply's weight is cut). With ``num_classes`` the
        task asks for the score histograms and confusion matrix too, and a reply must carry
        them, consistent with its count; the accuracy is then counted from the summed
        confusion matrix (exactly the pooled accuracy) and the AUC computed from the summed
        histograms (:mod:`fedguard.algorithms.binned_auc`).
        """
        ids = list(self.transport.client_ids if clients is None else clients)
        config: dict[str, messages.Scalar] = {}
        if num_classes is not None:
            config = {messages.EVAL_BINS: score_bins, messages.EVAL_CLASSES: num_classes}
        requests = _Requests(
            ids, lambda cid: messages.encode(messages.EvaluateTask(round_, cid, params, config))
        )
        outcomes = self.transport.exchange(requests, deadline_s=self.deadline_s)
        total, loss, acc = 0.0, 0.0, 0.0
        scores: torch.Tensor | None = None
        confusion: torch.Tensor | None = None
        if num_classes is not None:
            scores = torch.zeros(num_classes, 2, score_bins, dtype=torch.float64)
            confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        answered = 0
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                log.warning(
                    "round %d: evaluation on client %d failed: %s",
                    round_,
                    outcome.client_id,
                    outcome.reason,
                )
                continue
            reply, reason = self._check_evaluate_reply(outcome, round_, num_classes, score_bins)
            if reply is None:
                log.warning(
                    "round %d: evaluation reply of client %d rejected: %s",
                    round_,
                    outcome.client_id,
                    reason,
                )
                continue
            weight = float(reply.num_examples)
            if registered is not None:
                weight = min(weight, float(registered.get(reply.client_id, 0)))
                if weight < reply.num_examples:
                    log.warning(
                        "round %d: client %d evaluated %s examples, more than its registered "
                        "%s; weighted as %s",
                        round_,
                        reply.client_id,
                        reply.num_examples,
                        weight,
                        weight,
                    )
            if not weight > 0:
                continue
            share = weight / reply.num_examples
            answered += 1
            total += weight
            loss += reply.metrics["loss"] * weight
            acc += reply.metrics["accuracy"] * weight
            if scores is not None and confusion is not None:
                scores += reply.tensors[messages.EVAL_SCORES].double() * share
                confusion += reply.tensors[messages.EVAL_CONFUSION].double() * share
        if total == 0:
            return None
        auc = None if scores is None else binned_auc.auc(scores)
        accuracy = acc / total
        if confusion is not None:
            accuracy = float(confusion.trace()) / float(confusion.sum())
        return FederatedEvaluation(
            loss=loss / total,
            accuracy=accuracy,
            auc=auc,
            confusion=None if confusion is None else confusion,
            clients=answered,
            examples=total,
        )

    def _check_evaluate_reply(
        self, outcome: Delivered, round_: int, num_classes: int | None, bins: int
    ) -> tuple[messages.EvaluateReply | None, str]:
        """The decoded reply, or None and why it cannot be counted."""
        try:
            reply = messages.decode(outcome.payload, messages.EvaluateReply)
        except messages.MessageError as exc:
            return None, str(exc)
        wrong_address = messages.addressing_problem(reply, outcome.client_id, round_)
        if wrong_address is not None:
            return None, wrong_address
        values = (reply.metrics.get("loss"), reply.metrics.get("accuracy"))
        if claim_problem(reply.num_examples) is not None or not all(
            v is not None and math.isfinite(v) for v in values
        ):
            return None, "bad metrics"
        if num_classes is None:
            return reply, ""
        n = reply.num_examples
        wanted = {
            messages.EVAL_SCORES: (num_classes, 2, bins),
            messages.EVAL_CONFUSION: (num_classes, num_classes),
        }
        for name, shape in wanted.items():
            t = reply.tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != torch.int64:
                got = None if t is None else (tuple(t.shape), t.dtype)
                return None, f"{name!r} must be an int64 tensor of shape {shape}, got {got}"
            if bool((t < 0).any()):
                return None, f"{name!r} holds negative counts"
        per_class = reply.tensors[messages.EVAL_SCORES].sum(dim=2)
        if not bool((per_class.sum(dim=1) == n).all()):
            return None, f"the score histograms do not count its {n} examples"
        confusion = reply.tensors[messages.EVAL_CONFUSION]
        if int(confusion.sum()) != n or not torch.equal(per_class[:, 0], confusion.sum(dim=1)):
            return None, f"the confusion matrix does not count its {n} examples"
        return reply, ""


@dataclass(frozen=True)
class FederatedEvaluation:
    """The clients' evaluation of one model, added up: weighted mean loss, accuracy, AUC (None
    when not asked or undefined), the ``[C, C]`` confusion matrix (weighted counts; None when
    not asked), how many clients were counted and their total weight in examples."""

    loss: float
    accuracy: float
    auc: float | None
    confusion: torch.Tensor | None
    clients: int
    examples: float


def claim_problem(n: object) -> str | None:
    """Why ``n`` cannot be an example count (a weight), or None if it can: a finite number > 0."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return f"num_examples must be a number, got {n!r}"
    try:
        value = float(n)
    except OverflowError:  # an int beyond float64's range
        value = math.inf
    if not math.isfinite(value) or not value > 0:
        return f"num_examples must be positive and finite, got {value:.6g}"
    return None


def _drained(outcomes: list[Outcome]) -> Iterator[Outcome]:
    """``outcomes`` in order, each dropped from the list as it is handed out, so that a reply's
    bytes are freed once the reply is decoded: a round of 1,000 replies of a 0.5 MB model
    otherwise holds 0.5 GB of bytes beside the decoded updates until it ends."""
    outcomes.reverse()
    while outcomes:
        yield outcomes.pop()


def _unusable(params: torch.Tensor, state: StrategyState) -> str | None:
    """Why a round's new parameters or server state cannot be kept, or None if they can."""
    if not finite.all_finite(params):
        return "the aggregate is not finite"
    for name, tensor in state.items():
        if tensor.numel() and not finite.all_finite(tensor):
            return f"the new server state {name!r} is not finite"
    return None
