"""Two hundred malformed messages at a running server: each gets a specific gRPC status and a
log line, nothing reaches the round, and the server then serves the round normally."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Iterable

import grpc
import torch
from test_grpc_harness import Federation, make_security, wait_for, write_config

from fedguard.experiment import deployment as grpc_deploy
from fedguard.protocol import messages
from fedguard.runtime import auth
from fedguard.runtime.proto import wire_pb2

PULL = "/fedguard.wire.v1.Federation/Pull"
PUSH = "/fedguard.wire.v1.Federation/Push"
Code = grpc.StatusCode


def _creds(client_id: int, token: bytes, **changes) -> wire_pb2.Credentials:
    c = auth.fresh_credentials(client_id, token)
    fields = {"client_id": c.client_id, "token": c.token, "timestamp_ms": c.timestamp_ms}
    fields["nonce"] = c.nonce
    fields.update(changes)
    return wire_pb2.Credentials(**fields)


class Fuzzer:
    """Raw calls that bypass the client library, recording each status code."""

    def __init__(self, address: str, ca: bytes) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        self.channel = grpc.secure_channel(address, creds)
        self.pull_raw = self.channel.unary_stream(PULL, response_deserializer=None)
        self.push_raw = self.channel.stream_unary(PUSH, response_deserializer=None)
        self.codes: Counter = Counter()

    def pull(self, raw: bytes) -> tuple[Code, list[wire_pb2.TaskChunk]]:
        chunks = []
        try:
            for data in self.pull_raw(raw, timeout=10):
                chunks.append(wire_pb2.TaskChunk.FromString(data))
        except grpc.RpcError as exc:
            return self._count(exc.code()), chunks
        return self._count(Code.OK), chunks

    def push(self, raws: Iterable[bytes]) -> Code:
        try:
            self.push_raw(iter(list(raws)), timeout=10)
        except grpc.RpcError as exc:
            return self._count(exc.code())
        return self._count(Code.OK)

    def _count(self, code: Code) -> Code:
        self.codes[code] += 1
        return code


def _reply(task_id: str, token: bytes, payload: bytes, **header) -> list[bytes]:
    """The chunks of a reply with a (possibly lying) header."""
    fields = {"task_id": task_id, "size": len(payload), "sha256": hashlib.sha256(payload).digest()}
    fields.update(header)
    first = wire_pb2.ReplyChunk(
        credentials=_creds(1, token), header=wire_pb2.PayloadHeader(**fields), data=payload
    )
    return [first.SerializeToString()]


def test_two_hundred_malformed_messages_then_a_normal_round(tmp_path) -> None:
    config = write_config(
        tmp_path / "exp.toml",
        experiment={"rounds": 1},
        data={"num_clients": 2},
        server={"clients_per_round": 2, "min_clients": 2, "deadline_s": 60.0},
    )
    sec = make_security(tmp_path / "sec", range(2))
    fed = Federation(config, tmp_path / "run", sec)
    rng = random.Random(0)
    token = sec.token(1)
    try:
        fed.start_server()
        fed.start_client(0)
        log = fed.log
        wait_for(lambda: log.exists() and "serving 2" in log.read_text(), 60, "the server")
        fz = Fuzzer(fed.address, (sec.directory / "ca.pem").read_bytes())
        sent = 0
        for _ in range(40):  # random bytes as protobuf
            blob = os.urandom(rng.randint(1, 300))
            assert fz.pull(blob)[0] in (Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED)
            assert fz.push([blob]) in (Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED)
            sent += 2
        bad_credentials = [
            _creds(1, b"wrong"),
            _creds(5, token),  # not in this federation
            _creds(0, token),  # client 1's token claiming client 0
            _creds(1, token, timestamp_ms=1),  # far outside the window
            _creds(1, token, nonce=b"short"),
        ]
        for i in range(20):
            request = wire_pb2.PullRequest(credentials=bad_credentials[i % 5]).SerializeToString()
            code, chunks = fz.pull(request)
            assert (code, chunks) == (Code.UNAUTHENTICATED, [])
            sent += 1
        replayed = wire_pb2.PullRequest(credentials=_creds(1, token)).SerializeToString()
        code, chunks = fz.pull(replayed)  # first use: accepted (the task of client 1)
        assert code is Code.OK and chunks[0].status == wire_pb2.PULL_STATUS_TASK
        for _ in range(10):
            assert fz.pull(replayed) == (Code.UNAUTHENTICATED, [])
            sent += 1
        # The server holds no data: client 1's first task is to register. It is answered as the
        # real client 1 would answer it, and the next pull fetches the round's fit task.
        registering = messages.decode(b"".join(c.data for c in chunks))
        assert isinstance(registering, messages.RegisterTask)
        registered = grpc_deploy.demo_app(config, 1).handle(1, b"".join(c.data for c in chunks))
        assert fz.push(_reply(chunks[0].header.task_id, token, registered)) is Code.OK
        # the server makes the round's fit task once the registrations are in: until then a pull
        # is answered "idle" (seen on a loaded machine), so poll as a client does
        deadline = time.monotonic() + 30.0
        while True:
            fresh = wire_pb2.PullRequest(credentials=_creds(1, token)).SerializeToString()
            code, chunks = fz.pull(fresh)
            idle = code is Code.OK and chunks and chunks[0].status == wire_pb2.PULL_STATUS_IDLE
            if not idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert code is Code.OK and chunks[0].status == wire_pb2.PULL_STATUS_TASK
        task_id = chunks[0].header.task_id
        task = messages.decode(b"".join(c.data for c in chunks))
        assert isinstance(task, messages.FitTask)
        dim = task.parameters.shape[0]

        def fit_reply(**changes) -> bytes:
            fields = {"round": 1, "client_id": 1, "update": torch.zeros(dim), "num_examples": 5}
            fields.update(changes)
            return messages.encode(messages.FitReply(**fields))

        good = fit_reply()
        nan = torch.zeros(dim)
        nan[3] = float("nan")
        cases = [
            (lambda: _reply(task_id, token, good, sha256=bytes(32)), Code.DATA_LOSS),
            (lambda: _reply(task_id, token, good, size=1 << 40), Code.RESOURCE_EXHAUSTED),
            (lambda: _reply(task_id, token, good, size=len(good) - 1), Code.INVALID_ARGUMENT),
            (lambda: _reply(task_id, token, good, size=len(good) + 1), Code.INVALID_ARGUMENT),
            (lambda: _reply(task_id, token, os.urandom(64)), Code.INVALID_ARGUMENT),
            (lambda: _reply(task_id, token, fit_reply(update=nan)), Code.INVALID_ARGUMENT),
            (
                lambda: _reply(task_id, token, fit_reply(update=torch.zeros(dim + 1))),
                Code.INVALID_ARGUMENT,
            ),
            (
                lambda: _reply(
                    task_id, token, fit_reply(tensors={"x": torch.zeros(2, dtype=torch.float64)})
                ),
                Code.INVALID_ARGUMENT,
            ),
            (lambda: _reply(task_id, token, fit_reply(round=7)), Code.INVALID_ARGUMENT),
            (lambda: _reply(task_id, token, fit_reply(client_id=0)), Code.INVALID_ARGUMENT),
            (
                lambda: _reply(task_id, token, messages.encode(messages.EvaluateReply(1, 1, 5))),
                Code.INVALID_ARGUMENT,
            ),
            (lambda: _reply("not-a-task", token, good), Code.FAILED_PRECONDITION),
            (
                lambda: [
                    *_reply(task_id, token, good[:10], size=len(good), sha256=b"x" * 32),
                    _reply(task_id, token, good[10:])[0],
                ],
                Code.INVALID_ARGUMENT,
            ),
        ]
        while sent < 200:
            for make, expected in cases:  # fresh credentials each time: no replay
                assert fz.push(make()) is expected, expected
                sent += 1
        fz.channel.close()
        fed.start_client(1)  # the real client 1 fetches the still-open task and answers it
        assert fed.wait_server(60) == 0
        assert set(fed.wait_clients(15).values()) == {0}
    finally:
        fed.stop()
    [row] = fed.rows()
    assert row["clients_completed"] == 2 and row["clients_rejected"] == 0
    assert sent >= 200 and fz.codes[Code.OK] == 3  # the two pulls and the registration
    assert log.read_text().count("refused") >= 200
