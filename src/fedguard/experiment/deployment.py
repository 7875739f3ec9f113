"""Deployment entry points: run an experiment's server over gRPC, and build a deployed client.

``serve`` is ``fedguard.run`` with the gRPC transport in place of the simulator and a server
that never loads the data set (:mod:`fedguard.experiment.data_free`): its model comes from the
config, the clients' sizes from their registrations, the test metrics from the clients'
evaluations or a test set the server owns (``evaluation.server_data``). The runner, driver,
strategy, checkpoints and run folder are the simulator's, so ``--resume`` after a crash works as
in simulation. Differences with names: a deployed round always has a deadline (a simulated
client cannot vanish, a deployed one can), ``--round-deadline`` if given, else the config's
``server.deadline_s``, else :data:`DEFAULT_ROUND_DEADLINE_S`; it is written into the run's
``config.toml`` so the run folder says how long each round waited. Registration waits as long.

A deployed client is ``ClientApp.handle`` bound to one client id and its local data, either
the client's own ``.npz`` file (with held-out data from the file, ``--eval-data`` or a held-out
fraction) or, for demos, its partition of the experiment's data set (holding out its share of
the data set's evaluation split). A client given the experiment file holds the server to that
file's privacy settings (secure aggregation, DP, the rounding of its registered counts),
exactly as a simulated client does (:func:`fedguard.client.app.client_pins`), also with its own
data (:func:`fedguard.experiment.assembly.config_pins`, from the file alone). With a state
folder its per-client state (SCAFFOLD's control variate, FedDyn's gradient state, the personal
model of ``[personalization]``) survives a restart (:class:`fedguard.client.state_store.DiskState`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard.client import state_store
from fedguard.client.app import ClientApp
from fedguard.client.data import ClientData
from fedguard.data import dataset
from fedguard.data.errors import DataError
from fedguard.experiment import assembly, federation, runner
from fedguard.experiment import config as config_mod
from fedguard.experiment.plugin_context import PluginContext
from fedguard.models import registry as models
from fedguard.protocol import registration
from fedguard.runtime import auth, grpc_client, grpc_server, grpc_tls, he_keys
from fedguard.runtime import identities as identities_mod

log = logging.getLogger("fedguard.grpc")


DEFAULT_ROUND_DEADLINE_S = grpc_server.DEFAULT_DEADLINE_S


@dataclass(frozen=True)
class ServerOptions:
    """How the server listens, whom it admits, and how long it waits for its clients.

    ``round_deadline_s`` overrides the config's ``server.deadline_s`` (see the module docstring);
    ``max_payload_bytes`` is the largest reply the server accepts (larger ones are refused with
    ``RESOURCE_EXHAUSTED`` from their header, before any of their data is buffered).
    """

    address: str
    tls: grpc_tls.ServerTls | None
    tokens: Path | None
    insecure: bool = False
    wait_for_clients_s: float = 600.0
    poll_s: float = grpc_server.DEFAULT_POLL_S
    round_deadline_s: float | None = None
    max_payload_bytes: int = grpc_server.DEFAULT_MAX_PAYLOAD_BYTES
    progress_s: float = grpc_server.DEFAULT_PROGRESS_S
    identities: Path | None = None  # the clients' public identity keys (identities.json)
    he_params: Path | None = None  # mode = "ckks": the key-less HE parameters (fedguard he-keys)


def deadline_overrides(
    config: str | Path, options: ServerOptions, overrides: Sequence[str]
) -> list[str]:
    """``overrides`` plus the ``server.deadline_s`` every deployed round waits at most.

    ``--round-deadline`` wins over the config; a config without ``server.deadline_s`` gets
    :data:`DEFAULT_ROUND_DEADLINE_S` rather than waiting without a stated limit.
    """
    out = list(overrides)
    if options.round_deadline_s is not None:
        if options.round_deadline_s <= 0:
            raise config_mod.ConfigError(
                f"--round-deadline must be positive, got {options.round_deadline_s:g}."
            )
        out.append(f"server.deadline_s={float(options.round_deadline_s)!r}")
    elif config_mod.load(config, out).server.deadline_s is None:
        out.append(f"server.deadline_s={DEFAULT_ROUND_DEADLINE_S!r}")
    return out


def serve(
    config: str | Path,
    options: ServerOptions,
    *,
    out: str | Path | None,
    resume: bool = False,
    overrides: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the experiment with clients connecting over gRPC; returns the run's summary.

    The server never loads the data set. Registration starts once every client of the
    federation (``data.num_clients``) has connected, or after ``wait_for_clients_s`` with
    whoever is there; the clients admitted by it are the run's population. While a round waits,
    the ``fedguard.grpc`` logger reports every ``progress_s`` how many of its clients have
    replied.
    """
    overrides = deadline_overrides(config, options, overrides or [])
    deadline_s = config_mod.load(config, overrides).server.deadline_s
    log.info("each round waits at most %g s for a client's reply (server.deadline_s)", deadline_s)
    mutual = options.tls is not None and options.tls.client_ca is not None
    authenticator = auth.Authenticator(options.tokens, mutual_tls=mutual)
    holder: list[grpc_server.GrpcServerTransport] = []

    def transport_fn(client_ids: list[int]) -> grpc_server.GrpcServerTransport:
        transport = grpc_server.GrpcServerTransport(
            client_ids,
            options.address,
            authenticator=authenticator,
            tls=options.tls,
            insecure=options.insecure,
            poll_s=options.poll_s,
            max_payload_bytes=options.max_payload_bytes,
            progress_s=options.progress_s,
        )
        holder.append(transport)
        transport.start()
        if not transport.wait_for_clients(len(client_ids), options.wait_for_clients_s):
            log.warning(
                "only %d of %d clients connected within %g s; starting anyway",
                len(transport.connected()),
                len(client_ids),
                options.wait_for_clients_s,
            )
        return transport

    he_context = server_he_context(config_mod.load(config, overrides), options.he_params)
    registry = None
    if options.identities is not None:
        try:
            registry = identities_mod.load_registry(options.identities)
        except ValueError as exc:
            raise config_mod.ConfigError(f"--identities: {exc}") from None
    try:
        summary = runner.run(
            config,
            out=out,
            resume=resume,
            overrides=overrides,
            progress=progress,
            transport_fn=transport_fn,
            data_free=True,
            identities=registry,
            he_context=he_context,
        )
        if holder:
            holder[0].finish()
        return summary
    finally:
        for transport in holder:
            transport.close()


