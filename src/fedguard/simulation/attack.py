"""Simulated Byzantine clients: the one place where a run attacks itself (simulation only).

A deployed server cannot make its clients malicious; a robustness experiment must. Both halves
of an attack live here, so that nothing else in fedguard knows that an attack exists:

* Data poisoning (label flipping, a pixel-pattern backdoor; :mod:`fedguard.algorithms.attacks.data_poisoning`)
  rewrites the malicious clients' training data once, when the federation is built
  (:func:`poison_training_data`). They then train honestly on it.
* Model poisoning (:mod:`fedguard.algorithms.attacks.model_poisoning`, or a user's :class:`Attack`) is
  :class:`ModelPoisoning`, a transport wrapper: every sampled client, malicious or not, trains honestly; once the round's replies are
  in, the wrapper decodes them, computes what the malicious clients send from the honest clients'
  updates of the round (omniscient, as in the attacks' papers) and their own honest updates, and
  re-encodes those replies. The round driver and the strategy therefore see exactly the bytes a
  real server would, and check them the same way (a non-finite update is rejected and logged).

The malicious clients are fixed for the run (:func:`fedguard.algorithms.attacks.choose_malicious`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedguard.algorithms import attacks, seeding
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.algorithms.robust import base as robust_base
from fedguard.protocol import messages
from fedguard.protocol.transport import Delivered, Outcome, OutcomeWatcher, Transport

# (honest [N, D], own [M, D], generator) -> what the M malicious clients send [M, D].
Poison = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
_FIT_TASK = messages.FitTask.__name__


class Attack(abc.ABC):
    """A model-poisoning attack: what the malicious clients of a round send instead of their
    honest updates (simulation only; the public protocol for a user's attack).

    The simulator calls it once per round with the honest clients' updates ``honest [N, D]``
    (omniscient, as the attacks' papers assume; a weaker attacker ignores them), the malicious
    clients' own honest updates ``own [M, D]`` and a generator seeded per (attack seed, round).
    The run's driver and aggregator then see the result as they would a real client's reply.
    """

    @abc.abstractmethod
    def poison(
        self, honest: torch.Tensor, own: torch.Tensor, *, generator: torch.Generator
    ) -> torch.Tensor:
        """The ``[M, D]`` updates the malicious clients send."""

    def __call__(
        self, honest: torch.Tensor, own: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        out = self.poison(honest, own, generator=generator)
        if tuple(out.shape) != tuple(own.shape):
            raise robust_base.RobustnessError(
                f"{type(self).__name__} returned updates of shape {tuple(out.shape)}, expected "
                f"{tuple(own.shape)} (one per malicious client)."
            )
        return out


class BuiltinAttack(Attack):
    """One of fedguard's model-poisoning attacks (:mod:`fedguard.algorithms.attacks.model_poisoning`)."""

    def __init__(self, config: attacks.AttackConfig) -> None:
        if attacks.is_data_poisoning(config.kind):
            raise ValueError(f"{config.kind} poisons training data, not updates.")
        self.config = config

    def poison(
        self, honest: torch.Tensor, own: torch.Tensor, *, generator: torch.Generator
    ) -> torch.Tensor:
        return attacks.poison_updates(self.config, honest, own, generator=generator)


@dataclass(frozen=True)
class Backdoor:
    """BadNets-style backdoor: stamp ``trigger`` into ``fraction`` of the images, label ``target``."""

    trigger: attacks_data.Trigger
    target: int
    fraction: float


@dataclass(frozen=True)
class Plan:
    """One run's attack: what it does, who does it (sorted ids, fixed for the run) and its seed.

    ``config`` is a built-in attack's; a plug-in attack is the object ``plugin`` (config None).
    """

    config: attacks.AttackConfig | None
    malicious: tuple[int, ...]
    seed: int
    backdoor: Backdoor | None = None
    plugin: Attack | None = None

    @property
    def poisons_data(self) -> bool:
        return self.config is not None and attacks.is_data_poisoning(self.config.kind)

    def model_attack(self) -> Poison:
        """What the malicious clients send each round (a model-poisoning plan only)."""
        if self.plugin is not None:
            return self.plugin
        if self.config is None:
            raise ValueError("An attack plan needs a built-in attack's config or a plug-in.")
        return model_poison(self.config)

    def client_generator(self, client_id: int) -> torch.Generator:
        """Which of a malicious client's images get the backdoor: seeded per client."""
        return seeding.generator(self.seed, client_id, 0xDA7A)


def model_poison(config: attacks.AttackConfig) -> Poison:
    """The built-in model-poisoning attack of ``config`` (an :class:`Attack`, so a :data:`Poison`)."""
    return BuiltinAttack(config)


def poison_training_data(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kind: attacks.Attack,
    num_classes: int,
    backdoor: Backdoor | None,
    generator: torch.Generator,
    label_noise: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A malicious client's training data: labels flipped, labels shuffled with probability
    ``label_noise`` (a noisy client), or a share of images backdoored."""
    if kind is attacks.Attack.NOISY_CLIENT:
        return x, attacks_data.shuffle_labels(y, probability=label_noise, generator=generator)
    if kind is attacks.Attack.LABEL_FLIP:
        return x, attacks_data.flip_labels(y, num_classes=num_classes)
    if kind is attacks.Attack.BACKDOOR:
        if backdoor is None:
            raise ValueError("The backdoor attack needs its trigger and target; none was given.")
        out_x, out_y, _ = attacks_data.poison_backdoor(
            x,
            y,
            trigger=backdoor.trigger,
            target=backdoor.target,
            fraction=backdoor.fraction,
            generator=generator,
        )
        return out_x, out_y
    raise ValueError(f"{kind} is not a data-poisoning attack.")


def round_generator(seed: int, round_: int) -> torch.Generator:
    """The attack's randomness in one round (Gaussian updates): seeded, so resumes repeat it."""
    return seeding.generator(seed, round_, 0xBAD)


class ModelPoisoning(Transport):
    """Delivers through ``inner``, then replaces the fit replies of the ``malicious`` clients.

    Only fit rounds are attacked; evaluation and any other exchange pass through unchanged.
    A malicious client that failed or sent an undecodable reply is left as it was. When every
    replying client of a round is malicious, their own honest updates stand in for the honest
    ones (the attack then knows only what its clients computed).
    """

    def __init__(
        self, inner: Transport, malicious: Collection[int], poison: Poison, *, seed: int
    ) -> None:
        self.inner = inner
        self.malicious = frozenset(malicious)
        self.poison = poison
        self.seed = seed

    @property
    def client_ids(self) -> Sequence[int]:
        return self.inner.client_ids

    def watch(self, watcher: OutcomeWatcher | None) -> None:
        """Outcomes arrive through ``inner`` (a live view sees who replied and when; the
        replaced payloads are the driver's business)."""
        super().watch(watcher)
        self.inner.watch(watcher)

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        outcomes = self.inner.exchange(requests, deadline_s=deadline_s)
        if not requests or messages.kind_of(next(iter(requests.values()))) != _FIT_TASK:
            return outcomes
        honest: list[torch.Tensor] = []
        own: dict[int, messages.FitReply] = {}
        for outcome in outcomes:
            if not isinstance(outcome, Delivered):
                continue
            try:
                reply = messages.decode(outcome.payload, messages.FitReply)
            except messages.MessageError:
                continue  # the driver rejects it
            if outcome.client_id in self.malicious:
                own[outcome.client_id] = reply
            elif bool(torch.isfinite(reply.update).all()):
                honest.append(reply.update)
        if not own:
            return outcomes
        own_updates = torch.stack([r.update for r in own.values()])
        honest_updates = torch.stack(honest) if honest else own_updates
        round_ = next(iter(own.values())).round
        poisoned = self.poison(honest_updates, own_updates, round_generator(self.seed, round_))
        payloads = {
            cid: messages.encode(replace(reply, update=row.to(torch.float32)))
            for (cid, reply), row in zip(own.items(), poisoned, strict=True)
        }
        return [
            Delivered(o.client_id, payloads[o.client_id], o.seconds)
            if isinstance(o, Delivered) and o.client_id in payloads
            else o
            for o in outcomes
        ]

    def close(self) -> None:
        self.inner.close()
