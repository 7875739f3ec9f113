"""``runtime.kind = "ray"``: the simulated clients of an experiment on a pool of Ray actors.

:class:`SimulatedClients` is the recipe each actor receives (pickled once, through the object
store): the configuration, the run's pins and fit settings, the user's model and data functions
and the data-poisoning plans. Called inside the actor with the ids of its clients, it builds what the
in-process simulator builds in the driver, for those clients only: the federation from the
configuration and seed (the same partition, the same held-out shares, the same poisoned data),
the model, the trainer, and a :class:`~fedguard.client.app.ClientApp` over their data (with the
cohort engine over it when ``runtime.actor_engine = "cohort"``). The rest of the federation is
dropped there, so each actor keeps the data of its own clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch

from fedguard import plugins
from fedguard.client.app import ClientApp, ClientPins
from fedguard.client.trainer import ClientTrainer
from fedguard.experiment import config_checks, engines, federation
from fedguard.experiment.config import ConfigError, ExperimentConfig
from fedguard.experiment.plugin_context import PluginContext
from fedguard.models import registry as models
from fedguard.protocol import messages
from fedguard.protocol.transport import Transport
from fedguard.simulation import attack, ray_engine


@dataclass
class ActorClients:
    """An actor's clients: their app, and the cohort engine over it when the actors train
    cohorts (``runtime.actor_engine = "cohort"``; None: one client after another)."""

    app: ClientApp
    batch: Transport | None = None

    @property
    def state(self) -> MutableMapping[int, dict[str, torch.Tensor]]:
        return self.app.state

    def handle(self, client_id: int, payload: bytes) -> bytes:
        return self.app.handle(client_id, payload)


@dataclass(frozen=True)
class SimulatedClients:
    """What an actor needs to build its clients (see the module docstring).

    ``client_config``: the fit settings every task carries (a plug-in trainer's context gets
    them, as in the driver); ``poisoning``: the run's data-poisoning plans (one per behaviour,
    none without; model poisoning rewrites replies on the driver, around the transport).
    """

    cfg: ExperimentConfig
    pins: ClientPins
    client_config: Mapping[str, messages.Scalar]
    model_fn: Callable[..., Any] | None = None
    data_fn: federation.DataFn | None = None
    poisoning: tuple[attack.Plan, ...] = ()

    def __call__(self, client_ids: Sequence[int]) -> ActorClients:
        cfg = self.cfg
        fed = federation.build_federation(cfg, self.data_fn)
        fed = replace(fed, clients={cid: fed.clients[cid] for cid in client_ids})
        for plan in self.poisoning:
            poison = functools.partial(federation.poison_data, plan, fed.num_classes)
            fed = federation.poison_clients(
                fed, [m for m in plan.malicious if m in fed.clients], poison
            )
        build_model = functools.partial(
            models.build,
            cfg.model.name,
            framework=cfg.model.framework,
            input_shape=fed.input_shape,
            num_classes=fed.num_classes,
            seed=cfg.experiment.seed,
            builder=self.model_fn,
        )
        model = build_model()
        app = ClientApp(
            model,
            fed.clients,
            {},
            pins=self.pins,
            trainer=self._trainer(build_model),
            identities=config_checks.simulated_identities(cfg),
        )
        together = None
        if cfg.runtime.actor_engine == "cohort":
            together = engines.cohort_transport(cfg, app, list(fed.clients))
        return ActorClients(app, together)

    def _trainer(self, build_model: Callable[[], Any]) -> ClientTrainer:
        """``client.trainer``, made in the actor as the driver makes it (a plug-in is loaded
        with the same options and context)."""
        c = self.cfg.client
        if not plugins.is_reference(c.trainer):
            return config_checks.builtin_trainer(self.cfg)
        context = PluginContext(
            seed=self.cfg.experiment.seed,
            num_clients=self.cfg.data.num_clients,
            clients_per_round=self.cfg.clients_per_round,
            byzantine_f=self.cfg.server.byzantine_f,
            client_config=self.client_config,
            build_model=build_model,
        )
        made = plugins.load(
            c.trainer, what="client.trainer", options=c.trainer_options, context=context
        )
        plugins.check_kind(made, ClientTrainer, spec=c.trainer, what="client.trainer")
        return cast(ClientTrainer, made)


def _check_pickles(clients: SimulatedClients) -> None:
    """Refuse, naming the part, a recipe that cannot travel to the actors."""
    from ray import cloudpickle

    parts = (
        ("the model function (model_fn)", clients.model_fn),
        ("the data function (data_fn)", clients.data_fn),
        (
            "the client trainer's options (client.trainer_options)",
            clients.cfg.client.trainer_options,
        ),
        ("the clients' recipe", clients),
    )
    for what, part in parts:
        try:
            cloudpickle.dumps(part)
        except Exception as exc:  # pickling raises what the object's parts raise
            raise ConfigError(
                f'runtime.kind = "ray": {what} cannot be pickled to the Ray actors '
                f"({type(exc).__name__}: {exc}); make it a module-level function or an object "
                'without open files, locks or sockets, or use runtime.kind = "inprocess"'
            ) from None


def transport(
    clients: SimulatedClients,
    client_ids: Sequence[int],
    state: MutableMapping[int, dict[str, torch.Tensor]],
) -> ray_engine.RayTransport:
    """The Ray pool of ``clients.cfg``'s ``[runtime]`` serving ``client_ids``, their state kept
    in ``state`` (the experiment's, which checkpoints hold); a :class:`ConfigError` when Ray is
    missing, the recipe does not pickle, the pool does not fit the cluster or an actor cannot
    build its clients."""
    r = clients.cfg.runtime
    try:
        ray_engine.require_ray()
    except ray_engine.RayEngineError as exc:
        raise ConfigError(f'runtime.kind = "ray": {exc}') from None
    _check_pickles(clients)
    settings = ray_engine.PoolSettings(r.actors, r.cpus_per_actor, r.gpus_per_actor, r.address)
    try:
        return ray_engine.RayTransport(clients, client_ids, state, settings)
    except ray_engine.RayEngineError as exc:
        raise ConfigError(f'runtime.kind = "ray": {exc}') from None
