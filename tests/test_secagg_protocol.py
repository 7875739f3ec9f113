"""The secure-aggregation protocol over the in-process transport, with dropouts and a nosy server."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from scipy import stats

from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.protocol import messages, secagg, secagg_client, secagg_server
from fedguard.protocol.secagg import Mode, Phase
from fedguard.protocol.transport import Outcome, Transport
from fedguard.simulation.dropout import PhaseDropout
from fedguard.simulation.inprocess import InProcessTransport

N, DIM, ROUND = 10, 300, 7
UPDATES = {
    cid: torch.from_numpy(np.random.default_rng(cid).normal(0, 0.2, DIM).astype(np.float32))
    for cid in range(N)
}
EXAMPLES = {cid: 20 + 3 * cid for cid in range(N)}


def _fit(task: messages.FitTask) -> messages.FitReply:
    return messages.FitReply(
        task.round, task.client_id, UPDATES[task.client_id], EXAMPLES[task.client_id]
    )


def _seeded_bytes(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return rng.bytes


def _transport(client: secagg_client.SecAggClient) -> InProcessTransport:
    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(client.handle(messages.decode(payload)))

    return InProcessTransport(handler, list(range(N)))


def _settings(mode: Mode, bits: int = 32) -> secagg.Settings:
    neighbours = 5 if mode is Mode.SECAGG_PLUS else None
    return secagg.Settings(mode, clip_norm=3.0, max_weight=60, bits=bits, neighbours=neighbours)


def _run(
    transport: Transport,
    settings: secagg.Settings,
    identities: secagg.Identities | None = None,
) -> tuple[secagg_server.SecureSum, secagg.RoundSetup]:
    """One round; a verified one (a fresh nonce) when the server has ``identities``."""
    nonce = b"" if identities is None else bytes(range(32))
    setup = settings.setup(ROUND, list(range(N)), graph_seed=11, dim=DIM, nonce=nonce)
    params = torch.zeros(DIM)

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(ROUND, cid, params, ciphertexts, {"seed": 100 + cid})

    result = secagg_server.secure_sum(transport, setup, mask_request, identities=identities)
    return result, setup


def _expected(survivors: list[int], setup: secagg.RoundSetup) -> tuple[np.ndarray, int]:
    """The exact sum of the survivors' encodings, as the clients quantise them."""
    fp = setup.fixed_point
    total = np.zeros(DIM + 1, dtype=np.int64)
    for u in survivors:
        rng = np.random.default_rng([100 + u, 0x5EC])
        total += secagg_quantize.from_ring(
            secagg_quantize.encode(UPDATES[u].numpy(), EXAMPLES[u], fp, rng), setup.bits
        )
    return total[:-1] / fp.scale, int(total[-1])


def _tolerance(mode: Mode) -> int:
    """Dropouts every neighbourhood survives: n - t (complete graph), k + 1 - t (SecAgg+)."""
    setup = _settings(mode).setup(ROUND, list(range(N)), graph_seed=11, dim=DIM)
    return setup.neighbours + 1 - setup.threshold


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("phase", list(Phase))
def test_unmasked_sum_is_exact_with_dropouts(mode: Mode, phase: Phase) -> None:
    for count in sorted({0, 1, _tolerance(mode)}):
        dropped = set(range(N - count, N))
        transport = PhaseDropout(_transport(secagg_client.SecAggClient(_fit)), {phase: dropped})
        result, setup = _run(transport, _settings(mode))
        in_sum = set(range(N)) - (dropped if phase <= Phase.MASK else set())
        assert result.survivors == sorted(in_sum)
        total, weight = _expected(sorted(in_sum), setup)
        assert np.array_equal(result.total, total), (mode, phase, count)
        assert result.weight == weight == sum(EXAMPLES[u] for u in in_sum)
        assert result.metrics["clients_completed"] == len(in_sum)


