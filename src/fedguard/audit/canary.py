"""Canaries for the one-run privacy audit: drawn from a recorded seed, inserted by ``fedguard
run`` (``audit.canaries``), scored on the final model by ``fedguard audit --attack canary``.

Each of the ``M`` candidate canaries is included with probability 1/2 (a seeded coin); the
excluded ones never touch the run, yet are scored like the included ones, so that the audit's
guesses are about inclusion alone (:mod:`fedguard.audit.one_run`).

* Record level (by default when ``privacy.mode`` is off or local, the unit DP-SGD protects): a
  canary is an
  out-of-distribution image of uniform noise over the training data's value range with a
  random label, so that the model can only fit it by memorising it; an included canary joins
  the training data of a seeded random client. Its score is the final model's logit-scaled
  confidence in the canary's label, ``log p - log(1 - p)`` (Carlini et al. 2022), minus the
  same on the initial model (rebuilt from the seed): the difference removes each canary's own
  starting confidence, which would otherwise drown the signal of a short run.
* User level (by default under central or distributed DP, which protect a whole client; on
  request, ``audit.canary_level = "user"``, in a run without DP): a canary is a client whose
  update is always the same random unit direction times the round's clip norm (Andrew et al.,
  ICLR 2024) and who holds a typical (the median) client's number of examples, so that it
  weighs in the average like a typical client; included canaries join the population (and are
  sampled like any client).
  Its score is the cosine between its direction and the model's total change, final minus
  initial parameters.

* Gradient level (white-box, on request under local DP: ``audit.canary_level = "gradient"``;
  Steinke, Nasr and Jagielski's white-box setting with Dirac gradient canaries): a canary is a
  record of a seeded random client whose clipped gradient is ``C e_c`` at its own random
  coordinate ``c`` of the model; DP-SGD samples it with the examples' rate and adds it to the
  clipped sum before the noise, so it is protected exactly as an example is, and its score is
  minus the model's total change at ``c``. It measures DP-SGD's protection as an attacker who
  may craft any gradient would, without the run having to memorise an image.

Every canary is regenerated from ``(seed, index)`` alone, so the audit needs only the seed and
the inclusion bits that ``canaries.json`` in the run folder records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedguard.client import trainers
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer, TrainResult, TrainTask
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import messages

RECORD = "record"
USER = "user"
GRADIENT = "gradient"
KINDS = (RECORD, USER, GRADIENT)
FILE = "canaries.json"
_STREAM = 0xCA7A  # separates the canaries' random stream from the run's others


@dataclass(frozen=True)
class CanaryPlan:
    """The canaries of one run: their ``kind`` (record or user level), ``seed``, which of the
    ``count`` candidates are ``included``, and (record level) the client each included canary
    joined, or (user level) the client id each included canary client has."""

    kind: str
    count: int
    seed: int
    included: tuple[bool, ...]
    clients: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """What ``canaries.json`` records (the audit checks its regenerated canaries against
        it)."""
        return {
            "kind": self.kind,
            "count": self.count,
            "seed": self.seed,
            "included": [int(b) for b in self.included],
            "clients": list(self.clients),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CanaryPlan:
        return cls(
            str(data["kind"]),
            int(data["count"]),
            int(data["seed"]),
            tuple(bool(b) for b in data["included"]),
            tuple(int(c) for c in data["clients"]),
        )


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM, *stream])


def plan(
    kind: str, count: int, seed: int, client_ids: list[int], *, first_new_id: int
) -> CanaryPlan:
    """The seeded plan of ``count`` canaries: each included with probability 1/2; a
    record-level canary joins one of ``client_ids`` at random, an included user-level canary
    becomes client ``first_new_id``, ``first_new_id + 1``, ..."""
    if kind not in KINDS:
        raise ValueError(f"Canaries are one of {KINDS}, got {kind!r}.")
    rng = _rng(seed, 0)
    included = rng.random(count) < 0.5
    if kind in (RECORD, GRADIENT):
        hosts = rng.choice(np.asarray(client_ids), size=int(included.sum()))
        clients = tuple(int(c) for c in hosts)
    else:
        clients = tuple(range(first_new_id, first_new_id + int(included.sum())))
    return CanaryPlan(kind, count, seed, tuple(bool(b) for b in included), clients)


def included_count(count: int, seed: int) -> int:
    """How many of ``count`` canaries drawn from ``seed`` are included (as :func:`plan` draws)."""
    return int((_rng(seed, 0).random(count) < 0.5).sum())


AUTO = "auto"


def level(privacy_mode: str, requested: str = AUTO) -> str:
    """The canary level of a run in ``privacy_mode`` (``audit.canary_level``): ``auto`` is the
    unit the run's DP protects, user level under central or distributed DP (whole clients),
    record level otherwise.

    User-level canaries in a run without DP audit what the final model reveals about a whole
    client; under local DP they are refused, because a canary client's fixed update would skip
    DP-SGD's per-example clipping and noise, so the audit would not measure the run's
    protection. Record-level canaries under central or distributed DP are allowed: a record is
    protected at least as well as its client."""
    if requested not in (AUTO, *KINDS):
        raise ValueError(f"Canaries are one of {(AUTO, *KINDS)}, got {requested!r}.")
    if requested == AUTO:
        return USER if privacy_mode in ("central", "distributed") else RECORD
    if requested == USER and privacy_mode == "local":
        raise ValueError(
            'audit.canary_level = "user" under privacy.mode = "local": a canary client\'s '
            "fixed update would skip DP-SGD's per-example clipping and noise, so the audit "
            'would not measure the run\'s protection; use "record", "gradient" or "auto"'
        )
    if requested == GRADIENT and privacy_mode != "local":
        raise ValueError(
            'audit.canary_level = "gradient" needs privacy.mode = "local": gradient canaries '
            "are records of DP-SGD, added to its clipped per-example gradients; use "
            '"record" or "user" here'
        )
    return requested


def record_canaries(
    seed: int,
    count: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` record-level canaries ``(x [M, *input_shape], y [M])``: uniform noise on
    ``[low, high]`` (the training data's range) with uniformly random labels."""
    rng = _rng(seed, 1)
    x = rng.uniform(low, high, size=(count, *input_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=count)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def direction(seed: int, index: int, dim: int) -> torch.Tensor:
    """User-level canary ``index``'s unit direction ``[dim]`` (Gaussian, normalised)."""
    v = _rng(seed, 2, index).standard_normal(dim).astype(np.float32)
    return torch.from_numpy(v / np.linalg.norm(v))


def gradient_coordinates(seed: int, count: int, model: ModelAdapter) -> torch.Tensor:
    """The ``count`` gradient canaries' flat coordinates ``[M]``: distinct positions drawn
    uniformly among ``model``'s trainable parameters (canary ``i`` is the record whose clipped
    gradient is ``C e_{c_i}``)."""
    slices = model.trainable()
    trainable = sum(piece.numel for piece in slices)
    if count > trainable:
        raise ValueError(
            f"{count} gradient canaries need as many trainable parameters; the model has "
            f"{trainable}."
        )
    picks = _rng(seed, 3).choice(trainable, size=count, replace=False)
    starts = np.cumsum([0] + [piece.numel for piece in slices])
    offsets = np.asarray([piece.offset for piece in slices])
    which = np.searchsorted(starts, picks, side="right") - 1
    return torch.from_numpy((offsets[which] + picks - starts[which]).astype(np.int64))


def hosted_coordinates(
    canary_plan: CanaryPlan, coordinates: torch.Tensor
) -> dict[int, torch.Tensor]:
    """The included gradient canaries' coordinates by the client that holds them."""
    chosen = [i for i, inc in enumerate(canary_plan.included) if inc]
    hosted: dict[int, list[int]] = {}
    for index, host in zip(chosen, canary_plan.clients, strict=True):
        hosted.setdefault(host, []).append(int(coordinates[index]))
    return {host: torch.tensor(c, dtype=torch.int64) for host, c in hosted.items()}


def gradient_scores(change: torch.Tensor, coordinates: torch.Tensor) -> np.ndarray:
    """Each gradient canary's score: minus the model's total ``change`` at its coordinate
    (a descent step moves a parameter against the gradient the canary adds there)."""
    return (-change.double()[coordinates]).numpy()


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of record-level canaries (the audit refuses canaries that do not regenerate)."""
    h = hashlib.sha256(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()


def insert_records(
    clients: Mapping[int, ClientData], canary_plan: CanaryPlan, x: torch.Tensor, y: torch.Tensor
) -> dict[int, ClientData]:
    """The clients' data with the included record-level canaries appended to their hosts'
    training sets (held-out data untouched)."""
    out = dict(clients)
    chosen = [i for i, inc in enumerate(canary_plan.included) if inc]
    for index, host in zip(chosen, canary_plan.clients, strict=True):
        d = out[host]
        out[host] = replace(
            d,
            train_x=torch.cat([d.train_x, x[index : index + 1]]),
            train_y=torch.cat([d.train_y, y[index : index + 1]]),
        )
    return out


class CanaryClientTrainer(ClientTrainer):
    """The run's trainer, except for user-level canary clients, whose update is their fixed
    direction times the round's clip (the central-DP clip the task carries, else
    ``clip_norm``). Everything after training (clipping, masking, noise) is the run's own."""

    def __init__(
        self, inner: ClientTrainer, directions: Mapping[int, torch.Tensor], clip_norm: float
    ) -> None:
        self.inner = inner
        self.directions = dict(directions)
        self.clip_norm = clip_norm
        self.features = inner.features

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        d = self.directions.get(task.client_id)
        if d is None:
            return self.inner.train(model, data, task)
        clip = self.clip_norm
        if messages.DP_CLIP_NORM in task.config:
            clip = messages.config_float(task.config, messages.DP_CLIP_NORM)
        return TrainResult(d * clip, data.num_train, {"steps": 0.0})


