"""Bad input stops the command line before round 1 with one line naming the problem (exit 2):
a model whose output width is not the number of classes, a config file that is not UTF-8 text
or is a directory, non-finite features or out-of-range labels from a data function, and a
deployed client's unreadable, empty or invalid ``--data`` file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from conftest import tiny_config
from fedguard import cli

PLUGINS = "fg_bad_input_plugins"
PLUGIN_SOURCE = """
import numpy as np
import torch

from fedguard.data.dataset import ArrayDataset, DatasetSplits


def _splits(train_x=None, train_y=None, test_x=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    train = ArrayDataset(x[:240] if train_x is None else train_x, y[:240] if train_y is None else train_y)
    test = ArrayDataset(x[240:] if test_x is None else test_x, y[240:])
    return DatasetSplits("plugin", train, test, num_classes=2)


def good():
    return _splits()


def nan_features():
    x = _splits().train.x.copy()
    x[17, 2] = np.nan
    return _splits(train_x=x)


def infinite_test_features():
    x = _splits().test.x.copy()
    x[3, 0] = np.inf
    return _splits(test_x=x)


def labels_out_of_range():
    y = _splits().train.y.copy()
    y[5] = 7
    return _splits(train_y=y)


def five_outputs(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), 5))
"""


@pytest.fixture
def plugins(tmp_path_factory, monkeypatch) -> None:
    root = tmp_path_factory.getbasetemp() / "bad_input_plugins"
    root.mkdir(exist_ok=True)
    (root / f"{PLUGINS}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(root))


def _cli(capsys, *args: object) -> tuple[int, list[str]]:
    """Exit code and the non-blank lines written to stderr by ``fedguard ARGS``."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _config(tmp_path: Path, **sections: dict) -> Path:
    cfg = tiny_config(**sections)
    path = tmp_path / "exp.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def _refused(capsys, tmp_path, config: Path, *needles: str) -> None:
    """``validate`` and ``run`` both exit 2 with one line holding every needle; nothing ran."""
    out = tmp_path / "run"
    for args in (["validate", config], ["run", config, "--out", out, "--quiet"]):
        code, lines = _cli(capsys, *args)
        assert code == 2, (args[0], lines)
        assert len(lines) == 1, (args[0], lines)
        for needle in needles:
            assert needle in lines[0], (args[0], lines)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_model_with_5_outputs_on_2_classes_is_refused(plugins, tmp_path, capsys) -> None:
    config = _config(
        tmp_path,
        data={"dataset": f"{PLUGINS}:good", "partition": "iid"},
        model={"name": f"{PLUGINS}:five_outputs"},
    )
    _refused(capsys, tmp_path, config, "five_outputs", "5 outputs", "2 classes")


def test_a_config_that_is_not_utf8_is_refused(tmp_path, capsys) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes('[experiment]\nname = "café"\n'.encode("latin-1"))
    _refused(capsys, tmp_path, config, str(config), "not UTF-8")


def test_a_directory_given_as_the_config_is_refused(tmp_path, capsys) -> None:
    config = tmp_path / "configs"
    config.mkdir()
    _refused(capsys, tmp_path, config, str(config), "is a directory")


@pytest.mark.parametrize(
    ("function", "needles"),
    [
        ("nan_features", ["the training set", "NaN or infinite", "sample 17"]),
        ("infinite_test_features", ["the test set", "NaN or infinite", "sample 3"]),
        ("labels_out_of_range", ["the training set", "label 7 is out of range", "0..1"]),
    ],
)
def test_bad_values_from_a_data_function_are_refused_before_round_1(
    plugins, tmp_path, capsys, function, needles
) -> None:
    config = _config(tmp_path, data={"dataset": f"{PLUGINS}:{function}", "partition": "iid"})
    _refused(capsys, tmp_path, config, function, *needles)


# -- the deployed client's own data --------------------------------------------------------------
def _client(capsys, tmp_path: Path, data: Path, model: str = "logistic_regression"):
    token = tmp_path / "client-0.token"
    token.write_text("not-checked-before-connecting\n")
    return _cli(
        capsys,
        "client",
        "--server",
        "127.0.0.1:9",
        "--client-id",
        "0",
        "--token-file",
        token,
        "--insecure",
        "--give-up-after",
        "0.2",
        "--data",
        data,
        "--model",
        model,
        "--num-classes",
        "2",
    )


