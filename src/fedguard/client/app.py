"""The client function: a task message in, a reply message out.

The same :class:`ClientApp` serves the in-process simulator (one app for all simulated clients,
one model instance re-loaded per client) and a deployed client (one app, one client id). Client
state that must survive between rounds (SCAFFOLD's control variate) lives in a mapping the
runtime owns, so the simulator can checkpoint it and a deployed client can keep it on disk
(:class:`fedguard.client.state_store.DiskState`); the app assigns a client's entry whole
whenever it changes, so such a mapping sees every change. A registration task is answered
from the client's own data and model (:func:`fedguard.protocol.registration.registration_reply`);
an evaluation task only from held-out data, never from the training data.
Secure-aggregation requests go to a :class:`~fedguard.protocol.secagg_client.SecAggClient`,
which keeps each client id's keys and shares in memory for the length of one round only.
:class:`ClientPins`, from the client's own configuration, are what it holds the server to.
Local training is a :class:`~fedguard.client.trainer.ClientTrainer`: the one configured, or the
built-in loop each task's config names (:func:`fedguard.client.personal.for_task`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedguard.algorithms import binned_auc
from fedguard.algorithms.privacy import dp_fedavg
from fedguard.client import evaluation, personal
from fedguard.client.data import ClientData
from fedguard.client.trainer import ClientTrainer, TrainResult, TrainTask
from fedguard.client.trainers import local_training_from  # noqa: F401 (part of this API)
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import features, he, he_client, messages, registration, secagg, secagg_client

CONTROL = features.CONTROL
MAX_SCORE_BINS = 100_000  # the most histogram bins an evaluation task may ask for
_SECAGG_REQUESTS = (
    messages.SecAggSetup,
    messages.SecAggRevealRequest,
    messages.SecAggShareRequest,
    messages.SecAggMaskRequest,
    messages.SecAggConsistencyRequest,
    messages.SecAggUnmaskRequest,
)
_HE_REQUESTS = (messages.HeEncryptRequest, messages.HeDecryptRequest)


@dataclass(frozen=True)
class Pretrained:
    """A client's local training in round ``round``, already run by an engine that trains many
    clients at once: its :class:`TrainResult` and the entries of the client's own state the
    training set (SCAFFOLD's control variate), written when :meth:`ClientApp.fit` uses it."""

    round: int
    result: TrainResult
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class RefusedTaskError(RuntimeError):
    """A task asks for less privacy than the client's configuration; the client does not train."""


@dataclass(frozen=True)
class ClientPins:
    """What a client holds the server to, from its own configuration (the server is trusted to
    follow the protocol, not to choose its privacy parameters).

    ``secure_aggregation``: the client sends updates only under secure aggregation, refusing a
    plain fit task, and refuses rounds that break these pins (see :class:`.secagg.Pins`).
    ``homomorphic`` (``[secure_aggregation] mode = "ckks"``): likewise only encrypted, and it
    refuses HE rounds that ask for less (see :class:`.he_client.HEClient`);
    ``homomorphic_inputs``: the fewest contributors of a sum it decrypts.
    ``dp_sgd_noise`` and ``dp_sgd_clip`` (local DP): a fit task must train with DP-SGD at a noise
    multiplier of at least the one and a per-example clip of at most the other.
    ``count_bucket``: the client registers its example counts rounded up to a multiple of at
    least this, whatever the server asks.
    """

    secure_aggregation: secagg.Pins | None = None
    homomorphic: he.Settings | None = None
    homomorphic_inputs: int = 1
    dp_sgd_noise: float | None = None
    dp_sgd_clip: float | None = None
    count_bucket: int = 1

    def check_fit(self, task: messages.FitTask) -> None:
        """Raise :class:`RefusedTaskError` unless ``task``'s local DP keeps to the pins."""
        if self.dp_sgd_noise is None:
            return
        prefix = f"Client {task.client_id} refuses round {task.round}:"
        config = task.config
        if messages.DP_SGD_NOISE not in config or messages.DP_SGD_CLIP not in config:
            raise RefusedTaskError(
                f"{prefix} the fit task lacks DP-SGD, its configuration uses it."
            )
        noise = messages.config_float(config, messages.DP_SGD_NOISE)
        clip = messages.config_float(config, messages.DP_SGD_CLIP)
        if not noise >= self.dp_sgd_noise:  # NaN included
            raise RefusedTaskError(
                f"{prefix} DP-SGD noise multiplier {noise:g}, its configuration needs at least "
                f"{self.dp_sgd_noise:g}."
            )
        if self.dp_sgd_clip is not None and not 0 < clip <= self.dp_sgd_clip:
            raise RefusedTaskError(
                f"{prefix} DP-SGD gradient clip {clip:g}, its configuration allows at most "
                f"{self.dp_sgd_clip:g}."
            )


def client_pins(
    settings: secagg.Settings | he.Settings | None,
    dp_config: Mapping[str, messages.Scalar],
    client_ids: Iterable[int],
    *,
    min_cohort: int,
    min_inputs: int,
    count_bucket: int = 1,
) -> ClientPins:
    """The pins of a run: its secure-aggregation ``settings`` (None: off), the fit-config
    entries of its privacy mode (``dp_config``, as the server would send them) and the rounding
    of its registered counts."""
    pinned = None
    if isinstance(settings, he.Settings):
        return ClientPins(
            homomorphic=settings,
            homomorphic_inputs=max(min_inputs, 1),
            dp_sgd_noise=_optional_float(dp_config, messages.DP_SGD_NOISE),
            dp_sgd_clip=_optional_float(dp_config, messages.DP_SGD_CLIP),
            count_bucket=count_bucket,
        )
    if settings is not None:
        pinned = secagg.Pins(
            settings,
            client_ids=frozenset(client_ids),
            min_cohort=max(2, min_cohort),
            min_inputs=min_inputs,
        )
    return ClientPins(
        pinned,
        dp_sgd_noise=_optional_float(dp_config, messages.DP_SGD_NOISE),
        dp_sgd_clip=_optional_float(dp_config, messages.DP_SGD_CLIP),
        count_bucket=count_bucket,
    )


def _optional_float(config: Mapping[str, messages.Scalar], key: str) -> float | None:
    return None if config.get(key) is None else messages.config_float(config, key)


def _holds_own(data: ClientData) -> bool:
    """Whether ``data`` holds held-out examples of the client's own, what a personal model is
    evaluated on."""
    return data.own_eval and data.eval_y is not None and int(data.eval_y.shape[0]) > 0


class _ClientState(MutableMapping[str, torch.Tensor]):
    """One client's entry of the runtime's state mapping, created on the first write (so that a
    client whose trainer keeps no state adds nothing to a checkpoint)."""

    def __init__(self, states: MutableMapping[int, dict[str, torch.Tensor]], client_id: int):
        self._states = states
        self._id = client_id

    def _own(self) -> dict[str, torch.Tensor]:
        return self._states.get(self._id, {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._own()[name]

    # Entries are assigned whole, so that a mapping kept on disk (a deployed client's
    # ``--state-dir``) sees every change and writes it.
    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._states[self._id] = {**self._own(), name: value}

    def update(self, other: Any = (), /, **kwargs: torch.Tensor) -> None:
        """Set several entries in one assignment of the client's entry (one write to disk, so
        that a crash leaves all of them or none); nothing to set writes nothing."""
        values = dict(other, **kwargs)
        if values:
            self._states[self._id] = {**self._own(), **values}

    def __delitem__(self, name: str) -> None:
        own = dict(self._own())
        del own[name]
        self._states[self._id] = own

    def __iter__(self) -> Iterator[str]:
        return iter(self._own())

    def __len__(self) -> int:
        return len(self._own())


def _seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``, without its cost where torch has no accelerator.

    ``torch.manual_seed`` also queues a lazy seed for each accelerator back end that is not yet
    initialised, capturing a Python stack trace each time (about 0.1-0.3 ms per call, paid once
    per client per round in the simulator). With no accelerator available those seeds can never
    take effect, so seeding the CPU generator alone is the same thing.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.current_accelerator(check_available=True) is None:
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class ClientApp:
    """Decode a task, run local training or evaluation on the client's data, encode the reply."""

    def __init__(
        self,
        model: ModelAdapter,
        data: Mapping[int, ClientData],
        state: MutableMapping[int, dict[str, torch.Tensor]] | None = None,
        secagg: secagg_client.SecAggClient | None = None,
        pins: ClientPins | None = None,
        trainer: ClientTrainer | None = None,
        identities: secagg.Identities | None = None,
        he_key: Any = None,
    ) -> None:
        """``trainer``: the client's local training (None: the built-in loop each task names);
        ``identities``: the long-term keys of this node's clients and the registry of their
        peers' (with them, secure aggregation runs only verified rounds); ``he_key``: the
        federation's HE secret key (a TenSEAL context), for ``mode = "ckks"``."""
        self.model = model
        self.data = data
        self.trainer = trainer
        self.state: MutableMapping[int, dict[str, torch.Tensor]] = {} if state is None else state
        self.secagg = (
            secagg_client.SecAggClient(self.fit, identities=identities)
            if secagg is None
            else secagg
        )
        self.he = he_client.HEClient(self.fit, he_key, identities=identities)
        self._pretrained: dict[int, Pretrained] = {}
        self.pin(ClientPins() if pins is None else pins)

    def pin(self, pins: ClientPins) -> None:
        """Hold the server to ``pins`` from now on (the secure-aggregation client too)."""
        self.pins = pins
        self.secagg.pins = pins.secure_aggregation
        self.he.pins = pins.homomorphic
        self.he.min_inputs = pins.homomorphic_inputs

    def handle(self, client_id: int, payload: bytes) -> bytes:
        """Answer one request addressed to ``client_id``."""
        return messages.encode(self.answer(client_id, messages.decode(payload)))

    def answer(self, client_id: int, task: messages.Message) -> messages.Message:
        """The reply to one decoded request addressed to ``client_id`` (what :meth:`handle`
        encodes; an engine that decodes a round's requests itself calls this)."""
        if task.client_id != client_id:
            raise messages.MessageError(
                f"Task addressed to client {task.client_id} was delivered to client {client_id}."
            )
        if client_id not in self.data:
            raise KeyError(f"No data for client {client_id} on this node.")
        if isinstance(task, messages.FitTask):
            if self.pins.secure_aggregation is not None or self.pins.homomorphic is not None:
                raise RefusedTaskError(
                    f"Client {client_id} refuses round {task.round}: a plain fit task would show "
                    "the server its update, its configuration sends it only under secure "
                    "aggregation."
                )
            return self.fit(task)
        if isinstance(task, messages.EvaluateTask):
            return self.evaluate(task)
        if isinstance(task, messages.RegisterTask):
            return self.register(task)
        if isinstance(task, _SECAGG_REQUESTS):
            return self.secagg.handle(task)
        if isinstance(task, _HE_REQUESTS):
            return self.he.handle(task)
        raise messages.MessageError(f"A client cannot answer a {type(task).__name__}.")

    def fit(self, task: messages.FitTask) -> messages.FitReply:
        """Train with the app's trainer (or the built-in one the task names), then apply what
        every update gets before it leaves (:meth:`reply`). A result that an engine training
        many clients at once already computed for this task (:meth:`pretrained`) stands in for
        the training; every check and everything after the training is the same."""
        trainer, train_task = self.start_fit(task)
        done = self._pretrained.pop(task.client_id, None)
        if done is not None and done.round == task.round:
            train_task.state.update(done.state)
            return self.reply(task, done.result)
        self.model.set_flat(task.parameters)
        return self.reply(task, trainer.train(self.model, self.data[task.client_id], train_task))

    def start_fit(self, task: messages.FitTask) -> tuple[ClientTrainer, TrainTask]:
        """Check ``task`` against the pins and the trainer's features, seed this task's
        randomness and return the trainer with its :class:`TrainTask` (raises
        :class:`RefusedTaskError` for a task the client refuses)."""
        self.pins.check_fit(task)
        seed = messages.config_int(task.config, "seed", 0)
        trainer = self.trainer if self.trainer is not None else personal.for_task(task.config)
        missing = features.asked(task.config, task.tensors) - trainer.features
        if missing:
            raise RefusedTaskError(
                f"Client {task.client_id} refuses round {task.round}: the task asks for "
                f"{', '.join(sorted(missing))}, which its trainer {type(trainer).__name__} does "
                "not apply."
            )
        # Layers with their own randomness (dropout) draw from torch's global generator; seeding
        # it per task makes a resumed run repeat an uninterrupted one exactly.
        _seed_torch(seed)
        generator = torch.Generator().manual_seed(seed)
        return trainer, TrainTask(
            task.client_id,
            task.round,
            task.parameters,
            task.config,
            task.tensors,
            generator,
            _ClientState(self.state, task.client_id),
        )

    def reply(self, task: messages.FitTask, result: TrainResult) -> messages.FitReply:
        """The reply to ``task`` from its training's ``result``: central DP's clip when the task
        carries one, the trainer's metrics (DP-SGD's report among them) and tensors. Secure
        aggregation masks this reply's update (:class:`~fedguard.protocol.secagg_client.SecAggClient`)
        and :meth:`handle` encodes it, whichever engine trained."""
        update, metrics = result.update, dict(result.metrics)
        if messages.DP_CLIP_NORM in task.config:
            clip_norm = messages.config_float(task.config, messages.DP_CLIP_NORM)
            clipped = dp_fedavg.clip_update(update, clip_norm)
            update = clipped.update
            metrics[messages.DP_UNCLIPPED] = float(clipped.unclipped)
        return messages.FitReply(
            round=task.round,
            client_id=task.client_id,
            update=update,
            num_examples=result.num_examples,
            metrics=metrics,
            tensors=dict(result.tensors),
        )

    @contextlib.contextmanager
    def pretrained(self, results: Mapping[int, Pretrained]) -> Iterator[None]:
        """Within this block, :meth:`fit` takes a client's training from ``results`` (client id
        to the training an engine already ran for this round, e.g. the cohort engine's) instead
        of training; entries not used are dropped at the end."""
        self._pretrained = dict(results)
        del results  # fit pops each entry it uses: nothing here keeps a used one alive
        try:
            yield
        finally:
            self._pretrained = {}

    def evaluate(self, task: messages.EvaluateTask) -> messages.EvaluateReply:
        """Loss and accuracy of ``task.parameters`` on the client's held-out data and, when the
        task names the bins and classes, the score histograms and confusion matrix that a
        federated AUC and report add up (:mod:`fedguard.algorithms.binned_auc`).

        A client without held-out data refuses: its training data would report a fit, not a
        test, and metrics of training records are not covered by DP-SGD's guarantee.

        A personal evaluation task (one naming a personalisation method) is answered only from
        held-out data of the client's own (:attr:`ClientData.own_eval`): a client without any,
        too small to hold out a split of its partition and holding its share of the central
        evaluation split instead, replies :data:`~fedguard.protocol.messages.NO_OWN_EVAL` and
        nothing else, which the server does not count (:mod:`fedguard.protocol.personal_eval`).
        This is the one rule of which clients a personal evaluation counts, the same in every
        runtime: simulated, under Ray, with the cohort engine, and deployed."""
        data = self.data[task.client_id]
        if personal.PersonalSettings.from_config(task.config) is not None and not _holds_own(data):
            return messages.EvaluateReply(
                round=task.round,
                client_id=task.client_id,
                num_examples=0,
                metrics={messages.NO_OWN_EVAL: 1.0},
            )
        if data.eval_x is None or data.eval_y is None or int(data.eval_y.shape[0]) == 0:
            raise ValueError(
                f"Client {task.client_id} holds no held-out data to evaluate on (give it "
                "--eval-data, --eval-fraction or x_eval/y_eval in its --data file)."
            )
        x, y = data.eval_x, data.eval_y
        self.model.set_flat(task.parameters)
        result, probabilities = evaluation.evaluate_with_probabilities(self.model, x, y)
        tensors: dict[str, torch.Tensor] = {}
        if messages.EVAL_BINS in task.config:
            bins = messages.config_int(task.config, messages.EVAL_BINS)
            classes = messages.config_int(task.config, messages.EVAL_CLASSES)
            if probabilities.shape[1] != classes or not 1 <= bins <= MAX_SCORE_BINS:
                raise ValueError(
                    f"Client {task.client_id}: the task asks for {classes} classes in {bins} "
                    f"bins, its model has {probabilities.shape[1]} classes."
                )
            tensors[messages.EVAL_SCORES] = binned_auc.score_histograms(probabilities, y, bins)
            confusion = torch.zeros(classes, classes, dtype=torch.int64)
            confusion.index_put_(
                (y, probabilities.argmax(dim=1)), torch.ones_like(y), accumulate=True
            )
            tensors[messages.EVAL_CONFUSION] = confusion
        metrics = {"loss": result.loss, "accuracy": result.accuracy}
        metrics.update(self._personal_metrics(task, data))
        return messages.EvaluateReply(
            round=task.round,
            client_id=task.client_id,
            num_examples=result.num_examples,
            metrics=metrics,
            tensors=tensors,
        )

    def _personal_metrics(self, task: messages.EvaluateTask, data: ClientData) -> dict[str, float]:
        """``personal_loss`` and ``personal_accuracy``: the client's personal model (see
        :mod:`fedguard.client.personal`) on the same held-out data, when the task names a
        personalisation method ({} otherwise). Fine-tuning draws from the task's seed."""
        if personal.PersonalSettings.from_config(task.config) is None:
            return {}
        if data.eval_x is None or data.eval_y is None or not data.own_eval:
            raise ValueError(f"Client {task.client_id} holds no held-out data of its own.")
        generator = torch.Generator().manual_seed(messages.config_int(task.config, "seed", 0))
        own = personal.personal_params(
            self.model,
            data,
            task.parameters,
            _ClientState(self.state, task.client_id),
            task.config,
            generator,
        )
        self.model.set_flat(own)
        result = evaluation.evaluate(self.model, data.eval_x, data.eval_y)
        return {"personal_loss": result.loss, "personal_accuracy": result.accuracy}

    def register(self, task: messages.RegisterTask) -> messages.Registration:
        """This client's registration: its counts (rounded up) and its model's signature."""
        data = self.data[task.client_id]
        held = 0 if data.eval_y is None else int(data.eval_y.shape[0])
        return registration.registration_reply(
            task,
            spec=self.model.spec,
            num_examples=data.num_train,
            eval_examples=held,
            own_bucket=self.pins.count_bucket,
        )
