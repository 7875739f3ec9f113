"""Experiment configuration: TOML files validated with pydantic, with one-line errors.

Every key has a type and a range; unknown keys are refused, so a typo never silently falls back to
a default. Cross-key rules (more clients per round than clients, FedProx without a proximal term,
Krum under secure aggregation, more Byzantine clients than a robust rule tolerates) are checked
here too, before anything runs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedguard.algorithms import attacks, attacks_model, robust
from fedguard.protocol import strategy


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line per problem, naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(gt=0.0, lt=1.0)]


class ExperimentSection(_Section):
    name: str = "experiment"
    seed: int = 0
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


class ModelSection(_Section):
    name: str = "image_cnn"
    framework: Literal["torch", "keras"] = "torch"


class ClientSection(_Section):
    optimizer: Literal["sgd", "adam", "lbfgs", "newton"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    proximal_mu: float = Field(0.0, ge=0.0)
    max_steps: int | None = Field(None, ge=1)
    augment: Literal["none", "image", "spectrogram"] = "none"


class ServerSection(_Section):
    strategy: Literal[
        "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold"
    ] = "fedavg"
    clients_per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    min_clients: int | None = Field(None, ge=1)
    server_lr: float = Field(1.0, gt=0.0)
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)
    deadline_s: float | None = Field(None, gt=0.0)
    sampling: Literal["fixed", "poisson"] = "fixed"
    # Byzantine robustness: the rule that replaces the weighted mean, and what it must tolerate.
    aggregator: Literal[
        "mean",
        "krum",
        "multi_krum",
        "median",
        "trimmed_mean",
        "bulyan",
        "geometric_median",
        "centered_clipping",
        "norm_bounding",
    ] = "mean"
    byzantine_f: int | None = Field(None, ge=0)  # required with a robust aggregator
    multi_krum_m: int | None = Field(None, ge=1)  # default: K - f
    clipping_radius: float = Field(10.0, gt=0.0)  # centered clipping tau
    clipping_iterations: int = Field(1, ge=1)  # centered clipping L
    norm_bound: float | None = Field(None, gt=0.0)  # norm bounding M (required for it)
    weiszfeld_iterations: int = Field(1000, ge=1)  # geometric median
    weiszfeld_tolerance: float = Field(1e-6, gt=0.0)  # geometric median
    bucket_size: int = Field(1, ge=1)  # > 1: the rule runs on means of random buckets


class AttackSection(_Section):
    """Simulated Byzantine clients (simulation only): which attack, how many, its parameters.

    ``fraction`` of the clients, drawn with ``seed`` (default: the experiment's seed), are
    malicious for the whole run. Data poisoning (``label_flip``, ``backdoor``) changes their
    training data; model poisoning replaces their replies (see ``fedguard.runtime.attack``).
    """

    kind: Literal[
        "none",
        "sign_flip",
        "boost",
        "gaussian",
        "alie",
        "ipm",
        "min_max",
        "min_sum",
        "label_flip",
        "backdoor",
    ] = "none"
    fraction: float = Field(0.2, ge=0.0, le=1.0)
    seed: int | None = None
    scale: float = Field(1.0, gt=0.0)  # sign_flip: -scale * u
    factor: float = Field(10.0, gt=0.0)  # boost: factor * u
    std: float = Field(1.0, gt=0.0)  # gaussian
    z: float | None = Field(None, gt=0.0)  # alie; default: Baruch et al.'s z_max
    epsilon: float = Field(0.5, gt=0.0)  # ipm: -epsilon * mean(honest)
    perturbation: Literal["unit_vector", "std", "sign"] = "std"  # min_max / min_sum
    target_label: int = Field(0, ge=0)  # backdoor
    trigger_size: int = Field(3, ge=1)  # backdoor: side of the square, in pixels
    poisoned_fraction: float = Field(0.5, gt=0.0, le=1.0)  # backdoor: share of local images

    def config(self) -> attacks.AttackConfig:
        """The algorithms' view of a model-poisoning or label-flipping attack."""
        return attacks.AttackConfig(
            kind=attacks.Attack(self.kind),
            scale=self.scale,
            factor=self.factor,
            std=self.std,
            z=self.z,
            epsilon=self.epsilon,
            perturbation=attacks_model.Perturbation(self.perturbation),
        )


class EvaluationSection(_Section):
    every: int = Field(1, ge=0)
    federated: bool = False
    split: Literal["test", "val"] = "test"
    batch_size: int = Field(1024, ge=1)


class PrivacySection(_Section):
    """Differential privacy: off, record level inside each client, or user level at the server.

    ``distributed`` is user-level DP under secure aggregation: each client clips to ``clip_norm``
    and adds its share of Skellam noise before masking (see ``fedguard.algorithms.distributed_dp``).
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
    """

    enabled: bool = False
    mode: Literal["secagg", "secagg+"] = "secagg"
    bits: int = Field(32, ge=8, le=64)
    clip_norm: float | None = Field(None, gt=0.0)
    threshold: int | None = Field(None, ge=1)
    neighbours: int | None = Field(None, ge=1)
    max_examples: int | None = Field(None, ge=1)
    dropout_rate: float = Field(0.1, ge=0.0, lt=0.5)


class CheckpointSection(_Section):
    keep: int = Field(2, ge=1)


class ExperimentConfig(_Section):
    """The whole experiment; sections mirror the TOML tables."""

    experiment: ExperimentSection = ExperimentSection()
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    client: ClientSection = ClientSection()
    server: ServerSection = ServerSection()
    evaluation: EvaluationSection = EvaluationSection()
    checkpoint: CheckpointSection = CheckpointSection()
    privacy: PrivacySection = PrivacySection()
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()
    attack: AttackSection = AttackSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        s, c, n = self.server, self.client, self.data.num_clients
        if s.clients_per_round is not None and s.fraction is not None:
            raise ValueError(
                "server.clients_per_round and server.fraction both set: give one of them"
            )
        if s.clients_per_round is not None and s.clients_per_round > n:
            raise ValueError(
                f"server.clients_per_round={s.clients_per_round} exceeds data.num_clients={n}: "
                f"allowed 1..{n}"
            )
        per_round = self.clients_per_round
        if s.min_clients is not None and s.min_clients > per_round:
            raise ValueError(
                f"server.min_clients={s.min_clients} exceeds the {per_round} clients sampled "
                f"per round: allowed 1..{per_round}"
            )
        if s.strategy == "fedprox" and c.proximal_mu <= 0:
            raise ValueError(
                'client.proximal_mu must be > 0 with server.strategy = "fedprox" '
                "(with mu = 0 FedProx is FedAvg)"
            )
        if s.strategy != "fedprox" and c.proximal_mu > 0:
            raise ValueError(
                f'client.proximal_mu is only used by server.strategy = "fedprox", '
                f'not "{s.strategy}"'
            )
        if s.strategy == "scaffold" and c.optimizer != "sgd":
            raise ValueError(
                'server.strategy = "scaffold" needs client.optimizer = "sgd" (its control '
                f'variates assume plain SGD steps), got "{c.optimizer}"'
            )
        if s.strategy == "scaffold" and c.momentum > 0:
            raise ValueError(
                'client.momentum must be 0 with server.strategy = "scaffold" (option II of its '
                f"control variate update assumes plain SGD steps), got {c.momentum}"
            )
        if c.optimizer == "newton" and self.model.framework != "torch":
            raise ValueError(
                'client.optimizer = "newton" needs model.framework = "torch"; '
                'use "lbfgs" for Keras models'
            )
        if c.optimizer == "newton" and s.strategy not in ("fedavg", "fedavgm"):
            raise ValueError(
                'client.optimizer = "newton" takes the pooled Newton step on the server: '
                f'server.strategy must be "fedavg" or "fedavgm", got "{s.strategy}"'
            )
        self._privacy_checks()
        self._secure_aggregation_checks()
        self._robustness_checks()
        return self

    def _robustness_checks(self) -> None:
        s, k = self.server, self.clients_per_round
        if s.aggregator == "mean":
            used = [
                n for n in _ROBUST_KEYS if getattr(s, n) != ServerSection.model_fields[n].default
            ]
            if used:
                raise ValueError(
                    f"server.{used[0]} only applies to a robust server.aggregator; "
                    'it is "mean" (plain FedAvg)'
                )
        else:
            kind = robust.RobustAggregator(s.aggregator)
            condition = ROBUST_CONDITIONS[kind]
            if s.bucket_size > 1:
                condition += f" on K = ceil(clients / {s.bucket_size}) bucket means"
            most = robust.max_byzantine(kind, k, s.bucket_size)
            if most < 0:
                raise ValueError(
                    f'server.aggregator = "{kind}" cannot run with {k} clients per round: it '
                    f"needs {condition} even for f = 0"
                )
            if s.byzantine_f is None:
                raise ValueError(
                    f'server.aggregator = "{kind}" needs server.byzantine_f, the number of '
                    f"Byzantine clients per round it must tolerate (0..{most} with {k} clients "
                    f"per round, as it needs {condition})"
                )
            if s.byzantine_f > most:
                raise ValueError(
                    f"server.byzantine_f={s.byzantine_f} is too large for server.aggregator = "
                    f'"{kind}" with {k} clients per round: it needs {condition}, so f <= {most}'
                )
            need = min_updates(kind, s.byzantine_f, s.bucket_size)
            if s.min_clients is not None and s.min_clients < need:
                raise ValueError(
                    f"server.min_clients={s.min_clients} is below the {need} replies "
                    f'server.aggregator = "{kind}" needs to tolerate f={s.byzantine_f} '
                    f"({condition}); raise it or leave it unset"
                )
            for name, only in _ROBUST_PARAMETER_OWNER.items():
                if kind is not only and _changed(s, (name,)):
                    raise ValueError(
                        f'server.{name} only applies to server.aggregator = "{only}", not "{kind}"'
                    )
            if s.bucket_size > 1 and not robust.needs_individual_updates(kind):
                raise ValueError(
                    'server.bucket_size only applies to rules that compare updates; "norm_bounding" '
                    "clips each client's own update"
                )
            if kind is robust.RobustAggregator.NORM_BOUNDING and s.norm_bound is None:
                raise ValueError(
                    'server.aggregator = "norm_bounding" needs server.norm_bound, the largest '
                    "update norm it lets through"
                )
            if s.multi_krum_m is not None and s.multi_krum_m > need - s.byzantine_f:
                raise ValueError(
                    f"server.multi_krum_m={s.multi_krum_m} exceeds the {need - s.byzantine_f} "
                    f"updates Multi-Krum can select from {need} replies with f={s.byzantine_f}"
                )
            if self.client.optimizer == "newton":
                raise ValueError(
                    'client.optimizer = "newton" pools gradient and Hessian sums on the server; '
                    'a robust server.aggregator cannot apply to them: use "mean"'
                )
            if self.privacy.mode == "central" and robust.needs_individual_updates(kind):
                raise ValueError(
                    f'server.aggregator = "{kind}" cannot run with privacy.mode = "central": the '
                    'DP noise is calibrated for the mean\'s sensitivity; use "norm_bounding" '
                    'or "mean"'
                )
            if self.privacy.mode == "central" and self.privacy.adaptive_clip:
                raise ValueError(
                    'privacy.adaptive_clip cannot run with server.aggregator = "norm_bounding": '
                    "its clip count would not match the bound applied; use a fixed clip_norm"
                )
        self._attack_checks()

    def _attack_checks(self) -> None:
        a = self.attack
        if a.kind == "none":
            changed = _changed(a, tuple(n for n in AttackSection.model_fields if n != "kind"))
            if changed:
                name = changed[0]
                raise ValueError(f'attack.{name} is set but attack.kind = "none"')
            return
        kind = attacks.Attack(a.kind)
        if self.secure_aggregation.enabled and not attacks.is_data_poisoning(kind):
            raise ValueError(
                f'attack.kind = "{kind}" rewrites fit replies, which secure aggregation masks; '
                'simulate it without secure aggregation or use "label_flip" or "backdoor"'
            )
        if round(a.fraction * self.data.num_clients) == 0:
            raise ValueError(
                f"attack.fraction={a.fraction} of {self.data.num_clients} clients makes no client "
                'malicious; raise it or set attack.kind = "none"'
            )

    def _secure_aggregation_checks(self) -> None:
        a, p, s = self.secure_aggregation, self.privacy, self.server
        if not a.enabled:
            return
        aggregator = None if s.aggregator == "mean" else robust.RobustAggregator(s.aggregator)
        refusal = strategy.secure_aggregation_refusal(
            strategy.StrategyKind(s.strategy),
            newton=self.client.optimizer == "newton",
            aggregator=aggregator,
        )
        if refusal is not None:
            raise ValueError(f"secure_aggregation.enabled = true cannot run here: {refusal}")
        if p.mode in ("central", "distributed"):
            if a.clip_norm is not None and a.clip_norm != p.clip_norm:
                raise ValueError(
                    f"secure_aggregation.clip_norm={a.clip_norm} differs from privacy.clip_norm="
                    f"{p.clip_norm}: with {p.mode} DP the clients clip once, at privacy.clip_norm"
                )
            if p.adaptive_clip:
                raise ValueError(
                    "privacy.adaptive_clip needs each client's clipped bit, which secure "
                    "aggregation hides; use a fixed privacy.clip_norm"
                )
        elif a.clip_norm is None:
            raise ValueError(
                "secure_aggregation.clip_norm is required: updates are clipped to it so that "
                "their fixed-point sum cannot overflow"
            )
        per_round = self.clients_per_round
        if per_round < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 clients per round, got {per_round}"
            )
        if a.mode == "secagg" and a.neighbours is not None:
            raise ValueError(
                'secure_aggregation.neighbours only applies to mode = "secagg+" '
                '("secagg" masks over all pairs)'
            )
        if a.threshold is not None and a.threshold > per_round:
            raise ValueError(
                f"secure_aggregation.threshold={a.threshold} exceeds the {per_round} clients "
                f"sampled per round: allowed 1..{per_round}"
            )
        if a.threshold is not None and a.neighbours is not None and a.threshold > a.neighbours + 1:
            raise ValueError(
                f"secure_aggregation.threshold={a.threshold} exceeds the {a.neighbours + 1} share "
                "holders of a client (its neighbours and itself)"
            )

    def _privacy_checks(self) -> None:
        p, c, s = self.privacy, self.client, self.server
        if p.mode == "off":
            return
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise ValueError(
                f'privacy.mode = "{p.mode}" needs exactly one of privacy.noise_multiplier (> 0) '
                "and privacy.target_epsilon"
            )
        if p.max_epsilon is not None and p.target_epsilon is not None:
            if p.target_epsilon > p.max_epsilon:
                raise ValueError(
                    f"privacy.target_epsilon={p.target_epsilon} exceeds privacy.max_epsilon="
                    f"{p.max_epsilon}: the run would stop before its last round"
                )
        if p.mode == "local":
            if c.optimizer not in ("sgd", "adam"):
                raise ValueError(
                    f'privacy.mode = "local" (DP-SGD) needs client.optimizer "sgd" or "adam", '
                    f'got "{c.optimizer}"'
                )
            if s.strategy in ("fedprox", "scaffold"):
                raise ValueError(
                    f'privacy.mode = "local" does not support server.strategy = "{s.strategy}" '
                    "(its client term is not privatised); use fedavg, fedavgm or an adaptive one"
                )
        if p.mode == "distributed":
            if not self.secure_aggregation.enabled:
                raise ValueError(
                    'privacy.mode = "distributed" needs secure_aggregation.enabled = true: the '
                    'clients\' noise shares only add up to DP noise inside the masked sum; use "central"'
                )
            if p.adaptive_clip or s.sampling == "poisson" or p.accountant == "pld":
                raise ValueError(
                    'privacy.mode = "distributed" needs a fixed privacy.clip_norm, server.sampling = '
                    '"fixed" and privacy.accountant = "rdp" (its Skellam noise is accounted by RDP)'
                )
        if p.mode in ("central", "distributed"):
            if s.strategy == "scaffold" or c.optimizer == "newton":
                raise ValueError(
                    f'privacy.mode = "{p.mode}" privatises the model update only: SCAFFOLD control '
                    "variates and Newton statistics would leak; use another strategy or optimizer"
                )
        if p.accountant == "pld" and p.mode == "central" and s.sampling == "fixed":
            raise ValueError(
                'privacy.accountant = "pld" cannot account fixed-size client sampling; set '
                'server.sampling = "poisson" or privacy.accountant = "rdp"'
            )

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
    def min_clients(self) -> int:
        return self.server.min_clients if self.server.min_clients is not None else 1


