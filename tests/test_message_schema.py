"""The message schema at the door: every field of every reply, replaced by a value of the wrong
type or range, is refused by ``decode`` or rejected by the driver; nothing raises past the
driver, and a run with such a client completes its rounds."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import fedguard
from conftest import tiny_config
from fedguard.client.app import ClientApp, local_training_from
from fedguard.protocol import messages, secagg, secagg_client, secagg_server
from fedguard.protocol.secagg import Mode
from fedguard.simulation.inprocess import InProcessTransport

BAD = {
    "string": "x",
    "nan": math.nan,
    "inf": math.inf,
    "negative": -1,
    "huge": 10**30,
    "list": [1, 2],
    "none": None,
}
METRIC_OK = {"nan", "inf", "negative", "huge"}  # numbers: a metric may hold them


def _mutate(payload: bytes, target: str, value: object) -> bytes:
    """``payload`` with ``target`` replaced by ``value`` in its JSON header: a scalar field
    (``"num_examples"``), a metric (``"metrics.loss"``), or a tensor, byte field or byte map
    (removed from the tensors, with a byte map's index, and put among the fields instead)."""
    table = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    head = json.loads(table["__metadata__"]["message"])
    tensors = dict(st_load(payload))
    section, dot, name = target.partition(".")
    if dot and section == "metrics":
        head["fields"]["metrics"][name] = value
    else:
        for key in (target, f"bytes.{target}", f"map.{target}", f"map_ids.{target}"):
            tensors.pop(key, None)
        tensors.pop(f"map_lengths.{target}", None)
        head["fields"][target] = value
    return st_save(tensors, metadata={"message": json.dumps(head)})


def _targets(message: messages.Message) -> list[str]:
    out = []
    for f in fields(message):
        out.append(f.name)
        if f.name == "metrics":
            out += [f"metrics.{k}" for k in message.metrics]
    return out


def _cases(message: messages.Message) -> list[tuple[str, str, bytes]]:
    payload = messages.encode(message)
    return [
        (target, label, _mutate(payload, target, value))
        for target in _targets(message)
        for label, value in BAD.items()
    ]


FIT = messages.FitReply(1, 1, torch.zeros(5), 7, {"train_loss": 0.5})
EVALUATE = messages.EvaluateReply(1, 1, 7, {"loss": 0.5, "accuracy": 0.9})
SECAGG = [
    messages.SecAggKeys(1, 1, bytes(32), bytes(32), bytes(64)),
    messages.SecAggShares(1, 1, {0: b"abc", 2: b"defg"}),
    messages.SecAggMaskedInput(1, 1, torch.arange(6, dtype=torch.int64)),
    messages.SecAggUnmaskReply(1, 1, {0: b"ab"}, {2: b"cd"}),
]


@pytest.mark.parametrize("message", [FIT, EVALUATE, *SECAGG], ids=lambda m: type(m).__name__)
def test_decode_refuses_every_field_of_the_wrong_type_or_range(message) -> None:
    cases = _cases(message)
    assert len(cases) >= 3 * len(BAD)
    for target, label, payload in cases:
        if target.startswith("metrics.") and label in METRIC_OK:
            back = messages.decode(payload, type(message))  # a number: the driver judges it
            assert isinstance(back.metrics[target.removeprefix("metrics.")], float)
            continue
        with pytest.raises(messages.MessageError):
            messages.decode(payload, type(message))
    assert type(messages.decode(messages.encode(message), type(message))) is type(message)


def _with_tensor(payload: bytes, name: str, value: np.ndarray | None) -> bytes:
    """``payload`` with its tensor ``name`` replaced by ``value`` (None: removed)."""
    table = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    tensors = dict(st_load(payload))
    if value is None:
        tensors.pop(name)
    else:
        tensors[name] = value
    return st_save(tensors, metadata=table["__metadata__"])


def test_byte_map_indexes_are_checked() -> None:
    """A byte map's ids must be distinct valid client ids in increasing order and its lengths
    add up to its data; a map without its index, or with one of another dtype or size, is
    refused; the valid one decodes to the map that was sent."""
    shares = messages.SecAggShares(3, 5, {9: b"abc", 2: b"defg", 40: b""})
    good = messages.encode(shares)
    assert messages.decode(good, messages.SecAggShares).ciphertexts == {
        2: b"defg",
        9: b"abc",
        40: b"",
    }
    i64 = np.int64
    cases = {
        "repeats a client id": ("map_ids.ciphertexts", np.array([2, 2, 40], i64)),
        "out of order": ("map_ids.ciphertexts", np.array([9, 2, 40], i64)),
        "client id outside": ("map_ids.ciphertexts", np.array([-3, 2, 40], i64)),
        "outside \\[0, 2147483647\\]": ("map_ids.ciphertexts", np.array([2, 9, 2**40], i64)),
        "lengths do not add up": ("map_lengths.ciphertexts", np.array([4, 3, 1], i64)),
        "length outside": ("map_lengths.ciphertexts", np.array([9, -2, 0], i64)),
        "dtype": ("map_ids.ciphertexts", np.array([2, 9, 40], np.float64)),
        "2 ids and 3 lengths": ("map_ids.ciphertexts", np.array([2, 9], i64)),
        "lacks its 'map_lengths.ciphertexts'": ("map_lengths.ciphertexts", None),
        "unexpected tensor 'map_ids.public_keys'": ("map_ids.public_keys", np.zeros(1, i64)),
    }
    for reason, (name, value) in cases.items():
        with pytest.raises(messages.MessageError, match=reason):
            messages.decode(_with_tensor(good, name, value), messages.SecAggShares)
    # lengths that wrap around int64 to the data's size are refused, not sliced
    wrap = np.array([2**62, 2**62, 2**63 - 2**62 - 2**62 + 7], dtype=np.uint64).astype(i64)
    with pytest.raises(messages.MessageError, match="length outside"):
        messages.decode(_with_tensor(good, "map_lengths.ciphertexts", wrap), messages.SecAggShares)


def test_client_id_lists_are_checked() -> None:
    """The alive, dropped, survivor and sampled lists travel as int64 vectors: ids out of range,
    repeated or of another dtype or rank are refused; valid ones keep their order."""
    good = messages.encode(messages.SecAggUnmaskRequest(4, 2, [9, 2, 40], [7], {}))
    back = messages.decode(good, messages.SecAggUnmaskRequest)
    assert back.alive == [9, 2, 40] and back.dropped == [7] and back.signatures == {}
    i64 = np.int64
    cases = {
        "client ids must be distinct": ("ids.alive", np.array([9, 2, 9], i64)),
        "client id outside": ("ids.dropped", np.array([-1], i64)),
        "outside \\[0, 2147483647\\]": ("ids.alive", np.array([2**31], i64)),
        "dtype F64": ("ids.alive", np.array([9.0, 2.0], np.float64)),
        "expected 1-D": ("ids.alive", np.array([[9, 2]], i64)),
        "lacks its 'ids.dropped'": ("ids.dropped", None),
    }
    for reason, (name, value) in cases.items():
        with pytest.raises(messages.MessageError, match=reason):
            messages.decode(_with_tensor(good, name, value), messages.SecAggUnmaskRequest)
    survivors = messages.encode(messages.SecAggConsistencyRequest(4, 2, [5, 3]))
    assert messages.decode(survivors, messages.SecAggConsistencyRequest).survivors == [5, 3]
    with pytest.raises(messages.MessageError, match="must be distinct"):
        messages.decode(
            _with_tensor(survivors, "ids.survivors", np.array([3, 3], i64)),
            messages.SecAggConsistencyRequest,
        )


def test_packed_byte_maps_read_as_dicts_and_digest_their_contents() -> None:
    """A decoded byte map reads like the dict that was sent (items, lookups, membership,
    equality); its digest is the same for equal contents however built, and differs when
    one byte moves from one entry to the next (the lengths are in it) or an id changes."""
    sent = {7: b"\x00xy", 3: b"", 11: b"pq\x00"}
    packed = messages.decode(
        messages.encode(messages.SecAggShares(2, 4, sent)), messages.SecAggShares
    ).ciphertexts
    assert isinstance(packed, messages.PackedByteMap)
    assert packed == sent and dict(packed) == sent and list(packed) == [3, 7, 11]
    assert packed[11] == b"pq\x00" and packed.get(5) is None and 7 in packed and 8 not in packed
    assert len(packed) == 3 and packed.ids.tolist() == [3, 7, 11]
    with pytest.raises(KeyError):
        packed[4]
    again = messages.PackedByteMap.pack(dict(reversed(list(sent.items()))))
    assert messages.map_digest(sent) == packed.digest() == again.digest()
    assert messages.PackedByteMap.pack(packed) is packed
    moved = {7: b"\x00x", 3: b"", 11: b"ypq\x00"}  # the same bytes in id order
    assert b"".join(moved[i] for i in sorted(moved)) == b"".join(sent[i] for i in sorted(sent))
    assert messages.map_digest(moved) != packed.digest()
    assert messages.map_digest({**sent, 12: sent.pop(11)}) != packed.digest()
    # a packed map written again is the same payload as the dict it came from
    assert messages.encode(messages.SecAggShares(2, 4, packed)) == messages.encode(
        messages.SecAggShares(2, 4, dict(packed))
    )


def test_schema_refuses_bool_counts_floats_for_ints_and_unknown_fields() -> None:
    good = messages.encode(FIT)
    for target, value in [("num_examples", True), ("num_examples", 7.0), ("round", "1")]:
        with pytest.raises(messages.MessageError, match=target):
            messages.decode(_mutate(good, target, value), messages.FitReply)
    with pytest.raises(messages.MessageError, match="surprise: Extra inputs"):
        messages.decode(_mutate(good, "surprise", 1), messages.FitReply)
    with pytest.raises(messages.MessageError, match="dtype"):
        messages.decode(
            messages.encode(messages.SecAggMaskedInput(1, 1, torch.zeros(3))),
            messages.SecAggMaskedInput,
        )
    # a reason quoting what a peer sent stays on one line
    with pytest.raises(messages.MessageError) as exc:
        messages.decode(_mutate(good, "metrics.a\nforged line", "x"), messages.FitReply)
    assert "\n" not in str(exc.value) and "\\n" in str(exc.value)


def _with_format(payload: bytes, wire_format: object) -> bytes:
    """``payload`` with its header's wire format set to ``wire_format`` (``...``: removed)."""
    table = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    head = json.loads(table["__metadata__"]["message"])
    if wire_format is ...:
        del head["format"]
    else:
        head["format"] = wire_format
    return st_save(dict(st_load(payload)), metadata={"message": json.dumps(head)})


def test_a_payload_of_another_wire_format_is_refused_with_both_formats_named() -> None:
    good = messages.encode(FIT)
    assert messages.read_header(good).format == messages.WIRE_FORMAT == 2
    assert messages.decode(_with_format(good, 2), messages.FitReply).num_examples == 7
    # a header without a format is the first layout (JSON id lists), written before versioning
    for wire_format, shown in [(..., "1"), (1, "1"), (3, "3")]:
        with pytest.raises(
            messages.MessageError, match=f"wire format {shown}; this fedguard reads format 2"
        ):
            messages.decode(_with_format(good, wire_format), messages.FitReply)
    for junk in ["2", True, 2.0, None]:
        with pytest.raises(
            messages.MessageError, match="Malformed message payload: the wire format"
        ):
            messages.decode(_with_format(good, junk), messages.FitReply)


def test_config_numbers_are_read_by_type_not_coerced() -> None:
    config: dict[str, messages.Scalar] = {
        "lr": 0.5,
        "epochs": 3,
        "text": "0.5",
        "flag": True,
        "none": None,
        "half": 2.5,
    }
    assert messages.config_float(config, "lr") == 0.5
    assert messages.config_float(config, "epochs") == 3.0  # an integer is a number
    assert messages.config_int(config, "epochs") == 3
    assert messages.config_float(config, "absent", 0.1) == 0.1
    assert messages.config_int(config, "absent", 7) == 7
    for key in ("text", "flag", "none"):
        with pytest.raises(messages.MessageError, match=f"'{key}' must be a number"):
            messages.config_float(config, key)
    for key in ("half", "flag", "text", "none"):
        with pytest.raises(messages.MessageError, match=f"'{key}' must be an integer"):
            messages.config_int(config, key)
    for read in (messages.config_float, messages.config_int):
        with pytest.raises(messages.MessageError, match="lacks 'absent'"):
            read(config, "absent")
    # a fit task whose training settings are of the wrong type is refused, not coerced
    with pytest.raises(messages.MessageError, match="'lr' must be a number"):
        local_training_from({"lr": "0.1"})
    with pytest.raises(messages.MessageError, match="'epochs' must be an integer"):
        local_training_from({"epochs": 1.5})
    assert local_training_from({"lr": 1, "max_steps": None}).lr == 1.0


def _experiment_cases(honest: bytes) -> list[tuple[str, str, bytes]]:
    reply = messages.decode(honest)
    return [(t, label, p) for t, label, p in _cases(reply)]


def test_the_driver_rejects_every_fuzzed_fit_and_evaluate_reply_and_the_round_goes_on(
    caplog,
) -> None:
    from fedguard.experiment import config
    from fedguard.experiment.assembly import Experiment

    exp = Experiment(
        config.validate(tiny_config(server={"clients_per_round": 6, "min_clients": 3}))
    )
    params = exp.initial_params
    state = exp.strategy.init(params)
    recorded: dict[tuple[str, int], bytes] = {}
    honest = exp.app.handle

    def record(cid: int, payload: bytes) -> bytes:
        reply = honest(cid, payload)
        recorded[(messages.kind_of(payload), cid)] = reply
        return reply

    exp.driver.transport = InProcessTransport(record, exp.transport.client_ids)
    exp.driver.fit_round(1, params, state)
    exp.driver.evaluate_round(1, params)
    cases = {
        "FitTask": _experiment_cases(recorded[("FitTask", 1)]),
        "EvaluateTask": _experiment_cases(recorded[("EvaluateTask", 1)]),
    }
    bad: list[bytes] = []

    def replay(cid: int, payload: bytes) -> bytes:
        return bad[0] if cid == 1 else recorded[(messages.kind_of(payload), cid)]

    exp.driver.transport = InProcessTransport(replay, exp.transport.client_ids)
    rounds = 0
    with caplog.at_level(logging.WARNING, logger="fedguard.round"):
        for target, label, payload in cases["FitTask"]:
            bad[:] = [payload]
            result = exp.driver.fit_round(1, params, state)
            problems = dict(result.problems)
            if not (target.startswith("metrics.") and label in METRIC_OK):
                assert 1 in problems, (target, label)
            assert result.metrics["clients_completed"] >= 5
            assert torch.isfinite(result.params).all()
            rounds += 1
        for target, label, payload in cases["EvaluateTask"]:
            bad[:] = [payload]
            fed = exp.driver.evaluate_round(1, params)
            assert fed is not None and math.isfinite(fed.loss), (target, label)
            assert math.isfinite(fed.accuracy), (target, label)
            rounds += 1
    assert rounds == len(cases["FitTask"]) + len(cases["EvaluateTask"]) >= 60
    assert "client 1 rejected" in caplog.text


N, DIM = 5, 40


def test_every_fuzzed_secure_aggregation_reply_drops_only_its_sender() -> None:
    updates = {c: np.random.default_rng(c).normal(0, 0.1, DIM).astype(np.float32) for c in range(N)}

    def fit(task: messages.FitTask) -> messages.FitReply:
        cid = task.client_id
        return messages.FitReply(task.round, cid, torch.from_numpy(updates[cid]), 10 + cid)

    settings = secagg.Settings(Mode.SECAGG, clip_norm=3.0, max_weight=60, bits=32)
    samples = {
        messages.SecAggKeys: messages.SecAggKeys(1, 1, bytes(32), bytes(32), b""),
        messages.SecAggShares: messages.SecAggShares(1, 1, {0: b"ab", 2: b"cd"}),
        messages.SecAggMaskedInput: messages.SecAggMaskedInput(
            1, 1, torch.zeros(DIM + 1, dtype=torch.int32)
        ),
        messages.SecAggUnmaskReply: messages.SecAggUnmaskReply(1, 1, {0: b"ab"}, {}),
    }
    runs = 0
    for kind, sample in samples.items():
        for target, label, _ in _cases(sample):
            client = secagg_client.SecAggClient(fit)

            def handler(
                cid: int, payload: bytes, client=client, kind=kind, target=target, label=label
            ) -> bytes:
                reply = messages.encode(client.handle(messages.decode(payload)))
                if cid == 1 and messages.kind_of(reply) == kind.__name__:
                    return _mutate(reply, target, BAD[label])
                return reply

            setup = settings.setup(1, list(range(N)), graph_seed=5, dim=DIM)

            def mask_request(cid: int, ciphertexts: messages.ByteMap) -> messages.SecAggMaskRequest:
                return messages.SecAggMaskRequest(1, cid, torch.zeros(DIM), ciphertexts, {})

            transport = InProcessTransport(handler, list(range(N)))
            result = secagg_server.secure_sum(transport, setup, mask_request)
            if kind is messages.SecAggUnmaskReply:
                assert result.survivors == list(range(N))  # its shares are not needed
            else:
                assert result.survivors == [0, 2, 3, 4], (kind.__name__, target, label)
            assert any(c == 1 for c, _ in result.problems), (kind.__name__, target, label)
            runs += 1
    assert runs >= 4 * 3 * len(BAD)


def _sabotaged_handle(monkeypatch, mutate) -> None:
    honest = ClientApp.handle

    def handle(self, client_id: int, payload: bytes) -> bytes:
        reply = honest(self, client_id, payload)
        return mutate(reply) if client_id == 1 else reply

    monkeypatch.setattr(ClientApp, "handle", handle)


def test_a_run_with_a_client_sending_a_string_count_completes(tmp_path, monkeypatch) -> None:
    def string_count(reply: bytes) -> bytes:
        if messages.kind_of(reply) in ("FitReply", "EvaluateReply"):
            return _mutate(reply, "num_examples", "many")
        return reply

    _sabotaged_handle(monkeypatch, string_count)
    cfg = tiny_config(
        experiment={"rounds": 2}, evaluation={"mode": "both"}, server={"min_clients": 2}
    )
    summary = fedguard.run(cfg, out=tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sampled_1 = [r for r in rows if r["clients_rejected"]]
    assert sampled_1 and all(r["clients_rejected"] == 1 for r in sampled_1)


def test_a_negative_secure_aggregation_weight_aborts_its_round_and_the_run_goes_on(
    tmp_path, monkeypatch
) -> None:
    def negative_weight(reply: bytes) -> bytes:
        if messages.kind_of(reply) != "SecAggMaskedInput":
            return reply
        m = messages.decode(reply, messages.SecAggMaskedInput)
        if m.round != 1:  # round 1 only: a run whose every round aborts is a failed run
            return reply
        ring = m.masked.numpy().copy()
        unsigned = ring.view(np.uint32 if ring.dtype == np.int32 else np.uint64)
        unsigned[-1:] -= np.array([10**6], dtype=unsigned.dtype)  # the weight, minus a million
        out = messages.SecAggMaskedInput(m.round, m.client_id, torch.from_numpy(ring))
        return messages.encode(out)

    _sabotaged_handle(monkeypatch, negative_weight)
    sa = {"enabled": True, "mode": "secagg", "clip_norm": 10.0}
    cfg = tiny_config(experiment={"rounds": 2}, secure_aggregation=sa)
    summary = fedguard.run(cfg, out=tmp_path / "run", progress=False)
    assert summary["status"] == "completed"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "aggregated weight" in rows[0]["secure_aggregation_aborted"]
    assert not rows[1].get("secure_aggregation_aborted")
