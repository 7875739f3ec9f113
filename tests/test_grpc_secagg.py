"""Secure aggregation over the network: a client process that dies after sending its masked
input (it exits when asked to unmask) leaves the sum exact; the round equals the simulator's
round with that client dropped at the same phase."""

from __future__ import annotations

import torch
from test_grpc_harness import Behaviour, Federation, final_params, make_security, write_config

from fedguard.experiment import config as config_mod
from fedguard.experiment.assembly import Experiment
from fedguard.protocol.secagg import Phase
from fedguard.simulation.dropout import PhaseDropout

SECTIONS = {
    "experiment": {"rounds": 1},
    "data": {"num_clients": 5},
    "server": {"clients_per_round": 5, "min_clients": 3, "deadline_s": 5.0},
    "secure_aggregation": {"enabled": True, "clip_norm": 1.0, "bits": 64},
}
VANISHING = 2


def test_secure_aggregation_survives_a_client_dying_after_masking(tmp_path) -> None:
    config = write_config(tmp_path / "exp.toml", **SECTIONS)
    fed = Federation(config, tmp_path / "run", make_security(tmp_path / "sec", range(5)))
    try:
        fed.start_server()
        markers = {
            cid: fed.start_client(
                cid, Behaviour.VANISH_AT_UNMASK if cid == VANISHING else Behaviour.NORMAL
            )
            for cid in range(5)
        }
        assert fed.wait_server(90) == 0
        exits = fed.wait_clients(15)
    finally:
        fed.stop()
    assert markers[VANISHING].exists() and exits[VANISHING] == 17
    assert {exits[c] for c in range(5) if c != VANISHING} == {0}
    [row] = fed.rows()
    assert "secure_aggregation_aborted" not in row
    log = fed.log.read_text()
    assert "unmask: client 2 dropped: timeout" in log
    assert "secure aggregation of 5 clients, verified (signed keys, consistency check)" in log
    exp = Experiment(config_mod.load(config))
    exp.driver.transport = PhaseDropout(exp.transport, {Phase.UNMASK: {VANISHING}})
    exp.driver.deadline_s = None  # the script drops the client; a slow machine drops no other
    simulated = exp.driver.fit_round(1, exp.initial_params, exp.strategy.init(exp.initial_params))
    assert simulated.metrics["clients_completed"] == row["clients_completed"]
    round_, deployed = final_params(fed.out)
    assert round_ == 1 and torch.equal(deployed, simulated.params)
    assert not torch.equal(deployed, exp.initial_params)


def test_a_scripted_malicious_server_over_grpc_gets_no_share(tmp_path) -> None:
    """Real client loops over TLS, each with its identity key and the registry from the files
    ``fedguard tokens`` writes, against a server (this test) that runs a verified round through
    the gRPC transport and then tells two groups of clients different survivor sets. Every
    unmasking request fails at the client; no share crosses the network."""
    import threading

    from test_grpc_harness import make_security

    from fedguard.protocol import messages, secagg, secagg_client
    from fedguard.protocol.secagg import Mode
    from fedguard.protocol.transport import Delivered
    from fedguard.runtime import auth, grpc_client, grpc_launch, grpc_server, identities

    n, dim = 6, 12
    sec = make_security(tmp_path / "sec", range(n))
    address = f"127.0.0.1:{grpc_launch.free_port()}"
    transport = grpc_server.GrpcServerTransport(
        list(range(n)),
        address,
        authenticator=auth.Authenticator(sec.tokens()),
        tls=sec.server_tls(),
        poll_s=0.5,
    )
    transport.start()
    stop = threading.Event()

    def fit(task: messages.FitTask) -> messages.FitReply:
        return messages.FitReply(task.round, task.client_id, torch.full((dim,), 0.01), 4)

    def client_loop(cid: int) -> None:
        key = sec.directory / f"client-{cid}.identity"
        own = identities.load_client(key, sec.directory / identities.REGISTRY_FILE, cid)
        client = secagg_client.SecAggClient(fit, identities=own)

        def handler(_: int, payload: bytes) -> bytes:
            return messages.encode(client.handle(messages.decode(payload)))

        settings = grpc_client.ClientSettings(
            address, cid, sec.token(cid), sec.client_tls(cid), give_up_after_s=30.0
        )
        grpc_client.serve(settings, handler, stop=stop)

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(n)]
    for t in threads:
        t.start()
    try:
        assert transport.wait_for_clients(n, 30.0)
        settings = secagg.Settings(Mode.SECAGG, clip_norm=1.0, max_weight=4)
        setup = settings.setup(1, list(range(n)), graph_seed=0, dim=dim, nonce=bytes(range(32)))

        def ask(requests: dict[int, messages.SecAggMessage]) -> dict:
            encoded = {c: messages.encode(m) for c, m in requests.items()}
            replies = {}
            for o in transport.exchange(encoded, deadline_s=20.0):
                replies[o.client_id] = messages.decode(o.payload) if isinstance(o, Delivered) else o
            return replies

        keys = ask({u: setup.to_message(u) for u in range(n)})
        public = {v: k.c_public + k.s_public for v, k in keys.items()}
        sigs = {v: k.signature for v, k in keys.items()}
        shares = ask(
            {
                u: messages.SecAggShareRequest(
                    1, u, {v: public[v] for v in range(n) if v != u}, sigs
                )
                for u in range(n)
            }
        )
        masked = ask(
            {
                u: messages.SecAggMaskRequest(
                    1,
                    u,
                    torch.zeros(dim),
                    {v: shares[v].ciphertexts[u] for v in range(n) if v != u},
                    {"seed": u},
                )
                for u in range(n)
            }
        )
        assert all(isinstance(m, messages.SecAggMaskedInput) for m in masked.values())
        # group A is told everyone survived, group B that client 5 dropped
        group_a = [0, 1, 5]  # the others, 2, 3 and 4, form group B
        told = {u: list(range(n)) if u in group_a else [0, 1, 2, 3, 4] for u in range(n)}
        signed = ask({u: messages.SecAggConsistencyRequest(1, u, told[u]) for u in range(n)})
        sigs_all = {u: s.signature for u, s in signed.items()}
        assert len(sigs_all) == n and setup.quorum == 4
        unmask = ask(
            {
                u: messages.SecAggUnmaskRequest(
                    1, u, told[u], [] if u in group_a else [5], sigs_all
                )
                for u in range(n)
            }
        )
        assert not [u for u, r in unmask.items() if isinstance(r, messages.SecAggUnmaskReply)]
        reasons = {u: str(getattr(r, "reason", "")) for u, r in unmask.items()}
        assert all("3 valid signatures over the survivor set" in reasons[u] for u in range(n))
    finally:
        stop.set()
        transport.finish(grace_s=1.0)
        for t in threads:
            t.join(10)
