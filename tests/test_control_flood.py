"""Control endpoints under a flood (issue #21), with real sockets on loopback.

A client that sends requests and never reads the answers used to fill the server's send pipe until a
blocking send stalled the serving loop, silencing the endpoint for every client until the process exited.
Now each client has a bounded queue of answers of its own: answers to the flooder are dropped (counted,
logged once per client), the flooder is muted after a while, and a well-behaved client keeps getting its
answers within a short time *during* the flood. Both endpoints: the scan's ``ControlServer``
(``scope_stream.acquire.control``) and the broker's control socket.

Also: deep nesting and huge integers are ``malformed`` on the scan's control endpoint (they came back as
``failed``: the endpoint parsed with plain ``json.loads``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import zmq

from scope_stream.acquire.control import ControlServer, ReimageClient, ReimageRequest, ReimageResult
from scope_stream.config import PipelineConfig
from scope_stream.transport.broker import Broker
from scope_stream.transport.pipeline import ControlClient, PipelineError

pytestmark = pytest.mark.timeout(90)

FLOOD = 20_000  # requests the flooder sends (bounded)
FLOOD_S = 10.0  # and for at most this long
ANSWER_S = 2.0  # a well-behaved client's request must be answered within this, during the flood


class _Handler:
    """A scan stand-in whose ``status`` answer is large (4 KB): a flood of them fills any buffer quickly."""

    def submit_reimage(self, request: ReimageRequest) -> Future[ReimageResult]:
        fut: Future[ReimageResult] = Future()
        fut.set_exception(RuntimeError("not in this test"))
        return fut

    def control_status(self) -> dict[str, Any]:
        return {"state": "scanning", "queued": 0, "pad": "x" * 4000}


class _Flooder:
    """A DEALER that sends ``n`` requests as fast as it can and never reads; keeps its socket open until closed."""

    def __init__(self, endpoint: str, frame: bytes, n: int = FLOOD, limit_s: float = FLOOD_S) -> None:
        self.endpoint, self.frame, self.n, self.limit_s = endpoint, frame, n, limit_s
        self.sent = 0
        self.done = threading.Event()
        self._close = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flooder", daemon=True)

    def __enter__(self) -> _Flooder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close.set()
        self.thread.join(10)

    def _run(self) -> None:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"flooder")
        s.setsockopt(zmq.RCVHWM, 1)  # and reads nothing: the answers back up towards the server
        s.setsockopt(zmq.RCVBUF, 4096)
        s.connect(self.endpoint)
        deadline = time.monotonic() + self.limit_s
        try:
            while self.sent < self.n and time.monotonic() < deadline:
                try:
                    s.send(self.frame, zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    s.poll(10, zmq.POLLOUT)
            self.done.set()
            self._close.wait(30)  # open but not reading: the server's queue to it stays full
        finally:
            self.done.set()
            s.close(0)
            ctx.term()


def _well_behaved_during(flood: _Flooder, ask: Callable[[], bool], after_s: float = 1.0) -> list[float]:
    """Ask (each answer within ANSWER_S) from when the flood is under way until ``after_s`` after it was sent."""
    deadline = time.monotonic() + 30
    while flood.sent < 2000 and not flood.done.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    latencies: list[float] = []
    stop_at: float | None = None
    while stop_at is None or time.monotonic() < stop_at:
        assert time.monotonic() < deadline, "the flood did not end in time"
        t0 = time.monotonic()
        assert ask(), f"no answer within {ANSWER_S} s during the flood (after {len(latencies)} answers)"
        latencies.append(time.monotonic() - t0)
        if stop_at is None and flood.done.is_set():
            stop_at = time.monotonic() + after_s
        time.sleep(0.01)
    return latencies


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def gate_log() -> Iterator[_Lines]:
    h = _Lines()
    lg = logging.getLogger("scope_stream.transport.control_gate")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield h
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)


# ------------------------------------------------------------------- the scan's control endpoint
@pytest.fixture
def server() -> Iterator[ControlServer]:
    srv = ControlServer(_Handler()).start()
    try:
        yield srv
    finally:
        srv.close()


def test_scan_control_answers_others_while_a_client_floods_without_reading(
    server: ControlServer, gate_log: _Lines
) -> None:
    frame = json.dumps({"v": 1, "type": "status", "request_id": "f"}).encode()
    with _Flooder(server.endpoint, frame) as flood, ReimageClient(server.endpoint, timeout_s=ANSWER_S) as good:
        latencies = _well_behaved_during(flood, lambda: good.ping(timeout_s=ANSWER_S))
        assert good.status(timeout_s=ANSWER_S)["state"] == "scanning"
    assert flood.sent == FLOOD
    assert len(latencies) >= 5 and max(latencies) < ANSWER_S
    # the flooder's answers were dropped (its queue was full), not waited for; only it was affected
    stats = server.gate.stats()
    assert server.replies_dropped > 0 and stats["clients_dropping"] == 1, stats
    assert b"flooder" in server.gate.clients
    warned = [line for line in gate_log.lines if "does not read its replies" in line]
    assert len(warned) == 1 and "flooder" in warned[0], gate_log.lines  # once per client, not per answer


def test_a_muted_client_is_served_again_once_it_reads(server: ControlServer) -> None:
    gate = server.gate
    gate.mute_s = 0.3
    for _ in range(gate.mute_after):
        gate.dropped(b"slow")
    assert gate.muted(b"slow") and gate.stats()["clients_muted"] == 1
    time.sleep(0.35)
    assert not gate.muted(b"slow")
    gate.delivered(b"slow")
    assert gate.clients[b"slow"].in_a_row == 0


def _deep(n: int) -> bytes:
    return b'{"v": 1, "type": "ping", "request_id": "d", "pad": ' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (_deep(5000), "depth"),  # json.loads recursed: RecursionError, answered "failed"
        (_deep(33), "depth"),
        (b'{"v": 1, "type": "ping", "request_id": "i", "n": ' + b"9" * 5000 + b"}", "number"),  # ValueError
        (b'{"v": 1, "type": "ping", "request_id": "i", "n": 1' + b"0" * 400 + b"}", "number"),  # was answered pong
        (b'{"v": 1, "type": "reimage", "x_um": 1e400, "y_um": 1}', "number"),
        (b'{"v": 1, "type": "status", "n": -Infinity}', "number"),
    ],
    ids=["deep-5000", "deep-33", "int-5000-digits", "int-401-digits", "float-overflow", "infinity"],
)
def test_deep_nesting_and_huge_numbers_are_malformed(server: ControlServer, raw: bytes, what: str) -> None:
    with ReimageClient(server.endpoint, timeout_s=5) as client:
        reply = client.request(raw)
        assert reply["type"] == "error", reply
        assert reply["code"] == "malformed", reply
        assert reply["detail"].startswith(f"{what}: "), reply
        assert client.ping()  # and it keeps serving


# ------------------------------------------------------------------- the broker's control socket
@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(PipelineConfig(heartbeat_ms=100, worker_timeout_ms=2000))
    b.bind()
    t = threading.Thread(target=b.run, name="test-broker", daemon=True)
    t.start()
    try:
        yield b
    finally:
        b.request_stop(drain=False)
        t.join(15)
        assert not t.is_alive(), "the broker did not stop"


def test_broker_control_answers_others_while_a_client_floods_without_reading(broker: Broker, gate_log: _Lines) -> None:
    assert broker.endpoints is not None
    frame = json.dumps({"v": 1, "type": "stats", "req": "f"}).encode()  # ~1.5 KB answers
    good = ControlClient(broker.endpoints.control)

    def ping() -> bool:
        try:
            return good.request("ping", timeout=ANSWER_S)["type"] == "pong"
        except PipelineError:
            return False

    try:
        with _Flooder(broker.endpoints.control, frame) as flood:
            latencies = _well_behaved_during(flood, ping)
            assert good.stats(timeout=ANSWER_S)["control"]["clients_dropping"] == 1
        assert flood.sent == FLOOD
        assert len(latencies) >= 5 and max(latencies) < ANSWER_S
        stats = good.stats(timeout=ANSWER_S)
    finally:
        good.close()
    counts = stats["counts"]
    assert counts["control_replies_dropped"] > 0, counts
    assert stats["control"]["replies_dropped"] == counts["control_replies_dropped"]
    assert "internal" not in stats["rejected"]
    warned = [line for line in gate_log.lines if "does not read its replies" in line]
    assert len(warned) == 1 and "flooder" in warned[0], gate_log.lines