def server_he_context(cfg: config_mod.ExperimentConfig, path: Path | None) -> Any:
    """The server's key-less HE context from ``path`` (``--he-params``, the
    :data:`~fedguard.runtime.he_keys.SERVER_PARAMS_FILE` of ``fedguard he-keys``), required
    exactly when the experiment aggregates under HE; None otherwise."""
    a = cfg.secure_aggregation
    homomorphic = a.enabled and a.mode == "ckks"
    if path is None:
        if homomorphic:
            raise config_mod.ConfigError(
                'secure_aggregation.mode = "ckks" needs --he-params: the server\'s parameter '
                f"file ({he_keys.SERVER_PARAMS_FILE}) made by fedguard he-keys"
            )
        return None
    if not homomorphic:
        raise config_mod.ConfigError(
            '--he-params is for secure_aggregation.mode = "ckks", which this experiment does '
            "not use"
        )
    try:
        return he_keys.load(path, secret=False, scheme=a.he_scheme)
    except (OSError, ValueError) as exc:
        raise config_mod.ConfigError(f"--he-params: {exc}") from None


def give_he_key(app: ClientApp, path: Path, cfg: config_mod.ExperimentConfig | None) -> None:
    """Give ``app`` the federation's HE secret key from ``path`` (``--he-key``, the
    :data:`~fedguard.runtime.he_keys.CLIENT_KEY_FILE` of ``fedguard he-keys``), checked against
    the experiment's scheme when ``cfg`` is known."""
    scheme = None if cfg is None else cfg.secure_aggregation.he_scheme
    try:
        app.he.set_key(he_keys.load(path, secret=True, scheme=scheme))
    except (OSError, ValueError) as exc:
        raise config_mod.ConfigError(f"--he-key: {exc}") from None