_ROBUST_KEYS = (
    "byzantine_f",
    "multi_krum_m",
    "clipping_radius",
    "clipping_iterations",
    "norm_bound",
    "weiszfeld_iterations",
    "weiszfeld_tolerance",
    "bucket_size",
)
_ROBUST_PARAMETER_OWNER = {
    "multi_krum_m": robust.RobustAggregator.MULTI_KRUM,
    "clipping_radius": robust.RobustAggregator.CENTERED_CLIPPING,
    "clipping_iterations": robust.RobustAggregator.CENTERED_CLIPPING,
    "norm_bound": robust.RobustAggregator.NORM_BOUNDING,
    "weiszfeld_iterations": robust.RobustAggregator.GEOMETRIC_MEDIAN,
    "weiszfeld_tolerance": robust.RobustAggregator.GEOMETRIC_MEDIAN,
}
# The condition on K updates and f Byzantine ones under which each rule's guarantee holds.
ROBUST_CONDITIONS = {
    k: "K > 2f + 2"
    if k in (robust.RobustAggregator.KRUM, robust.RobustAggregator.MULTI_KRUM)
    else "K >= 4f + 3"
    if k is robust.RobustAggregator.BULYAN
    else "K > 2f"
    for k in robust.RobustAggregator
}


def _changed(section: _Section, names: tuple[str, ...]) -> list[str]:
    """The keys among ``names`` whose value differs from the default (as written back on resume,
    every key is present, so "set" cannot mean "given")."""
    fields = type(section).model_fields
    return [n for n in names if getattr(section, n) != fields[n].default]