def test_sum_is_exact_with_64_bit_ring_and_signed_keys() -> None:
    keys = {cid: ed25519.Ed25519PrivateKey.generate() for cid in range(N)}
    public = {cid: key.public_key() for cid, key in keys.items()}
    clients = {
        cid: secagg_client.SecAggClient(
            _fit, identities=secagg.Identities(public, {cid: keys[cid]})
        )
        for cid in range(N)
    }

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(clients[cid].handle(messages.decode(payload)))

    transport = InProcessTransport(handler, list(range(N)))
    result, setup = _run(transport, _settings(Mode.SECAGG, 64), secagg.Identities(public))
    total, _ = _expected(list(range(N)), setup)
    assert np.array_equal(result.total, total)
    clipped = {u: secagg_quantize.clip(UPDATES[u].numpy(), 3.0) for u in range(N)}
    assert any(np.linalg.norm(UPDATES[u].numpy()) > 3.0 for u in range(N))  # the clip binds
    weighted = sum(EXAMPLES[u] * clipped[u] for u in range(N))
    assert np.allclose(result.total, weighted, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", list(Mode))
def test_forged_keys_exclude_the_forger_and_the_rest_sum_exactly(mode: Mode) -> None:
    """Client 3 signs with a key that is not its registered identity: the server, checking
    what the peers would check, drops it in phase 0 and names it; the others' sum is exact."""
    real = {cid: ed25519.Ed25519PrivateKey.generate() for cid in range(N)}
    public = {cid: key.public_key() for cid, key in real.items()}
    impostor = ed25519.Ed25519PrivateKey.generate()
    believed = {**public, 3: impostor.public_key()}  # only client 3's own node believes this
    clients = {
        cid: secagg_client.SecAggClient(
            _fit,
            identities=secagg.Identities(believed, {3: impostor})
            if cid == 3
            else secagg.Identities(public, {cid: real[cid]}),
        )
        for cid in range(N)
    }

    def handler(cid: int, payload: bytes) -> bytes:
        return messages.encode(clients[cid].handle(messages.decode(payload)))

    transport = InProcessTransport(handler, list(range(N)))
    result, setup = _run(transport, _settings(mode), secagg.Identities(public))
    others = [u for u in range(N) if u != 3]
    assert result.survivors == others
    assert any(c == 3 and "advertise: bad signature" in r for c, r in result.problems)
    total, weight = _expected(others, setup)
    assert np.array_equal(result.total, total) and result.weight == weight


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("phase", [Phase.ADVERTISE, Phase.SHARE, Phase.MASK])
def test_too_few_survivors_abort_before_anything_is_revealed(mode: Mode, phase: Phase) -> None:
    dropped = set(range(_tolerance(mode) + 1))  # adjacent to client 0 or not, 0's holders lose t
    if mode is Mode.SECAGG_PLUS:
        setup = _settings(mode).setup(ROUND, list(range(N)), graph_seed=11, dim=DIM)
        dropped = set(sorted(setup.graph[0])[: _tolerance(mode) + 1])
    transport = PhaseDropout(_transport(secagg_client.SecAggClient(_fit)), {phase: dropped})
    with pytest.raises(secagg.SecAggAbortedError, match="nothing was unmasked") as info:
        _run(transport, _settings(mode))
    assert "the threshold is" in str(info.value)
    assert not [p for p, _ in transport.delivered if p is Phase.UNMASK]
    assert info.value.metrics["clients_completed"] == 0


class _Intercept(Transport):
    """Rewrites requests on their way to clients; keeps every decoded reply."""

    def __init__(self, inner: Transport, edit: Callable[[int, messages.Message], messages.Message]):
        self.inner, self.edit = inner, edit
        self.replies: list[messages.Message] = []

    @property
    def client_ids(self):
        return self.inner.client_ids

    def exchange(self, requests: Mapping[int, bytes], *, deadline_s: float | None) -> list[Outcome]:
        edited = {c: messages.encode(self.edit(c, messages.decode(p))) for c, p in requests.items()}
        outcomes = self.inner.exchange(edited, deadline_s=deadline_s)
        self.replies += [messages.decode(o.payload) for o in outcomes if hasattr(o, "payload")]
        return outcomes


def _problem(result: secagg_server.SecureSum, cid: int) -> str:
    return " ".join(reason for c, reason in result.problems if c == cid)


def test_client_refuses_to_reveal_both_shares_of_a_peer() -> None:
    def edit(cid: int, m: messages.Message) -> messages.Message:
        if isinstance(m, messages.SecAggUnmaskRequest) and cid == 0:
            return messages.SecAggUnmaskRequest(m.round, cid, m.alive, [*m.dropped, 4])
        return m

    transport = _Intercept(_transport(secagg_client.SecAggClient(_fit)), edit)
    result, setup = _run(transport, _settings(Mode.SECAGG))
    assert "refuses to reveal both shares of client 4" in _problem(result, 0)
    unmask = [r for r in transport.replies if isinstance(r, messages.SecAggUnmaskReply)]
    assert sorted(r.client_id for r in unmask) == list(range(1, N))  # client 0 revealed nothing
    assert np.array_equal(result.total, _expected(list(range(N)), setup)[0])


@pytest.mark.parametrize(
    ("alive", "dropped", "message"),
    [
        (list(range(N)), [], None),
        ([0, 1, 2, 3, 4, 5], [], "but the server reports"),  # 6..9 vanished from both lists
        ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9], "fewer than the threshold 6"),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], [0], "is not listed alive"),
    ],
)
def test_client_refuses_an_inconsistent_unmask_request(alive, dropped, message) -> None:
    client = secagg_client.SecAggClient(_fit)
    transport = PhaseDropout(_transport(client), {Phase.UNMASK: set(range(N))})
    with pytest.raises(secagg.SecAggAbortedError, match="only 0 shares"):
        _run(transport, _settings(Mode.SECAGG))
    request = messages.SecAggUnmaskRequest(ROUND, 0, alive, dropped)
    if message is None:
        reply = client.unmask(request)
        assert sorted(reply.b_shares) == list(range(N)) and reply.s_shares == {}
        with pytest.raises(secagg.SecAggError, match="has no round 7"):
            client.unmask(request)  # a second request finds the state gone
    else:
        with pytest.raises(secagg.SecAggError, match=message):
            client.unmask(request)


