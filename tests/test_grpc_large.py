"""Models of any size: a 200 MB model (50M float32 parameters) goes to a client and its 200 MB
update comes back through the real server and client over TLS, in 1 MiB chunks; a reply
announced above the server's limit is refused with RESOURCE_EXHAUSTED from its header, before
its data is buffered."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator

import grpc
import torch
from test_grpc_harness import make_security

from fedguard.protocol import messages
from fedguard.protocol.transport import Delivered, Failed, FailureKind
from fedguard.runtime import auth, grpc_chunks, grpc_client, grpc_launch, grpc_server
from fedguard.runtime.proto import wire_pb2, wire_pb2_grpc

PARAMETERS = 50_000_000  # 200 MB of float32, the model size
LIMIT_BYTES = 256 << 20  # the server's configured reply limit in this test
DEADLINE_S = 120.0  # a generous deadline; benchmarks/grpc_large.py times the round trip


def _answer(client_id: int, payload: bytes) -> bytes:
    """A client that returns ``-parameters`` as its update: checkable element by element."""
    task = messages.decode(payload, messages.FitTask)
    update = torch.neg(task.parameters)
    return messages.encode(messages.FitReply(task.round, client_id, update, num_examples=1))


def _credentials(client_id: int, token: bytes) -> wire_pb2.Credentials:
    c = auth.fresh_credentials(client_id, token)
    return wire_pb2.Credentials(
        client_id=c.client_id, token=c.token, timestamp_ms=c.timestamp_ms, nonce=c.nonce
    )


def test_a_200_mb_model_round_trips_and_an_oversized_reply_is_refused_early(
    tmp_path, caplog, monkeypatch
) -> None:
    # Every chunk that reaches an assembler (the client's for the task, the server's for the
    # reply), by assembler: what was received, in what pieces.
    chunks: dict[int, tuple[int, list[int]]] = {}
    real_add = grpc_chunks.Assembler.add

    def counting_add(self: grpc_chunks.Assembler, data: bytes) -> None:
        chunks.setdefault(id(self), (self.header.size, []))[1].append(len(data))
        real_add(self, data)

    monkeypatch.setattr(grpc_chunks.Assembler, "add", counting_add)
    sec = make_security(tmp_path / "sec", range(2))
    address = f"127.0.0.1:{grpc_launch.free_port()}"
    transport = grpc_server.GrpcServerTransport(
        [0, 1],
        address,
        authenticator=auth.Authenticator(sec.tokens()),
        tls=sec.server_tls(),
        poll_s=1.0,
        max_payload_bytes=LIMIT_BYTES,
        progress_s=1.0,
    )
    transport.start()
    settings = grpc_client.ClientSettings(
        address, 0, sec.token(0), sec.client_tls(0), give_up_after_s=30.0
    )
    stop = threading.Event()
    answered: list[int] = []
    client = threading.Thread(
        target=lambda: answered.append(grpc_client.serve(settings, _answer, stop=stop)),
        daemon=True,
    )
    client.start()
    try:
        params = torch.linspace(-1.0, 1.0, PARAMETERS)
        task = messages.encode(messages.FitTask(1, 0, params))
        assert len(task) > 200_000_000
        [outcome] = transport.exchange({0: task}, deadline_s=DEADLINE_S)
        assert isinstance(outcome, Delivered), outcome
        reply = messages.decode(outcome.payload, messages.FitReply)
        assert reply.update.shape == (PARAMETERS,) and torch.equal(reply.update, -params)
        # Each direction streamed its whole payload once, in full 1 MiB chunks and one tail:
        # the task into the client's assembler, then the reply into the server's.
        (task_size, down), (reply_size, up) = chunks.values()
        for size, pieces, payload in ((task_size, down, task), (reply_size, up, outcome.payload)):
            assert size == len(payload) and sum(pieces) == size
            assert len(pieces) == math.ceil(size / grpc_chunks.CHUNK_BYTES) > 190
            assert set(pieces[:-1]) == {grpc_chunks.CHUNK_BYTES}
        del params, task, reply, outcome

        # A reply announced at 300 MiB against the 256 MiB limit, to client 1's open task.
        caplog.set_level(logging.INFO, logger="fedguard.grpc")
        small = messages.encode(messages.FitTask(1, 1, torch.zeros(10)))
        result: list = []
        waiting = threading.Thread(
            target=lambda: result.extend(transport.exchange({1: small}, deadline_s=2.5)),
            daemon=True,
        )
        waiting.start()
        code, sent = _oversized_push(address, (sec.directory / "ca.pem").read_bytes(), sec)
        waiting.join(15)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # gRPC flow control stops the sender soon after the refusal: far from all 300 chunks.
        assert sent < 64, f"the client sent {sent} of 300 MiB before the refusal"
        [failed] = result
        assert isinstance(failed, Failed) and failed.kind is FailureKind.ERROR
        # the limit is the task's own (a 10-parameter fit reply), below the server's LIMIT_BYTES
        assert f"payload of {300 << 20} bytes exceeds the limit of" in failed.reason
        # While it waited, the round said who had replied: the task fetched, no reply yet.
        progress = "round 1, FitTask: 0 of 1 clients replied, 1 fetched their task"
        assert progress in caplog.text
        assert "exceeds the limit" in caplog.text  # the refusal is logged with its reason
        transport.finish(grace_s=0.5)  # client 1 (the raw calls above) will not pull again
        client.join(15)
        assert answered == [1]
    finally:
        stop.set()
        transport.close()
        client.join(5)


def _oversized_push(address: str, ca: bytes, sec) -> tuple[grpc.StatusCode, int]:
    """Pull client 1's task, then push a reply whose header announces 300 MiB: the status and
    how many 1 MiB chunks the sender produced before the call ended."""
    token = sec.token(1)
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    stub = wire_pb2_grpc.FederationStub(channel)
    try:
        deadline = time.monotonic() + 10
        task_id = ""
        while not task_id and time.monotonic() < deadline:
            chunks = list(stub.Pull(wire_pb2.PullRequest(credentials=_credentials(1, token))))
            if chunks and chunks[0].status == wire_pb2.PULL_STATUS_TASK:
                task_id = chunks[0].header.task_id
        assert task_id, "client 1's task never appeared"
        size = 300 << 20
        piece = bytes(grpc_chunks.CHUNK_BYTES)
        sent = [0]

        def stream() -> Iterator[wire_pb2.ReplyChunk]:
            header = wire_pb2.PayloadHeader(
                task_id=task_id, size=size, sha256=hashlib.sha256(b"never checked").digest()
            )
            sent[0] += 1
            yield wire_pb2.ReplyChunk(credentials=_credentials(1, token), header=header, data=piece)
            for _ in range(size // len(piece) - 1):
                sent[0] += 1
                yield wire_pb2.ReplyChunk(data=piece)

        try:
            stub.Push(stream(), timeout=20)
        except grpc.RpcError as exc:
            return exc.code(), sent[0]
        return grpc.StatusCode.OK, sent[0]
    finally:
        channel.close()
