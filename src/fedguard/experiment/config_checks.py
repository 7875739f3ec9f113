"""The cross-section rules of an experiment configuration, checked before anything runs.

Each function takes the whole validated configuration and raises ``ValueError`` with a one-line
reason naming the keys (pydantic turns it into a :class:`~fedguard.experiment.config.ConfigError`).

The composition rules of a strategy, an aggregator and a client trainer read what those objects
state about themselves (an aggregator's Byzantine condition, whether it needs individual
updates; a strategy's sum path and extra reply tensors; the features a trainer applies), so one
set of rules serves fedguard's own and a user's plug-ins: :func:`aggregator_rules`,
:func:`strategy_rules` and :func:`trainer_rules`. The configuration's validation applies them to
the built-ins it names; a run applies them to the objects it built, plug-ins included, before
round 1. The robust-aggregation helpers the runner needs (:func:`robust_rule`,
:func:`min_updates`) live here beside the checks that use them.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from fedguard import plugins
from fedguard.algorithms import attacks, robust
from fedguard.algorithms.contribution import shapley as contribution_shapley
from fedguard.audit import canary
from fedguard.client import personal, trainers
from fedguard.client.trainer import ClientTrainer
from fedguard.experiment.config_sections import ExperimentSections, ServerSection
from fedguard.protocol import aggregator as aggregators
from fedguard.protocol import features, fedopt, robust_rules, secagg
from fedguard.protocol.aggregator import Aggregator
from fedguard.protocol.strategy import Strategy, StrategyKind

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
    "bucket_size": None,  # any built-in rule that compares updates
}


def _changed(section: BaseModel, names: tuple[str, ...]) -> list[str]:
    """The keys among ``names`` whose value differs from the default (as written back on resume,
    every key is present, so "set" cannot mean "given")."""
    fields = type(section).model_fields
    return [n for n in names if getattr(section, n) != fields[n].default]


def min_updates(rule: Aggregator, f: int, most: int) -> int:
    """The fewest updates ``K`` (at most ``most``) with which ``rule`` tolerates ``f`` Byzantine
    ones; ``most`` itself when even those are too few (the checks refuse that before a run)."""
    need = aggregators.fewest_updates(rule, f, most)
    return most if need is None else need


def robust_rule(server: ServerSection, seed: int = 0) -> robust.RobustConfig | None:
    """The built-in robust aggregation rule of ``[server]``, or None for the plain weighted mean
    (and for a plug-in aggregator). ``seed`` (the experiment's) seeds the bucket shuffles.
    """
    if server.aggregator == "mean" or plugins.is_reference(server.aggregator):
        return None
    if server.byzantine_f is None:  # the config refuses this
        raise ValueError(
            f"server.byzantine_f is required with server.aggregator = {server.aggregator!r}"
        )
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


def builtin_aggregator(server: ServerSection, seed: int = 0) -> Aggregator:
    """The built-in aggregator ``[server]`` names: the mean or a robust rule."""
    rule = robust_rule(server, seed)
    return aggregators.Mean() if rule is None else robust_rules.RobustRule(rule)


def builtin_trainer(cfg: ExperimentSections) -> ClientTrainer:
    """The built-in trainer of ``[client]``: DP-SGD under local DP, the Newton statistics for
    ``optimizer = "newton"``, else ``client.optimizer``'s loop; wrapped in
    ``[personalization]``'s method when there is one."""
    if cfg.client.optimizer == "newton":
        return trainers.NewtonTrainer()
    base: ClientTrainer = (
        trainers.DPSGDTrainer() if cfg.privacy.mode == "local" else trainers.OptimizerTrainer()
    )
    if cfg.personalization.method != "none":
        return personal.PersonalizedTrainer(base)
    return base


def builtin_strategy(cfg: ExperimentSections, aggregator: Aggregator | None = None) -> Strategy:
    """The built-in strategy of ``[server]`` without central DP, for the composition checks
    (with the mean when no ``aggregator`` is given)."""
    c = cfg.client
    return fedopt.create(
        StrategyKind(cfg.server.strategy),
        client_config={"optimizer": c.optimizer, "proximal_mu": c.proximal_mu},
        num_clients=cfg.data.num_clients,
        aggregator=aggregator,
    )


def strategy_and_optimizer(cfg: ExperimentSections) -> None:
    """Client counts, and the strategies and optimizers that need one another."""
    s, c, n = cfg.server, cfg.client, simulated_population(cfg)
    if s.clients_per_round is not None and s.fraction is not None:
        raise ValueError("server.clients_per_round and server.fraction both set: give one of them")
    if s.clients_per_round is not None and s.clients_per_round > n:
        raise ValueError(
            f"server.clients_per_round={s.clients_per_round} exceeds data.num_clients={n}: "
            f"allowed 1..{n}"
        )
    per_round = cfg.clients_per_round
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
            f'client.proximal_mu is only used by server.strategy = "fedprox", not "{s.strategy}"'
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
    if s.strategy != "feddyn" and _changed(s, ("feddyn_alpha",)):
        raise ValueError(
            f'server.feddyn_alpha is only used by server.strategy = "feddyn", not "{s.strategy}"'
        )
    if s.strategy == "feddyn" and _changed(s, ("server_lr",)):
        raise ValueError(
            'server.server_lr does not apply to server.strategy = "feddyn": it sets the model '
            "to the mean of the clients' models minus h / alpha, no server step; leave it at 1"
        )
    if s.strategy == "fednova" and c.optimizer != "sgd":
        raise ValueError(
            'server.strategy = "fednova" needs client.optimizer = "sgd": it normalises each '
            "update by the weights SGD (with or without client.momentum) gives its local "
            f'gradients, and "{c.optimizer}" has no such weights; use fedavg or fedprox instead'
        )
    if c.optimizer == "newton" and cfg.model.framework != "torch":
        raise ValueError(
            'client.optimizer = "newton" needs model.framework = "torch"; '
            'use "lbfgs" for Keras models'
        )
    if c.optimizer == "newton" and s.strategy not in ("fedavg", "fedavgm"):
        raise ValueError(
            'client.optimizer = "newton" takes the pooled Newton step on the server: '
            f'server.strategy must be "fedavg" or "fedavgm", got "{s.strategy}"'
        )


MAX_EXACT_SHAPLEY_CLIENTS = contribution_shapley.MAX_PLAYERS


def robustness(cfg: ExperimentSections) -> None:
    """A robust rule's own parameters and, for a built-in rule, its composition rules
    (:func:`aggregator_rules`; a plug-in's are applied once the run has built it)."""
    s = cfg.server
    if s.aggregator == "mean":
        used = _changed(s, (*_ROBUST_KEYS, "aggregator_options"))
        if used:
            raise ValueError(
                f"server.{used[0]} only applies to a robust server.aggregator; "
                'it is "mean" (plain FedAvg)'
            )
    elif plugins.is_reference(s.aggregator):
        for name in _ROBUST_PARAMETER_OWNER:
            if _changed(s, (name,)):
                raise ValueError(
                    f"server.{name} is a setting of fedguard's robust rules; give a plug-in's "
                    "settings in server.aggregator_options"
                )
        if s.byzantine_f is None:
            raise ValueError(
                f'server.aggregator = "{s.aggregator}" needs server.byzantine_f, the number of '
                "Byzantine clients per round it must tolerate"
            )
    else:
        kind = robust.RobustAggregator(s.aggregator)
        if _changed(s, ("aggregator_options",)):
            raise ValueError(
                'server.aggregator_options only applies to a plug-in server.aggregator ("package.'
                f'module:name"); "{kind}" takes its settings from [server]'
            )
        for name, only in _ROBUST_PARAMETER_OWNER.items():
            if only is not None and kind is not only and _changed(s, (name,)):
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
        # The rule as the run builds it; an unset f stands in as 0 (aggregator_rules refuses it).
        checked = s.model_copy(update={"byzantine_f": s.byzantine_f or 0})
        rule = builtin_aggregator(checked, cfg.experiment.seed)
        aggregator_rules(cfg, rule)
        if s.byzantine_f is None:  # aggregator_rules refuses this
            raise ValueError("server.byzantine_f is required with a robust server.aggregator")
        need = min_updates(rule, s.byzantine_f, cfg.clients_per_round)
        if s.multi_krum_m is not None and s.multi_krum_m > need - s.byzantine_f:
            raise ValueError(
                f"server.multi_krum_m={s.multi_krum_m} exceeds the {need - s.byzantine_f} "
                f"updates Multi-Krum can select from {need} replies with f={s.byzantine_f}"
            )
    attack(cfg)


def aggregator_rules(cfg: ExperimentSections, rule: Aggregator) -> None:
    """What any aggregator but the mean must satisfy: its Byzantine condition for
    ``server.byzantine_f`` and the cohort, and nothing that hides or noises individual updates
    if it compares them."""
    s, name = cfg.server, cfg.server.aggregator
    # asynchronous rounds: the rule runs on each buffer of staleness-scaled updates
    k = cfg.buffer_size if s.mode == "async" else cfg.clients_per_round
    if cfg.secure_aggregation.enabled and rule.needs_individual_updates:
        raise ValueError(
            f'secure_aggregation.enabled = true cannot run here: server.aggregator = "{name}" '
            "compares individual updates, which secure aggregation hides; use "
            '"norm_bounding" (each client clips its own update) or turn secure aggregation off'
        )
    f = s.byzantine_f
    condition = rule.condition(k, 0 if f is None else f).reason
    most = aggregators.most_tolerated(rule, k)
    if most < 0:
        raise ValueError(
            f'server.aggregator = "{name}" cannot run with {k} clients per round: it '
            f"needs {condition} even for f = 0"
        )
    if f is None:
        raise ValueError(
            f'server.aggregator = "{name}" needs server.byzantine_f, the number of '
            f"Byzantine clients per round it must tolerate (0..{most} with {k} clients "
            f"per round, as it needs {condition})"
        )
    if f > most:
        raise ValueError(
            f"server.byzantine_f={f} is too large for server.aggregator = "
            f'"{name}" with {k} clients per round: it needs {condition}, so f <= {most}'
        )
    need = min_updates(rule, f, k)
    if s.min_clients is not None and s.min_clients < need:
        raise ValueError(
            f"server.min_clients={s.min_clients} is below the {need} replies "
            f'server.aggregator = "{name}" needs to tolerate f={f} '
            f"({condition}); raise it or leave it unset"
        )
    if cfg.client.optimizer == "newton":
        raise ValueError(
            'client.optimizer = "newton" pools gradient and Hessian sums on the server; '
            'a robust server.aggregator cannot apply to them: use "mean"'
        )
    if cfg.privacy.mode == "central" and rule.needs_individual_updates:
        raise ValueError(
            f'server.aggregator = "{name}" cannot run with privacy.mode = "central": the '
            'DP noise is calibrated for the mean\'s sensitivity; use "norm_bounding" '
            'or "mean"'
        )
    if cfg.privacy.mode == "central" and cfg.privacy.adaptive_clip and rule.norm_bound is not None:
        raise ValueError(
            f'privacy.adaptive_clip cannot run with server.aggregator = "{name}": '
            "its clip count would not match the bound applied; use a fixed clip_norm"
        )


def strategy_rules(cfg: ExperimentSections, strategy: Strategy) -> None:
    """What a strategy must offer for the rest of the configuration: a sum path under secure
    aggregation and central DP, an aggregator if one is configured, and replies that carry
    nothing but the update under user-level DP."""
    s, mode = cfg.server, cfg.privacy.mode
    refusal = strategy.sum_refusal()
    if cfg.secure_aggregation.enabled and refusal is not None:
        raise ValueError(f"secure_aggregation.enabled = true cannot run here: {refusal}")
    if s.aggregator != "mean" and strategy.aggregator is None:
        raise ValueError(
            f'server.aggregator = "{s.aggregator}" cannot apply to server.strategy = '
            f'"{s.strategy}": it combines the updates its own way; use "mean"'
        )
    if mode in ("central", "distributed"):
        extra = sorted(strategy.required_tensors(1))
        if extra:
            raise ValueError(
                f'privacy.mode = "{mode}" privatises the model update only: server.strategy = '
                f'"{s.strategy}" has its clients send {", ".join(extra)} too, which would leak'
            )
        if refusal is not None:
            raise ValueError(
                f'privacy.mode = "{mode}" adds noise to the sum of the updates: {refusal}'
            )


_ASYNC_KEYS = ("concurrency", "buffer_size", "max_staleness", "staleness_exponent")


def asynchronous(cfg: ExperimentSections) -> None:
    """``server.mode = "async"`` (FedBuff) and what composes with it; its keys only with it.

    Refused: secure aggregation (it masks a fixed cohort's sum; a buffer is no cohort), user-level
    DP (``central``, ``distributed``: no accountant here covers clients dispatched one at a time,
    some of them twice before a server step), a privacy budget to calibrate or enforce
    (``target_epsilon``, ``max_epsilon``: a client may train more than once per round, so the
    per-round calibration is not conservative), Poisson sampling, model-poisoning attacks (they
    forge a round's replies from the cohort's), contribution scores (they value a round's
    cohort) and strategies whose replies
    carry more than the update (SCAFFOLD, the Newton step). Local DP-SGD composes: each reply's
    DP-SGD is accounted per client, every dispatch counted.
    """
    s = cfg.server
    if s.mode == "sync":
        changed = [k for k in _ASYNC_KEYS if getattr(s, k) is not None]
        if changed:
            raise ValueError(f'server.{changed[0]} is set but server.mode = "sync"')
        return
    why = 'server.mode = "async"'
    if cfg.secure_aggregation.enabled:
        raise ValueError(
            f"{why} cannot run with secure_aggregation.enabled = true: secure aggregation "
            "masks the sum of a fixed cohort, and a buffer of asynchronous replies is none; "
            'use server.mode = "sync"'
        )
    if cfg.privacy.mode in ("central", "distributed"):
        raise ValueError(
            f'{why} cannot run with privacy.mode = "{cfg.privacy.mode}": user-level DP '
            "accounting assumes a sampled cohort per round, and asynchronous dispatch is not "
            'one; use privacy.mode = "local" (DP-SGD in each client) or server.mode = "sync"'
        )
    p = cfg.privacy
    for key in ("target_epsilon", "max_epsilon"):
        if p.mode == "local" and getattr(p, key) is not None:
            raise ValueError(
                f"{why} cannot run with privacy.{key}: a client may train more than once per "
                "round, so the budget cannot be planned per round; set privacy.noise_multiplier "
                "and read the reported epsilon"
            )
    if s.sampling == "poisson":
        raise ValueError(f'{why} dispatches one client at a time: server.sampling must be "fixed"')
    if cfg.runtime.kind != "inprocess":
        raise ValueError(
            f'{why} runs on runtime.kind = "inprocess" (or deployed over gRPC): the '
            f'"{cfg.runtime.kind}" engine exchanges whole cohorts and has no reply stream yet'
        )
    poisons_data = {a.value for a in attacks.DATA_POISONING}
    if cfg.attack.kind != "none" and cfg.attack.kind not in poisons_data:
        raise ValueError(
            f'{why} cannot simulate attack.kind = "{cfg.attack.kind}": a model-poisoning '
            "attack forges a round's replies from its cohort; data poisoning (label_flip, "
            "backdoor, noisy_client) runs"
        )
    if cfg.contribution.method != "none":
        raise ValueError(
            f"{why} cannot score contributions: they value a round's cohort; set "
            'contribution.method = "none"'
        )
    if s.strategy == StrategyKind.SCAFFOLD or cfg.client.optimizer == "newton":
        raise ValueError(
            f"{why} scales each update by its staleness; SCAFFOLD's control deltas and the "
            "Newton step's statistics cannot be scaled: use another strategy or optimizer"
        )
    if s.strategy in (StrategyKind.FEDDYN, StrategyKind.FEDNOVA):
        raise ValueError(
            f'{why} scales each update by its staleness; server.strategy = "{s.strategy}" '
            "needs a synchronous cohort (FedDyn's h counts the round's participants, FedNova "
            'rescales by the cohort\'s step norms): use server.mode = "sync"'
        )
    if cfg.concurrency > cfg.data.num_clients:
        raise ValueError(
            f"server.concurrency = {cfg.concurrency} is more than the {cfg.data.num_clients} "
            "clients"
        )
    if cfg.min_clients > cfg.buffer_size:
        raise ValueError(
            f"server.min_clients = {cfg.min_clients} is more than server.buffer_size = "
            f"{cfg.buffer_size}, the replies of one server step"
        )


def trainer_rules(cfg: ExperimentSections, trainer: ClientTrainer, strategy: Strategy) -> None:
    """The client trainer applies every feature the strategy and the privacy mode need."""
    needs = {f: f'server.strategy = "{cfg.server.strategy}"' for f in strategy.client_features()}
    if cfg.privacy.mode == "local":
        needs[features.DP_SGD] = 'privacy.mode = "local"'
    if cfg.personalization.method != "none":
        needs[features.PERSONALIZATION] = f'personalization.method = "{cfg.personalization.method}"'
    for feature, owner in sorted(needs.items()):
        if feature not in trainer.features:
            applied = ", ".join(sorted(trainer.features)) or "none"
            raise ValueError(
                f'client.trainer = "{cfg.client.trainer}" does not apply {feature}, which '
                f"{owner} needs (it applies: {applied})"
            )


def composition(
    cfg: ExperimentSections, *, strategy: Strategy, rule: Aggregator, trainer: ClientTrainer
) -> None:
    """Every composition rule for the objects a run built (fedguard's or a user's)."""
    if cfg.server.aggregator != "mean":
        aggregator_rules(cfg, rule)
    strategy_rules(cfg, strategy)
    trainer_rules(cfg, trainer, strategy)


def builtin_composition(cfg: ExperimentSections) -> None:
    """The composition rules for the built-in strategy and trainer of ``cfg``; plug-ins are
    checked once the run has built them."""
    if plugins.is_reference(cfg.server.strategy):
        return
    strategy = builtin_strategy(cfg)
    strategy_rules(cfg, strategy)
    if not plugins.is_reference(cfg.client.trainer):
        trainer_rules(cfg, builtin_trainer(cfg), strategy)


def plugin_options(cfg: ExperimentSections) -> None:
    """Options tables only with the plug-ins they configure."""
    for key, name, options in (
        ("server.strategy", cfg.server.strategy, cfg.server.strategy_options),
        ("client.trainer", cfg.client.trainer, cfg.client.trainer_options),
    ):
        if options and not plugins.is_reference(name):
            raise ValueError(
                f'{key}_options only applies to a plug-in {key} ("package.module:name"), '
                f'not "{name}"'
            )


def attack(cfg: ExperimentSections) -> None:
    """A simulated attack that can run: some client malicious, replies not masked away; a list
    of behaviours with one fraction each, disjoint shares that fit, at most one rewriting replies.
    """
    a = cfg.attack
    if a.kind == "none":
        changed = _changed(a, tuple(n for n in type(a).model_fields if n != "kind"))
        if changed:
            name = changed[0]
            raise ValueError(f'attack.{name} is set but attack.kind = "none"')
        return
    kinds = a.kinds()
    if isinstance(a.kind, list):
        if not kinds:
            raise ValueError('attack.kind = [] names no behaviour; set attack.kind = "none"')
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"attack.kind lists a behaviour twice: {list(kinds)}")
        if not isinstance(a.fraction, list) or len(a.fraction) != len(kinds):
            raise ValueError(
                f"attack.kind lists {len(kinds)} behaviours: attack.fraction must be a list of "
                f"{len(kinds)} shares, one per behaviour, got {a.fraction!r}"
            )
        if math.fsum(a.fractions()) > 1.0:
            raise ValueError(
                f"attack.fraction = {list(a.fractions())} adds up to more than all the clients"
            )
        rewriting = [k for k in kinds if not attacks.is_data_poisoning(attacks.Attack(k))]
        if len(rewriting) > 1:
            raise ValueError(
                f"attack.kind: {rewriting} all rewrite fit replies; a run combines at most one "
                "such behaviour with any number of data-poisoning ones"
            )
    elif isinstance(a.fraction, list):
        raise ValueError(
            f'attack.fraction is a list but attack.kind = "{a.kind}" is one behaviour; give one '
            "share, or list the behaviours"
        )
    plugin = plugins.is_reference(kinds[0])
    if a.options and not plugin:
        raise ValueError(
            f'attack.options only applies to a plug-in attack.kind ("package.module:name"), '
            f'not "{a.kind}"'
        )
    for kind, fraction in zip(kinds, a.fractions(), strict=True):
        data_poisoning = not plugin and attacks.is_data_poisoning(attacks.Attack(kind))
        if cfg.secure_aggregation.enabled and not data_poisoning:
            raise ValueError(
                f'attack.kind = "{kind}" rewrites fit replies, which secure aggregation masks; '
                'simulate it without secure aggregation or use "label_flip" or "backdoor"'
            )
        if round(fraction * cfg.data.num_clients) == 0:
            what = f'"{kind}"' if len(kinds) > 1 else "client"
            raise ValueError(
                f"attack.fraction={fraction} of {cfg.data.num_clients} clients makes no "
                f'{what} malicious; raise it or set attack.kind = "none"'
            )