def test_tampered_and_replayed_bundles_are_rejected() -> None:
    shares: dict[int, messages.ByteMap] = {}

    def edit(cid: int, m: messages.Message) -> messages.Message:
        if isinstance(m, messages.SecAggMaskRequest) and not shares:
            for r in transport.replies:
                if isinstance(r, messages.SecAggShares):
                    shares[r.client_id] = r.ciphertexts
        if isinstance(m, messages.SecAggMaskRequest) and cid in (0, 1):
            cts = dict(m.ciphertexts)
            if cid == 0:  # flip one byte of the bundle from client 5
                flipped = bytearray(cts[5])
                flipped[20] ^= 0x40
                cts[5] = bytes(flipped)
            else:  # replay client 5's bundle for client 2 to client 1
                cts[5] = shares[5][2]
            return messages.SecAggMaskRequest(m.round, cid, m.parameters, cts, m.config)
        return m

    transport = _Intercept(_transport(secagg_client.SecAggClient(_fit)), edit)
    result, setup = _run(transport, _settings(Mode.SECAGG))
    assert "bundle from client 5 to client 0 in round 7 failed authentication" in _problem(
        result, 0
    )
    assert "bundle from client 5 to client 1 in round 7 failed authentication" in _problem(
        result, 1
    )
    assert result.survivors == list(range(2, N))
    assert np.array_equal(result.total, _expected(list(range(2, N)), setup)[0])


def test_masked_vector_looks_uniform_and_hides_the_update() -> None:
    dim = 40_000
    update = torch.full((dim,), 0.01)

    def fit(task: messages.FitTask) -> messages.FitReply:
        return messages.FitReply(task.round, task.client_id, update, 10)

    client = secagg_client.SecAggClient(fit, random_bytes=_seeded_bytes(3))
    transport = _Intercept(_transport(client), lambda c, m: m)
    settings = secagg.Settings(Mode.SECAGG_PLUS, clip_norm=10.0, max_weight=10, neighbours=3)
    setup = settings.setup(ROUND, list(range(N)), graph_seed=1, dim=dim)

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(ROUND, cid, torch.zeros(dim), ciphertexts, {"seed": cid})

    result = secagg_server.secure_sum(transport, setup, mask_request)
    assert np.allclose(result.total, N * 10 * 0.01, atol=N * 10 / setup.fixed_point.scale)
    masked = next(r for r in transport.replies if isinstance(r, messages.SecAggMaskedInput))
    y = masked.masked.numpy().view(np.uint32)
    plain = secagg_quantize.encode(update.numpy(), 10, setup.fixed_point, np.random.default_rng(0))
    top = lambda v: np.bincount((v >> 28).astype(np.int64), minlength=16)  # noqa: E731
    assert stats.chisquare(top(y)).pvalue > 0.01
    assert stats.chisquare(top(plain)).pvalue < 1e-12  # the same test does see structure
    assert np.mean(y == plain) < 1e-3
