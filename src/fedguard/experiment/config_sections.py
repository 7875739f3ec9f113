"""The sections of an experiment's configuration (one pydantic model per TOML table) and
:class:`ExperimentSections`, all of them together without the cross-key rules.

:mod:`fedguard.experiment.config` adds those rules (:mod:`fedguard.experiment.config_checks`,
which reads these sections) and the TOML loading; import from there.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from fedguard import plugins
from fedguard.algorithms import attacks, robust
from fedguard.algorithms.attacks import model_poisoning as attacks_model
from fedguard.protocol.strategy import StrategyKind


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line per problem, naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
# A Ray cluster's head, as `ray start --head` prints it (runtime.address).
RAY_ADDRESS = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
# A plug-in's options: the TOML table of its key, passed to its factory as keyword arguments.
Options = dict[str, Any]


def _built_in_or_reference(value: str, built_in: tuple[str, ...], key: str) -> str:
    """``value`` if it is one of ``built_in`` or a ``package.module:name`` reference."""
    if value in built_in or plugins.is_reference(value):
        return value
    allowed = ", ".join(repr(b) for b in built_in)
    raise ValueError(
        f'{key}: Input should be {allowed} or "package.module:name" (a plug-in), got {value!r}'
    )


class ExperimentSection(_Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0, lt=2**63)  # numpy's seeding takes no negative seed
    rounds: int = Field(10, ge=1, le=100_000)


class DataSection(_Section):
    dataset: str = "synthetic"
    path: str | None = None
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0.0)
    shards_per_client: int = Field(2, ge=1)
    num_clients: int = Field(10, ge=1, le=1_000_000)
    test_fraction: Probability = 0.2
    client_eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    augment_copies: int = Field(0, ge=0, le=20)
    feature_norm: Literal["utterance", "band"] = "utterance"  # fsdd log-mel normalisation
    # fsdd feature settings (defaults: fedguard.data.audio_features.TRIM_DB / DYNAMIC_RANGE_DB)
    trim_db: float | None = Field(None, gt=0.0)  # trim silence this far below the peak
    dynamic_range_db: float = Field(80.0, gt=0.0)  # log-mel range kept below the peak
    synthetic_samples: int = Field(10_000, ge=1)
    synthetic_shape: tuple[int, ...] = (1, 28, 28)
    synthetic_classes: int = Field(10, ge=2)
    # make each training sample's features when a client reads them (labels only are held)
    synthetic_on_demand: bool = False


class ModelSection(_Section):
    """The model; ``input_shape`` (one example's) and ``num_classes`` let a deployed server,
    which holds no data set, build it (a simulation checks them against the data)."""

    name: str = "image_cnn"
    framework: Literal["torch", "keras"] = "torch"
    input_shape: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(None, min_length=1)
    num_classes: int | None = Field(None, ge=2)


class ClientSection(_Section):
    """Local training: ``client.optimizer``'s built-in loop with these settings, or a plug-in
    ``trainer`` (a :class:`fedguard.ClientTrainer`, ``trainer_options`` its options) that reads
    them from its task's config."""

    optimizer: Literal["sgd", "adam", "lbfgs", "newton"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    proximal_mu: float = Field(0.0, ge=0.0)
    max_steps: int | None = Field(None, ge=1)
    augment: Literal["none", "image", "spectrogram"] = "none"
    trainer: str = "builtin"  # builtin (client.optimizer's loop; DP-SGD under local DP) | plug-in
    trainer_options: Options = {}

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, value: str) -> str:
        return _built_in_or_reference(value, ("builtin",), "client.trainer")


BUILTIN_AGGREGATORS = ("mean", *(k.value for k in robust.RobustAggregator))


class ServerSection(_Section):
    """The strategy (built-in or a plug-in :class:`fedguard.Strategy`), sampling, and the
    aggregator (the mean, a robust rule, or a plug-in :class:`fedguard.Aggregator`)."""

    strategy: str = "fedavg"
    strategy_options: Options = {}
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    min_clients: int | None = Field(None, ge=1)
    server_lr: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
    feddyn_alpha: float = Field(0.01, gt=0.0)  # FedDyn's regulariser weight (strategy "feddyn")
    deadline_s: float | None = Field(None, gt=0.0)
    sampling: Literal["fixed", "poisson"] = "fixed"
    # Byzantine robustness: the rule that replaces the weighted mean, and what it must tolerate.
    aggregator: str = "mean"
    aggregator_options: Options = {}
    byzantine_f: int | None = Field(None, ge=0)  # required with a robust aggregator
    multi_krum_m: int | None = Field(None, ge=1)  # default: K - f
    clipping_radius: float = Field(10.0, gt=0.0)  # centered clipping tau
    clipping_iterations: int = Field(1, ge=1)  # centered clipping L
    norm_bound: float | None = Field(None, gt=0.0)  # norm bounding M (required for it)
    weiszfeld_iterations: int = Field(1000, ge=1)  # geometric median
    weiszfeld_tolerance: float = Field(1e-6, gt=0.0)  # geometric median
    bucket_size: int = Field(1, ge=1)  # > 1: the rule runs on means of random buckets
    # Asynchronous rounds (FedBuff; see fedguard.protocol.async_driver). Unset: the defaults
    # of mode = "async" (concurrency: clients_per_round; buffer_size: 10, at most concurrency;
    # max_staleness: 100); set in mode = "sync" they are refused.
    mode: Literal["sync", "async"] = "sync"
    concurrency: int | None = Field(None, ge=1)
    buffer_size: int | None = Field(None, ge=1)
    max_staleness: int | None = Field(None, ge=0)
    staleness_exponent: float | None = Field(None, ge=0.0)  # s(tau) = (1 + tau)^-a, default 0.5

    @field_validator("strategy", "aggregator")
    @classmethod
    def _named(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "strategy":
            return _built_in_or_reference(
                value, tuple(k.value for k in StrategyKind), "server.strategy"
            )
        return _built_in_or_reference(value, BUILTIN_AGGREGATORS, "server.aggregator")


BUILTIN_ATTACKS = ("none", *(k.value for k in attacks.Attack))


class AttackSection(_Section):
    """Simulated Byzantine clients (simulation only): which attack, how many, its parameters.

    ``fraction`` of the clients, drawn with ``seed`` (default: the experiment's seed), are
    malicious for the whole run. Data poisoning (``label_flip``, ``backdoor``) changes their
    training data; model poisoning replaces their replies (see ``fedguard.simulation.attack``), as
    a plug-in :class:`fedguard.Attack` does (``kind = "package.module:name"``, ``options`` its
    options).

    Several built-in behaviours in one run: ``kind`` a list and ``fraction`` a list of the same
    length (``kind = ["free_rider", "noisy_client"]``, ``fraction = [0.2, 0.1]``); each kind gets
    its own ``round(fraction * num_clients)`` clients, disjoint, drawn from one seeded order (the
    first kind's clients are those it would get alone). At most one of them may rewrite replies
    (model poisoning, free riders); the others poison training data. The cross-key rules are
    ``config_checks.attack``'s.
    """

    kind: str | list[str] = "none"
    fraction: Fraction | list[Fraction] = 0.2
    seed: int | None = Field(None, ge=0, lt=2**63)
    scale: float = Field(1.0, gt=0.0)  # sign_flip: -scale * u
    factor: float = Field(10.0, gt=0.0)  # boost: factor * u
    std: float = Field(1.0, gt=0.0)  # gaussian
    z: float | None = Field(None, gt=0.0)  # alie; default: Baruch et al.'s z_max
    epsilon: float = Field(0.5, gt=0.0)  # ipm: -epsilon * mean(honest)
    perturbation: Literal["unit_vector", "std", "sign"] = "std"  # min_max / min_sum
    target_label: int = Field(0, ge=0)  # backdoor
    trigger_size: int = Field(3, ge=1)  # backdoor: side of the square, in pixels
    poisoned_fraction: float = Field(0.5, gt=0.0, le=1.0)  # backdoor: share of local images
    label_noise: float = Field(0.5, gt=0.0, le=1.0)  # noisy_client: share of labels shuffled
    options: Options = {}  # a plug-in attack's options

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return _built_in_or_reference(value, BUILTIN_ATTACKS, "attack.kind")
        for kind in value:
            if kind not in BUILTIN_ATTACKS[1:]:
                allowed = ", ".join(repr(b) for b in BUILTIN_ATTACKS[1:])
                raise ValueError(
                    f"attack.kind: a list holds built-in behaviours only ({allowed}), got "
                    f'{kind!r} (a plug-in attack or "none" stands alone)'
                )
        return value

    def kinds(self) -> tuple[str, ...]:
        """The behaviours, in the order given (one for a single ``kind``)."""
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)

    def fractions(self) -> tuple[float, ...]:
        """Each behaviour's share of the clients, in :meth:`kinds`' order."""
        return (self.fraction,) if isinstance(self.fraction, float) else tuple(self.fraction)

    def config(self, kind: str | None = None) -> attacks.AttackConfig:
        """The algorithms' view of the built-in model- or data-poisoning attack ``kind``
        (default: the single ``kind``)."""
        if kind is None:
            if not isinstance(self.kind, str):
                raise ValueError("attack.kind is a list: name the behaviour to configure.")
            kind = self.kind
        return attacks.AttackConfig(
            kind=attacks.Attack(kind),
            scale=self.scale,
            factor=self.factor,
            std=self.std,
            z=self.z,
            epsilon=self.epsilon,
            perturbation=attacks_model.Perturbation(self.perturbation),
            label_noise=self.label_noise,
        )


class EvaluationSection(_Section):
    """Where ``test_accuracy``, ``test_loss`` and ``test_auc`` come from.

    ``mode = "server"``: the evaluation set the server owns: ``server_data`` (an ``.npz`` with
    ``x`` and ``y``) when given, else, in simulation, the data set's ``split``.
    ``"federated"``: every client evaluates on its own held-out data and the server adds the
    reports up (weighted by count). ``"both"``: the server's set, plus the clients' reports as
    ``federated_loss`` / ``federated_accuracy`` / ``federated_auc``. Unset: ``"server"`` in
    simulation; on a deployed server, which holds no data set, ``"server"`` with
    ``server_data`` and ``"federated"`` without.
    """

    every: int = Field(1, ge=0)
    mode: Literal["server", "federated", "both"] | None = None
    server_data: str | None = None
    split: Literal["test", "val"] = "test"
    batch_size: int = Field(1024, ge=1)

    def resolved_mode(self, *, deployed: bool) -> str:
        """The mode in force (see the class docstring)."""
        if self.mode is not None:
            return self.mode
        return "federated" if deployed and self.server_data is None else "server"


# A client's registered example counts are rounded up to a multiple of this under DP, unless
# registration.count_bucket says otherwise (see fedguard.protocol.registration).
DP_COUNT_BUCKET = 100


class RegistrationSection(_Section):
    """What a deployed server accepts when clients register (see
    ``fedguard.protocol.registration``): counts rounded up to a multiple of at least
    ``count_bucket`` (default: exact without DP, :data:`DP_COUNT_BUCKET` under DP), and at most
    ``max_examples`` training or held-out examples per client (more is refused as absurd)."""

    count_bucket: int | None = Field(None, ge=1)
    max_examples: int = Field(10_000_000, ge=1)


class PrivacySection(_Section):
    """Differential privacy: off, record level inside each client, or user level at the server.

    ``distributed`` is user-level DP under secure aggregation: each client clips to ``clip_norm``
    and adds its share of Skellam noise before masking (see ``fedguard.algorithms.privacy.distributed_dp``).
    """

    mode: Literal["off", "local", "central", "distributed"] = "off"
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon: float | None = Field(None, gt=0.0)
    max_epsilon: float | None = Field(None, gt=0.0)
    delta: Probability = 1e-5
    accountant: Literal["rdp", "pld"] = "rdp"
    max_grad_norm: float = Field(1.0, gt=0.0)  # local: per-sample gradient clip
    clip_norm: float = Field(1.0, gt=0.0)  # central: update clip (the first one if adaptive)
    adaptive_clip: bool = False
    target_quantile: Probability = 0.5
    clip_learning_rate: float = Field(0.2, gt=0.0)
    clip_count_stddev: float | None = Field(None, gt=0.0)  # default: clients per round / 20


class SecureAggregationSection(_Section):
    """Secure aggregation: the server learns only the sum of the clipped client updates.

    ``mode = "secagg"`` masks over the complete graph (Bonawitz et al. 2017), ``"secagg+"`` over
    a random graph of ``neighbours`` per client (Bell et al. 2020; default about log2 of the
    clients per round). ``threshold`` is the number of share holders of a client that must
    survive (default: more than half). ``max_examples`` caps a client's weight (default: the
    largest local training set, known in simulation; set it in a deployment). ``dropout_rate`` is
    the largest share of a round's clients that may drop while the round still completes (with
    distributed DP each client's noise share assumes that many may be missing).
    ``server = "malicious"`` (the default) runs the protocol secure against a malicious server
    wherever the clients have identities (always in simulation; in a deployment, with the keys
    ``fedguard tokens`` writes): signed keys, a consistency check and a SecAgg+ graph from the
    clients' committed randomness. ``"semi-honest"`` trusts the server to follow the protocol
    and saves those messages.

    ``mode = "ckks"`` aggregates under homomorphic encryption instead of masking (see
    ``fedguard.protocol.he``): every client holds one secret key, made once per run, the server
    adds ciphertexts and ``decryptors`` clients (2: their answers are compared, so one lying
    decryptor is detected; 1: a round needs only one surviving client) decrypt the sum.
    ``he_scheme = "bfv"`` (the default) encrypts the fixed-point encoding of ``bits`` bits and
    sums it exactly (3.9x the bytes of a float32 update); ``"ckks"`` encrypts floats, sums them
    approximately and sends twice the bytes. Its threat model is weaker than masking's: any one
    client colluding with the server can decrypt every update.
    """

    enabled: bool = False
    server: Literal["malicious", "semi-honest"] = "malicious"
    mode: Literal["secagg", "secagg+", "ckks"] = "secagg"
    he_scheme: Literal["bfv", "ckks"] = "bfv"
    decryptors: int = Field(2, ge=1, le=2)
    bits: int = Field(32, ge=8, le=64)
    clip_norm: float | None = Field(None, gt=0.0)
    threshold: int | None = Field(None, ge=1)
    neighbours: int | None = Field(None, ge=1)
    max_examples: int | None = Field(None, ge=1)
    dropout_rate: float = Field(0.1, ge=0.0, lt=0.5)


CONTRIBUTION_METHODS = ("none", "gtg_shapley", "leave_one_out", "exact_shapley", "cosine")


class ContributionSection(_Section):
    """Contribution scores of the clients of a round (see ``fedguard.experiment.contribution``).

    Every ``every`` rounds the server scores the round's accepted updates with ``method``: the
    utility of a coalition is the negative validation loss of the model the server would have
    built from its updates alone (its aggregator and optimizer step from the round's starting
    state); ``validation = "val"`` is the data set's validation split in simulation, and
    ``evaluation.server_data`` on a deployed server. ``flag_rule`` says what flags a client
    after ``flag_patience`` scored rounds in a row (and with ``exclude_flagged`` leaves it out of
    later rounds' aggregates): ``"update"`` (the default) its update, suspect when its norm is
    below ``flag_min_norm_ratio`` times the round's median norm (a zero update always is) or,
    with ``flag_min_cosine`` set, its cosine with the others' weighted mean is below that;
    ``"score"`` its round score below ``flag_threshold``; ``"either"`` whichever comes first
    (see ``fedguard.algorithms.contribution.free_riders``). ``reward_total`` is divided by
    cumulative score with the share ``reward_floor`` paid equally. The ``gtg_*`` keys are
    GTG-Shapley's tolerances (in units of the utility) and sampling limits;
    ``gtg_max_evaluations`` caps the validation evaluations of one scored round.
    """

    method: Literal["none", "gtg_shapley", "leave_one_out", "exact_shapley", "cosine"] = "none"
    every: int = Field(1, ge=1)
    validation: Literal["val"] = "val"
    flag_rule: Literal["update", "score", "either"] = "update"
    flag_threshold: float = Field(0.0, allow_inf_nan=False)
    flag_min_norm_ratio: float = Field(0.01, ge=0.0, lt=1.0, allow_inf_nan=False)
    flag_min_cosine: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    flag_patience: int = Field(3, ge=1)
    exclude_flagged: bool = False
    reward_total: float = Field(100.0, ge=0.0, allow_inf_nan=False)
    reward_floor: float = Field(0.1, ge=0.0, le=1.0)
    gtg_round_tolerance: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
    gtg_walk_tolerance: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
    gtg_convergence_tolerance: float = Field(0.1, gt=0.0, allow_inf_nan=False)
    gtg_max_cycles: int = Field(30, ge=3)
    gtg_max_evaluations: int | None = Field(None, ge=3)  # per scored round; None: no cap


class AuditSection(_Section):
    """Canaries for the one-run privacy audit (``fedguard audit --attack canary``).

    ``canaries`` candidate canaries are drawn from ``canary_seed`` (default: the experiment's
    seed) and each is inserted with probability 1/2; the audit scores all of them on the final
    model and turns its guesses into an empirical lower bound on epsilon (Steinke, Nasr and
    Jagielski, NeurIPS 2023). ``canary_level``: ``record``, mislabelled out-of-distribution
    examples added to the clients' training data; ``user``, canary clients whose update is a
    fixed random direction of norm ``privacy.clip_norm`` (Andrew et al., ICLR 2024), refused
    under local DP; ``gradient`` (local DP only), white-box records whose clipped gradient is
    a fixed coordinate vector, added to DP-SGD's clipped sum; ``auto`` (default), the unit the
    run's DP protects: user level under central or distributed DP, record level otherwise. Canaries change the run: they are for
    an audit run, not a production one. 0: none."""

    canaries: int = Field(0, ge=0, le=1_000_000)
    canary_seed: int | None = Field(None, ge=0, lt=2**63)
    canary_level: Literal["auto", "record", "user", "gradient"] = "auto"


class LatencySection(_Section):
    """A simulated latency per client and task (``[runtime.latency]``; see
    ``fedguard.simulation.latency``): a base duration (``constant``, ``exponential`` or
    ``lognormal`` with mean ``mean_s`` and log-std ``sigma``) times ``slowdown`` for the
    ``slow_fraction`` of clients drawn slow with ``seed`` (default: the experiment's)."""

    base: Literal["constant", "exponential", "lognormal"] = "constant"
    mean_s: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    sigma: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    slow_fraction: float = Field(0.0, ge=0.0, le=1.0)
    slowdown: float = Field(10.0, ge=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)


class PersonalizationSection(_Section):
    """Each client's own model beside the global one (see ``fedguard.client.personal``).

    ``method``: ``"none"``; ``"finetune"`` (the global model fine-tuned for ``epochs`` epochs on
    the client's data, only the tensors whose names start with ``finetune_layers``' prefixes,
    or all); ``"ditto"`` (a personal model trained for ``epochs`` epochs per round with the
    proximal term ``ditto_lambda/2 ||v - w_global||^2``, the global model as usual);
    ``"fedrep"`` (the head, the tensors whose names start with ``head``'s prefixes, default the
    model's last layer, trained ``epochs`` epochs with the body frozen, then the body
    ``client.epochs`` with the head frozen); ``"fedper"`` (body and head together). Under FedRep
    and FedPer the head never leaves the client and only the body is aggregated. Each client's
    personal model is evaluated on its held-out split (``data.client_eval_fraction`` in
    simulation) beside the global model."""

    method: Literal["none", "finetune", "ditto", "fedrep", "fedper"] = "none"
    epochs: int = Field(1, ge=1, le=1000)
    ditto_lambda: float = Field(0.1, gt=0.0, allow_inf_nan=False)
    head: list[Annotated[str, Field(min_length=1)]] = []
    finetune_layers: list[Annotated[str, Field(min_length=1)]] = []


class CheckpointSection(_Section):
    keep: int = Field(2, ge=1)


COHORT_SIZE_CPU = 8
COHORT_SIZE_ACCELERATOR = 256


class RuntimeSection(_Section):
    """Where the simulated clients run (``fedguard run`` only; a deployment runs them behind
    gRPC and ignores this).

    ``kind = "inprocess"``: one client after another on one model. ``"cohort"``: the same
    clients, with each round's local training vectorised (``torch.func``) over ``cohort_size``
    clients at a time (unset: :data:`COHORT_SIZE_CPU` on the CPU, where larger stacks fall out
    of the caches, :data:`COHORT_SIZE_ACCELERATOR` on an accelerator) on ``cohort_device``
    (``"auto"``: the accelerator torch sees, else the CPU); see ``fedguard.simulation.cohort``.
    ``"ray"``: on a pool of Ray actors (see ``fedguard.simulation.ray_engine``) of ``actors``
    actors (default: one per ``cpus_per_actor`` CPUs of the cluster), each reserving
    ``cpus_per_actor`` CPUs (its torch threads) and ``gpus_per_actor`` GPUs, on a local Ray
    instance or, with ``address`` (``"auto"`` or ``HOST:PORT``), on the running cluster it
    names; with ``actor_engine = "cohort"`` each actor trains its clients of a round as cohorts.
    Every engine gives the same results. ``latency``: a simulated latency model (simulation
    only); with it the metrics report ``simulated_seconds``, the virtual time the run would
    have taken. ``threads``: torch's intra-op threads in the process that runs the rounds
    (default: torch's, one per core); on a machine shared with other CPU-bound work, 1 avoids
    threads that wait on each other at every small operation (Ray actors take
    ``cpus_per_actor`` threads each)."""

    kind: Literal["inprocess", "cohort", "ray"] = "inprocess"
    cohort_size: int | None = Field(None, ge=1, le=100_000)
    cohort_device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: int | None = Field(None, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    address: str | None = None
    actor_engine: Literal["inprocess", "cohort"] = "inprocess"
    latency: LatencySection | None = None
    threads: int | None = Field(None, ge=1, le=1024)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto" or RAY_ADDRESS.fullmatch(value):
            return value
        raise ValueError(
            f'runtime.address: "auto" or HOST:PORT of a running Ray cluster\'s head (as `ray '
            f"start --head` prints it), got {value!r}"
        )


# The tracking URI schemes MLflow's client takes (a plain path is a local file store).
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "databricks")


class TrackingSection(_Section):
    """Where every metrics row also goes, besides the run folder (``fedguard.observe.tracking``).

    ``tensorboard = true``: TensorBoard scalars in ``tensorboard_dir`` (default
    RUN_DIR/tensorboard; needs the ``tensorboard`` extra). ``mlflow = "URI"``: the parameters,
    each round's metrics and, at the end, the run folder's files, to the MLflow tracking server
    or store at URI, in the MLflow experiment ``mlflow_experiment`` (default: experiment.name;
    needs the ``mlflow`` extra)."""

    tensorboard: bool = Field(False, strict=True)  # TOML true or false, not "yes"
    tensorboard_dir: str | None = None
    mlflow: str | None = None
    mlflow_experiment: str | None = None

    @field_validator("mlflow")
    @classmethod
    def _mlflow(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, sep, rest = value.partition("://")
        if not value.strip() or (sep and (scheme.split("+")[0] not in MLFLOW_SCHEMES or not rest)):
            raise ValueError(
                f"tracking.mlflow: an MLflow tracking URI ({', '.join(s + '://' for s in MLFLOW_SCHEMES)}"
                f" or a folder), got {value!r}"
            )
        return value

    @field_validator("tensorboard_dir", "mlflow_experiment")
    @classmethod
    def _not_empty(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"tracking.{info.field_name}: must not be empty")
        return value


class ExperimentSections(_Section):
    """Every section of an experiment, as the TOML tables give them (the cross-key rules are
    :class:`~fedguard.experiment.config.ExperimentConfig`'s)."""

    experiment: ExperimentSection = ExperimentSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    client: ClientSection = ClientSection()
    server: ServerSection = ServerSection()
    evaluation: EvaluationSection = EvaluationSection()
    checkpoint: CheckpointSection = CheckpointSection()
    personalization: PersonalizationSection = PersonalizationSection()
    privacy: PrivacySection = PrivacySection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    attack: AttackSection = AttackSection()
    registration: RegistrationSection = RegistrationSection()
    contribution: ContributionSection = ContributionSection()
    runtime: RuntimeSection = RuntimeSection()
    audit: AuditSection = AuditSection()
    tracking: TrackingSection = TrackingSection()

    @property
    def clients_per_round(self) -> int:
        """Clients sampled each round (all of them unless a count or a fraction is given)."""
        n = self.data.num_clients
        if self.server.clients_per_round is not None:
            return self.server.clients_per_round
        if self.server.fraction is not None:
            return max(1, round(self.server.fraction * n))
        return n

    @property
    def count_bucket(self) -> int:
        """The rounding of registered example counts (``registration.count_bucket``)."""
        if self.registration.count_bucket is not None:
            return self.registration.count_bucket
        return 1 if self.privacy.mode == "off" else DP_COUNT_BUCKET

    @property
    def concurrency(self) -> int:
        """Asynchronous rounds: clients training at once (default: clients per round)."""
        c = self.server.concurrency
        return c if c is not None else self.clients_per_round

    @property
    def buffer_size(self) -> int:
        """Asynchronous rounds: replies per server step (default: 10, at most concurrency)."""
        b = self.server.buffer_size
        return b if b is not None else min(10, self.concurrency)

    @property
    def max_staleness(self) -> int:
        """Asynchronous rounds: the stalest reply kept, in model versions (default 100)."""
        m = self.server.max_staleness
        return m if m is not None else 100

    @property
    def staleness_exponent(self) -> float:
        """Asynchronous rounds: ``a`` in ``s(tau) = (1 + tau)^(-a)`` (default 0.5, FedBuff's)."""
        a = self.server.staleness_exponent
        return a if a is not None else 0.5

    @property
    def min_clients(self) -> int:
        return self.server.min_clients if self.server.min_clients is not None else 1