def secure_aggregation(cfg: ExperimentSections) -> None:
    """What secure aggregation needs: a sum-only strategy, one clip, a reachable threshold."""
    a, p, s = cfg.secure_aggregation, cfg.privacy, cfg.server
    if not a.enabled:
        return
    if not plugins.is_reference(s.strategy):  # a plug-in's is checked once it is built
        refusal = builtin_strategy(cfg).sum_refusal()
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
    per_round = cfg.clients_per_round
    if per_round < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per round, got {per_round}")
    if a.mode == "ckks":
        homomorphic(cfg)
        return
    changed = _changed(a, ("he_scheme", "decryptors"))
    if changed:
        raise ValueError(
            f'secure_aggregation.{changed[0]} only applies to mode = "ckks" (aggregation under '
            f'homomorphic encryption), not "{a.mode}"'
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


def homomorphic(cfg: ExperimentSections) -> None:
    """``[secure_aggregation] mode = "ckks"``: no masking settings, and distributed DP only
    where the encrypted sum is exact (the BFV scheme)."""
    a, p = cfg.secure_aggregation, cfg.privacy
    masking = _changed(a, ("threshold", "neighbours"))
    if masking:
        raise ValueError(
            f'secure_aggregation.{masking[0]} is a masking setting; mode = "ckks" encrypts '
            "instead of masking: remove it"
        )
    if cfg.runtime.kind == "ray":
        raise ValueError(
            'secure_aggregation.mode = "ckks" cannot run with runtime.kind = "ray": the '
            "federation's HE key is made in this process and handed to its clients only; use "
            '"inprocess" or "cohort"'
        )
    if p.mode == "distributed" and a.he_scheme != "bfv":
        raise ValueError(
            'privacy.mode = "distributed" needs an exact sum of the clients\' integer noise '
            'shares, which secure_aggregation.he_scheme = "ckks" (approximate sums) does not '
            'give; set he_scheme = "bfv"'
        )


def privacy(cfg: ExperimentSections) -> None:
    """Which DP mode runs with which optimizer, strategy, sampling and accountant."""
    p, c, s = cfg.privacy, cfg.client, cfg.server
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
        if s.strategy in ("fedprox", "scaffold", "feddyn", "fednova"):
            raise ValueError(
                f'privacy.mode = "local" does not support server.strategy = "{s.strategy}" '
                "(DP-SGD does not apply its client term or normalisation); use fedavg, fedavgm "
                "or an adaptive one"
            )
        if cfg.data.augment_copies > 0:
            raise ValueError(
                f'privacy.mode = "local" cannot run with data.augment_copies = '
                f"{cfg.data.augment_copies}: DP-SGD would count each perturbed copy of a "
                "recording as a record of its own, so epsilon would cover one feature vector, "
                "not one recording; set data.augment_copies = 0"
            )
    if p.mode == "distributed":
        if not cfg.secure_aggregation.enabled:
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


def contribution(cfg: ExperimentSections) -> None:
    """Per-client contribution scores need each client's update and a game small enough."""
    c = cfg.contribution
    if c.method == "none":
        changed = _changed(c, tuple(n for n in type(c).model_fields if n != "method"))
        if changed:
            raise ValueError(f'contribution.{changed[0]} is set but contribution.method = "none"')
        return
    if c.flag_rule == "update" and _changed(c, ("flag_threshold",)):
        raise ValueError(
            'contribution.flag_threshold is a bound on the score; contribution.flag_rule = "update" '
            'flags on the updates alone: set flag_rule = "score" or "either", or remove the key'
        )
    if c.flag_rule == "score":
        unused = _changed(c, ("flag_min_norm_ratio", "flag_min_cosine"))
        if unused:
            raise ValueError(
                f"contribution.{unused[0]} bounds the update test; contribution.flag_rule = "
                '"score" flags on the scores alone: set flag_rule = "update" or "either", or '
                "remove the key"
            )
    if cfg.secure_aggregation.enabled:
        raise ValueError(
            f'contribution.method = "{c.method}" scores each client\'s update, which secure '
            "aggregation hides (the server sees only the sum); turn secure aggregation off or "
            'set contribution.method = "none"'
        )
    if c.method == "exact_shapley":
        # the most clients a round can have: the fixed cohort, or everyone under Poisson sampling
        most = cfg.data.num_clients if cfg.server.sampling == "poisson" else cfg.clients_per_round
        if most > MAX_EXACT_SHAPLEY_CLIENTS:
            raise ValueError(
                f'contribution.method = "exact_shapley" evaluates all 2^K coalitions of a round; '
                f"up to {most} clients per round is above the limit of "
                f'{MAX_EXACT_SHAPLEY_CLIENTS}: use "gtg_shapley" or fewer clients per round'
            )
    budget = c.gtg_max_evaluations
    if budget is not None:
        if c.method != "gtg_shapley":
            raise ValueError(
                f"contribution.gtg_max_evaluations bounds GTG-Shapley; contribution.method = "
                f'"{c.method}" does not sample (remove the key or use "gtg_shapley")'
            )
        most = cfg.data.num_clients if cfg.server.sampling == "poisson" else cfg.clients_per_round
        if budget < most + 1:
            raise ValueError(
                f"contribution.gtg_max_evaluations={budget} cannot pay for one GTG-Shapley "
                f"permutation of up to {most} clients per round ({most + 1} evaluations: the "
                f"previous model, the full aggregate and {most - 1} coalitions between); raise "
                f"it to at least {most + 1}"
            )


RAY_KEYS = ("actors", "cpus_per_actor", "gpus_per_actor", "address", "actor_engine")
_COHORT_KEYS = ("cohort_size", "cohort_device")


def audit(cfg: ExperimentSections) -> None:
    """``[audit]``: canaries are inserted by the in-process engine's clients (the cohort engine
    and Ray actors build their clients elsewhere), in synchronous rounds."""
    if cfg.audit.canaries == 0:
        return
    canary.level(cfg.privacy.mode, cfg.audit.canary_level)  # user level is refused under local DP
    if cfg.runtime.kind != "inprocess":
        raise ValueError(
            f"audit.canaries: canaries are inserted by the in-process engine only (runtime.kind "
            f'is "{cfg.runtime.kind}"): set runtime.kind = "inprocess" for the audit run'
        )
    if cfg.server.mode != "sync":
        raise ValueError(
            'audit.canaries needs server.mode = "sync" (the audit run\'s rounds are synchronous)'
        )
    if cfg.attack.kind != "none":
        raise ValueError(
            "audit.canaries: an audit run measures privacy, not robustness; set "
            'attack.kind = "none"'
        )


# Strategies whose client half spans the whole vector (a control variate, a gradient state, a
# normalisation by all local steps): with a head kept on the client they would mix its values in.
_WHOLE_VECTOR_STRATEGIES = ("scaffold", "feddyn", "fednova")


def personalization(cfg: ExperimentSections) -> None:
    """``[personalization]``: what each method composes with (see the README's section).

    Refused: the Newton step (a closed-form statistic, no local model to personalise); FedRep
    and FedPer with SCAFFOLD, FedDyn or FedNova (their client state or normalisation covers the
    head too) and in asynchronous rounds; under local DP every method but FedPer (FedPer's
    training is the planned DP-SGD itself, with the client's head in the model; fine-tuning,
    Ditto's personal model and FedRep's head phase would take DP-SGD steps the plan does not
    count, or train outside DP a model whose evaluation leaves the client); keys of a method
    not chosen."""
    p = cfg.personalization
    changed = _changed(p, ("epochs", "ditto_lambda", "head", "finetune_layers"))
    owners = {
        "epochs": ("finetune", "ditto", "fedrep"),
        "ditto_lambda": ("ditto",),
        "head": ("fedrep", "fedper"),
        "finetune_layers": ("finetune",),
    }
    for key in changed:
        if p.method not in owners[key]:
            allowed = " or ".join(f'"{m}"' for m in owners[key])
            raise ValueError(
                f"personalization.{key} is set but personalization.method is "
                f'"{p.method}"; it applies to method = {allowed}'
            )
    if p.method == "none":
        return
    prefix = f'personalization.method = "{p.method}"'
    if cfg.client.optimizer == "newton":
        raise ValueError(
            f'{prefix} trains a local model; client.optimizer = "newton" sends closed-form '
            'statistics instead: use "sgd", "adam" or "lbfgs"'
        )
    body_only = p.method in ("fedrep", "fedper")
    if body_only and cfg.server.strategy in _WHOLE_VECTOR_STRATEGIES:
        raise ValueError(
            f'{prefix} keeps the head on the client, but server.strategy = "'
            f'{cfg.server.strategy}" keeps client state over the whole model (head included): '
            'use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad, or method = "ditto"'
        )
    if body_only and cfg.server.mode == "async":
        raise ValueError(
            f'{prefix} needs server.mode = "sync" (the body-only aggregation is built for '
            'synchronous rounds); use method = "ditto" or "finetune" in asynchronous rounds'
        )
    if cfg.privacy.mode == "local" and p.method != "fedper":
        why = {
            "finetune": "fine-tuning trains on the client's records outside DP-SGD",
            "ditto": "Ditto's personal model trains on the client's records outside DP-SGD",
            "fedrep": "FedRep's head phase adds DP-SGD steps the privacy plan does not count",
        }[p.method]
        raise ValueError(
            f'{prefix} cannot run under privacy.mode = "local": {why}, and its evaluation would '
            'leave the client uncovered by the accounting. Use method = "fedper" (its training '
            "is the planned DP-SGD, with the client's head inside the model)"
        )


def runtime(cfg: ExperimentSections) -> None:
    """``[runtime]``: the Ray pool's keys belong to ``kind = "ray"``, the cohort engine's to
    ``kind = "cohort"`` or a Ray pool whose actors train cohorts (set elsewhere they would
    silently do nothing)."""
    r = cfg.runtime
    if r.kind != "ray":
        changed = _changed(r, RAY_KEYS)
        if changed:
            raise ValueError(
                f'runtime.{changed[0]} is set but runtime.kind = "{r.kind}": it shapes the Ray '
                'actor pool; set runtime.kind = "ray" or remove it'
            )
    if r.latency is not None and r.kind != "inprocess":
        raise ValueError(
            f"runtime.latency is simulated by the in-process engine only (runtime.kind is "
            f'"{r.kind}"): set runtime.kind = "inprocess" or remove runtime.latency'
        )
    if r.kind != "cohort" and not (r.kind == "ray" and r.actor_engine == "cohort"):
        changed = _changed(r, _COHORT_KEYS)
        if changed:
            raise ValueError(
                f"runtime.{changed[0]} applies to the cohort engine only: set "
                f'runtime.kind = "cohort" (or runtime.actor_engine = "cohort" on Ray), or remove '
                f'it (runtime.kind is "{r.kind}")'
            )


def simulated_population(cfg: ExperimentSections) -> int:
    """The clients of a simulated federation: the data's ``num_clients`` and, with user-level
    audit canaries, the included canary clients, who take the ids after them."""
    a = cfg.audit
    n = cfg.data.num_clients
    if a.canaries and canary.level(cfg.privacy.mode, a.canary_level) == canary.USER:
        seed = a.canary_seed if a.canary_seed is not None else cfg.experiment.seed
        n += canary.included_count(a.canaries, seed)
    return n


def simulated_identities(cfg: ExperimentSections) -> secagg.Identities | None:
    """The identities of a simulated federation: under secure aggregation against a malicious
    server (the default), one Ed25519 key per client (canary clients included) derived from the
    run's seed
    (:meth:`~fedguard.protocol.secagg.Identities.simulated`); None otherwise. Never for a
    deployment, whose clients hold keys of their own."""
    sa = cfg.secure_aggregation
    if not sa.enabled or sa.server != "malicious":
        return None
    return secagg.Identities.simulated(cfg.experiment.seed, range(simulated_population(cfg)))
