"""Config validation: one line per problem, naming the key and what is allowed."""

from __future__ import annotations

import pytest

from fedguard.experiment import config


def _error(data: dict) -> str:
    with pytest.raises(config.ConfigError) as info:
        config.validate(data)
    return str(info.value)


def test_defaults_validate() -> None:
    cfg = config.validate({})
    assert cfg.server.strategy == "fedavg"
    assert cfg.clients_per_round == cfg.data.num_clients == 10


def test_wrong_choice_names_key_and_allowed_values() -> None:
    msg = _error({"server": {"strategy": "fedavx"}})
    assert msg.startswith("server.strategy:")
    assert "'fedyogi'" in msg and "'fedavx'" in msg
    assert "\n" not in msg


def test_unknown_key_lists_allowed_keys() -> None:
    msg = _error({"client": {"learning_rate": 0.1}})
    assert msg.startswith("client.learning_rate: unknown key (allowed: optimizer, lr,")


def test_wrong_type() -> None:
    msg = _error({"experiment": {"rounds": "ten"}})
    assert msg.startswith("experiment.rounds:") and "'ten'" in msg


def test_out_of_range() -> None:
    assert _error({"client": {"lr": -1}}).startswith("client.lr: Input should be greater than 0")


@pytest.mark.parametrize(
    ("data", "start"),
    [
        (
            {"data": {"num_clients": 5}, "server": {"clients_per_round": 6}},
            "server.clients_per_round=6",
        ),
        ({"server": {"clients_per_round": 4, "fraction": 0.5}}, "server.clients_per_round and"),
        ({"server": {"clients_per_round": 4, "min_clients": 5}}, "server.min_clients=5"),
        ({"server": {"strategy": "fedprox"}}, "client.proximal_mu must be > 0"),
        ({"client": {"proximal_mu": 0.1}}, "client.proximal_mu is only used"),
        (
            {"server": {"strategy": "scaffold"}, "client": {"optimizer": "adam"}},
            'server.strategy = "scaffold"',
        ),
        (
            {"client": {"optimizer": "newton"}, "model": {"framework": "keras"}},
            'client.optimizer = "newton"',
        ),
    ],
)
def test_impossible_combinations(data: dict, start: str) -> None:
    assert _error(data).startswith(start)


def test_fraction_sets_clients_per_round() -> None:
    cfg = config.validate({"data": {"num_clients": 40}, "server": {"fraction": 0.25}})
    assert cfg.clients_per_round == 10


def test_overrides_parse_toml_values() -> None:
    data = config.apply_overrides(
        {"client": {"lr": 0.1}},
        ["client.lr=0.5", "server.strategy=fedadam", "evaluation.mode=federated", "data.alpha=2"],
    )
    cfg = config.validate(data)
    assert cfg.client.lr == 0.5
    assert cfg.server.strategy == "fedadam"
    assert cfg.evaluation.mode == "federated"
    assert cfg.data.alpha == 2.0


def test_override_without_equals_sign() -> None:
    with pytest.raises(config.ConfigError, match="expected key.path=value"):
        config.apply_overrides({}, ["client.lr"])


def test_toml_round_trip(tmp_path) -> None:
    import tomli_w

    cfg = config.validate({"data": {"dataset": "breast_cancer", "num_clients": 5}})
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(config.to_toml_dict(cfg)))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    "section, key", [("experiment", "seed"), ("attack", "seed"), ("audit", "canary_seed")]
)
def test_negative_seeds_are_refused_before_the_run(section: str, key: str) -> None:
    # numpy's SeedSequence refuses them, which used to surface only inside the first round
    assert _error({section: {key: -3}}).startswith(
        f"{section}.{key}: Input should be greater than or equal to 0"
    )