def demo_app(
    config: str | Path,
    client_id: int,
    overrides: Sequence[str] = (),
    *,
    state_dir: Path | None = None,
) -> ClientApp:
    """A client holding its partition of the experiment's data set (for demos and tests).

    The experiment is assembled as a simulation assembles it, so that the client pins the same
    secure-aggregation and DP settings that a simulated client of this config pins, and holds
    out what a simulated client holds out (its share of the evaluation split, or of its own
    partition with ``data.client_eval_fraction``); the simulated ``[attack]`` is left out (a
    deployed client trains on its own data). ``state_dir``: keep its state there.
    """
    cfg = config_mod.load(config, list(overrides))
    if cfg.attack.kind != "none":
        cfg = cfg.model_copy(update={"attack": config_mod.AttackSection()})
    # one client, in this process: the simulation's [runtime] does not apply
    cfg = cfg.model_copy(update={"runtime": config_mod.RuntimeSection()})
    exp = assembly.Experiment(cfg)
    if client_id not in exp.fed.clients:
        raise config_mod.ConfigError(
            f"--client-id {client_id}: the experiment has clients 0..{len(exp.fed.clients) - 1}"
        )
    state = None if state_dir is None else _state(state_dir)
    return ClientApp(
        exp.model,
        {client_id: exp.fed.clients[client_id]},
        state=state,
        pins=exp.app.pins,
        trainer=exp.trainer,
    )


def _state(folder: Path) -> state_store.DiskState:
    try:
        return state_store.DiskState(folder)
    except state_store.StateError as exc:
        raise config_mod.ConfigError(str(exc)) from None


