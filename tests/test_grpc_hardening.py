"""The deployed server against one bad client or unauthenticated peer: silent streams do not
starve the real clients, a reply larger than its task can need is refused from its header, a
second push for one task is refused at once, and a client's error text cannot forge log lines."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import torch
from test_grpc_harness import make_security, wait_for

from fedguard.protocol import messages
from fedguard.protocol.transport import Delivered, Failed
from fedguard.runtime import auth, grpc_chunks, grpc_client, grpc_launch, grpc_server
from fedguard.runtime.proto import wire_pb2, wire_pb2_grpc

PULL = "/fedguard.wire.v1.Federation/Pull"
PUSH = "/fedguard.wire.v1.Federation/Push"
DIM = 16


def _credentials(client_id: int, token: bytes) -> wire_pb2.Credentials:
    c = auth.fresh_credentials(client_id, token)
    return wire_pb2.Credentials(
        client_id=c.client_id, token=c.token, timestamp_ms=c.timestamp_ms, nonce=c.nonce
    )


def _answer(client_id: int, payload: bytes) -> bytes:
    task = messages.decode(payload)
    if isinstance(task, messages.EvaluateTask):
        return messages.encode(messages.EvaluateReply(task.round, client_id, 3, {"loss": 0.1}))
    update = torch.full_like(task.parameters, float(client_id))
    return messages.encode(messages.FitReply(task.round, client_id, update, num_examples=5))


class _Server:
    """An in-process server over TLS on loopback and threads running the real client loop."""

    def __init__(self, tmp_path, clients: int, **options) -> None:
        self.sec = make_security(tmp_path / "sec", range(clients))
        self.address = f"127.0.0.1:{grpc_launch.free_port()}"
        self.transport = grpc_server.GrpcServerTransport(
            list(range(clients)),
            self.address,
            authenticator=auth.Authenticator(self.sec.tokens()),
            tls=self.sec.server_tls(),
            poll_s=0.5,
            progress_s=1.0,
            **options,
        )
        self.transport.start()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.answered: dict[int, int] = {}

    def ca(self) -> bytes:
        return (self.sec.directory / "ca.pem").read_bytes()

    def channel(self) -> grpc.Channel:
        return grpc.secure_channel(
            self.address, grpc.ssl_channel_credentials(root_certificates=self.ca())
        )

    def start_client(self, cid: int, handler=_answer) -> None:
        settings = grpc_client.ClientSettings(
            self.address, cid, self.sec.token(cid), self.sec.client_tls(cid), give_up_after_s=30.0
        )

        def run() -> None:
            self.answered[cid] = grpc_client.serve(settings, handler, stop=self.stop)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def pull_task(self, cid: int) -> tuple[str, bytes]:
        """Pull client ``cid``'s open task with raw calls: its id and payload."""
        channel = self.channel()
        try:
            stub = wire_pb2_grpc.FederationStub(channel)
            for _ in range(40):
                chunks = list(
                    stub.Pull(
                        wire_pb2.PullRequest(credentials=_credentials(cid, self.sec.token(cid)))
                    )
                )
                if chunks and chunks[0].status == wire_pb2.PULL_STATUS_TASK:
                    return chunks[0].header.task_id, b"".join(c.data for c in chunks)
            raise AssertionError(f"client {cid}'s task never appeared")
        finally:
            channel.close()

    def close(self) -> None:
        self.stop.set()
        self.transport.finish(grace_s=1.0)
        for t in self.threads:
            t.join(10)


def _exchange_in_background(transport, requests, deadline_s) -> tuple[threading.Thread, list]:
    result: list = []
    t = threading.Thread(
        target=lambda: result.extend(transport.exchange(requests, deadline_s=deadline_s)),
        daemon=True,
    )
    t.start()
    return t, result