def _arrays(n: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int64)}


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _with_nan() -> dict[str, np.ndarray]:
    a = _arrays()
    a["x"][4, 1] = np.nan
    return a


def _out_of_range() -> dict[str, np.ndarray]:
    a = _arrays()
    a["y"][2] = 2
    return a


def _bad_eval_labels() -> dict[str, np.ndarray]:
    a = _arrays()
    return {**a, "x_eval": a["x"][:5], "y_eval": np.full(5, -1)}


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        (_with_nan, ["(x, y)", "NaN or infinite", "sample 4"]),
        (_out_of_range, ["(x, y)", "label 2 is out of range", "0..1"]),
        (lambda: _arrays(0), ["(x, y)", "holds no samples"]),
        (_bad_eval_labels, ["(x_eval, y_eval)", "label -1 is out of range"]),
        (
            lambda: {"x": np.array([object()] * 4, dtype=object), "y": np.zeros(4)},
            ["'x'", "object"],
        ),
        (lambda: {"x": _arrays()["x"]}, ["lacks the arrays ['y']"]),
    ],
    ids=["nan", "label-range", "empty", "eval-labels", "object-dtype", "no-labels"],
)
def test_a_client_with_bad_data_is_refused(tmp_path, capsys, arrays, needles) -> None:
    data = _npz(tmp_path / "mine.npz", **arrays())
    code, lines = _client(capsys, tmp_path, data)
    assert code == 2 and len(lines) == 1, lines
    assert f"--data {data}" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (
            lambda p: p.write_bytes(_npz(p.with_suffix(".ok.npz"), **_arrays()).read_bytes()[:60]),
            "not an .npz file",
        ),
        (lambda p: p.write_bytes(b""), "not an .npz file"),
        (lambda p: p.write_bytes(b"just some text, not numpy"), "not an .npz file"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
    ],
    ids=["truncated", "empty-file", "text", "missing", "directory"],
)
def test_a_client_with_an_unreadable_data_file_is_refused(tmp_path, capsys, make, needle):
    data = tmp_path / "mine.npz"
    make(data)
    code, lines = _client(capsys, tmp_path, data)
    assert code == 2 and len(lines) == 1, lines
    assert f"--data {data}" in lines[0] and needle in lines[0], lines


def test_a_client_model_with_the_wrong_output_width_is_refused(plugins, tmp_path, capsys):
    data = _npz(tmp_path / "mine.npz", **_arrays())
    code, lines = _client(capsys, tmp_path, data, model=f"{PLUGINS}:five_outputs")
    assert code == 2 and len(lines) == 1, lines
    assert "five_outputs" in lines[0] and "5 outputs" in lines[0] and "2 classes" in lines[0]


def test_a_missing_token_file_is_a_one_line_error(tmp_path, capsys) -> None:
    data = _npz(tmp_path / "mine.npz", **_arrays())
    missing = tmp_path / "nope.token"
    code, lines = _cli(
        capsys,
        "client",
        "--server",
        "127.0.0.1:9",
        "--client-id",
        "0",
        "--token-file",
        missing,
        "--insecure",
        "--data",
        data,
        "--model",
        "logistic_regression",
        "--num-classes",
        "2",
    )
    assert code == 2 and lines == [f"error: --token-file {missing}: no such file"], lines


def test_an_out_folder_that_is_a_file_is_a_one_line_error(tmp_path, capsys) -> None:
    out = tmp_path / "taken"
    out.write_text("a file, not a folder\n")
    code, lines = _cli(capsys, "run", _config(tmp_path), "--out", out, "--quiet")
    assert code == 2 and len(lines) == 1 and str(out) in lines[0], lines


def test_an_empty_data_file_is_a_one_line_error(tmp_path, capsys) -> None:
    empty = tmp_path / "pneumoniamnist.npz"
    empty.write_bytes(b"")
    config = _config(tmp_path, data={"dataset": "pneumoniamnist", "path": str(empty)})
    _refused(capsys, tmp_path, config, str(empty), "cannot be read")