def data_app(
    data: Path,
    client_id: int,
    *,
    model: str,
    framework: str,
    num_classes: int,
    experiment: config_mod.ExperimentConfig | None = None,
    eval_data: Path | None = None,
    eval_fraction: float = 0.0,
    state_dir: Path | None = None,
) -> ClientApp:
    """A client holding its own data: an ``.npz`` with ``x``, ``y`` (and ``x_eval``, ``y_eval``).

    Its held-out data, what it evaluates the global model on: ``eval_data`` (an ``.npz`` with
    ``x``, ``y``), else the file's ``x_eval``, ``y_eval``, else ``eval_fraction`` of its
    examples held out of training (a shuffle seeded with its client id); without any it takes
    no part in federated evaluation (it registers 0 held-out examples).

    With the ``experiment``'s config it holds the server to that config's secure aggregation
    and DP (:func:`.assembly.config_pins`, from the config and its own data's size; the
    experiment's data set is not loaded) and trains with its ``client.trainer``; without it, it
    holds the server only to the protocol's own rules and trains as each task names. Under
    local DP its sampling rate and steps follow its own data, not the server's copy of the
    partition: its fit replies report them and the server composes what they report.
    ``state_dir``: keep its state there (see :class:`~fedguard.client.state_store.DiskState`)."""
    if experiment is not None and not 0 <= client_id < experiment.data.num_clients:
        raise config_mod.ConfigError(
            f"--client-id {client_id}: the experiment has clients "
            f"0..{experiment.data.num_clients - 1}"
        )
    # The data and the model are checked here, before connecting: a file that cannot be read,
    # empty or non-finite features, labels outside 0..num_classes-1, or a model whose output
    # width is not num_classes stop the client with one line naming the problem.
    if num_classes < 2:
        raise config_mod.ConfigError(f"--num-classes must be at least 2, got {num_classes}")
    if not 0.0 <= eval_fraction < 1.0:
        raise config_mod.ConfigError(f"--eval-fraction must be in [0, 1), got {eval_fraction:g}")
    try:
        train, held = dataset.read_client_npz(data, num_classes=num_classes)
    except DataError as exc:
        raise config_mod.ConfigError(f"--data {exc}") from None
    if eval_data is not None:
        try:
            held, _ = dataset.read_client_npz(eval_data, num_classes=num_classes)
        except DataError as exc:
            raise config_mod.ConfigError(f"--eval-data {exc}") from None
        if held.x.shape[1:] != train.x.shape[1:]:
            raise config_mod.ConfigError(
                f"--eval-data {eval_data}: examples of shape {list(held.x.shape[1:])}, --data "
                f"has {list(train.x.shape[1:])}"
            )
    elif held is None and eval_fraction > 0.0:
        train, held = _hold_out(train, eval_fraction, client_id, data)

    def tensors(d: dataset.ArrayDataset) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(d.x, dtype=np.float32))
        return x, torch.from_numpy(np.ascontiguousarray(d.y, dtype=np.int64))

    x, y = tensors(train)
    x_eval, y_eval = (None, None) if held is None else tensors(held)
    local = ClientData(x, y, x_eval, y_eval)
    try:
        adapter = models.build(
            model,
            framework=framework,
            input_shape=tuple(int(s) for s in x.shape[1:]),
            num_classes=num_classes,
            seed=0,  # the server sends the parameters; the local initialisation is never used
        )
    except (ValueError, ImportError) as exc:
        raise config_mod.ConfigError(f"--model {model!r}: {exc}") from None
    assembly.check_output_width(adapter, x[:1], num_classes, f"--model {model!r}")
    pins = trainer = None
    if experiment is not None:
        pins = assembly.config_pins(experiment, adapter, client_id, local.num_train)
        # The client's own file names its trainer; without it, the built-in loop the task names.
        context = PluginContext(seed=experiment.experiment.seed)
        trainer = assembly.build_trainer(experiment, context)
    state = None if state_dir is None else _state(state_dir)
    return ClientApp(adapter, {client_id: local}, state=state, pins=pins, trainer=trainer)


def _hold_out(
    train: dataset.ArrayDataset, fraction: float, client_id: int, data: Path
) -> tuple[dataset.ArrayDataset, dataset.ArrayDataset]:
    """``fraction`` of ``train`` held out for evaluation (a shuffle seeded with the client id,
    so that a restarted client holds out the same examples), the rest kept for training."""
    n = len(train)
    k = int(round(fraction * n))
    if not federation.holds_out(n, fraction):  # the simulation's rule
        raise config_mod.ConfigError(
            f"--eval-fraction {fraction:g} of the {n} examples of {data} holds out {k}; it must "
            "leave at least one example on each side"
        )
    order = np.random.default_rng([client_id, 0xE7A1]).permutation(n)
    return train.subset(order[k:]), train.subset(order[:k])


def identify(app: ClientApp, key: Path, registry: Path, client_id: int) -> None:
    """Give ``app`` client ``client_id``'s identity key at ``key`` and the federation's
    registry at ``registry``: from then on it takes part only in verified secure-aggregation
    rounds. Raises ValueError unless the key is the one registered for ``client_id``."""
    app.secagg.identities = identities_mod.load_client(key, registry, client_id)
    app.he.identities = app.secagg.identities


def run_client(settings: grpc_client.ClientSettings, app: ClientApp) -> int:
    """Answer the server's tasks with ``app`` until the run is finished; the tasks answered.

    Raises :class:`~fedguard.protocol.registration.RegistrationRefused` (after telling the
    server) when the server's model is not this client's."""
    return grpc_client.serve(settings, app.handle, stop_on=(registration.RegistrationRefused,))
