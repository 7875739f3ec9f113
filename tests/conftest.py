"""Shared fixtures: small configs that run in well under a second per round."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure

# The browser tests' one Chromium for the whole session (their ``browser`` fixture starts from
# it); a session fixture is shared only when it is defined here.
from browser import _chromium  # noqa: F401 (fixture)

os.environ.setdefault("KERAS_BACKEND", "torch")
# One torch thread in the test process and in every process a test starts, unless
# OMP_NUM_THREADS says otherwise (`OMP_NUM_THREADS=2 .venv/bin/python -m pytest` runs the suite on
# two). The suite's models are tiny, and while another job keeps the cores busy two intra-op
# threads wait on each other at every small op: an 8-example MLP step took 0.5 ms on one thread
# and 5-19 ms on two on a loaded 2-core machine. Tests that compare engines or thread counts do so
# with stated tolerances, so nothing here depends on the count.
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# What the tests marked ``shared_data`` read (the layout of SHARED_DATA / "README.md").
DATA_SETS = {
    "fsdd/recordings": "the Free Spoken Digit Dataset's 3,000 .wav files",
    "medmnist/pneumoniamnist.npz": "the PneumoniaMNIST archive (MedMNIST v2 layout)",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "shared_data: reads the real data sets in ../shared/data beside the project"
    )
    config.addinivalue_line(
        "markers", "plots: draws the PNG pictures it makes (the other tests only build them)"
    )


# A white 1x1 PNG: what a picture's file holds in a test that does not draw its pictures.
UNDRAWN_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)


REAL_SAVEFIG, REAL_TIGHT_LAYOUT = Figure.savefig, Figure.tight_layout


def _save_undrawn(figure: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
    """``Figure.savefig`` without drawing: the figure's lines convert their data (as drawing
    would, so that data a line cannot show still fails) and the file gets :data:`UNDRAWN_PNG`."""
    for ax in figure.axes:
        for line in ax.get_lines():
            line.recache(always=True)
    if isinstance(fname, str | os.PathLike):
        Path(fname).write_bytes(UNDRAWN_PNG)
    else:
        fname.write(UNDRAWN_PNG)


@pytest.fixture(scope="session", autouse=True)
def _pictures_built_not_drawn() -> Iterator[None]:
    """Every run writes PNG plots (accuracy, loss, partition, confusion matrix, privacy, ...),
    and drawing them with matplotlib was about 1 s of the 1.3 s of CPU that one small run takes,
    hundreds of times a session, in tests that never look at them. Those tests still build every
    figure (the plotting code runs, the lines convert their data) and still write each file, but
    the figure is not laid out or drawn: the file holds a 1x1 PNG. The tests that check pictures
    are marked ``plots`` and draw them for real (``test_runner.py``'s run folder contract draws
    the accuracy, loss, partition and confusion-matrix plots; the privacy, contributions and
    audit pictures are drawn in their tests). Processes that tests start draw for real."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", _save_undrawn)
        patch.setattr(Figure, "tight_layout", lambda figure, *args, **kwargs: None)
        yield