class _Attacker:
    """Keeps ``streams`` silent Push and Pull calls open on one connection: each sends its
    headers and then nothing; an ended one is reopened at once. Records how each ended."""

    def __init__(self, channel: grpc.Channel, streams: int) -> None:
        self.push = channel.stream_unary(PUSH, request_serializer=None, response_deserializer=None)
        self.pull = channel.stream_stream(PULL, request_serializer=None, response_deserializer=None)
        self.streams = streams
        self.quit = threading.Event()
        self.ended: Counter = Counter()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _silence(self) -> Iterator[bytes]:
        self.quit.wait()
        return
        yield b""  # a generator that sends nothing until the attack ends

    def _open_push(self) -> grpc.Future:
        self.opened += 1
        return self.push.future(self._silence())

    def _open_pull(self):
        self.opened += 1
        call = self.pull(self._silence())
        threading.Thread(target=self._drain, args=(call,), daemon=True).start()
        return call

    def _drain(self, call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    def _run(self) -> None:
        pushes = [self._open_push() for _ in range(self.streams)]
        pulls = [self._open_pull() for _ in range(self.streams)]
        while not self.quit.wait(0.05):
            for i, f in enumerate(pushes):
                if f.done():
                    self.ended[f.code()] += 1
                    pushes[i] = self._open_push()
            for i, c in enumerate(pulls):
                if not c.is_active():
                    self.ended[c.code()] += 1
                    pulls[i] = self._open_pull()
        for c in pulls:
            c.cancel()
        for f in pushes:
            f.cancel()


def test_real_clients_train_while_an_attacker_holds_silent_streams(tmp_path) -> None:
    server = _Server(tmp_path, 3, first_message_s=1.0)
    attacker_channel = server.channel()
    attacker = _Attacker(attacker_channel, streams=25)
    try:
        attacker.thread.start()
        # the attack is on: its first silent calls have been cancelled and reopened
        wait_for(lambda: attacker.ended[grpc.StatusCode.CANCELLED] > 0, 30, "a cancellation")
        for cid in range(3):
            server.start_client(cid)
        params = torch.arange(DIM, dtype=torch.float32)
        for round_ in (1, 2):
            tasks = {
                cid: messages.encode(messages.FitTask(round_, cid, params)) for cid in range(3)
            }
            outcomes = server.transport.exchange(tasks, deadline_s=20.0)
            assert all(isinstance(o, Delivered) for o in outcomes), outcomes
            for o in outcomes:
                reply = messages.decode(o.payload, messages.FitReply)
                assert torch.equal(reply.update, torch.full((DIM,), float(o.client_id)))
    finally:
        attacker.quit.set()
        attacker.thread.join(10)
        attacker_channel.close()
        server.close()
    assert server.answered == {0: 2, 1: 2, 2: 2}
    # the attacker's calls were refused at once or cancelled when their first message was late
    assert attacker.opened > 2 * attacker.streams
    assert attacker.ended[grpc.StatusCode.CANCELLED] > 0


def _push(
    channel: grpc.Channel,
    creds: wire_pb2.Credentials,
    task_id: str,
    payload: bytes,
    *,
    size: int | None = None,
    hold: threading.Event | None = None,
    sent: list[int] | None = None,
) -> grpc.Future:
    """A Push of ``payload`` (announced as ``size`` bytes) in 1 MiB chunks; with ``hold``, the
    stream pauses after its first chunk until ``hold`` is set."""
    announced = len(payload) if size is None else size
    header = wire_pb2.PayloadHeader(
        task_id=task_id, size=announced, sha256=hashlib.sha256(payload).digest()
    )
    pieces = [bytes(p) for p in grpc_chunks.pieces(payload)]
    sent = sent if sent is not None else []

    def stream() -> Iterator[wire_pb2.ReplyChunk]:
        sent.append(1)
        yield wire_pb2.ReplyChunk(credentials=creds, header=header, data=pieces[0])
        if hold is not None:
            hold.wait(20)
        for piece in pieces[1:]:
            sent.append(1)
            yield wire_pb2.ReplyChunk(data=piece)

    return wire_pb2_grpc.FederationStub(channel).Push.future(stream(), timeout=20)


def test_a_reply_larger_than_its_task_needs_is_refused_from_its_header(tmp_path) -> None:
    server = _Server(tmp_path, 1)
    try:
        task = messages.encode(messages.EvaluateTask(1, 0, torch.zeros(DIM)))
        limit = grpc_checks_limit(task)
        waiting, result = _exchange_in_background(server.transport, {0: task}, 3.0)
        task_id, _ = server.pull_task(0)
        big = bytes(8 << 20)  # 8 MiB: far above an evaluation reply, far below the 1 GiB cap
        sent: list[int] = []
        channel = server.channel()
        with pytest.raises(grpc.RpcError) as refused:
            _push(channel, _credentials(0, server.sec.token(0)), task_id, big, sent=sent).result()
        channel.close()
        waiting.join(10)
    finally:
        server.close()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    [failed] = result
    assert isinstance(failed, Failed)
    assert f"payload of {8 << 20} bytes exceeds the limit of {limit} bytes" in failed.reason
    assert limit < (2 << 20)


def grpc_checks_limit(task: bytes) -> int:
    from fedguard.runtime import grpc_checks

    return grpc_checks.describe_task(task).reply_limit


def test_a_second_concurrent_push_for_one_task_is_refused_at_once(tmp_path) -> None:
    server = _Server(tmp_path, 1)
    hold = threading.Event()
    try:
        task = messages.encode(messages.FitTask(1, 0, torch.zeros(DIM)))
        waiting, result = _exchange_in_background(server.transport, {0: task}, 15.0)
        task_id, _ = server.pull_task(0)
        good = _answer(0, task)
        token = server.sec.token(0)
        first_channel, second_channel = server.channel(), server.channel()
        first_sent: list[int] = []
        first = _push(
            first_channel, _credentials(0, token), task_id, good, hold=hold, sent=first_sent
        )
        # wait (at most 10 s) until the first push holds the task: its first chunk arrived
        for _ in range(200):
            with server.transport._cond:
                if getattr(server.transport._tasks[task_id], "pushing", None) is not None:
                    break
            threading.Event().wait(0.05)
        with pytest.raises(grpc.RpcError) as second:
            _push(second_channel, _credentials(0, token), task_id, good).result()
        hold.set()
        assert first.result().task_id == task_id
        waiting.join(10)
        first_channel.close()
        second_channel.close()
    finally:
        hold.set()
        server.close()
    assert second.value.code() is grpc.StatusCode.ABORTED
    [delivered] = result
    assert isinstance(delivered, Delivered) and delivered.payload == good


FORGED = "2025-01-01 INFO all clients healthy"


def test_a_client_error_with_a_newline_is_one_quoted_log_line(tmp_path, caplog) -> None:
    from conftest import tiny_config
    from fedguard.experiment import config
    from fedguard.experiment.assembly import Experiment

    exp = Experiment(
        config.validate(
            tiny_config(data={"num_clients": 2}, server={"clients_per_round": 2, "min_clients": 1})
        )
    )
    server = _Server(tmp_path, 2)

    def failing(cid: int, payload: bytes) -> bytes:
        raise ValueError(f"disk full\n{FORGED}\r\x1b[2K" + "x" * 1000)

    try:
        server.start_client(0, _answer)  # a zero update of the model's size
        server.start_client(1, failing)
        exp.driver.transport = server.transport
        exp.driver.deadline_s = 30.0
        params = exp.initial_params
        with caplog.at_level(logging.WARNING, logger="fedguard.round"):
            result = exp.driver.fit_round(1, params, exp.strategy.init(params))
    finally:
        server.close()
    reason = dict(result.problems)[1]
    assert "\n" not in reason and "\x1b" not in reason and "\r" not in reason
    assert "disk full\\n2025-01-01" in reason and "cut from" in reason
    assert len(reason) < 500
    lines = caplog.text.splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert sum("client 1 failed" in line for line in lines) == 1
    assert result.metrics["clients_completed"] == 1
