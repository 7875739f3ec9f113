"""Secure aggregation against a malicious server and malicious clients (verified rounds).

A scripted server drives real :class:`~fedguard.protocol.secagg_client.SecAggClient` objects, one
per client with its own Ed25519 identity, through the encoded messages, and attacks the round:
(a) it tells two groups of clients different survivor sets, (b) it substitutes a client's public
key, (c) it replays an old round's messages, (d) it chooses the SecAgg+ graph. Each attack is
detected and the round ends with no share revealed by any honest client. Malicious clients (a bad
signature, a malformed share bundle or share, a masked vector of the wrong shape) are excluded and
named by :func:`~fedguard.protocol.secagg_server.secure_sum`, and the others' weighted sum stays
exact (compared with a reference sum computed here from the raw updates and unequal weights).
Every test runs with one client object per id and with one object serving every id, whose
per-round memory of checked broadcast sets must not let a tampered set through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedguard.algorithms.secagg import quantize as secagg_quantize
from fedguard.protocol import messages, secagg, secagg_client, secagg_server
from fedguard.protocol.secagg import Identities, Mode, SecAggAbortedError, SecAggError
from fedguard.simulation.inprocess import InProcessTransport

N, DIM, SEED = 8, 30, 17
IDS = list(range(N))
IDENTITIES = Identities.simulated(3, IDS)
REGISTRY = IDENTITIES.public()
UPDATES = {cid: np.random.default_rng(cid).normal(0, 0.1, DIM).astype(np.float32) for cid in IDS}
WEIGHTS = {cid: 3 + 2 * cid for cid in IDS}  # unequal example counts


def _fit(task: messages.FitTask) -> messages.FitReply:
    update = torch.from_numpy(UPDATES[task.client_id])
    return messages.FitReply(task.round, task.client_id, update, WEIGHTS[task.client_id])


def _settings(mode: Mode) -> secagg.Settings:
    neighbours = 3 if mode is Mode.SECAGG_PLUS else None
    return secagg.Settings(mode, clip_norm=5.0, max_weight=40, neighbours=neighbours)


def _nonce(round_: int) -> bytes:
    return bytes([round_]) * 32


_ONE_NODE = {"on": False}  # set per test by the ``node`` fixture


@pytest.fixture(autouse=True, params=["one device per client", "one node for all clients"])
def node(request: pytest.FixtureRequest) -> None:
    """Every test runs twice: with one client object per id (a deployment) and with one object
    answering for every id (the simulator), which checks each broadcast set once per round and
    nonce and reuses the outcome for the other ids: each attack must be caught either way."""
    _ONE_NODE["on"] = request.param == "one node for all clients"


def _clients() -> dict[int, secagg_client.SecAggClient]:
    """One client object (one device) per id, each with only its own private key; or, under
    the ``node`` fixture's second setting, one object holding every id's key."""
    if _ONE_NODE["on"]:
        shared = secagg_client.SecAggClient(
            _fit, identities=IDENTITIES, random_bytes=np.random.default_rng(100).bytes
        )
        return dict.fromkeys(IDS, shared)
    return {
        cid: secagg_client.SecAggClient(
            _fit,
            identities=Identities(REGISTRY.registry, {cid: IDENTITIES.own[cid]}),
            random_bytes=np.random.default_rng(100 + cid).bytes,
        )
        for cid in IDS
    }


class Scripted:
    """A server that runs the phases by hand, so that a test can change what it sends.

    Every request and reply goes through the wire encoding. ``refusals`` records the clients
    that refused a request (and why); ``revealed`` the clients that sent any share in phase 3.
    """

    def __init__(self, mode: Mode, round_: int = 5, clients=None) -> None:
        self.clients = _clients() if clients is None else clients
        self.setup = _settings(mode).setup(
            round_, IDS, graph_seed=SEED, dim=DIM, nonce=_nonce(round_)
        )
        self.published = self.setup  # what phase 0 sends (before a committed graph's seed)
        self.refusals: dict[int, str] = {}
        self.revealed: dict[int, messages.SecAggUnmaskReply] = {}
        self.keys: dict[int, messages.SecAggKeys] = {}
        self.reveals: dict[int, bytes] = {}
        self.bundles: dict[int, messages.ByteMap] = {}
        self.signatures: dict[int, bytes] = {}

    def ask(self, cid: int, request: messages.SecAggMessage) -> messages.SecAggMessage | None:
        decoded = messages.decode(messages.encode(request))
        try:
            reply = self.clients[cid].handle(decoded)
        except SecAggError as exc:
            self.refusals[cid] = str(exc)
            return None
        reply = messages.decode(messages.encode(reply))
        if isinstance(reply, messages.SecAggUnmaskReply) and (reply.b_shares or reply.s_shares):
            self.revealed[cid] = reply
        return reply

    # -- the honest phases ----------------------------------------------------------------------

    def advertise(self) -> None:
        for u in IDS:
            reply = self.ask(u, self.published.to_message(u))
            if isinstance(reply, messages.SecAggKeys):
                self.keys[u] = reply

    def advertised(self) -> dict[int, bytes]:
        return {v: k.c_public + k.s_public + k.commitment for v, k in self.keys.items()}

    def reveal(self) -> None:
        """SecAgg+: collect every ``r`` and switch to the graph they give."""
        sigs = {v: k.signature for v, k in self.keys.items()}
        for u in IDS:
            request = messages.SecAggRevealRequest(self.setup.round, u, self.advertised(), sigs)
            reply = self.ask(u, request)
            if isinstance(reply, messages.SecAggReveal):
                self.reveals[u] = reply.reveal
        seed = secagg_server.secagg_crypto.graph_seed(
            self.setup.round, self.setup.nonce, self.reveals
        )
        self.setup = replace(self.setup, graph_seed=seed)

    def share_request(self, u: int, graph=None) -> messages.SecAggShareRequest:
        peers = sorted((graph or self.setup.graph)[u])
        return messages.SecAggShareRequest(
            self.setup.round,
            u,
            {v: self.keys[v].c_public + self.keys[v].s_public for v in peers},
            {v: self.keys[v].signature for v in peers},
            dict(self.reveals),
        )

    def share(self) -> None:
        for u in IDS:
            reply = self.ask(u, self.share_request(u))
            if isinstance(reply, messages.SecAggShares):
                self.bundles[u] = reply.ciphertexts

    def mask(self) -> None:
        for u in IDS:
            cts = {v: self.bundles[v][u] for v in self.setup.graph[u] if v in self.bundles}
            request = messages.SecAggMaskRequest(
                self.setup.round, u, torch.zeros(DIM), cts, {"seed": u}
            )
            self.ask(u, request)

    def consistency(self, survivors: list[int], to: list[int]) -> dict[int, bytes]:
        signed = {}
        for u in to:
            request = messages.SecAggConsistencyRequest(self.setup.round, u, survivors)
            reply = self.ask(u, request)
            if isinstance(reply, messages.SecAggConsistencySignature):
                signed[u] = reply.signature
        return signed

    def unmask(self, u: int, alive: list[int], dropped: list[int], sigs: dict[int, bytes]):
        request = messages.SecAggUnmaskRequest(self.setup.round, u, alive, dropped, sigs)
        return self.ask(u, request)

    def through_mask(self) -> None:
        self.advertise()
        if self.setup.committed_graph:
            self.reveal()
        self.share()
        self.mask()


@pytest.mark.parametrize("mode", list(Mode))
def test_the_scripted_server_run_honestly_unmasks(mode: Mode) -> None:
    """The control for the attacks below: the same script, followed honestly, gets the shares."""
    server = Scripted(mode)
    server.through_mask()
    sigs = server.consistency(IDS, IDS)
    for u in IDS:
        server.unmask(u, IDS, [], sigs)
    assert server.refusals == {} and sorted(server.revealed) == IDS


# --- (a) different survivor sets -----------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_a_server_telling_two_groups_different_survivor_sets_gets_no_share(mode: Mode) -> None:
    """Client 7 is alive to group A and dropped to group B: A would reveal shares of its
    self-mask ``b_7`` and B shares of its mask key ``s_7``, which together unmask ``x_7``. Each
    group signs its own set; neither reaches the quorum of signatures over the set it was told,
    whether the server forwards its own group's signatures or everyone's."""
    server = Scripted(mode)
    server.through_mask()
    group_a, group_b = [0, 1, 2, 7], [3, 4, 5, 6]
    told_b = [u for u in IDS if u != 7]
    sigs_a = server.consistency(IDS, group_a)
    sigs_b = server.consistency(told_b, group_b)
    assert len(sigs_a) == 4 and len(sigs_b) == 4  # every client signed what it was told
    assert server.setup.quorum == 5
    for u in group_a:
        server.unmask(u, IDS, [], {**sigs_b, **sigs_a})
    for u in group_b:
        server.unmask(u, told_b, [7], {**sigs_a, **sigs_b})
    assert server.revealed == {}
    assert all("4 valid signatures over the survivor set" in server.refusals[u] for u in IDS)
    # four genuine signatures and one the server made up are not the quorum either
    again = Scripted(mode)
    again.through_mask()
    sigs = again.consistency(IDS, IDS)
    forged = {**sigs, 0: bytes(64)}
    for u in IDS:
        again.unmask(u, IDS, [], {v: forged[v] for v in [0, 1, 2, 3, 7]})
    assert again.revealed == {}


@pytest.mark.parametrize("mode", list(Mode))
def test_unmasking_for_a_set_other_than_the_one_signed_is_refused(mode: Mode) -> None:
    server = Scripted(mode)
    server.through_mask()
    sigs = server.consistency(IDS, IDS)
    others = [u for u in IDS if u != 7]
    server.unmask(0, others, [7], sigs)  # the quorum signed IDS, the request says 7 dropped
    assert server.revealed == {} and "signed the survivors" in server.refusals[0]
    small = Scripted(mode)
    small.through_mask()
    small.consistency([0, 1, 2, 3], [0])  # fewer survivors than the quorum
    assert "fewer than the quorum of 5" in small.refusals[0]
    stranger = Scripted(mode)
    stranger.through_mask()
    stranger.consistency([*IDS, 99], [0])
    assert "never checked" in stranger.refusals[0]


# --- (b) a substituted public key ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["c", "s"])
@pytest.mark.parametrize("mode", list(Mode))
def test_a_substituted_public_key_is_detected_before_any_share_leaves(mode: Mode, which) -> None:
    """The server swaps client 3's advertised key for one of its own (so that it could decrypt
    the bundles sent to 3, or strip 3's pair masks) and forwards 3's real signature."""
    server = Scripted(mode)
    server.advertise()
    own = secagg_server.secagg_crypto.key_pair(np.random.default_rng(9).bytes).public
    server.keys[3] = replace(server.keys[3], **{f"{which}_public": own})
    if server.setup.committed_graph:
        server.reveal()
        victims = [u for u in IDS if u != 3]
    else:
        server.share()
        victims = sorted(server.setup.graph[3])
    assert victims and all("invalid signature" in server.refusals[u] for u in victims)
    assert not set(server.bundles) & set(victims)  # no share bundle was made
    server.mask()
    sigs = server.consistency(IDS, IDS)
    for u in IDS:
        server.unmask(u, IDS, [], sigs)
    assert server.revealed == {}


def test_an_unregistered_or_unsigned_peer_is_refused() -> None:
    server = Scripted(Mode.SECAGG)
    server.advertise()
    server.keys[5] = replace(server.keys[5], signature=b"")
    server.share()
    assert "invalid signature" in server.refusals[0]
    assert 0 not in server.bundles


# --- (c) replayed messages -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_messages_replayed_from_an_old_round_are_refused(mode: Mode) -> None:
    """Round 5 runs honestly; in round 6 the server replays round 5's setup, its signed keys
    and its consistency signatures (over the same survivor set), and replays round 6's own
    setup with its nonce: each is refused, and no share of round 6 is revealed."""
    clients = _clients()
    old = Scripted(mode, round_=5, clients=clients)
    old.through_mask()
    old_sigs = old.consistency(IDS, IDS)
    for u in IDS:
        old.unmask(u, IDS, [], old_sigs)
    assert sorted(old.revealed) == IDS

    new = Scripted(mode, round_=6, clients=clients)
    new.advertise()
    assert new.refusals == {}
    # the old setup again, and round 6's setup with its nonce again
    assert new.ask(0, old.published.to_message(0)) is None
    assert "has begun round 6 already" in new.refusals[0]
    assert new.ask(1, new.published.to_message(1)) is None
    assert "nonce was used before" in new.refusals[1]
    # client 3's old signed keys in place of its new ones (the server knows the old
    # secrets it reconstructed in round 5 only if 3 dropped; any old key is refused)
    new.keys[3] = replace(old.keys[3], round=6)
    if new.setup.committed_graph:
        new.reveal()
    else:
        new.share()
    victims = [u for u in IDS if u != 3] if new.setup.committed_graph else new.setup.graph[3]
    assert all("invalid signature" in new.refusals[u] for u in victims)

    # a clean round 7 through the mask, then round 5's signatures over the same set
    fresh = Scripted(mode, round_=7, clients=clients)
    fresh.through_mask()
    for u in IDS:
        fresh.unmask(u, IDS, [], old_sigs)
    assert fresh.revealed == {}
    assert all("has no round 7" in fresh.refusals[u] for u in IDS)  # no consistency check yet
    fresh.refusals.clear()
    fresh.consistency(IDS, IDS)
    for u in IDS:
        fresh.unmask(u, IDS, [], old_sigs)
    assert fresh.revealed == {}
    assert all("0 valid signatures" in fresh.refusals[u] for u in IDS)
    # and the old unmask request itself, addressed to round 5
    assert old.unmask(0, IDS, [], old_sigs) is None and "has no round 5" in old.refusals[0]


# --- (d) the server chooses the graph ------------------------------------------------------------


def _plus_through_reveal() -> Scripted:
    server = Scripted(Mode.SECAGG_PLUS)
    server.advertise()
    server.reveal()
    assert server.refusals == {} and len(server.reveals) == N
    return server


def test_a_graph_of_the_servers_choosing_is_refused() -> None:
    """The server sends every client the neighbours of a graph from a seed it picked."""
    server = _plus_through_reveal()
    chosen = secagg_server.secagg_crypto.graph_seed(5, bytes(32), {})  # any seed not revealed
    graph = replace(server.setup, graph_seed=chosen).graph
    assert graph != server.setup.graph
    for u in IDS:
        server.ask(u, server.share_request(u, graph))
    moved = [u for u in IDS if graph[u] != server.setup.graph[u]]
    assert moved and all("not its neighbours in the graph" in server.refusals[u] for u in moved)
    assert not set(server.bundles) & set(moved)


def test_the_server_cannot_drop_or_alter_a_reveal_or_skip_the_commitments() -> None:
    """Grinding the seed: leave a client's own ``r`` out (it refuses), substitute one (its
    commitment does not open), or share before any ``r`` is revealed (refused)."""
    server = _plus_through_reveal()
    server.reveals = {v: r for v, r in server.reveals.items() if v != 2}
    server.ask(2, server.share_request(2))
    assert "own graph randomness is missing" in server.refusals[2]
    server.reveals[2] = bytes(32)
    server.ask(4, server.share_request(4))
    assert "does not match its signed commitment" in server.refusals[4]
    early = Scripted(Mode.SECAGG_PLUS)
    early.advertise()
    early.share()
    assert len(early.refusals) == N and early.bundles == {}
    assert "before the graph's randomness was revealed" in early.refusals[0]


def test_a_commitment_set_with_a_client_missing_or_forged_is_refused() -> None:
    server = Scripted(Mode.SECAGG_PLUS)
    server.advertise()
    sigs = {v: k.signature for v, k in server.keys.items()}
    advertised = server.advertised()
    without_me = {v: a for v, a in advertised.items() if v != 0}
    server.ask(0, messages.SecAggRevealRequest(5, 0, without_me, sigs))
    assert "own advertisement is missing" in server.refusals[0]
    forged = {**advertised, 1: advertised[1][:-32] + bytes(32)}  # 1's commitment replaced
    server.ask(2, messages.SecAggRevealRequest(5, 2, forged, sigs))
    assert "invalid signature" in server.refusals[2]
    few = {v: advertised[v] for v in (3, 4, 5)}
    server.ask(3, messages.SecAggRevealRequest(5, 3, few, sigs))
    assert "fewer than the 5" in server.refusals[3]


# --- what a node remembers of the sets it checked -------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode))
def test_a_majoritys_signatures_do_not_unmask_a_minority_told_another_set(mode: Mode) -> None:
    """Five clients are told that all eight survived and three that client 7 dropped. The five sign, reach the quorum and unmask (b-shares, 7's included); the three are
    then sent the same five signatures, over the other set: had a client reused what it learnt
    of those signatures for the five, it would count a quorum and reveal 7's mask-key share,
    which with 7's b-share unmasks ``x_7``."""
    server = Scripted(mode)
    server.through_mask()
    majority, minority = [0, 1, 2, 3, 7], [4, 5, 6]
    told = [u for u in IDS if u != 7]
    sigs = server.consistency(IDS, majority)
    server.consistency(told, minority)
    for u in majority:
        server.unmask(u, IDS, [], sigs)
    assert sorted(server.revealed) == majority  # the five unmasked, 7's b-share among theirs
    for u in minority:
        assert server.unmask(u, told, [7], sigs) is None
        assert "0 valid signatures" in server.refusals[u]
    assert not any(r.s_shares for r in server.revealed.values())


def test_each_client_derives_the_graph_from_the_reveals_it_was_sent() -> None:
    """The server sends client 0 every reveal and client 1 all but client 6's (both above the
    quorum): each derives its graph seed from its own set, whatever a node computed before."""
    server = _plus_through_reveal()
    every = dict(server.reveals)
    fewer = {v: r for v, r in every.items() if v != 6}
    crypto = secagg_server.secagg_crypto
    for u, reveals in ((0, every), (1, fewer)):
        seed = crypto.graph_seed(server.setup.round, server.setup.nonce, reveals)
        graph = replace(server.setup, graph_seed=seed).graph
        server.reveals = reveals
        reply = server.ask(u, server.share_request(u, graph))
        assert isinstance(reply, messages.SecAggShares), server.refusals
        assert set(reply.ciphertexts) == set(graph[u]) & set(server.keys)
        state = server.clients[u].states[u]
        assert state.setup.graph_seed == seed  # type: ignore[union-attr]
    assert crypto.graph_seed(5, server.setup.nonce, every) != crypto.graph_seed(
        5, server.setup.nonce, fewer
    )


def test_a_set_checked_once_is_refused_when_sent_with_a_bad_signature() -> None:
    """Client 0 checks the advertisements; client 2 is sent the same advertisements with client
    4's signature replaced: refused, as a client on its own device would refuse it."""
    server = Scripted(Mode.SECAGG_PLUS)
    server.advertise()
    sigs = {v: k.signature for v, k in server.keys.items()}
    advertised = server.advertised()
    assert isinstance(
        server.ask(0, messages.SecAggRevealRequest(5, 0, advertised, sigs)), (messages.SecAggReveal)
    )
    bad = {**sigs, 4: sigs[5]}
    assert server.ask(2, messages.SecAggRevealRequest(5, 2, advertised, bad)) is None
    assert "client 4 carry an invalid signature" in server.refusals[2]


def test_a_client_with_an_identity_refuses_a_semi_honest_round() -> None:
    server = Scripted(Mode.SECAGG)
    server.published = replace(server.published, nonce=b"")
    server.advertise()
    assert len(server.refusals) == N and "only in verified rounds" in server.refusals[0]


# --- malicious clients ---------------------------------------------------------------------------

BAD = 3
Tamper = Callable[[messages.SecAggMessage], messages.SecAggMessage]


def _bad_signature(m):
    if isinstance(m, messages.SecAggKeys):
        return replace(m, signature=bytes(64))
    return m


def _wrong_shape(m):
    if isinstance(m, messages.SecAggMaskedInput):
        return replace(m, masked=torch.cat([m.masked, m.masked[:1]]))
    return m


def _float_vector(m):
    if isinstance(m, messages.SecAggMaskedInput):
        return replace(m, masked=m.masked.to(torch.float32))
    return m


def _short_bundle(m):
    if isinstance(m, messages.SecAggShares):
        first = min(m.ciphertexts)
        return replace(m, ciphertexts={**m.ciphertexts, first: m.ciphertexts[first][:-5]})
    return m


def _forged_share(m):
    if isinstance(m, messages.SecAggUnmaskReply):
        owner = max(o for o in m.b_shares if o != BAD)
        fake = bytes(len(m.b_shares[owner]))
        return replace(m, b_shares={**m.b_shares, owner: fake})
    return m


def _bad_consistency(m):
    if isinstance(m, messages.SecAggConsistencySignature):
        return replace(m, signature=bytes(64))
    return m


CASES = {
    # tamper, the phase that names it, whether its input stays in the sum
    "bad-signature": (_bad_signature, "advertise: bad signature", False),
    "oversized-vector": (_wrong_shape, "mask: masked input of shape (32,)", False),
    "float-vector": (_float_vector, "mask: SecAggMaskedInput tensor 'masked' has dtype F32", False),
    "short-bundle": (_short_bundle, "share: share bundles not of", False),
    "forged-share": (_forged_share, "does not match the commitment of its owner", True),
    "bad-consistency-signature": (_bad_consistency, "consistency: bad signature", True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(Mode))
def test_a_malicious_client_is_excluded_and_named_and_the_sum_stays_exact(mode, case) -> None:
    tamper, named, stays = CASES[case]
    client = secagg_client.SecAggClient(_fit, identities=IDENTITIES)

    def handler(cid: int, payload: bytes) -> bytes:
        reply = client.handle(messages.decode(payload))
        return messages.encode(tamper(reply) if cid == BAD else reply)

    transport = InProcessTransport(handler, IDS)
    setup = _settings(mode).setup(5, IDS, graph_seed=SEED, dim=DIM, nonce=_nonce(5))

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(5, cid, torch.zeros(DIM), ciphertexts, {"seed": cid})

    result = secagg_server.secure_sum(transport, setup, mask_request, identities=REGISTRY)
    assert any(c == BAD and named in reason for c, reason in result.problems), result.problems
    summed = IDS if stays else [u for u in IDS if u != BAD]
    assert result.survivors == summed
    # the reference: the weighted sum of the raw updates (each well inside the clip)
    assert all(np.linalg.norm(UPDATES[u]) < 5.0 for u in IDS)
    reference = sum(WEIGHTS[u] * UPDATES[u].astype(np.float64) for u in summed)
    assert result.weight == sum(WEIGHTS[u] for u in summed)
    step = 1.0 / setup.fixed_point.scale  # stochastic rounding of x: one step, times the weight
    assert np.max(np.abs(result.total - reference)) <= result.weight * step
    # and bit-exact against the clients' own encodings
    exact = np.zeros(DIM + 1, dtype=np.int64)
    for u in summed:
        rng = np.random.default_rng([u, 0x5EC])
        encoded = secagg_quantize.encode(UPDATES[u], WEIGHTS[u], setup.fixed_point, rng)
        exact += secagg_quantize.from_ring(encoded, setup.bits)
    assert np.array_equal(result.total, exact[:-1] / setup.fixed_point.scale)


def test_too_many_forged_shares_abort_the_round_without_a_wrong_sum() -> None:
    """With every holder but the owner forging, no secret has t matching shares: abort."""
    client = secagg_client.SecAggClient(_fit, identities=IDENTITIES)

    def handler(cid: int, payload: bytes) -> bytes:
        reply = client.handle(messages.decode(payload))
        if isinstance(reply, messages.SecAggUnmaskReply):
            reply = replace(reply, b_shares={o: bytes(len(s)) for o, s in reply.b_shares.items()})
        return messages.encode(reply)

    setup = _settings(Mode.SECAGG).setup(5, IDS, graph_seed=SEED, dim=DIM, nonce=_nonce(5))

    def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
        return messages.SecAggMaskRequest(5, cid, torch.zeros(DIM), ciphertexts, {"seed": cid})

    with pytest.raises(SecAggAbortedError, match="shares of client 0 arrived"):
        secagg_server.secure_sum(
            InProcessTransport(handler, IDS), setup, mask_request, identities=REGISTRY
        )