@pytest.fixture(autouse=True)
def _pictures_drawn_where_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``plots`` lays out and draws its pictures as a run outside the tests does."""
    if request.node.get_closest_marker("plots") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", REAL_SAVEFIG)
        patch.setattr(Figure, "tight_layout", REAL_TIGHT_LAYOUT)
        yield


MISSING_DATA = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what they deselect
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the data, the tests that read it do not run and the session fails with one
    message that says where the data goes; every other test still runs."""
    needing = [item for item in items if item.get_closest_marker("shared_data") is not None]
    missing = [name for name in DATA_SETS if not (SHARED_DATA / name).exists()]
    if not needing or not missing:
        return
    wanted = "\n".join(f"  {SHARED_DATA / name}: {what}" for name, what in DATA_SETS.items())
    config.stash[MISSING_DATA] = (
        f"{len(needing)} tests read real data that is missing ({', '.join(missing)}), so they "
        f"did not run and the session fails.\nThe data sets go in {SHARED_DATA} (the folder "
        f"shared/data beside the project checkout, as {SHARED_DATA / 'README.md'} describes):\n"
        f"{wanted}\nPut them there, or leave those tests out with: "
        ".venv/bin/python -m pytest -m 'not shared_data'"
    )
    skipped = {id(item) for item in needing}
    items[:] = [item for item in items if id(item) not in skipped]
    config.hook.pytest_deselected(items=needing)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001
    message = config.stash.get(MISSING_DATA, None)
    if message is not None:
        terminalreporter.section("missing data", sep="=", red=True, bold=True)
        terminalreporter.line(message, red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(MISSING_DATA, None) is not None and exitstatus in (
        pytest.ExitCode.OK,
        pytest.ExitCode.NO_TESTS_COLLECTED,
    ):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def tiny_config(**sections: dict) -> dict:
    """A synthetic logistic-regression experiment; ``sections`` update its tables."""
    cfg = {
        "experiment": {"name": "tiny", "seed": 3, "rounds": 3},
        "data": {
            "dataset": "synthetic",
            "num_clients": 6,
            "synthetic_samples": 600,
            "synthetic_shape": [1, 6, 6],
            "synthetic_classes": 3,
            "partition": "dirichlet",
            "alpha": 1.0,
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.1, "epochs": 1, "batch_size": 16},
        "server": {"strategy": "fedavg", "clients_per_round": 4},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def driven_params(exp: Any, rounds: int) -> torch.Tensor:
    """The parameters after ``rounds`` fit rounds of ``exp``'s driver, called directly (no runner,
    no evaluation): what a test compares across engines, transports and protections."""
    params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
    for r in range(1, rounds + 1):
        result = exp.driver.fit_round(r, params, state)
        params, state = result.params, result.state
    return params


def faulted_rounds(cfg: dict, faults: dict[tuple[int, int], Any], rounds: int) -> list[dict]:
    """``rounds`` fit rounds of the config ``cfg``, driven directly (no runner), with ``faults``
    (:class:`~fedguard.simulation.dropout.FitFault` by ``(round, client id)``) injected. After
    each round: its ``metrics``, the ``params``, the ``server`` state (a ``ServerState``), a copy
    of each client's state (``clients``) and the clients ``sampled`` in it."""
    from fedguard.experiment import config
    from fedguard.experiment.assembly import Experiment
    from fedguard.protocol.strategy import ServerState
    from fedguard.simulation.dropout import FitFaults

    exp = Experiment(config.validate(cfg))
    try:
        exp.driver.transport = FitFaults(exp.driver.transport, faults)
        params, state = exp.initial_params, exp.strategy.init(exp.initial_params)
        out = []
        for r in range(1, rounds + 1):
            result = exp.driver.fit_round(r, params, state)
            params, state = result.params, result.state
            clients = {cid: dict(named) for cid, named in exp.client_state.items()}
            out.append(
                {
                    "metrics": result.metrics,
                    "params": params,
                    "server": ServerState.of(state),
                    "clients": clients,
                    "sampled": exp.driver.sample(r),
                }
            )
        return out
    finally:
        exp.close()


def committed_state(after: dict, cid: int, names: Any) -> torch.Tensor:
    """Client ``cid``'s state ``names`` (a ``features.CommittedState``) after a round of
    :func:`faulted_rounds` as the server's record settles it (what its next task would start
    from): the one the server's part holds."""
    from fedguard.algorithms.optimizers import committed

    named = after["clients"].get(cid, {})
    rounds = named.get(names.rounds, torch.zeros(2, dtype=torch.int64)).tolist()
    state, _ = committed.settle(
        named.get(names.committed),
        rounds[0],
        named.get(names.pending),
        rounds[1],
        committed.last_aggregated(after["server"].aggregated, cid),
        like=after["params"],
        server_part=names.server_part,
        client_part=names.client_part,
    )
    return state


def ten_iid_config(name: str, **sections: dict) -> dict:
    """Ten IID synthetic clients, all of them in each of 4 rounds; ``sections`` update its tables."""
    cfg = {
        "experiment": {"name": name, "seed": 1, "rounds": 4},
        "data": {
            "dataset": "synthetic",
            "num_clients": 10,
            "synthetic_samples": 1000,
            "synthetic_shape": [1, 6, 6],
            "synthetic_classes": 3,
            "partition": "iid",
        },
        "model": {"name": "logistic_regression"},
        "client": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "batch_size": 32},
        "server": {"strategy": "fedavg", "clients_per_round": 10},
        "evaluation": {"every": 0},
    }
    for table, values in sections.items():
        cfg.setdefault(table, {}).update(values)
    return cfg


def metric_rows(folder: Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl."""
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
