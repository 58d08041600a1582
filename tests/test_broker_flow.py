"""The broker's flow control, in process, with real ZMQ sockets: a full pipe to a worker, dropped replies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from pipeline_support import make_tile

from scope_stream.config import PipelineConfig
from scope_stream.transport.broker import Broker
from scope_stream.transport.protocol import decode_header, encode, tile_frames


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker(PipelineConfig(heartbeat_ms=100, worker_timeout_ms=5000))
    b.bind()
    try:
        yield b
    finally:
        b.close()


def _pump(b: Broker, until: Any, timeout: float = 5.0) -> None:
    """Run the broker's socket handlers (not its loop) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the broker did not get there in time"
        b._drain_socket(b.frontend, b._on_frontend, 64)
        b._drain_socket(b.backend, b._on_backend, 64)
        time.sleep(0.01)


def _worker(b: Broker, name: str, credit: int) -> zmq.Socket[Any]:
    assert b.endpoints is not None
    s = b.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, name.encode())
    s.connect(b.endpoints.backend)
    s.send_multipart([encode("ready", credit=credit, name=name)])
    return s


def _received(sock: zmq.Socket[Any]) -> list[str]:
    """Tile ids a worker socket has been sent (heartbeats skipped)."""
    ids = []
    while sock.poll(200, zmq.POLLIN):
        frames = sock.recv_multipart()
        header = decode_header(frames[0])
        if header["type"] == "tile":
            ids.append(header["tile"]["tile_id"])
    return ids


def test_a_full_worker_pipe_keeps_its_credit_and_the_tile_goes_elsewhere(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert broker.endpoints is not None
    a, b = _worker(broker, "wa", 2), _worker(broker, "wb", 2)
    src = broker.ctx.socket(zmq.DEALER)
    src.setsockopt(zmq.LINGER, 0)
    src.connect(broker.endpoints.frontend)
    try:
        _pump(broker, lambda: len(broker.workers) == 2)
        for i in range(2):
            src.send_multipart(tile_frames(make_tile(i, "flow"), sent_at=time.time()))
        _pump(broker, lambda: len(broker.queue) == 2)

        # the first send to worker "wa" finds its pipe full (as when its I/O thread is starved)
        real_send = broker._send
        refused: list[bytes] = []

        def send_once_refused(sock: zmq.Socket[Any], frames: list[Any], *, copy: bool = False) -> bool:
            if sock is broker.backend and frames[0] == b"wa" and not refused:
                refused.append(frames[0])
                return False
            return real_send(sock, frames, copy=copy)

        monkeypatch.setattr(broker, "_send", send_once_refused)
        wa, wb = broker.workers[b"wa"], broker.workers[b"wb"]
        wa.last_used, wb.last_used = 0.0, 1.0  # equal credit: the less recently used "wa" is picked first
        broker._dispatch()
        assert refused == [b"wa"]
        assert wa.credit == 2 and not wa.held, "a refused send must not cost the worker its credit"
        assert broker.counts["dispatch_blocked"] == 1
        assert len(wb.held) == 2 and wb.credit == 0, "both tiles went to the other worker"
        assert sorted(_received(b)) == ["t0", "t1"]

        # once the block has passed, "wa" gets work again (it used to stay at credit 0 for good)
        time.sleep(0.06)
        src.send_multipart(tile_frames(make_tile(2, "flow"), sent_at=time.time()))
        _pump(broker, lambda: len(broker.queue) == 1)
        broker._dispatch()
        assert wa.held == {("flow", "t2")} and wa.credit == 1
        assert _received(a) == ["t2"]
    finally:
        for s in (a, b, src):
            s.close(linger=0)


def test_acks_have_room_and_an_undeliverable_reply_is_counted(broker: Broker) -> None:
    # acks must not share the tiles' high-water mark (8): a busy I/O thread then dropped them
    assert broker.frontend.getsockopt(zmq.SNDHWM) >= 1000
    broker._reply(broker.frontend, b"nobody-here", "ack", tile_id="x")
    assert broker.counts["replies_dropped"] == 1