class GradientCanaryTrainer(ClientTrainer):
    """The run's trainer, except that a DP-SGD task of a client that holds gradient canaries
    trains with them (:func:`fedguard.client.dp_sgd.train`'s ``gradient_canaries``); the
    reply reports what ran exactly as without them."""

    def __init__(self, inner: ClientTrainer, hosted: Mapping[int, torch.Tensor]) -> None:
        self.inner = inner
        self.hosted = dict(hosted)
        self.features = inner.features

    def train(self, model: ModelAdapter, data: ClientData, task: TrainTask) -> TrainResult:
        coordinates = self.hosted.get(task.client_id)
        if coordinates is None or messages.DP_SGD_NOISE not in task.config:
            return self.inner.train(model, data, task)
        return trainers.run_dp_sgd(model, data, task, gradient_canaries=coordinates)


def record_scores(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Each record canary's score on ``model``: ``log p(y | x) - log(1 - p(y | x))``."""
    model.train_mode(False)
    scores = []
    with torch.no_grad():
        for xb, yb in zip(torch.split(x, 256), torch.split(y, 256), strict=True):
            logp = model.log_probabilities(xb, training=False).double()
            own = logp.gather(1, yb[:, None]).squeeze(1)
            rest = torch.log((-torch.expm1(own)).clamp_min(1e-300))
            scores.append((own - rest).numpy())
    return np.concatenate(scores)


def user_scores(change: torch.Tensor, seed: int, count: int) -> np.ndarray:
    """Each user-level canary's score: the cosine between its direction and the model's total
    ``change`` (final minus initial parameters)."""
    unit = change.double() / change.double().norm().clamp_min(1e-300)
    dim = int(change.numel())
    return np.asarray([float(unit @ direction(seed, i, dim).double()) for i in range(count)])