def min_updates(kind: robust.RobustAggregator, f: int, bucket_size: int = 1) -> int:
    """The fewest updates ``K`` with which ``kind`` tolerates ``f`` Byzantine ones."""
    k = 1
    while robust.max_byzantine(kind, k, bucket_size) < f:
        k += 1
    return k


def robust_rule(server: ServerSection, seed: int = 0) -> robust.RobustConfig | None:
    """The robust aggregation rule of ``[server]``, or None for the plain weighted mean.

    ``seed`` (the experiment's) seeds the bucket shuffles.
    """
    if server.aggregator == "mean":
        return None
    assert server.byzantine_f is not None  # checked by the config
    return robust.RobustConfig(
        kind=robust.RobustAggregator(server.aggregator),
        f=server.byzantine_f,
        multi_krum_m=server.multi_krum_m,
        max_iterations=server.weiszfeld_iterations,
        tolerance=server.weiszfeld_tolerance,
        tau=server.clipping_radius,
        clipping_iterations=server.clipping_iterations,
        norm_bound=server.norm_bound,
        bucket_size=server.bucket_size,
        seed=seed,
    )


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{key}: unknown key{hint}"
    message = error["msg"]
    if error["type"] == "value_error":
        return message.removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f", got {value!r}"
    return f"{key}: {message}{shown}"


def validate(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a configuration mapping; raise :class:`ConfigError` with one line per problem."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as TOML (``0.1``, ``true``, ``"sgd"``) or text."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key.path=value`` override set."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
            node = child
        node[path[-1]] = value
    return out


def load(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a TOML experiment file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    return validate(apply_overrides(data, overrides or []))


def to_toml_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain TOML-writable tables (no null values)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, tuple):
            return list(value)
        return value

    return clean(config.model_dump(mode="python"))
