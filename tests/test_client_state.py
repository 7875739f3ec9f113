"""A deployed client's state on its own disk: SCAFFOLD's control variate survives a restart.

Four SCAFFOLD rounds with a server that holds no data: once uninterrupted, once with the server
and every client stopped after round 2 and started again (the server with ``--resume``, each
client as a new app over its ``--state-dir``). The two end with the same parameters bit for
bit. Clients restarted without their state folders refuse the resumed run's tasks: the server's
control variate holds their old ``c_i``, and training from zero would leave it off the mean of
the clients' ``c_i`` for good.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from fedguard import cli
from fedguard.client.app import CONTROL, ClientApp
from fedguard.client.state_store import DiskState, StateError
from fedguard.experiment import checkpoint, runner
from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.protocol.driver import RoundFailedError
from fedguard.protocol.transport import Transport
from fedguard.simulation.inprocess import InProcessTransport

ROUNDS = 4


def test_state_is_written_atomically_private_and_read_back(tmp_path) -> None:
    store = DiskState(tmp_path / "state")
    control = torch.arange(5, dtype=torch.float32) / 3
    store[7] = {CONTROL: control}
    path = tmp_path / "state" / "client-7.safetensors"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["client-7.safetensors"]
    control.add_(1.0)  # the stored copy is the caller's value when it was assigned
    again = DiskState(tmp_path / "state")
    assert list(again) == [7] and torch.equal(again[7][CONTROL], torch.arange(5) / 3)
    del again[7]
    assert not path.exists() and len(DiskState(tmp_path / "state")) == 0


def test_an_unreadable_state_file_or_folder_is_refused_in_one_line(tmp_path, capsys) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "client-3.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StateError, match="client-3.safetensors: not a readable client state file"):
        DiskState(folder)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot be created"):
        DiskState(blocker)
    code = cli.main(
        [
            "client",
            "--server",
            "127.0.0.1:1",
            "--client-id",
            "0",
            "--token-file",
            str(blocker),
            "--insecure",
            "--data",
            str(tmp_path / "missing.npz"),
            "--model",
            "logistic_regression",
            "--num-classes",
            "3",
            "--eval-fraction",
            "1.5",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--eval-fraction must be in [0, 1), got 1.5" in err, err


def _cfg() -> dict:
    return tiny_config(
        experiment={"rounds": ROUNDS},
        server={"strategy": "scaffold", "clients_per_round": 4},
        client={"lr": 0.05},
        evaluation={"mode": "federated"},
    )


def _clients(folder: Path | None) -> ClientApp:
    """A fresh process's worth of clients: the partition, and the state folder if any."""
    exp = Experiment(config_mod.validate(_cfg()))
    state = None if folder is None else DiskState(folder)
    return ClientApp(exp.model, exp.fed.clients, state=state, pins=exp.app.pins)


def _run(out: Path, app: ClientApp, rounds: int, *, resume: bool = False) -> None:
    def transport_fn(ids: list[int]) -> Transport:
        return InProcessTransport(app.handle, ids)

    runner.run(
        _cfg(),
        out=out,
        resume=resume,
        progress=False,
        overrides=[f"experiment.rounds={rounds}"],
        transport_fn=transport_fn,
        data_free=True,
    )


def _final(out: Path) -> torch.Tensor:
    ck = checkpoint.latest(out / "checkpoints")
    assert ck is not None and ck.round == ROUNDS
    assert not any(k.startswith("client.") for k in ck.tensors)  # the clients keep their own
    return ck.tensors["params"]


def test_scaffold_state_survives_a_restart_of_the_server_and_every_client(tmp_path) -> None:
    whole = tmp_path / "whole"
    _run(whole, _clients(tmp_path / "state-whole"), ROUNDS)

    restarted = tmp_path / "restarted"
    _run(restarted, _clients(tmp_path / "state"), 2)
    saved = {p.name for p in (tmp_path / "state").iterdir()}
    assert saved == {f"client-{c}.safetensors" for c in range(6)}  # all sampled in rounds 1-2
    _run(restarted, _clients(tmp_path / "state"), ROUNDS, resume=True)
    assert torch.equal(_final(restarted), _final(whole))

    forgetful = tmp_path / "forgetful"
    _run(forgetful, _clients(tmp_path / "state-lost"), 2)
    with pytest.raises(RoundFailedError, match="only 0 usable replies") as failed:
        _run(forgetful, _clients(tmp_path / "state-empty"), ROUNDS, resume=True)
    # each sampled client's delta entered c in round 1 or 2, and its state holds none
    refusal = (
        r"SCAFFOLD: the server's control variate holds this client's update of round [12], its "
        r"control variate state holds round 0; it is not the state"
    )
    assert len(re.findall(refusal, str(failed.value))) == 4, failed.value
