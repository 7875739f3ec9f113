"""The cohort engine: the in-process simulator with each round's local training vectorised.

``[runtime] kind = "cohort"``. A round's requests are decoded once; the fit tasks among them
(plain fit tasks and secure aggregation's masking requests, which carry one) whose training can be
vectorised are trained together, ``cohort_size`` clients at a time, by
:func:`fedguard.client.cohort.train` (``torch.func.vmap`` over stacked parameters and batches, on
``device``). Then every request is answered by the same :meth:`ClientApp.answer
<fedguard.client.app.ClientApp.answer>` as in the in-process simulator, which takes each client's
training from the cohort's results: checks, central DP's clip, secure aggregation's masking,
DP-SGD's report and the byte encoding are the sequential client's own code.

What cannot be vectorised (a Keras model, batch norm, a plug-in trainer, L-BFGS, Newton) is
trained client by client as the in-process simulator does, with one log line per reason; so is
a cohort whose vectorised training raised. A client's ``seconds`` (for ``server.deadline_s``) is
its share of its cohort's training time plus its own answer's time.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from fedguard.client import cohort, trainers
from fedguard.client.app import ClientApp, Pretrained
from fedguard.models.adapter import TorchModel
from fedguard.protocol import he_client, messages, secagg_client
from fedguard.protocol.transport import Delivered, Failed, FailureKind, Outcome, Transport

log = logging.getLogger("fedguard.cohort")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: torch's accelerator when one is available, else the CPU; else ``name``."""
    if name != "auto":
        return torch.device(name)
    accelerator = getattr(torch, "accelerator", None)
    found = None if accelerator is None else accelerator.current_accelerator(check_available=True)
    return torch.device("cpu") if found is None else torch.device(found)


