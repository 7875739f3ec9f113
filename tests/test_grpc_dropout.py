"""A client that hangs mid-round and is killed: the round completes at its deadline with the
others, and the restarted client reconnects and joins the next round."""

from __future__ import annotations

from test_grpc_harness import Behaviour, Federation, make_security, wait_for, write_config


def test_a_client_killed_mid_round_is_dropped_and_rejoins_the_next_round(tmp_path) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        data={"num_clients": 5},
        server={"clients_per_round": 5, "min_clients": 3, "deadline_s": 6.0},
    )
    fed = Federation(config, tmp_path / "run", make_security(tmp_path / "sec", range(5)))
    try:
        fed.start_server()
        for cid in range(4):
            fed.start_client(cid)
        marker = fed.start_client(4, Behaviour.HANG_IN_ROUND_2)
        wait_for(marker.exists, 90, "client 4 to hang in round 2")
        fed.kill_client(4)
        wait_for(lambda: len(fed.rows()) >= 2, 30, "round 2 to complete without client 4")
        fed.start_client(4)
        assert fed.wait_server(60) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    rows = fed.rows()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["clients_completed"] for r in rows] == [5, 4, 5]
    assert [r["clients_failed"] for r in rows] == [0, 1, 0]
    assert rows[1]["seconds"] >= 6.0  # round 2 waited for the deadline, then went on
