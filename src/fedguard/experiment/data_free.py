"""The experiment of a deployed server that holds no participant's data.

:class:`DataFreeExperiment` is :class:`~fedguard.experiment.assembly.Experiment` for a server
that never loads the data set: the model comes from the config (``model.input_shape`` and
``model.num_classes``, :func:`.assembly.model_io`), and what a simulation reads off the
partition comes from the clients' registrations (:mod:`fedguard.protocol.registration`): the
sampling population (the admitted clients), the most examples each reply may claim, secure
aggregation's default weight cap, the privacy plan (local DP: each client's range of sizes;
user-level DP: the number of clients). The strategy, privacy plan, secure aggregation and round
driver are built by the same functions as in simulation.

Evaluation (``evaluation.mode``): ``"federated"`` (the default without ``server_data``) asks
every admitted client that holds held-out data to evaluate, caps each reply's weight at its
registered held-out count and adds the reports up: loss, accuracy, the AUC from score
histograms and the confusion matrix. ``"server"`` evaluates on ``evaluation.server_data``, a
test set the server owns; ``"both"`` does both. The run folder is the simulator's:
``partition.json`` lists the registrations instead of label counts.

A resumed run keeps the population it started with (the sampling of every round, and so the
privacy accounting, depends on it): the checkpoint records the registrations; a client of the
population that registers again is admitted with its new counts, one that does not keeps its
recorded ones, and a client outside it is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedguard.experiment import assembly, checkpoint, personalization, privacy
from fedguard.experiment.assembly import TransportFn
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.models import registry as models
from fedguard.models.adapter import ModelAdapter
from fedguard.protocol import registration, secagg
from fedguard.protocol.driver import FederatedEvaluation, RoundFailedError
from fedguard.protocol.strategy import StrategyState
from fedguard.protocol.transport import Population, Transport

REGISTRATIONS = "registrations"  # checkpoint info: the admitted clients' registrations


class DataFreeExperiment:
    """One configured experiment on a server without data, its clients registered."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        transport_fn: TransportFn,
        privacy_spent: privacy.Spent | None = None,
        recorded: Mapping[str, Any] | None = None,
        registration_deadline_s: float | None = None,
        identities: secagg.Identities | None = None,
        he_context: Any = None,
    ) -> None:
        """``recorded``: the info of the checkpoint a resumed run continues from;
        ``registration_deadline_s``: how long registration waits (default ``server.deadline_s``);
        ``identities``: the clients' registered public identity keys (verified secure
        aggregation; without them the semi-honest protocol); ``he_context``: under
        ``mode = "ckks"``, the key-less HE parameters (``fedguard he-keys``' server file)."""
        if cfg.audit.canaries:
            raise ConfigError(
                "audit.canaries: a deployed server holds no data and cannot insert canaries; "
                "run the audit run in simulation (fedguard run)"
            )
        self.cfg = cfg
        self.identities = identities
        self.he_context = he_context
        self.mode = cfg.evaluation.resolved_mode(deployed=True)
        if self.mode in ("server", "both") and cfg.evaluation.server_data is None:
            raise ConfigError(
                f'evaluation.mode = "{self.mode}" needs evaluation.server_data on a deployed '
                'server, which holds no data set; give a test set the server owns, or use "federated"'
            )
        if cfg.attack.kind != "none":
            raise ConfigError(
                "attack: simulated attackers exist only in simulation; a deployed server has "
                'none to run (set attack.kind = "none")'
            )
        input_shape, self.num_classes = assembly.model_io(cfg)
        self.input_shape = input_shape
        try:
            self.model = self._fresh_model()
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"model.name: {exc}") from None
        assembly.check_output_width(
            self.model,
            torch.zeros(1, *input_shape),
            self.num_classes,
            f"model.name {cfg.model.name!r} with model.input_shape {list(input_shape)}",
        )
        self.owned = assembly.server_data(cfg, input_shape, self.num_classes)
        spec = self.model.spec
        self.limits = registration.Limits(
            signature=registration.model_signature(spec),
            model=f"{cfg.model.name}, {cfg.model.framework}, {registration.describe(spec)}",
            count_bucket=cfg.count_bucket,
            max_examples=cfg.registration.max_examples,
        )
        reachable = list(range(cfg.data.num_clients))
        inner = transport_fn(reachable)
        try:
            deadline = (
                registration_deadline_s
                if registration_deadline_s is not None
                else cfg.server.deadline_s
            )
            self.registry = registration.register(
                inner, reachable, self.limits, deadline_s=deadline
            )
            if recorded is not None:
                self._keep_population(recorded)
            self._check_population()
            self._assemble(inner, privacy_spent)
        except BaseException:
            inner.close()
            raise

    def _fresh_model(self) -> ModelAdapter:
        """An instance of the run's model as initialised, from the config alone."""
        cfg = self.cfg
        return models.build(
            cfg.model.name,
            framework=cfg.model.framework,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            seed=cfg.experiment.seed,
        )

    def _keep_population(self, recorded: Mapping[str, Any]) -> None:
        """A resumed run's population: the recorded clients, with new registrations where they
        registered again (see the module docstring)."""
        rows = recorded.get(REGISTRATIONS)
        if not isinstance(rows, dict):
            raise ConfigError(
                "--resume: the checkpoint records no registrations (a run of a server that held "
                "the data set); start a new run"
            )
        before = {int(cid): registration.Registered.from_json(r) for cid, r in rows.items()}
        clients = {cid: self.registry.clients.get(cid, old) for cid, old in before.items()}
        for cid in sorted(set(self.registry.clients) - set(before)):
            self.registry.refused[cid] = "refused: not in the population of the resumed run"
        self.registry.clients = dict(sorted(clients.items()))

    def _check_population(self) -> None:
        """Refuse to start when fewer clients are admitted than a round samples."""
        admitted = len(self.registry.clients)
        cfg = self.cfg
        least = cfg.clients_per_round if cfg.server.sampling == "fixed" else cfg.min_clients
        if admitted >= max(least, 1):
            return
        why = "; ".join(f"client {c} {r}" for c, r in sorted(self.registry.refused.items()))
        raise RoundFailedError(
            f"Only {admitted} of {cfg.data.num_clients} clients registered and were admitted; "
            f"a round needs {least} (server.clients_per_round). {why}"
        )

    def _assemble(self, inner: Transport, privacy_spent: privacy.Spent | None) -> None:
        cfg, registry = self.cfg, self.registry
        sizes = registry.sizes
        if cfg.privacy.mode == "local":  # each client's range of sizes
            low = {cid: r.fewest_examples for cid, r in registry.clients.items()}
            self.privacy = privacy.build(
                cfg, low, self.model, privacy_spent, sizes_known=False, largest_sizes=sizes
            )
        else:
            self.privacy = privacy.build(cfg, sizes, self.model, privacy_spent, sizes_known=False)
        built = assembly.build_server_plugins(
            cfg, self.privacy, len(sizes), build_model=self._fresh_model
        )
        self.trainer, self.aggregator, self.strategy = (
            built.trainer,
            built.aggregator,
            built.strategy,
        )
        self.transport: Transport = Population(inner, list(sizes))
        self.driver = assembly.build_driver(
            cfg,
            self.transport,
            self.strategy,
            self.aggregator,
            self.model,
            self.privacy,
            sizes,
            self.identities,
            self.he_context,
        )
        # server.mode = "async": FedBuff over the transport's stream (the gRPC server's)
        self.async_driver = assembly.build_async_driver(cfg, self.driver, self.aggregator)
        self.latency = None  # a deployment's latency is real
        self.client_state: dict[int, dict[str, torch.Tensor]] = {}  # the clients keep theirs
        self.eval_clients = registry.eval_sizes
        if self.mode in ("federated", "both") and not self.eval_clients:
            raise ConfigError(
                f'evaluation.mode = "{self.mode}": no admitted client holds held-out data '
                "(each registered 0 held-out examples); give the clients --eval-data or "
                "--eval-fraction, or evaluate on evaluation.server_data"
            )
        self.last_federated: FederatedEvaluation | None = None
        self.initial_params = self.model.get_flat()

    # -- what the runner asks of an experiment (as of assembly.Experiment) ----------------------
    @property
    def client_ids(self) -> list[int]:
        return list(self.registry.clients)

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in range(self.num_classes)]

    def partition(self) -> dict[str, Any]:
        """What ``partition.json`` says: the registrations (the server has no label counts)."""
        registered = self.registry.clients
        return {
            "dataset": None,
            "source": "registrations",
            "num_clients": len(registered),
            "class_names": self.class_names,
            "count_bucket": self.limits.count_bucket,
            "clients": [
                {
                    "id": cid,
                    "name": f"client_{cid}",
                    "num_samples": r.num_examples,
                    "eval_samples": r.eval_examples,
                    "count_bucket": r.count_bucket,
                    "label_counts": None,
                }
                for cid, r in registered.items()
            ],
            "total_samples": sum(r.num_examples for r in registered.values()),
            "eval_samples": (
                int(self.owned[1].shape[0])
                if self.owned is not None
                else sum(r.eval_examples for r in registered.values())
            ),
            "refused": {str(cid): reason for cid, reason in sorted(self.registry.refused.items())},
        }

    def partition_histogram(self) -> list[list[int]]:
        """Per client, its registered example count (one bar each in ``partition.png``)."""
        return [[r.num_examples] for r in self.registry.clients.values()]

    @property
    def histogram_names(self) -> list[str]:
        return ["registered examples"]

    def contribution_utility(self) -> Callable[[torch.Tensor], float] | None:
        """Contribution scores' utility on a data-free server: the negative loss on
        ``evaluation.server_data``, the one labelled set it owns (a :class:`ConfigError` without
        it; None when ``contribution.method`` needs none)."""
        method = self.cfg.contribution.method
        if method in ("none", "cosine"):
            return None
        if self.owned is None:
            raise ConfigError(
                f'contribution.method = "{method}" values updates on a validation set the server '
                "owns; a deployed server holds no data set: give evaluation.server_data, or use "
                'contribution.method = "cosine" (no validation)'
            )
        x, y = self.owned
        return assembly.negative_loss(self.model, x, y, self.cfg)

    def checkpoint_info(self) -> dict[str, Any]:
        """The registrations, so that a resumed run keeps its population."""
        return {REGISTRATIONS: self.registry.to_json()}

    def should_evaluate(self, round_: int) -> bool:
        every = self.cfg.evaluation.every
        return round_ == self.cfg.experiment.rounds or (every > 0 and round_ % every == 0)

    def evaluate_round(self, round_: int, params: torch.Tensor) -> dict[str, Any]:
        """The metrics of an evaluated round, per ``evaluation.mode`` (module docstring)."""
        out: dict[str, Any] = {"backdoor_success": None}
        if self.mode in ("server", "both") and self.owned is not None:
            self.model.set_flat(params)
            x, y = self.owned
            out.update(assembly.central_metrics(self.model, x, y, self.cfg.evaluation.batch_size))
        if self.mode in ("federated", "both"):
            fed = self.driver.evaluate_round(
                round_,
                params,
                clients=list(self.eval_clients),
                registered=self.eval_clients,
                num_classes=self.num_classes,
            )
            self.last_federated = fed
            prefix = "test" if self.mode == "federated" else "federated"
            out.update(assembly.federated_metrics(fed, prefix))
        # each client's personal model beside the global one, on the client's held-out data
        out.update(
            personalization.evaluate(
                self.cfg,
                self.driver.transport,
                round_,
                params,
                list(self.eval_clients),
                assembly.client_training_config(self.cfg),
                self.driver.deadline_s,
            )
        )
        return out

    def final_report(self, params: torch.Tensor) -> dict[str, Any]:
        """The confusion matrix: on the server's test set, or the clients' added up."""
        if self.mode == "federated" or self.owned is None:
            return assembly.federated_report(self.last_federated)
        self.model.set_flat(params)
        x, y = self.owned
        return assembly.confusion_report(self.model, x, y, None, self.cfg.evaluation.batch_size)

    def attack_summary(self) -> None:
        return None

    def checkpoint_tensors(
        self, params: torch.Tensor, state: StrategyState
    ) -> dict[str, torch.Tensor]:
        tensors = {"params": params}
        tensors.update({f"server.{k}": v for k, v in state.items()})
        return tensors

    def restore(self, ck: checkpoint.Checkpoint) -> tuple[torch.Tensor, StrategyState]:
        params = ck.tensors["params"]
        self.model.spec.check_vector(params)
        server = {
            k.removeprefix("server."): v for k, v in ck.tensors.items() if k.startswith("server.")
        }
        return params, self.strategy.restore(server)