class CohortTransport(Transport):
    """Answers each round's requests with ``app``, training its fit tasks as cohorts."""

    def __init__(
        self,
        app: ClientApp,
        client_ids: Sequence[int],
        *,
        cohort_size: int,
        device: torch.device | str = "cpu",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if cohort_size < 1:
            raise ValueError(f"The cohort size must be at least 1, got {cohort_size}.")
        self.app = app
        self._client_ids = tuple(client_ids)
        self.cohort_size = cohort_size
        self.device = torch.device(device)
        self._clock = clock
        self._logged: set[str] = set()
        self._model_problem = cohort.unsupported_model(app.model)
        self._engine_model: TorchModel | None = None
        #: Clients trained by the vectorised path so far (the rest trained one by one).
        self.vectorised = 0

    @property
    def client_ids(self) -> Sequence[int]:
        return self._client_ids

    def _fallback(self, reason: str) -> None:
        """Log once per reason that some clients train sequentially."""
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("cohort engine: training client by client: %s", reason)

    def _model(self) -> TorchModel:
        """The model the cohorts train on: the app's own on its device, else a copy on ours."""
        if self._engine_model is None:
            model = self.app.model
            if not isinstance(model, TorchModel):  # unsupported_model refuses these
                raise TypeError(
                    f"The cohort engine needs a TorchModel, got {type(model).__name__}."
                )
            if model.trainable()[0].param.device == self.device:
                self._engine_model = model
            else:
                module = copy.deepcopy(model.module).to(self.device)
                self._engine_model = TorchModel(
                    module, outputs_probabilities=model.outputs_probabilities
                )
        return self._engine_model

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        decoded: dict[int, messages.Message | Exception] = {}
        for client_id, payload in requests.items():
            try:
                decoded[client_id] = messages.decode(payload)
            except Exception as exc:  # answered as a failure below, like the sequential client
                decoded[client_id] = exc
        pretrained, shares = self._train(decoded)
        outcomes: list[Outcome] = []
        with self.app.pretrained(pretrained):
            # The app drops each result once it answers with it, and each task is dropped once
            # answered, so that a round's tasks, results and encoded replies (each a model's size
            # per client: 0.5 GB apiece for 1,000 clients of a 0.5 MB model) are not all held.
            del pretrained
            for client_id in list(decoded):
                task = decoded.pop(client_id)
                start = self._clock()
                try:
                    if isinstance(task, Exception):
                        raise task
                    reply = messages.encode(self.app.answer(client_id, task))
                except Exception as exc:  # a client's failure must never stop the round
                    outcomes.append(
                        Failed(client_id, FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
                    )
                    continue
                seconds = self._clock() - start + shares.get(client_id, 0.0)
                if deadline_s is not None and seconds > deadline_s:
                    outcomes.append(
                        Failed(client_id, FailureKind.TIMEOUT, f"replied after {seconds:.2f} s")
                    )
                    continue
                outcomes.append(Delivered(client_id, reply, seconds))
        for outcome in outcomes:  # trained together, the cohort's outcomes settle together
            self._arrived(outcome)
        return outcomes

    def _fit_task(self, task: messages.Message | Exception) -> messages.FitTask | None:
        """The fit task a request trains for, or None (secure aggregation's masking request
        carries one; a plain fit task under secure aggregation is refused unanswered)."""
        plain = self.app.pins.secure_aggregation is None and self.app.pins.homomorphic is None
        if isinstance(task, messages.FitTask) and plain:
            return task
        if isinstance(task, messages.SecAggMaskRequest):
            return secagg_client.fit_task(task)
        if isinstance(task, messages.HeEncryptRequest):
            return he_client.fit_task(task)
        return None

    def _members(self, decoded: Mapping[int, messages.Message | Exception]) -> list[cohort.Member]:
        """The round's fit tasks that the vectorised path can train."""
        members = []
        for client_id, message in decoded.items():
            task = self._fit_task(message)
            if task is None or task.client_id != client_id or client_id not in self.app.data:
                continue
            if self.app.data[client_id].num_train == 0:  # the sequential path refuses it
                continue
            if self._model_problem is not None:
                self._fallback(self._model_problem)
                return []
            try:
                trainer, train_task = self.app.start_fit(task)
            except Exception:  # refused: answering the task raises the same error
                continue
            problem = cohort.unsupported_task(trainer, trainers.local_training_from(task.config))
            if problem is not None:
                self._fallback(problem)
                continue
            members.append(cohort.Member(trainer, train_task, self.app.data[client_id]))
        return members

    def _train(
        self, decoded: Mapping[int, messages.Message | Exception]
    ) -> tuple[dict[int, Pretrained], dict[int, float]]:
        """Train the round's vectorisable fit tasks; their results and each client's share of
        its cohort's seconds."""
        groups: list[tuple[tuple[object, ...], torch.Tensor, list[cohort.Member]]] = []
        for member in self._members(decoded):
            key, params = cohort.settings(member), member.task.params
            for g_key, g_params, group in groups:
                if g_key == key and (g_params is params or torch.equal(g_params, params)):
                    group.append(member)
                    break
            else:
                groups.append((key, params, [member]))
        pretrained: dict[int, Pretrained] = {}
        shares: dict[int, float] = {}
        for _, _, group in groups:
            # longest training first: a chunk's clients finish together, little is masked
            group.sort(key=lambda m: -int(m.data.train_y.shape[0]))
            for start in range(0, len(group), self.cohort_size):
                chunk = group[start : start + self.cohort_size]
                began = self._clock()
                try:
                    results = cohort.train(self._model(), chunk)
                except Exception as exc:  # the sequential path trains these and reports errors
                    self._fallback(f"vectorised training failed ({type(exc).__name__}: {exc})")
                    continue
                share = (self._clock() - began) / len(chunk)
                for member, result in zip(chunk, results, strict=True):
                    pretrained[member.task.client_id] = result
                    shares[member.task.client_id] = share
                self.vectorised += len(chunk)
        return pretrained, shares
